"""Issue 19: the python runner's torch runtime (`python -m export --runtime torch`) served through the real
Triton and the real gateway, on CPU (fp32, eager: what the runtime does without a GPU).

The session's tiny SD (imagen-v2) and SDXL (imagen-xl) diffusers folders are exported again with the torch
runtime and served by a Triton of this module's own (in .venv-triton, which holds both runtimes' packages). The
torch runtime must serve the tensors the ONNX graphs declare (so the manifests agree and the gateway is the same),
give the diffusers reference's image within the parity tolerance (tests/integration/reference.py) and the
onnxruntime runtime's within the same, and a dynamic batch of UNet rows at different timesteps must give what the
rows give one by one.

Issue 23: the tiny SD is exported with LoRA slots, as the session's ONNX one is (`loras` is an optional input: the
other tests' direct calls send none, which is no adapter): it declares what the ONNX export with slots declares,
and rows that name an adapter get diffusers' output with that adapter loaded, the other rows the plain model's.
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from PIL import Image, ImageDraw

from export.lora import LoraShape, branch_targets
from export.onnx_export import load_pipeline
from export.pipeline import ExportRequest, run_export
from export.repository import ServingOptions, config_parameters
from gateway.diffusion.manifest import load_manifests
from gateway.settings import PROJECT_ROOT
from gateway.triton.client import TritonEngine
from gateway.triton.server import TritonServer
from tests.helpers import data_uri, make_image
from tests.integration.conftest import GatewayFactory, Repository, start_own_triton
from tests.integration.reference import assert_parity, diffusers_img2img, gateway_sized, serve_first_image
from tests.lora_files import make_adapter

pytestmark = pytest.mark.integration

# The session's ONNX pipelines, and the names this module serves their weights under with the torch runtime.
TORCH_NAMES = {"imagen-v2": "imagen-v2-torch", "imagen-xl": "imagen-xl-torch"}
# A batched UNet call and the same rows one at a time: the same kernels on other shapes (observed ~1e-6 here;
# the onnxruntime runtime's bound in test_export and test_batch_split).
ATOL = 1e-5
# The torch pipeline with LoRA slots (issue 23), the session's pipeline it is exported from, and the adapter.
LORA_NAME, LORA_SOURCE, LORA_SHAPE = "imagen-v2-torch", "imagen-v2", LoraShape(4, 8)
ADAPTER, ADAPTER_SCALE = "x", 0.8
# A row with an adapter against diffusers with it loaded (PEFT's layers there, the bank's branches here; observed
# ~2e-6 on the UNet and the text encoder, whose outputs the adapter moves by ~1 and ~4).
LORA_ATOL = 1e-5


@pytest.fixture(scope="module")
def torch_triton(
    repository: Repository, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, TritonServer]]:
    repo = tmp_path_factory.mktemp("torch-runtime") / "models"
    for onnx_name, torch_name in TORCH_NAMES.items():
        request = ExportRequest(
            model_dir=repository.diffusers_dirs[onnx_name],
            repository=repo,
            name=torch_name,
            options=ServingOptions(runtime="torch"),
            lora=LORA_SHAPE if torch_name == LORA_NAME else None,
        )
        run_export(request, progress=False)
    # The runners' default LoRA folder: `loras/` beside the model repository (read when a request first names one).
    make_adapter(
        repository.diffusers_dirs[LORA_SOURCE],
        repo.parent / "loras" / f"{ADAPTER}.safetensors",
        seed=1,
        rank=4,
        alpha=8,
        text_encoders=True,
    )
    server = start_own_triton(repo, repo.parent / "tritonserver.log")
    try:
        server.wait_ready([m for manifest in load_manifests(repo).values() for m in manifest.models], timeout_s=300)
        yield repo, server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def torch_gateway(torch_triton: tuple[Path, TritonServer], make_gateway: GatewayFactory) -> Iterator[str]:
    repo, server = torch_triton
    with make_gateway(model_repository=repo, triton_url=server.grpc_url) as url:
        yield url


def _manifest(repo: Path, name: str) -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads((repo / f"{name}.pipeline.json").read_text())
    return manifest


@pytest.mark.parametrize("onnx_name", sorted(TORCH_NAMES))
def test_torch_runtime_serves_the_tensors_the_onnx_graphs_declare(
    repository: Repository, torch_triton: tuple[Path, TritonServer], onnx_name: str
) -> None:
    repo, _ = torch_triton
    onnx, torch = _manifest(repository.path, onnx_name), _manifest(repo, TORCH_NAMES[onnx_name])
    assert (onnx["runtime"], torch["runtime"]) == ("onnxruntime", "torch")
    assert torch["components"].keys() == onnx["components"].keys()
    for component, spec in onnx["components"].items():
        served = torch["components"][component]
        # `loras` (LoRA slots) aside: the session's ONNX imagen-xl has them, its torch export here does not.
        inputs = {k: v for k, v in served["inputs"].items() if k != "loras"}
        assert inputs == {k: v for k, v in spec["inputs"].items() if k != "loras"}, component
        assert served["outputs"] == spec["outputs"], component
        config = (repo / served["model"] / "config.pbtxt").read_text()
        assert 'key: "runtime" value: { string_value: "torch" }' in config
        assert not list((repo / served["model"] / "1").glob("*.onnx")), "the torch runtime needs no ONNX"
    for key in ("family", "native_resolution", "grid", "latent_channels", "scaling_factor", "scheduler", "dtype"):
        assert torch[key] == onnx[key], key
    assert {**torch["text"], "tokenizer": None} == {**onnx["text"], "tokenizer": None}


@pytest.mark.parametrize(
    ("onnx_name", "size", "guidance_scale", "negative_prompt"),
    [("imagen-v2", (160, 120), 7.5, "blurry, low quality"), ("imagen-xl", (128, 96), 5.0, "blurry, low quality")],
)
def test_torch_runtime_matches_diffusers_and_the_onnxruntime_runtime(
    gateway: str,
    torch_gateway: str,
    auth: dict[str, str],
    repository: Repository,
    onnx_name: str,
    size: tuple[int, int],
    guidance_scale: float,
    negative_prompt: str,
) -> None:
    source = make_image(*size, seed=11, fmt="PNG")
    body = {
        "image": data_uri(source),
        "prompt": "a castle on a hill, ink drawing",
        "negative_prompt": negative_prompt,
        "strength": 0.7,
        "steps": 10,
        "guidance_scale": guidance_scale,
        "seed": 99,
    }
    _, served = serve_first_image(torch_gateway, auth, {**body, "model": TORCH_NAMES[onnx_name]})
    _, by_onnxruntime = serve_first_image(gateway, auth, {**body, "model": onnx_name})

    manifest = repository.manifests[onnx_name]
    reference = diffusers_img2img(
        repository.diffusers_dirs[onnx_name],
        gateway_sized(source, manifest),
        prompt=str(body["prompt"]),
        negative_prompt=negative_prompt,
        strength=0.7,
        steps=10,
        guidance_scale=guidance_scale,
        seed=99,
        sdxl=manifest.family == "sdxl",
        latent_channels=manifest.latent_channels,
        vae_scale_factor=manifest.vae_scale_factor,
    )
    assert_parity(served, reference, f"{onnx_name} torch runtime vs diffusers")
    assert_parity(served, by_onnxruntime, f"{onnx_name} torch runtime vs onnxruntime runtime")


def test_a_masked_edit_on_the_torch_runtime_is_the_onnxruntime_runtimes(
    gateway: str, torch_gateway: str, auth: dict[str, str]
) -> None:
    """Issue 25: a masked edit (the per-step blend, the overlay) is the gateway's work between ordinary UNet calls,
    so the torch runtime serves what the onnxruntime one does, which test_inpainting compares with diffusers."""
    mask = Image.new("L", (80, 60), 0)
    ImageDraw.Draw(mask).ellipse((8, 6, 72, 54), fill=255)
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    body = {
        "image": data_uri(make_image(160, 120, seed=12, fmt="PNG")),
        "mask": data_uri(buffer.getvalue()),
        "prompt": "a castle on a hill, ink drawing",
        "strength": 1.0,
        "steps": 8,
        "seed": 98,
        "cache": False,
    }
    payload, served = serve_first_image(torch_gateway, auth, {**body, "model": TORCH_NAMES["imagen-v2"]})
    assert payload["masked"] is True
    _, by_onnxruntime = serve_first_image(gateway, auth, {**body, "model": "imagen-v2"})
    assert_parity(served, by_onnxruntime, "masked edit: torch runtime vs onnxruntime runtime")


def _unet_counts(client: grpcclient.InferenceServerClient, model: str) -> tuple[int, int]:
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def test_a_dynamic_batch_at_different_timesteps_equals_the_rows_one_by_one(
    torch_triton: tuple[Path, TritonServer],
) -> None:
    repo, server = torch_triton
    model = _manifest(repo, "imagen-xl-torch")["components"]["unet"]["model"]
    specs = _manifest(repo, "imagen-xl-torch")["components"]["unet"]["inputs"]
    rng = np.random.default_rng(5)
    timesteps = np.linspace(1, 999, 12)
    rows = [
        {
            name: np.array([[t]], dtype=np.float32)
            if name == "timestep"
            else rng.standard_normal([1] + [16 if d == -1 else d for d in spec["shape"][1:]]).astype(np.float32)
            for name, spec in specs.items()
        }
        for t in timesteps
    ]

    async def infer(client: grpcaio.InferenceServerClient, arrays: dict[str, np.ndarray]) -> np.ndarray:
        inputs = []
        for name, array in arrays.items():
            tensor = grpcaio.InferInput(name, list(array.shape), "FP32")
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        out: np.ndarray = (await client.infer(model, inputs)).as_numpy("out_sample")
        return out

    async def burst() -> list[np.ndarray]:
        client = grpcaio.InferenceServerClient(server.grpc_url)
        try:
            return await asyncio.gather(*(infer(client, row) for row in rows))
        finally:
            await client.close()

    async def one_by_one() -> list[np.ndarray]:
        client = grpcaio.InferenceServerClient(server.grpc_url)
        try:
            return [await infer(client, row) for row in rows]
        finally:
            await client.close()

    sync = grpcclient.InferenceServerClient(server.grpc_url)
    before = _unet_counts(sync, model)
    batched = asyncio.run(burst())
    after = _unet_counts(sync, model)
    alone = asyncio.run(one_by_one())
    sync.close()
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert inferences == len(rows)
    assert executions < inferences, f"{executions} executions for {inferences} rows: nothing was batched"
    for i, (merged, single) in enumerate(zip(batched, alone, strict=True)):
        np.testing.assert_allclose(merged, single, rtol=0, atol=ATOL, err_msg=f"row {i} (t={timesteps[i]:.0f})")


def test_the_device_runs_http_client_gets_what_the_gateways_grpc_client_gets(
    torch_triton: tuple[Path, TritonServer],
) -> None:
    """scripts/gpu_serve_check.py drives Triton over HTTP where the gateway's gRPC client is not installed."""
    repo, server = torch_triton
    scripts = str(PROJECT_ROOT / "scripts")
    sys.path.insert(0, scripts)
    try:
        from gpu_serve_check import HttpTriton
    finally:
        sys.path.remove(scripts)
    spec = _manifest(repo, "imagen-v2-torch")["components"]["unet"]
    rng = np.random.default_rng(3)
    inputs = {
        "sample": rng.standard_normal((2, 4, 16, 16)).astype(np.float32),
        "timestep": np.array([[10.0], [700.0]], dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float32),
    }

    async def both() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        http, grpc = HttpTriton(server.http_url, 30.0), TritonEngine(server.grpc_url, timeout_s=30.0)
        try:
            return (
                await http.infer(spec["model"], inputs, ["out_sample"]),
                await grpc.infer(spec["model"], inputs, ["out_sample"]),
            )
        finally:
            await http.close()
            await grpc.close()

    by_http, by_grpc = asyncio.run(both())
    assert by_http["out_sample"].shape == (2, 4, 16, 16)
    np.testing.assert_array_equal(by_http["out_sample"], by_grpc["out_sample"])


# --- issue 23: LoRA slots in the torch runtime -------------------------------------------------------------------


def test_the_torch_runtime_with_lora_slots_declares_what_the_onnx_export_declares(
    repository: Repository, torch_triton: tuple[Path, TritonServer]
) -> None:
    repo, _ = torch_triton
    onnx, torch = _manifest(repository.path, LORA_SOURCE), _manifest(repo, LORA_NAME)
    pipeline = load_pipeline(repository.diffusers_dirs[LORA_SOURCE])
    adapted = {"unet", "text_encoder"}
    for component, spec in onnx["components"].items():
        served = torch["components"][component]
        # The session's ONNX imagen-v2 may be exported with or without slots: `loras` aside, the same tensors.
        inputs = {k: v for k, v in served["inputs"].items() if k != "loras"}
        assert inputs == {k: v for k, v in spec["inputs"].items() if k != "loras"}, component
        assert served["outputs"] == spec["outputs"], component
        version = repo / served["model"] / "1"
        params = config_parameters((repo / served["model"] / "config.pbtxt").read_text())
        if component not in adapted:
            assert "loras" not in served["inputs"] and "lora_component" not in params, component
            assert not (version / "lora_branches.py").exists()
            continue
        assert served["inputs"]["loras"] == {"name": "loras", "datatype": "BYTES", "shape": [-1, 1]}, component
        assert {k: v for k, v in params.items() if k.startswith("lora_")} == {
            "lora_component": component,
            "lora_slots": "4",
            "lora_rank": "8",  # the torch runtime's own: the ONNX runner reads the rank from the graph's inputs
            "lora_layers_per_block": str(pipeline.unet.config.layers_per_block),
            "lora_base": "sd",
        }
        for runner_file in ("lora_bank.py", "lora_format.py", "lora_branches.py"):
            assert (version / runner_file).is_file(), f"{component}: {runner_file}"
    lora = torch["lora"]
    assert (lora["slots"], lora["rank"], lora["base"]) == (4, 8, "sd")
    assert lora["targets"] == {
        c: {layer: list(dims) for layer, dims in branch_targets(getattr(pipeline, c), c).items()} for c in adapted
    }
    if "lora" in onnx:  # traced from the ONNX graph's bank inputs there
        assert lora["targets"] == onnx["lora"]["targets"]


def _infer_rows(server: TritonServer, model: str, requests: list[dict[str, np.ndarray]], output: str) -> list[Any]:
    """The requests sent at once (one dynamic batch when Triton gathers them); each one's output, or its error."""
    datatypes = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64", np.dtype(object): "BYTES"}

    async def infer(client: grpcaio.InferenceServerClient, arrays: dict[str, np.ndarray]) -> Any:
        inputs = []
        for name, array in arrays.items():
            tensor = grpcaio.InferInput(name, list(array.shape), datatypes[array.dtype])
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        try:
            return (await client.infer(model, inputs)).as_numpy(output)
        except Exception as exc:  # tritonclient's InferenceServerException: the request's own error
            return exc

    async def burst() -> list[Any]:
        client = grpcaio.InferenceServerClient(server.grpc_url)
        try:
            return await asyncio.gather(*(infer(client, arrays) for arrays in requests))
        finally:
            await client.close()

    return asyncio.run(burst())


def test_lora_rows_get_diffusers_with_the_adapter_and_the_other_rows_the_plain_model(
    repository: Repository, torch_triton: tuple[Path, TritonServer]
) -> None:
    _, server = torch_triton
    models = {c: f"{LORA_NAME}_{c}" for c in ("unet", "text_encoder")}
    rng = np.random.default_rng(23)
    batch = 4
    adapted, plain = [0, 2], [1, 3]
    with_adapter = json.dumps([[ADAPTER, ADAPTER_SCALE]]).encode()
    loras = np.array([[with_adapter], [b""], [with_adapter], [b"[]"]], dtype=object)
    unet_inputs = {
        "sample": rng.standard_normal((batch, 4, 16, 16)).astype(np.float32),
        "timestep": np.array([[10.0], [400.0], [700.0], [999.0]], dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, 77, 32)).astype(np.float32),
    }
    input_ids = rng.integers(0, 1000, (batch, 77)).astype(np.int64)
    # The UNet: one request of the four rows, then each row a request of its own, sent at once; the text encoder:
    # the four rows in one request; and a request naming an adapter the folder lacks fails alone.
    unet_rows = [{**unet_inputs, "loras": loras}] + [
        {name: value[i : i + 1] for name, value in {**unet_inputs, "loras": loras}.items()} for i in range(batch)
    ]
    missing = {name: value[:1] for name, value in unet_inputs.items()}
    missing["loras"] = np.array([[b'[["missing", 1.0]]']], dtype=object)
    unet_served = _infer_rows(server, models["unet"], [*unet_rows, missing], "out_sample")
    (text_served,) = _infer_rows(
        server, models["text_encoder"], [{"input_ids": input_ids, "loras": loras}], "last_hidden_state"
    )
    assert "missing" in str(unet_served[-1]) and "no file" in str(unet_served[-1]), unet_served[-1]
    one_by_one = np.concatenate(unet_served[1:-1])

    import torch

    pipeline = load_pipeline(repository.diffusers_dirs[LORA_SOURCE])

    def reference() -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            unet = pipeline.unet(
                torch.from_numpy(unet_inputs["sample"]),
                torch.from_numpy(unet_inputs["timestep"].reshape(-1)),
                torch.from_numpy(unet_inputs["encoder_hidden_states"]),
            ).sample
            text = pipeline.text_encoder(torch.from_numpy(input_ids)).last_hidden_state
        return unet.numpy(), text.numpy()

    without = reference()
    adapter_file = torch_triton[0].parent / "loras" / f"{ADAPTER}.safetensors"
    pipeline.load_lora_weights(str(adapter_file.parent), weight_name=adapter_file.name, adapter_name=ADAPTER)
    pipeline.set_adapters([ADAPTER], [ADAPTER_SCALE])
    with_lora = reference()
    for label, served, plain_ref, lora_ref in [
        ("unet", unet_served[0], without[0], with_lora[0]),
        ("unet, a request a row", one_by_one, without[0], with_lora[0]),
        ("text_encoder", text_served, without[1], with_lora[1]),
    ]:
        assert np.abs(lora_ref - plain_ref).max() > 1000 * LORA_ATOL, f"{label}: the adapter changes little"
        np.testing.assert_allclose(served[adapted], lora_ref[adapted], rtol=0, atol=LORA_ATOL, err_msg=label)
        np.testing.assert_allclose(served[plain], plain_ref[plain], rtol=0, atol=LORA_ATOL, err_msg=label)
