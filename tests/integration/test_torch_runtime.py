"""Issue 19: the python runner's torch runtime (`python -m export --runtime torch`) served through the real
Triton and the real gateway, on CPU (fp32, eager: what the runtime does without a GPU).

The session's tiny SD (imagen-v2) and SDXL (imagen-xl) diffusers folders are exported again with the torch
runtime and served by a Triton of this module's own (in .venv-triton, which holds both runtimes' packages). The
torch runtime must serve the tensors the ONNX graphs declare (so the manifests agree and the gateway is the same),
give the diffusers reference's image within the parity tolerance (tests/integration/reference.py) and the
onnxruntime runtime's within the same, and a dynamic batch of UNet rows at different timesteps must give what the
rows give one by one.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio

from export.pipeline import ExportRequest, run_export
from export.repository import ServingOptions
from gateway.diffusion.manifest import load_manifests
from gateway.settings import PROJECT_ROOT
from gateway.triton.client import TritonEngine
from gateway.triton.server import TritonServer
from tests.helpers import data_uri, make_image
from tests.integration.conftest import GatewayFactory, Repository, start_own_triton
from tests.integration.reference import assert_parity, diffusers_img2img, gateway_sized, serve_first_image

pytestmark = pytest.mark.integration

# The session's ONNX pipelines, and the names this module serves their weights under with the torch runtime.
TORCH_NAMES = {"imagen-v2": "imagen-v2-torch", "imagen-xl": "imagen-xl-torch"}
# A batched UNet call and the same rows one at a time: the same kernels on other shapes (observed ~1e-6 here;
# the onnxruntime runtime's bound in test_export and test_batch_split).
ATOL = 1e-5


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
        )
        run_export(request, progress=False)
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
        assert (served["inputs"], served["outputs"]) == (spec["inputs"], spec["outputs"]), component
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
