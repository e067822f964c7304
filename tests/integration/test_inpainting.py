"""Issue 25: masked edits served by the real Triton and gateway equal diffusers' inpaint pipelines.

Parity: `StableDiffusionInpaintPipeline` / `StableDiffusionXLInpaintPipeline` on the same tiny random weights, the
same image, mask, strength, steps and noise (the gateway's seeded draws, `reference.seeded_like_gateway_inpaint`),
with diffusers' documented mask blur before the call and its `apply_overlay` after it, as the gateway does. The
tolerance is the img2img parity tests' (`reference.assert_parity`: at most 2 levels of 255, mean under 0.05), over
the whole image and over the generated pixels alone (where the blurred mask is 255). One case per path:

| model | UNet | scheduler | strength | mask | path |
|---|---|---|---|---|---|
| imagen-v2 (session) | 4 | PNDM | 1.0 | L, default blur (4) | pure-noise start, per-step blend, add_noise by alpha |
| imagen-xl (session) | 4 | Euler | 0.6 | L, blur 0 | add_noise start, sigma step-index blend, SDXL |
| v2-inpaint (module) | 9 | DDIM | 0.75 | L, blur 4 | 3 draws, one 2-row VAE encode, channel concatenation |
| xl-inpaint (module) | 9 | Euler | 1.0 | RGBA, alpha-0 hole, blur 0 | 2 draws, init_noise_sigma, the alpha rule, SDXL |

Each image is 160x120 (served at 128x96) with its mask sent at 80x60, so the mask is resized too. Observed: max 1
level, mean under 1e-4 (bit-identical for imagen-v2).

Outside the mask the input comes back after decoding (the overlay): bit-exact where the blurred mask is 0, and at
most m + 1 levels off where it is m in 1..127 (the overlay's feathering, a fraction m/255 of the generated pixel,
plus one level of Pillow's premultiplied-alpha rounding).

The two 9-channel models are exported into the session Triton's `module_models` repository and loaded there (Triton
loads them in its own processes while the 4-channel cases run), with a gateway of their own; unloaded at the end.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image, ImageDraw
from tritonclient.utils import InferenceServerException

from export.pipeline import ExportRequest, run_export
from export.repository import DEFAULTS
from export.tiny import build_random_pipeline
from gateway.diffusion.manifest import PipelineManifest, load_manifest
from gateway.triton.server import TritonServer
from tests.helpers import batch_sizes, data_uri, make_image
from tests.integration.conftest import GatewayFactory, Repository
from tests.integration.reference import (
    MAX_LEVELS,
    assert_parity,
    diffusers_inpaint,
    gateway_sized,
    load_inpaint_pipeline,
    serve_first_image,
)

pytestmark = pytest.mark.integration

SOURCE_SIZE, MASK_SIZE = (160, 120), (80, 60)
SEED, PROMPT, NEGATIVE = 2468, "a wooden boat on a calm lake", "blurry, low quality"
# The tiny 9-channel pipelines: name -> build_random_pipeline's arguments.
INPAINTING: dict[str, dict[str, Any]] = {
    "v2-inpaint": {"seed": 3, "scheduler": "ddim"},
    "xl-inpaint": {"seed": 4, "scheduler": "euler", "arch": "sdxl"},
}


@dataclass(frozen=True)
class Exported:
    """The 9-channel models: diffusers folders, manifests, and the session Triton loading their Triton models."""

    diffusers_dirs: dict[str, Path]
    manifests: dict[str, PipelineManifest]
    loads: list[Future[None]]


def _load(grpc_url: str, model: str) -> None:
    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        client.load_model(model)
    finally:
        client.close()


@pytest.fixture(scope="module", autouse=True)
def exported(module_models: Path, triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exported]:
    """Build and export each 9-channel pipeline, and have the session Triton load its models right away, without
    waiting: the next export and the 4-channel tests run meanwhile. Unloaded and removed at the end."""
    root = tmp_path_factory.mktemp("inpaint")
    before = set(module_models.iterdir())
    folders: dict[str, Path] = {}
    manifests: dict[str, PipelineManifest] = {}
    pool = ThreadPoolExecutor(max_workers=8)
    loads: list[Future[None]] = []
    try:
        for name, kwargs in INPAINTING.items():
            folders[name] = build_random_pipeline(root / name, size="tiny", inpainting=True, **kwargs)
            # The export's own ONNX-vs-torch check on the SD one (the UNet traced with 9 channels, the decoder fed
            # the VAE's 4); parity covers both.
            validate = name == "v2-inpaint"
            request = ExportRequest(model_dir=folders[name], repository=module_models, name=name, validate=validate)
            run_export(request, progress=False)
            manifests[name] = load_manifest(module_models / f"{name}.pipeline.json")
            loads += [pool.submit(_load, triton.grpc_url, model) for model in manifests[name].models]
        yield Exported(folders, manifests, loads)
    finally:
        pool.shutdown(wait=True)
        client = grpcclient.InferenceServerClient(triton.grpc_url)
        try:
            for manifest in manifests.values():
                for model in manifest.models:
                    with contextlib.suppress(InferenceServerException):  # one that failed to load
                        client.unload_model(model)
        finally:
            client.close()
        for path in set(module_models.iterdir()) - before:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


@pytest.fixture(scope="module")
def inpaint_gateway(
    exported: Exported, triton: TritonServer, module_models: Path, make_gateway: GatewayFactory
) -> Iterator[str]:
    """A gateway serving the 9-channel models (the session Triton's `module_models`), once they are loaded."""
    for load in exported.loads:
        load.result()
    triton.wait_ready([m for manifest in exported.manifests.values() for m in manifest.models])
    with make_gateway(model_repository=module_models) as url:
        yield url


def _ellipse_mask(size: tuple[int, int]) -> Image.Image:
    """An "L" mask, 255 inside a centred ellipse (the area to change), 0 elsewhere: about half the image."""
    width, height = size
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).ellipse((width * 0.1, height * 0.1, width * 0.9, height * 0.9), fill=255)
    return mask


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _alpha_hole(mask: Image.Image) -> Image.Image:
    """OpenAI's convention for `mask`'s area: RGBA, fully transparent there, opaque white elsewhere. Its RGB is
    black in the hole, so read by luminance it would say the opposite."""
    hole = np.asarray(mask) >= 128
    rgba = np.full((*hole.shape, 4), 255, dtype=np.uint8)
    rgba[hole] = (0, 0, 0, 0)
    return Image.fromarray(rgba, "RGBA")


@dataclass(frozen=True)
class Case:
    model: str
    strength: float
    steps: int
    guidance_scale: float
    mask_blur: int | None  # None: not sent (the default, 4)
    alpha_mask: bool = False
    negative_prompt: str | None = NEGATIVE


def _check_case(case: Case, url: str, auth: dict[str, str], manifest: PipelineManifest, folder: Path) -> None:
    """Serve the case, compare it with diffusers' inpaint pipeline, and check the pixels outside the mask."""
    source = make_image(*SOURCE_SIZE, seed=11, fmt="PNG")
    mask = _ellipse_mask(MASK_SIZE)
    body: dict[str, Any] = {
        "image": data_uri(source),
        "mask": data_uri(_png(_alpha_hole(mask) if case.alpha_mask else mask)),
        "prompt": PROMPT,
        "negative_prompt": case.negative_prompt,
        "model": case.model,
        "strength": case.strength,
        "steps": case.steps,
        "guidance_scale": case.guidance_scale,
        "seed": SEED,
        "cache": False,
    }
    if case.mask_blur is not None:
        body["mask_blur"] = case.mask_blur
    blur = 4 if case.mask_blur is None else case.mask_blur
    payload, served = serve_first_image(url, auth, body)
    assert (payload["masked"], payload["mask_blur"]) == (True, blur)

    resized = gateway_sized(source, manifest)
    assert served.shape == (resized.height, resized.width, 3) == (96, 128, 3)
    reference, blurred = diffusers_inpaint(
        load_inpaint_pipeline(folder, sdxl=manifest.family == "sdxl"),
        resized,
        mask.resize(resized.size, Image.Resampling.LANCZOS),
        prompt=PROMPT,
        negative_prompt=case.negative_prompt,
        strength=case.strength,
        steps=case.steps,
        guidance_scale=case.guidance_scale,
        seed=SEED,
        mask_blur=blur,
        latent_channels=manifest.latent_channels,
        vae_scale_factor=manifest.vae_scale_factor,
    )
    assert_parity(served, reference, case.model)
    m = np.asarray(blurred)
    generated = m == 255  # no input pasted back there: the model's pixels alone
    assert generated.mean() > 0.25, generated.mean()
    assert_parity(served[generated][None], reference[generated][None], f"{case.model}, generated pixels")

    # Outside the mask: the input itself, feathered by the blurred mask's grey levels.
    original = np.asarray(resized).astype(np.int16)
    diff = np.abs(served.astype(np.int16) - original).max(axis=2)
    kept, feathered = m == 0, (m > 0) & (m < 128)
    assert kept.mean() > 0.1 and feathered.any()
    assert diff[kept].max() == 0
    assert (diff[feathered] <= m[feathered].astype(np.int16) + 1).all(), (diff - m)[feathered].max()
    assert diff[generated].mean() > 10 * MAX_LEVELS  # the masked area really changed


FOUR_CHANNEL = [
    Case("imagen-v2", strength=1.0, steps=10, guidance_scale=7.5, mask_blur=None),
    Case("imagen-xl", strength=0.6, steps=10, guidance_scale=5.0, mask_blur=0, negative_prompt=None),
]
NINE_CHANNEL = [
    Case("v2-inpaint", strength=0.75, steps=12, guidance_scale=7.5, mask_blur=4),
    Case("xl-inpaint", strength=1.0, steps=8, guidance_scale=5.0, mask_blur=0, alpha_mask=True),
]


@pytest.mark.parametrize("case", FOUR_CHANNEL, ids=[c.model for c in FOUR_CHANNEL])
def test_a_masked_edit_on_a_4_channel_model_matches_diffusers_inpaint(
    case: Case, gateway: str, auth: dict[str, str], repository: Repository
) -> None:
    manifest = repository.manifests[case.model]
    assert not manifest.inpainting and manifest.family == ("sdxl" if "xl" in case.model else "sd")
    _check_case(case, gateway, auth, manifest, repository.diffusers_dirs[case.model])


def test_masked_and_unmasked_requests_share_unet_batches(
    gateway: str, auth: dict[str, str], repository: Repository, triton: TritonServer
) -> None:
    """A 4-channel UNet's calls are the same for masked and unmasked rows (the blend is numpy between steps), so
    Triton's dynamic batcher merges them. Without guidance each call carries exactly its images: the masked
    request's 1 row is the only odd contribution among 2-row unmasked calls, so an executed batch of odd size
    >= 3 held masked and unmasked rows together."""
    size = (128, 128)
    common = {"image": data_uri(make_image(*size, seed=3)), "prompt": PROMPT, "model": "imagen-v2", "steps": 20}
    common |= {"strength": 1.0, "guidance_scale": 1.0, "cache": False}
    masked = {**common, "mask": data_uri(_png(_ellipse_mask(size))), "seed": 5}
    unet = repository.manifests["imagen-v2"].unet.model

    before = batch_sizes(triton.grpc_url, unet)
    results: dict[str, np.ndarray] = {}
    errors: list[BaseException] = []

    def post(name: str, body: dict[str, Any]) -> None:
        try:
            results[name] = serve_first_image(gateway, auth, body)[1]
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    bodies = {"masked": masked} | {f"unmasked{i}": {**common, "num_images": 2, "seed": 6 + i} for i in range(3)}
    threads = [threading.Thread(target=post, args=item) for item in bodies.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    executed = batch_sizes(triton.grpc_url, unet) - before
    assert any(rows % 2 and rows >= 3 for rows in executed), executed

    # Sharing executions with other requests' rows leaves the masked image as it is alone.
    _, alone = serve_first_image(gateway, auth, masked)
    assert np.abs(alone.astype(np.int16) - results["masked"].astype(np.int16)).max() <= MAX_LEVELS


@pytest.mark.parametrize("case", NINE_CHANNEL, ids=[c.model for c in NINE_CHANNEL])
def test_a_masked_edit_on_an_inpainting_model_matches_diffusers_inpaint(
    case: Case, inpaint_gateway: str, auth: dict[str, str], exported: Exported
) -> None:
    manifest = exported.manifests[case.model]
    assert manifest.inpainting and manifest.sample_channels == 9
    assert manifest.family == ("sdxl" if "xl" in case.model else "sd")
    _check_case(case, inpaint_gateway, auth, manifest, exported.diffusers_dirs[case.model])


def test_an_inpainting_model_refuses_a_request_without_a_mask(inpaint_gateway: str, auth: dict[str, str]) -> None:
    body = {"image": data_uri(make_image(64, 64)), "prompt": PROMPT, "model": "xl-inpaint", "steps": 2}
    response = httpx.post(f"{inpaint_gateway}/v1/image-to-image", json=body, headers=auth, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and "'mask'" in error["message"], error
    by_id = {m["id"]: m for m in httpx.get(f"{inpaint_gateway}/v1/models", headers=auth).json()["data"]}
    assert by_id["xl-inpaint"]["inpainting"] is True and by_id["v2-inpaint"]["inpainting"] is True


def _tensor_dims(config: str, name: str) -> list[int]:
    match = re.search(rf'name: "{name}" data_type: \w+ dims: \[ ([^\]]*) \]', config)
    assert match is not None, config
    return [int(d) for d in match.group(1).split(",")]


@pytest.mark.parametrize("name", sorted(INPAINTING))
def test_an_inpainting_folder_exports_with_a_nine_channel_sample(
    exported: Exported, module_models: Path, name: str
) -> None:
    """`--model-dir` of diffusers' inpaint pipeline folders (SD and SDXL): the UNet's `in_channels` makes an
    inpainting model, its Triton config takes [9, h, w] and answers [4, h, w], the decoder takes the VAE's 4, and
    it defaults to strength 1.0."""
    index = json.loads((exported.diffusers_dirs[name] / "model_index.json").read_text())
    family = "sdxl" if INPAINTING[name].get("arch") == "sdxl" else "sd"
    assert (
        index["_class_name"]
        == {"sd": "StableDiffusionInpaintPipeline", "sdxl": "StableDiffusionXLInpaintPipeline"}[family]
    )
    manifest = json.loads((module_models / f"{name}.pipeline.json").read_text())
    assert manifest["family"] == family and manifest["inpainting"] is True
    assert (manifest["latent_channels"], manifest["unet_in_channels"]) == (4, 9)
    assert manifest["components"]["unet"]["inputs"]["sample"]["shape"] == [-1, 9, -1, -1]
    assert manifest["components"]["unet"]["outputs"]["out_sample"]["shape"] == [-1, 4, -1, -1]
    assert manifest["components"]["vae_decoder"]["inputs"]["latent_sample"]["shape"] == [-1, 4, -1, -1]
    assert manifest["defaults"] == {**DEFAULTS, "strength": 1.0}
    config = (module_models / f"{name}_unet" / "config.pbtxt").read_text()
    assert _tensor_dims(config, "sample") == [9, -1, -1]
    assert _tensor_dims(config, "out_sample") == [4, -1, -1]
    decoder = (module_models / f"{name}_vae_decoder" / "config.pbtxt").read_text()
    assert _tensor_dims(decoder, "latent_sample") == [4, -1, -1]
    loaded = exported.manifests[name]
    assert (loaded.latent_channels, loaded.sample_channels, loaded.inpainting) == (4, 9, True)
