"""Issue 24: job priorities on the real Triton (the bundled tritonserver 2.51).

The gateway sends every call's priority. By default the exported batchers have no priority levels (measured
costly on Triton 2.51: export/repository.py), and Triton serves every priority as its one level: the session's
UNet answers the same at each of the gateway's priorities (0, 1, 2: Triton's levels 3, 2, 1), and so does a
whole pipeline. With `--triton-priority-levels` the batcher has three levels (default 2), which Triton loads and
serves every priority with, the same answers. The order in which Triton serves priorities is not observable in
its statistics; the gateway's own ordering is test_priority.py's.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from export.repository import render_dynamic_batching
from gateway.diffusion.img2img import Generation, Img2ImgPipeline
from gateway.triton.client import PRIORITY_LEVELS, TritonEngine
from gateway.triton.server import TritonServer
from tests.integration.conftest import Repository, start_own_triton

pytestmark = pytest.mark.integration

NAME = "imagen-v3"  # no LoRA slots: the UNet's inputs are the plain ones
PRIORITIES = range(PRIORITY_LEVELS)
PRIORITY_LINE = "priority_levels: 3 default_priority_level: 2 }"


def unet_feeds(repository: Repository) -> dict[str, np.ndarray]:
    """One guided step's 2 rows at the native size, as the gateway sends them (shapes from the manifest)."""
    rng = np.random.default_rng(24)
    manifest = repository.manifests[NAME]
    raw = json.loads(manifest.path.read_text())
    side = manifest.native_resolution // manifest.vae_scale_factor
    # A per-sample scalar (the timestep, `[-1]`) goes as `[rows, 1]`, as the gateway sends it.
    shapes = {
        s["name"]: [2] + ([side if d == -1 else d for d in s["shape"][1:]] or [1])
        for s in raw["components"]["unet"]["inputs"].values()
    }
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


async def unet_answers(url: str, repository: Repository) -> list[np.ndarray]:
    manifest = repository.manifests[NAME]
    feeds = unet_feeds(repository)
    (output,) = manifest.unet.outputs.values()
    engine = TritonEngine(url, timeout_s=30)
    try:
        return [(await engine.infer(manifest.unet.model, feeds, [output], priority=p))[output] for p in PRIORITIES]
    finally:
        await engine.close()


def test_the_default_export_has_no_priority_levels_and_triton_loads_it_so(
    repository: Repository, triton: TritonServer
) -> None:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        for manifest in repository.manifests.values():
            for model in manifest.models:
                batching = (repository.path / model / "config.pbtxt").read_text()
                (line,) = [row for row in batching.splitlines() if row.startswith("dynamic_batching")]
                assert "priority" not in line, (model, line)
                loaded = client.get_model_config(model).config.dynamic_batching
                assert (loaded.priority_levels, loaded.default_priority_level) == (0, 0), model
    finally:
        client.close()


async def test_the_unet_answers_the_same_at_every_priority(repository: Repository, triton: TritonServer) -> None:
    first, *others = await unet_answers(triton.grpc_url, repository)
    assert np.all(np.isfinite(first))
    for other in others:
        np.testing.assert_array_equal(other, first)


async def test_a_pipeline_at_the_lowest_and_highest_priority_gives_the_same_images(
    repository: Repository, triton: TritonServer
) -> None:
    gen = Generation(
        prompt="a lighthouse",
        negative_prompt="blurry",
        image=np.random.default_rng(1).uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32),
        strength=1.0,
        steps=2,
        guidance_scale=7.5,
        seeds=[5],
    )
    engine = TritonEngine(triton.grpc_url, timeout_s=30)
    try:
        pipeline = Img2ImgPipeline(repository.manifests[NAME], engine)
        low, high = [(await pipeline(gen, priority=p)).images for p in (0, PRIORITY_LEVELS - 1)]
    finally:
        await engine.close()
    np.testing.assert_array_equal(high, low)


async def test_a_model_exported_with_priority_levels_loads_them_and_serves_every_priority(
    repository: Repository, triton: TritonServer, tmp_path: Path
) -> None:
    """The same UNet with the batching line `--triton-priority-levels` writes, on a Triton of its own."""
    model = repository.manifests[NAME].unet.model
    leveled = tmp_path / "models"
    shutil.copytree(repository.path / model, leveled / model)
    config = leveled / model / "config.pbtxt"
    delay = re.search(r"max_queue_delay_microseconds: (\d+)", config.read_text())
    assert delay is not None
    line = render_dynamic_batching(int(delay[1]), priority_levels=True)
    config.write_text(re.sub(r"^dynamic_batching \{.*\}$", line, config.read_text(), flags=re.MULTILINE))
    assert PRIORITY_LINE in config.read_text()
    server = start_own_triton(leveled, tmp_path / "tritonserver.log")
    try:
        server.wait_ready([model])
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            loaded = client.get_model_config(model).config.dynamic_batching
        finally:
            client.close()
        answers = await unet_answers(server.grpc_url, repository)
    finally:
        server.stop()
    assert (loaded.priority_levels, loaded.default_priority_level) == (3, 2)
    served = await unet_answers(triton.grpc_url, repository)
    for answer in answers:
        np.testing.assert_array_equal(answer, served[0])
