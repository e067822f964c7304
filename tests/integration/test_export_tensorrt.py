"""Issue 14: TensorRT in the export, on a CPU machine.

What is checked here: every generated config.pbtxt (tensorrt and onnxruntime backends) parses into Triton's own
`ModelConfig`; each optimization profile covers 1..max_batch_size rows and every shape the gateway sends; the
fp16 ONNX the plans are built from runs in onnxruntime and matches the fp32 export; the build script's dry run
prints the exact commands, and its real run (trtexec replaced by a stub that writes the file it is told to, the
only fake: there is no TensorRT here) builds the missing plans only, atomically; the device check's tiny CPU mode
writes its JSON. What is not checked here: a real plan build, and Triton loading a plan (both need a GPU).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from export.lora import empty_lora_feeds_for
from export.onnx_export import COMPONENTS
from export.pipeline import ExportRequest, run_export
from export.repository import MANIFEST_SUFFIX, ServingOptions
from export.trt_build import RECIPE_FILE
from gateway.media.codecs import fit_to_grid
from gateway.settings import PROJECT_ROOT
from tests.integration.conftest import Repository

pytestmark = pytest.mark.integration

NAME = "imagen-v2"
MAX_BATCH = 8  # not the default, so the value is seen to travel from the options into configs and profiles
# fp16 vs fp32 on the tiny model: max |fp16 - fp32| <= FP16_REL x max |fp32|, per component output. fp16 keeps
# 11 significant bits (~5e-4 relative per rounding) and the tiny graphs chain tens of rounded ops; observed
# 0.07-0.22 % here (text encoder 3.2e-3 of 3.0, UNet 3.2e-3 of 1.5, VAE decoder 7.3e-3 of 4.6), the bound leaves
# room for other CPUs' summation orders.
FP16_REL = 1e-2
# Image sizes clients send (w, h): square, both orientations, extreme aspect ratios, tiny and huge.
CLIENT_SIZES = [(512, 512), (1000, 333), (333, 1000), (4000, 10), (10, 4000), (1, 1), (129, 128)]
BUILD_SCRIPT = PROJECT_ROOT / "scripts" / "build-trt-plans.sh"


@pytest.fixture(scope="module")
def exports(repository: Repository, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same tiny pipeline as the session's fp32 `imagen-v2`, exported for the tensorrt and onnxruntime backends."""
    root = tmp_path_factory.mktemp("tensorrt")
    out = {}
    for backend in ("tensorrt", "onnxruntime"):
        out[backend] = root / backend / "models"
        # The tensorrt export with Triton's priority levels (`--triton-priority-levels`), onnxruntime without.
        options = ServingOptions(
            backend=backend, max_batch_size=MAX_BATCH, triton_priority_levels=backend == "tensorrt"
        )
        # `--fp16` for onnxruntime: the same converter as the plans' ONNX (tensorrt implies it).
        request = ExportRequest(
            model_dir=repository.diffusers_dirs[NAME],
            repository=out[backend],
            name=NAME,
            options=options,
            fp16=backend == "onnxruntime",
            validate=False,  # the ONNX-vs-torch check is test_export.py's
        )
        run_export(request, progress=False)
    return out


def manifest(repository: Path) -> dict[str, Any]:
    raw: dict[str, Any] = json.loads((repository / f"{NAME}{MANIFEST_SUFFIX}").read_text())
    return raw


def parse_config(model_dir: Path) -> Any:
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def shapes_arg(profile: dict[str, dict[str, list[int]]], which: str) -> str:
    return ",".join(f"{name}:{'x'.join(map(str, p[which]))}" for name, p in profile.items())


def test_every_config_parses_into_tritons_model_config(exports: dict[str, Path]) -> None:
    """Both backends: one config per manifest component (whatever components it lists), Triton's schema, the
    manifest's tensor names, types and shapes; timestep per sample via reshape; the backend's own parts."""
    type_names = dict(model_config_pb2.DataType.items())
    for backend, repo in exports.items():
        raw = manifest(repo)
        assert raw["dtype"] == "float16"
        assert set(raw["components"]) == set(COMPONENTS)
        assert {p.name for p in repo.iterdir() if p.is_dir()} == {c["model"] for c in raw["components"].values()}
        for component, entry in raw["components"].items():
            config = parse_config(repo / entry["model"])
            assert config.name == entry["model"]
            assert config.max_batch_size == MAX_BATCH
            assert config.HasField("dynamic_batching")
            # Priority levels when asked for (issue 24): the gateway's levels 1..3, default 2; else none.
            batching = config.dynamic_batching
            levels = (3, 2) if backend == "tensorrt" else (0, 0)
            assert (batching.priority_levels, batching.default_priority_level) == levels, (backend, component)
            for tensors, declared in ((config.input, entry["inputs"]), (config.output, entry["outputs"])):
                assert [t.name for t in tensors] == list(declared), (backend, component)
                for tensor in tensors:
                    spec = declared[tensor.name]
                    assert tensor.data_type == type_names[f"TYPE_{spec['datatype']}"]
                    if len(spec["shape"]) == 1:  # a per-sample scalar: [1] per request, [batch] to the model
                        assert list(tensor.dims) == [1] and tensor.HasField("reshape")
                        assert list(tensor.reshape.shape) == []
                    else:
                        assert list(tensor.dims) == spec["shape"][1:] and not tensor.HasField("reshape")
            if backend == "tensorrt":
                assert (config.platform, config.backend) == ("tensorrt_plan", "")
                assert config.default_model_filename == "model.plan"
                (group,) = config.instance_group
                assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
                assert (repo / entry["model"] / RECIPE_FILE).is_file()
            else:
                assert config.backend == "onnxruntime"
                (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
                params = dict(accelerator.parameters)
                assert accelerator.name == "tensorrt"
                assert params["precision_mode"] == "FP16"
                assert params["trt_engine_cache_enable"] == "1"
                assert params["trt_engine_cache_path"] == f"{ServingOptions.trt_cache_dir}/ort/{entry['model']}"
                assert params["trt_timing_cache_path"].startswith(ServingOptions.trt_cache_dir + "/")
                # The same profile as the plan's (checked against the gateway's shapes below).
                recipe = json.loads((exports["tensorrt"] / entry["model"] / RECIPE_FILE).read_text())
                for which in ("min", "opt", "max"):
                    assert params[f"trt_profile_{which}_shapes"] == shapes_arg(recipe["profile"], which)


def test_each_profile_covers_the_batches_and_shapes_the_gateway_sends(exports: dict[str, Path]) -> None:
    """Batch 1..max_batch_size rows; fixed dims as the manifest; image sides over every size `fit_to_grid`
    gives the gateway for client images; trtexec's argv carries exactly that profile."""
    repo = exports["tensorrt"]
    raw = manifest(repo)
    factor = raw["vae_scale_factor"]
    sizes = [fit_to_grid(w, h, raw["native_resolution"], raw["grid"]) for w, h in CLIENT_SIZES]
    for component, entry in raw["components"].items():
        recipe = json.loads((repo / entry["model"] / RECIPE_FILE).read_text())
        assert recipe["max_batch_size"] == parse_config(repo / entry["model"]).max_batch_size == MAX_BATCH
        assert list(recipe["profile"]) == list(entry["inputs"])
        for name, spec in entry["inputs"].items():
            lo, opt, hi = (recipe["profile"][name][k] for k in ("min", "opt", "max"))
            assert len(lo) == len(opt) == len(hi) == len(spec["shape"])
            assert (lo[0], opt[0], hi[0]) == (1, MAX_BATCH, MAX_BATCH)
            for axis, dim in enumerate(spec["shape"][1:], start=1):
                if dim >= 0:
                    assert lo[axis] == opt[axis] == hi[axis] == dim, (component, name, axis)
            if -1 in spec["shape"][1:]:
                scale = factor if spec["shape"][1] == raw["latent_channels"] else 1
                for w, h in sizes:
                    assert lo[2] <= h // scale <= hi[2] and lo[3] <= w // scale <= hi[3], (component, w, h)
                # The native square is the common shape (the longer side is always native): the opt one.
                assert opt[2:] == [raw["native_resolution"] // scale] * 2
        argv = recipe["argv"]
        assert argv[:3] == ["trtexec", "--onnx=1/model.onnx", "--saveEngine=1/model.plan"]
        for which, flag in (("min", "--minShapes="), ("opt", "--optShapes="), ("max", "--maxShapes=")):
            assert flag + shapes_arg(recipe["profile"], which) in argv
        assert "--fp16" in argv
        assert f"--timingCacheFile={ServingOptions.trt_cache_dir}/timing.cache" in argv


def _feeds(session: ort.InferenceSession, raw: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    latent, batch = raw["native_resolution"] // raw["vae_scale_factor"], 2
    feeds = {}
    for arg in session.get_inputs():
        if arg.type == "tensor(int64)":
            feeds[arg.name] = rng.integers(0, 49408, (batch, raw["text"]["max_length"]), dtype=np.int64)
        elif arg.name == "timestep":
            feeds[arg.name] = np.array([981.0, 21.0], dtype=np.float32)
        else:
            channels = arg.shape[1]
            side = latent if channels == raw["latent_channels"] else raw["native_resolution"]
            shape = [batch, *(d if isinstance(d, int) else side for d in arg.shape[1:])]
            feeds[arg.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


@pytest.mark.parametrize("backend", ["tensorrt", "onnxruntime"])
def test_fp16_onnx_runs_on_cpu_and_matches_the_fp32_export(
    backend: str, exports: dict[str, Path], repository: Repository
) -> None:
    """The plans' ONNX (and `--fp16`'s): fp16 weights, fp32 (and int64) inputs/outputs as the gateway sends, only
    the served outputs; within FP16_REL of the session's fp32 export of the same weights, not bit-identical."""
    raw = manifest(exports[backend])
    rng = np.random.default_rng(14)
    for component, entry in raw["components"].items():
        path16 = exports[backend] / entry["model"] / "1" / "model.onnx"
        model = onnx.load(str(path16))
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer), component
        s16 = ort.InferenceSession(str(path16), providers=["CPUExecutionProvider"])
        s32 = ort.InferenceSession(
            str(repository.path / entry["model"] / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        assert [o.name for o in s16.get_outputs()] == list(entry["outputs"])
        # The session's imagen-v2 has LoRA slots (these exports have none): its graph also takes the bank.
        graph32 = {i.name: list(i.shape) for i in s32.get_inputs()}
        plain32 = [(i.name, i.type) for i in s32.get_inputs() if not i.name.startswith("lora")]
        assert [(i.name, i.type) for i in s16.get_inputs()] == plain32
        feeds = _feeds(s16, raw, rng)
        (out16,) = s16.run(None, feeds)
        no_adapter = empty_lora_feeds_for(graph32)
        out32 = dict(zip([o.name for o in s32.get_outputs()], s32.run(None, {**feeds, **no_adapter}), strict=True))
        (name,) = entry["outputs"]
        ref = out32[name]
        assert out16.dtype == np.float32 and out16.shape == ref.shape
        error = float(np.abs(out16 - ref).max())
        print(f"{backend} {component}: max |fp16 - fp32| = {error:.2e}, max |fp32| = {np.abs(ref).max():.2e}")
        assert 0 < error <= FP16_REL * float(np.abs(ref).max()), (component, error, float(np.abs(ref).max()))


def _run_build(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run([str(BUILD_SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60, check=False)


def test_build_script_dry_run_prints_the_exact_commands(exports: dict[str, Path]) -> None:
    repo = exports["tensorrt"]
    before = sorted(p for p in repo.rglob("*"))
    result = _run_build("--repository", str(repo), "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    expected = []
    for entry in sorted(manifest(repo)["components"].values(), key=lambda e: e["model"]):
        model_dir = repo / entry["model"]
        recipe = json.loads((model_dir / RECIPE_FILE).read_text())
        # Built into a .partial file, then renamed: otherwise exactly the recipe's command.
        argv = [a.replace("--saveEngine=1/model.plan", "--saveEngine=1/model.plan.partial") for a in recipe["argv"]]
        expected.append(f"cd {model_dir} && {' '.join(argv)}")
        expected.append(f"mv {model_dir}/1/model.plan.partial {model_dir}/1/model.plan")
    assert lines == expected
    assert f"# 4 of 4 plans to build in {repo}" in result.stdout
    assert sorted(p for p in repo.rglob("*")) == before, "a dry run writes nothing"


STUB_TRTEXEC = """#!/bin/sh
# trtexec stand-in: logs its folder and arguments, fails when FAIL_IN names its folder, else writes the engine.
echo "$(pwd) $*" >> "$STUB_LOG"
[ "$(basename "$(pwd)")" = "${FAIL_IN:-}" ] && { echo partial > 1/model.plan.partial; exit 3; }
for arg in "$@"; do
  case "$arg" in --saveEngine=*) echo "engine for $(basename "$(pwd)")" > "${arg#--saveEngine=}" ;; esac
done
"""


def test_build_script_builds_only_missing_plans_atomically(exports: dict[str, Path], tmp_path: Path) -> None:
    repo = tmp_path / "models"
    shutil.copytree(exports["tensorrt"], repo)
    stub, log, cache = tmp_path / "trtexec", tmp_path / "calls.log", tmp_path / "cache"
    stub.write_text(STUB_TRTEXEC)
    stub.chmod(0o755)
    os.environ["STUB_LOG"] = str(log)
    try:
        common = ("--repository", str(repo), "--trtexec", str(stub), "--cache-dir", str(cache))
        timing = ("--timing-cache", str(cache / "timing.cache"))
        result = _run_build(*common, *timing)
        assert result.returncode == 0, result.stderr
        models = sorted(c["model"] for c in manifest(repo)["components"].values())
        calls = log.read_text().splitlines()
        assert [c.split(" ", 1)[0] for c in calls] == [str(repo / m) for m in models]
        assert all(f"--timingCacheFile={cache / 'timing.cache'}" in c for c in calls)
        for model in models:
            assert (repo / model / "1" / "model.plan").read_text() == f"engine for {model}\n"
            assert not (repo / model / "1" / "model.plan.partial").exists()
        assert stat.S_IMODE(cache.stat().st_mode) == 0o2775, "Triton writes onnxruntime's engines there too"
        # Everything in place: nothing to do.
        result = _run_build(*common)
        assert result.returncode == 0 and "# 0 of 4 plans to build" in result.stdout
        assert len(log.read_text().splitlines()) == len(models)
        # A re-exported ONNX (newer than its plan) is rebuilt; a failed build leaves no plan and fails the run.
        unet = repo / f"{NAME}_unet"
        os.utime(unet / "1" / "model.plan", (1, 1))
        os.environ["FAIL_IN"] = unet.name
        result = _run_build(*common)
        assert result.returncode == 1 and f"{unet.name}: trtexec exited 3" in result.stderr
        assert not (unet / "1" / "model.plan.partial").exists()
        assert (unet / "1" / "model.plan").stat().st_mtime == 1, "the old plan is left as it was"
        del os.environ["FAIL_IN"]
        assert _run_build(*common).returncode == 0
        assert (unet / "1" / "model.plan").stat().st_mtime > 1
    finally:
        os.environ.pop("STUB_LOG", None)
        os.environ.pop("FAIL_IN", None)


def test_gpu_check_tiny_cpu_mode_writes_valid_json(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check.json"
    env = {**os.environ, "PYTHON": sys.executable}
    argv = [str(PROJECT_ROOT / "scripts" / "gpu-check.sh"), "--tiny", "--device", "cpu", "--rows", "1,2,4"]
    result = subprocess.run(
        [*argv, "--iters", "1", "--out", str(out)], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert (data["check"], data["version"], data["tiny"]) == ("gpu-check", 1, True)
    assert data["environment"]["device"] == "cpu"
    for section in ("unet", "vae_decoder", "exported"):
        rows = data[section]["rows"]
        assert [r["rows"] for r in rows] == [1, 2, 4], section
        base = rows[0]["ms_median"]
        for r in rows:
            assert r["ms_median"] > 0 and r["ms_per_row"] == pytest.approx(r["ms_median"] / r["rows"], rel=1e-3)
            assert r["per_row_speedup"] == pytest.approx(base / r["ms_per_row"], rel=1e-2)
    assert data["unet"]["dtype"] == "float16" and data["unet"]["attention"] == "AttnProcessor2_0"
    assert data["unet"]["per_sample_timestep_changes_row_1"] > 0
    for component in ("unet", "vae_decoder"):
        cmp = data["fp16_vs_fp32"][component]
        assert cmp["non_finite"] == 0 and 0 < cmp["max_rel_to_max"] < FP16_REL, cmp
    assert data["exported"]["status"] == "ok" and data["exported"]["providers"] == ["CPUExecutionProvider"]
