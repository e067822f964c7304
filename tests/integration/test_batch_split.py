"""Issue 18, item 4: a UNet whose batch policy is smaller than one request's rows still serves it.

The session's imagen-v2 diffusers folder is exported again with `--max-batch-size 2 --calibrate` (the tiny UNet
calibrates to 1 or 2 rows here), served by its own Triton with the CPU budget on, and a guided 2-image request
(4 UNet rows a step, which that Triton refuses in one call) gives what the session's unbounded imagen-v2 gives.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from export.pipeline import ExportRequest, run_export
from export.repository import ServingOptions
from gateway.diffusion.img2img import Generation, Img2ImgPipeline
from gateway.diffusion.manifest import PipelineManifest, load_manifest
from gateway.settings import Settings
from gateway.triton.client import TritonEngine
from gateway.triton.server import TritonServer
from tests.integration.conftest import Repository, start_own_triton

MAX_BATCH = 2
NAME = "imagen-b2"
# What test_export's batch-of-three check allows between a batched and a one-row UNet call on this runtime.
ATOL = 1e-5


@pytest.fixture(scope="module")
def bounded(repository: Repository, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, TritonServer]]:
    repo = tmp_path_factory.mktemp("bounded") / "models"
    request = ExportRequest(
        model_dir=repository.diffusers_dirs["imagen-v2"],
        repository=repo,
        name=NAME,
        options=ServingOptions(max_batch_size=MAX_BATCH),
        validate=False,
        calibrate=True,
    )
    run_export(request, progress=False)
    server = start_own_triton(repo, repo.parent / "tritonserver.log", cpu_budget=Settings().triton_cpu_budget)
    try:
        server.wait_ready(load_manifest(repo / f"{NAME}.pipeline.json").models)
        yield repo, server
    finally:
        server.stop()


def test_calibration_writes_one_policy_into_the_config_the_manifest_and_its_record(
    bounded: tuple[Path, TritonServer],
) -> None:
    repo, _ = bounded
    record = json.loads((repo / f"{NAME}_unet" / "calibration.json").read_text())
    policy = record["policy"]["max_batch_size"]
    assert 1 <= policy <= MAX_BATCH and set(record["seconds_per_row"]) <= {"1", "2"}
    assert record["settings"]["cpu_mem_arena"] == "1"  # timed as served: the config's session settings
    config = (repo / f"{NAME}_unet" / "config.pbtxt").read_text()
    assert f"max_batch_size: {policy}\n" in config
    assert "priority_levels" not in config  # the export had none (`--triton-priority-levels`): none added
    manifest = json.loads((repo / f"{NAME}.pipeline.json").read_text())
    assert manifest["components"]["unet"]["max_batch_size"] == policy
    for component in ("vae_encoder", "vae_decoder"):  # each VAE half measured too, at least 1 row
        vae = json.loads((repo / f"{NAME}_{component}" / "calibration.json").read_text())["policy"]
        assert 1 <= vae["max_batch_size"] <= MAX_BATCH and vae["max_queue_delay_us"] == 0
        assert manifest["components"][component]["max_batch_size"] == vae["max_batch_size"]
    assert manifest["components"]["text_encoder"]["max_batch_size"] == MAX_BATCH  # not calibrated


def _generation() -> Generation:
    rng = np.random.default_rng(7)
    return Generation(
        prompt="a lighthouse at dusk",
        negative_prompt="blurry",
        image=rng.uniform(-1, 1, (1, 3, 128, 128)).astype(np.float32),
        strength=0.8,
        steps=4,
        guidance_scale=7.5,  # guided: 2 images are 4 UNet rows a step
        seeds=[11, 12],
    )


async def _generate(manifest: PipelineManifest, url: str) -> np.ndarray:
    engine = TritonEngine(url, timeout_s=60)
    try:
        return (await Img2ImgPipeline(manifest, engine)(_generation())).images
    finally:
        await engine.close()


async def test_rows_over_the_unets_max_are_split_and_equal_the_unsplit_result(
    bounded: tuple[Path, TritonServer], repository: Repository, triton: TritonServer
) -> None:
    repo, server = bounded
    manifest = load_manifest(repo / f"{NAME}.pipeline.json")
    assert manifest.unet.max_batch_size is not None and manifest.unet.max_batch_size < 4
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:  # the bounded Triton would refuse the 4 rows in one call: the split is needed, not a no-op
        inputs = []
        for name, array in {
            "sample": np.zeros((4, 4, 16, 16), np.float32),
            "timestep": np.ones((4, 1), np.float32),
            "encoder_hidden_states": np.zeros((4, 77, 32), np.float32),
        }.items():
            inputs.append(grpcclient.InferInput(name, list(array.shape), "FP32"))
            inputs[-1].set_data_from_numpy(array)
        with pytest.raises(InferenceServerException, match="batch"):
            client.infer(manifest.unet.model, inputs)
        split = await _generate(manifest, server.grpc_url)
        stats = client.get_inference_statistics(manifest.unet.model, as_json=True)["model_stats"][0]
    finally:
        client.close()
    plain = await _generate(repository.manifests["imagen-v2"], triton.grpc_url)
    assert split.shape == plain.shape == (2, 3, 128, 128)
    np.testing.assert_allclose(split, plain, rtol=0, atol=ATOL)
    assert max(int(b["batch_size"]) for b in stats["batch_stats"]) <= manifest.unet.max_batch_size
