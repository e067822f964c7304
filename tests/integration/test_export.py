"""Issue 2: ONNX export fidelity, per-sample timesteps, the repository in the real Triton, and the CLI's errors."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from onnx import numpy_helper

from export.layout import detect_family, missing_parts
from export.lora import empty_lora_feeds_for
from export.onnx_export import COMPONENTS, SDXL_COMPONENTS, fp16_components
from export.onnx_export import load_pipeline as load_diffusers
from export.pipeline import ExportRequest, run_export
from export.repository import ServingOptions
from export.validate import FP32_ATOL, check_components
from gateway.settings import PROJECT_ROOT
from gateway.triton.server import TritonServer
from tests.integration.conftest import Repository

pytestmark = pytest.mark.integration


def _onnx_path(repository: Repository, name: str, component: str) -> Path:
    return repository.path / f"{name}_{component}" / "1" / "model.onnx"


def test_each_onnx_component_matches_torch(repository: Repository) -> None:
    """The export's own check passes (export.validate: its units), and the tiny model holds the stricter 1e-4
    absolute on fp32 outputs (FP32_ATOL); observed errors are around 1e-6."""
    pipeline = load_diffusers(repository.diffusers_dirs["imagen-v2"])
    paths = {c: _onnx_path(repository, "imagen-v2", c) for c in COMPONENTS}
    checks = check_components(pipeline, paths, batch=2, seed=3)
    assert [c.component for c in checks] == list(COMPONENTS)
    for check in checks:
        assert check.within_tolerance and check.max_abs_error <= FP32_ATOL, check.describe()
    units = {c.component: c.unit for c in checks}
    assert units["vae_decoder"] == "levels of 255" and units["unet"] == "of the output's scale"


@pytest.mark.parametrize(
    ("component", "initializer", "factor"),
    [
        ("vae_decoder", "decoder.conv_out.weight", 1.02),  # every pixel 2% off: a few levels
        ("unet", "conv_out.weight", 1.02),
        ("text_encoder", "text_model.embeddings.position_embedding.weight", 1.02),
        ("vae_encoder", "quant_conv.weight", 1.02),
    ],
)
def test_the_export_check_catches_a_slightly_wrong_graph(
    repository: Repository, tmp_path: Path, component: str, initializer: str, factor: float
) -> None:
    """One weight 2% off in an otherwise right graph fails the check by a wide margin, as a wrong export would."""
    pipeline = load_diffusers(repository.diffusers_dirs["imagen-v2"])
    model = onnx.load(str(_onnx_path(repository, "imagen-v2", component)))
    (tensor,) = [t for t in model.graph.initializer if t.name == initializer]
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float32(factor), initializer))
    broken = tmp_path / "model.onnx"
    onnx.save(model, str(broken))
    (check,) = check_components(pipeline, {component: broken}, batch=2, seed=3)
    assert not check.within_tolerance and check.error > 3 * check.tolerance, check.describe()
    assert check.describe().startswith(f"{component}: ONNX output differs from torch by ")


def test_unet_batch_of_three_timesteps_equals_three_separate_calls(repository: Repository) -> None:
    session = ort.InferenceSession(str(_onnx_path(repository, "imagen-v2", "unet")))
    # imagen-v2 has LoRA slots: its bank inputs, with no adapter row.
    lora = empty_lora_feeds_for({i.name: list(i.shape) for i in session.get_inputs()})
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((3, 4, 16, 16)).astype(np.float32)
    timesteps = np.array([981.0, 500.0, 21.0], dtype=np.float32)
    hidden = rng.standard_normal((3, 77, 32)).astype(np.float32)
    batched = session.run(None, {"sample": sample, "timestep": timesteps, "encoder_hidden_states": hidden, **lora})[0]
    separate = np.concatenate(
        [
            session.run(
                None,
                {
                    "sample": sample[i : i + 1],
                    "timestep": timesteps[i : i + 1],
                    "encoder_hidden_states": hidden[i : i + 1],
                    **lora,
                },
            )[0]
            for i in range(3)
        ]
    )
    np.testing.assert_allclose(batched, separate, rtol=0, atol=1e-5)
    # And the timestep really is per sample: the same inputs at one shared timestep give something else.
    shared = session.run(
        None, {"sample": sample, "timestep": np.full(3, 500.0, np.float32), "encoder_hidden_states": hidden, **lora}
    )[0]
    assert np.abs(shared[0] - batched[0]).max() > 1e-3


def test_manifest_describes_the_models(repository: Repository) -> None:
    raw = json.loads((repository.path / "imagen-v2.pipeline.json").read_text())
    assert raw["native_resolution"] == 128 and raw["vae_scale_factor"] == 8 and raw["grid"] == 16
    assert raw["scaling_factor"] == pytest.approx(0.18215)
    assert raw["scheduler"]["_class_name"] == "PNDMScheduler"
    assert raw["components"]["unet"]["inputs"]["timestep"] == {"name": "timestep", "datatype": "FP32", "shape": [-1]}
    assert (repository.path / raw["text"]["tokenizer"]).is_file()
    assert json.loads((repository.path / "imagen-v3.pipeline.json").read_text())["scheduler"]["_class_name"] == (
        "EulerDiscreteScheduler"
    )


def test_sdxl_components_match_torch_and_the_manifest_describes_them(repository: Repository) -> None:
    """SDXL: five components; the text encoders serve the penultimate hidden state (and the second its pooled
    projection), the UNet takes `text_embeds` and the six `time_ids`. Same 1e-4 tolerance as SD."""
    pipeline = load_diffusers(repository.diffusers_dirs["imagen-xl"])
    assert type(pipeline).__name__ == "StableDiffusionXLImg2ImgPipeline"
    paths = {c: _onnx_path(repository, "imagen-xl", c) for c in SDXL_COMPONENTS}
    checks = check_components(pipeline, paths, batch=2, seed=3)
    assert [c.component for c in checks] == list(SDXL_COMPONENTS)
    for check in checks:
        assert check.within_tolerance and check.max_abs_error <= FP32_ATOL, check.describe()

    raw = json.loads((repository.path / "imagen-xl.pipeline.json").read_text())
    assert (raw["manifest_version"], raw["family"], raw["turbo"]) == (2, "sdxl", False)
    assert raw["sdxl"]["force_zeros_for_empty_prompt"] is True and raw["sdxl"]["requires_aesthetics_score"] is False
    comps = raw["components"]
    assert list(comps) == list(SDXL_COMPONENTS)
    assert comps["text_encoder"]["outputs"]["hidden_states"]["name"] == "hidden_states.1"  # 2 layers: [-2]
    assert set(comps["text_encoder_2"]["outputs"]) == {"hidden_states", "text_embeds"}
    assert comps["unet"]["inputs"]["time_ids"]["shape"] == [-1, 6]
    assert comps["unet"]["inputs"]["encoder_hidden_states"]["shape"] == [-1, 77, 64]  # 32 + 32, side by side
    assert [t["component"] for t in raw["text_encoders"]] == ["text_encoder", "text_encoder_2"]
    # tokenizer_2 pads with "!" (id 0), tokenizer with the end token, as SDXL's own do.
    tokenizers = [json.loads((repository.path / t["tokenizer"]).read_text()) for t in raw["text_encoders"]]
    pads = [t["padding"]["pad_id"] for t in tokenizers]
    assert pads == [49407, 0]

    turbo = json.loads((repository.path / "imagen-xl-turbo.pipeline.json").read_text())
    assert turbo["components"] == comps  # the variant serves the same Triton models
    assert turbo["turbo"] is True and turbo["scheduler"]["timestep_spacing"] == "trailing"
    assert turbo["defaults"] == {"steps": 2, "guidance_scale": 0.0, "strength": 0.5}


def test_sdxl_folder_layout_is_detected_and_checked(tmp_path: Path, repository: Repository) -> None:
    source = repository.diffusers_dirs["imagen-xl"]
    assert detect_family(source) == "sdxl" and detect_family(repository.diffusers_dirs["imagen-v2"]) == "sd"
    assert missing_parts(source) == []
    broken = tmp_path / "xl"
    shutil.copytree(source, broken, ignore=shutil.ignore_patterns("tokenizer_2", "*.safetensors"))
    missing = missing_parts(broken)
    assert "tokenizer_2/ (vocab.json + merges.txt, or tokenizer.json)" in missing
    assert "text_encoder_2/ weights (*.safetensors or *.bin)" in missing
    # A refiner lists no first text encoder: only the second is required.
    refiner = tmp_path / "refiner"
    shutil.copytree(source, refiner, ignore=shutil.ignore_patterns("text_encoder", "tokenizer"))
    index = json.loads((refiner / "model_index.json").read_text())
    (refiner / "model_index.json").write_text(json.dumps({**index, "text_encoder": [None, None]}))
    assert missing_parts(refiner) == []


def test_fp16_keeps_a_force_upcast_vae_in_fp32(repository: Repository) -> None:
    """diffusers runs an fp16 SDXL pipeline's VAE in fp32 when its config says `force_upcast` (it overflows in
    fp16); `--fp16` leaves the two VAE halves fp32 for such a VAE and converts them otherwise (and always for SD,
    whose pipelines ignore the flag)."""
    pipeline = load_diffusers(repository.diffusers_dirs["imagen-xl"])
    assert pipeline.vae.config.force_upcast
    assert fp16_components(pipeline, SDXL_COMPONENTS) == ("text_encoder", "text_encoder_2", "unet")
    pipeline.vae.register_to_config(force_upcast=False)  # a fixed fp16 VAE (madebyollin's sdxl-vae-fp16-fix)
    assert fp16_components(pipeline, SDXL_COMPONENTS) == SDXL_COMPONENTS
    sd = load_diffusers(repository.diffusers_dirs["imagen-v2"])  # SD's pipelines never upcast: all converted
    assert sd.vae.config.force_upcast and fp16_components(sd, COMPONENTS) == COMPONENTS


def test_fp16_sdxl_export_converts_all_but_the_vae(tmp_path: Path, repository: Repository) -> None:
    """The real `--fp16` path on the tiny SDXL: UNet and text encoders carry fp16 weights, the VAE halves none."""
    import onnx

    repo = tmp_path / "fp16"
    manifest = run_export(
        ExportRequest(
            model_dir=repository.diffusers_dirs["imagen-xl"], repository=repo, name="xl16", fp16=True, validate=False
        ),
        progress=False,
    )
    assert (manifest["dtype"], manifest["vae_dtype"]) == ("float16", "float32")

    def weight_types(component: str) -> set[int]:
        model = onnx.load(str(repo / f"xl16_{component}" / "1" / "model.onnx"))
        return {init.data_type for init in model.graph.initializer}

    fp16 = onnx.TensorProto.FLOAT16
    assert fp16 in weight_types("unet") and fp16 in weight_types("text_encoder_2")
    assert fp16 not in weight_types("vae_encoder") and fp16 not in weight_types("vae_decoder")


def test_tensorrt_plans_keep_a_force_upcast_vae_in_fp32(tmp_path: Path, repository: Repository) -> None:
    """`--backend tensorrt` on the tiny SDXL: the VAE halves' ONNX stays fp32 and their trtexec recipes build
    without `--fp16` (SDXL's VAE overflows in fp16); the UNet's is fp16."""
    import onnx

    repo = tmp_path / "trt"
    options = ServingOptions(backend="tensorrt")
    source = repository.diffusers_dirs["imagen-xl"]
    manifest = run_export(
        ExportRequest(model_dir=source, repository=repo, name="xlt", options=options, validate=False), progress=False
    )
    assert manifest["vae_dtype"] == "float32"
    for component, want_fp16 in (("unet", True), ("vae_encoder", False), ("vae_decoder", False)):
        recipe = json.loads((repo / f"xlt_{component}" / "plan.build.json").read_text())
        assert ("--fp16" in recipe["argv"]) is want_fp16, component
        weights = onnx.load(str(repo / f"xlt_{component}" / "1" / "model.onnx")).graph.initializer
        assert (onnx.TensorProto.FLOAT16 in {w.data_type for w in weights}) is want_fp16, component


def _shape(spec_shape: list[int], batch: int, spatial: int) -> list[int]:
    return [batch] + [spatial if d == -1 else d for d in spec_shape[1:]]


def test_every_model_is_ready_and_answers_with_the_right_shapes(repository: Repository, triton: TritonServer) -> None:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        for manifest_name in ("imagen-v2", "imagen-v3", "imagen-xl"):
            raw = json.loads((repository.path / f"{manifest_name}.pipeline.json").read_text())
            for component, spec in raw["components"].items():
                assert client.is_model_ready(spec["model"]), spec["model"]
                spatial = 128 if component == "vae_encoder" else 16
                inputs = []
                for tensor in spec["inputs"].values():
                    shape = _shape(tensor["shape"], 2, spatial)
                    if tensor["name"] == "timestep":
                        shape = [2, 1]  # Triton's per-sample scalar: dims [1], reshaped to [batch] for the graph
                    inp = grpcclient.InferInput(tensor["name"], shape, tensor["datatype"])
                    if tensor["datatype"] == "BYTES":  # `loras` (a model with LoRA slots): no adapter
                        inp.set_data_from_numpy(np.full(shape, b"", dtype=np.object_))
                    else:
                        dtype = np.int64 if tensor["datatype"] == "INT64" else np.float32
                        inp.set_data_from_numpy(np.ones(shape, dtype=dtype))
                    inputs.append(inp)
                result = client.infer(spec["model"], inputs)
                for tensor in spec["outputs"].values():
                    out = result.as_numpy(tensor["name"])
                    expected = {"vae_encoder": 16, "vae_decoder": 128}.get(component, 16)
                    assert list(out.shape) == _shape(tensor["shape"], 2, expected), (component, out.shape)
                    assert np.isfinite(out).all()
    finally:
        client.close()


def _unet_counts(client: grpcclient.InferenceServerClient, model: str) -> tuple[int, int]:
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def test_dynamic_batcher_merges_concurrent_unet_requests(repository: Repository, triton: TritonServer) -> None:
    model = "imagen-v2_unet"
    sync = grpcclient.InferenceServerClient(triton.grpc_url)
    before = _unet_counts(sync, model)
    rng = np.random.default_rng(1)

    async def one(client: grpcaio.InferenceServerClient, t: float) -> np.ndarray:
        arrays = {
            "sample": rng.standard_normal((1, 4, 16, 16)).astype(np.float32),
            "timestep": np.array([[t]], dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((1, 77, 32)).astype(np.float32),
        }
        inputs = []
        for name, array in arrays.items():
            inp = grpcaio.InferInput(name, list(array.shape), "FP32")
            inp.set_data_from_numpy(array)
            inputs.append(inp)
        return (await client.infer(model, inputs)).as_numpy("out_sample")

    async def burst() -> list[np.ndarray]:
        client = grpcaio.InferenceServerClient(triton.grpc_url)
        try:
            return await asyncio.gather(*(one(client, float(t)) for t in np.linspace(1, 999, 16)))
        finally:
            await client.close()

    outputs = asyncio.run(burst())
    after = _unet_counts(sync, model)
    sync.close()
    assert all(o.shape == (1, 4, 16, 16) for o in outputs)
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert inferences == 16
    assert executions < inferences, f"{executions} executions for {inferences} inferences: nothing was batched"


# --- CLI errors: exit code 2, one clear line, repository untouched -----------------------------------------


def _snapshot(path: Path) -> dict[str, tuple[int, int]]:
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))}


def _run_export(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "export", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def existing_repo(tmp_path: Path) -> Path:
    """A repository that already holds something, so 'left as it was' is a real check."""
    repo = tmp_path / "repo"
    (repo / "other_model" / "1").mkdir(parents=True)
    (repo / "other_model" / "config.pbtxt").write_text('name: "other_model"\n')
    (repo / "other.pipeline.json").write_text("{}\n")
    return repo


def _wrong_layout(tmp_path: Path) -> Path:
    folder = tmp_path / "not-a-pipeline"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text("{}")
    return folder


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing folder", "model folder not found"),
        ("wrong layout", "missing: model_index.json"),
        ("unknown backend", "invalid choice: 'tensorflow'"),
        ("unwritable output", "not writable"),
        ("bad name", "invalid --name"),
    ],
)
def test_cli_bad_input_exits_2_and_leaves_repository(
    case: str, expected: str, tmp_path: Path, existing_repo: Path, repository: Repository
) -> None:
    source = repository.diffusers_dirs["imagen-v2"]
    output = existing_repo
    if case == "missing folder":
        args = ["--model-dir", str(tmp_path / "nope")]
    elif case == "wrong layout":
        args = ["--model-dir", str(_wrong_layout(tmp_path))]
    elif case == "unknown backend":
        args = ["--model-dir", str(source), "--backend", "tensorflow"]
    elif case == "unwritable output":
        blocker = tmp_path / "a-file"
        blocker.write_text("not a folder")
        output = blocker / "repo"  # a path under a regular file cannot be created, even by root
        args = ["--model-dir", str(source)]
    else:
        args = ["--model-dir", str(source), "--name", "bad name/../x"]
    before = _snapshot(existing_repo)
    result = _run_export(*args, "--output", str(output))
    assert result.returncode == 2, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(error_lines) == 1 and expected in error_lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert _snapshot(existing_repo) == before
    assert not list(existing_repo.parent.glob(".*staging*"))


def test_cli_unwritable_output_directory(tmp_path: Path, repository: Repository) -> None:
    """A read-only repository (for a non-root user; root bypasses modes, so the test skips then)."""
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions; the under-a-file case covers root")
    repo = tmp_path / "ro"
    repo.mkdir()
    repo.chmod(0o500)
    result = _run_export("--model-dir", str(repository.diffusers_dirs["imagen-v2"]), "--output", str(repo))
    assert result.returncode == 2 and "not writable" in result.stderr


def test_cli_tiny_export_replaces_a_pipeline_atomically(tmp_path: Path, existing_repo: Path) -> None:
    before_other = _snapshot(existing_repo / "other_model")
    first = _run_export("--tiny", "--name", "t", "--output", str(existing_repo), "--no-validate")
    assert first.returncode == 0, first.stderr
    manifest_1 = json.loads((existing_repo / "t.pipeline.json").read_text())
    onnx_1 = (existing_repo / "t_unet" / "1" / "model.onnx").read_bytes()
    second = _run_export("--tiny", "--seed", "7", "--name", "t", "--output", str(existing_repo), "--no-validate")
    assert second.returncode == 0, second.stderr
    assert (existing_repo / "t_unet" / "1" / "model.onnx").read_bytes() != onnx_1  # new weights in place
    assert json.loads((existing_repo / "t.pipeline.json").read_text())["source"] != manifest_1["source"]
    assert _snapshot(existing_repo / "other_model") == before_other  # the other pipeline untouched
    assert sorted(p.name for p in existing_repo.iterdir()) == sorted(
        ["other_model", "other.pipeline.json", "t.pipeline.json"] + [f"t_{c}" for c in COMPONENTS]
    )
    assert not list(existing_repo.parent.glob(".*staging*"))
    assert "stage" in second.stderr  # the progress bar
    # The summary line reports what the export needed of the host (issue 20, item 2): a few hundred MB for tiny.
    peak = float(second.stdout.rsplit("peak RSS ", 1)[1].split(" GB")[0])
    assert 0.05 < peak < 8, second.stdout


def test_onnxruntime_backend_configs(tmp_path: Path, repository: Repository) -> None:
    """`--backend onnxruntime`: same model and tensor names, native backend, no model.py."""
    repo = tmp_path / "ort"
    result = _run_export(
        "--model-dir", str(repository.diffusers_dirs["imagen-v2"]), "--backend", "onnxruntime", "--no-validate",
        "--output", str(repo), "--max-batch-size", "8", "--max-queue-delay-us", "500", "--triton-priority-levels",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    config = (repo / "imagen-v2_unet" / "config.pbtxt").read_text()
    assert 'backend: "onnxruntime"' in config and "max_batch_size: 8" in config
    assert "max_queue_delay_microseconds: 500 priority_levels: 3 default_priority_level: 2 }" in config
    assert 'name: "timestep" data_type: TYPE_FP32 dims: [ 1 ] reshape: { shape: [ ] }' in config
    assert not (repo / "imagen-v2_unet" / "1" / "model.py").exists()
    python_config = (repository.path / "imagen-v2_unet" / "config.pbtxt").read_text()
    # The python runner's sessions keep the CPU arena (faster; the batch bound bounds what it holds).
    assert 'parameters { key: "cpu_mem_arena" value: { string_value: "1" } }' in python_config

    def tensors(text: str) -> list[str]:  # the python runner's model also takes `loras` (imagen-v2 has LoRA slots)
        lines = [line.rstrip(",") for line in text.splitlines() if "name:" in line and "data_type" in line]
        return [line for line in lines if '"loras"' not in line]

    assert tensors(config) == tensors(python_config)


def test_an_fp16_folder_is_exported_in_fp32_a_module_at_a_time(tmp_path: Path) -> None:
    """SDXL is published in fp16: such a folder loads as stored (mapped, not converted all at once) and each
    module goes to fp32 in its own export stage; the graphs are fp32 and pass the export's check."""
    import torch

    from export.onnx_export import stored_dtype
    from export.tiny import build_random_pipeline

    folder = build_random_pipeline(tmp_path / "fp32", size="tiny", seed=0, arch="sdxl")
    load_diffusers(folder).to(torch.float16).save_pretrained(tmp_path / "fp16")
    assert (stored_dtype(folder), stored_dtype(tmp_path / "fp16")) == ("float32", "float16")
    manifest = run_export(
        ExportRequest(model_dir=tmp_path / "fp16", repository=tmp_path / "repo", name="half"), progress=False
    )
    assert manifest["dtype"] == "float32"
    for component in SDXL_COMPONENTS:
        graph = onnx.load(str(tmp_path / "repo" / f"half_{component}" / "1" / "model.onnx")).graph
        floats = {
            onnx.TensorProto.DataType.Name(t.data_type)
            for t in graph.initializer
            if t.data_type != onnx.TensorProto.INT64
        }
        assert floats <= {"FLOAT"}, (component, floats)
