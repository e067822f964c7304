"""The diffusers reference run, fed the gateway's own seeded noise.

diffusers' img2img (SD and SDXL alike) draws two tensors with `randn_tensor`, in order: the VAE sample noise,
then the noise added at the first timestep. We patch `randn_tensor` in the two modules that call it so it
returns, in that order, the arrays `gateway.pipeline.draw_noise(seed, shape)` gives; the served pipeline draws
exactly those for a seed. The inpaint pipelines (masked edits) draw up to three, fed likewise from
`draw_inpaint_noise` (`seeded_like_gateway_inpaint`).
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from gateway.diffusion.manifest import PipelineManifest
from gateway.diffusion.sampling import draw_inpaint_noise, draw_noise
from gateway.media import codecs

# The parity tolerance of every family and scheduler: levels of 255 (max, and mean over all pixels).
MAX_LEVELS = 2
MAX_MEAN_LEVELS = 0.05


def gateway_sized(source: bytes, manifest: PipelineManifest) -> Image.Image:
    """The very image the gateway denoises: decoded and resized by the gateway's codec, for diffusers to get."""
    decoded = codecs.decode_image(source)
    width, height = codecs.fit_to_grid(decoded.width, decoded.height, manifest.native_resolution, manifest.grid)
    if decoded.size == (width, height):
        return decoded
    return decoded.resize((width, height), Image.Resampling.LANCZOS)


def assert_parity(served: np.ndarray, reference: np.ndarray, label: str = "") -> None:
    """Served and reference uint8 HWC pixels agree within the tolerance, and the comparison is not vacuous."""
    assert served.shape == reference.shape, (label, served.shape, reference.shape)
    diff = np.abs(served.astype(np.int16) - reference.astype(np.int16))
    summary = f"{label}: max {diff.max()} levels, mean {diff.mean():.4f}"
    assert diff.max() <= MAX_LEVELS, summary
    assert diff.mean() <= MAX_MEAN_LEVELS, summary
    assert reference.std() > 1.0, label  # the output is not flat


def serve_first_image(gateway: str, auth: dict[str, str], body: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray]:
    """POST `body` (a None `negative_prompt` is left out) to the real gateway; its JSON and the first image's
    uint8 HWC pixels, fetched from its URL."""
    body = {k: v for k, v in body.items() if not (k == "negative_prompt" and v is None)}
    response = httpx.post(f"{gateway}/v1/image-to-image", json=body, headers=auth, timeout=120)
    assert response.status_code == 200, response.text
    payload: dict[str, Any] = response.json()
    image = Image.open(io.BytesIO(httpx.get(payload["images"][0]["url"]).content)).convert("RGB")
    return payload, np.asarray(image)


@contextmanager
def seeded_like_gateway(seeds: list[int], latent_shape: tuple[int, ...], *, sdxl: bool = False) -> Iterator[None]:
    import diffusers.models.autoencoders.vae as vae_module
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as sd_module
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img as sdxl_module

    img2img_module: Any = sdxl_module if sdxl else sd_module

    draws = [draw_noise(seed, latent_shape) for seed in seeds]
    vae_noise = np.concatenate([d[0] for d in draws])
    start_noise = np.concatenate([d[1] for d in draws])
    # diffusers samples the VAE once for the single input image; image i of ours uses seed i's draw.
    with _randn_from([vae_noise[:1], start_noise], vae_module, img2img_module):
        yield


@contextmanager
def _randn_from(queue: list[np.ndarray], *modules: Any) -> Iterator[None]:
    """diffusers' `randn_tensor` in each of `modules` answers `queue`'s arrays in order (shapes checked); all of
    them must be drawn."""
    import torch

    def fake_randn(shape: Any, generator: Any = None, device: Any = None, dtype: Any = None, **_: Any) -> Any:
        assert queue, "diffusers drew more noise tensors than expected"
        array = queue.pop(0)
        assert tuple(shape) == array.shape, (tuple(shape), array.shape)
        return torch.from_numpy(array.copy()).to(dtype=dtype or torch.float32)

    saved = [module.randn_tensor for module in modules]
    for module in modules:
        module.randn_tensor = fake_randn
    try:
        yield
        assert not queue, "diffusers drew fewer noise tensors than expected"
    finally:
        for module, original in zip(modules, saved, strict=True):
            module.randn_tensor = original


def run_pipeline(
    pipe: Any,
    image: Image.Image,
    *,
    prompt: str,
    negative_prompt: str | None,
    strength: float,
    steps: int,
    guidance_scale: float,
) -> np.ndarray:
    """uint8 HWC pixels of one diffusers img2img call (the caller injects the gateway's noise around it)."""
    import torch

    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(
            prompt=prompt,
            image=image,
            strength=strength,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            negative_prompt=negative_prompt,
            output_type="np",
        ).images[0]
    return np.asarray((out * 255).round().astype(np.uint8))


def diffusers_img2img(
    model_dir: Path,
    image: Image.Image,
    *,
    prompt: str,
    negative_prompt: str | None,
    strength: float,
    steps: int,
    guidance_scale: float,
    seed: int,
    sdxl: bool = False,
    scheduler: dict[str, Any] | None = None,
    latent_channels: int = 4,
    vae_scale_factor: int = 8,
    loras: Sequence[tuple[Path, float]] = (),
) -> np.ndarray:
    """uint8 HWC pixels of diffusers' StableDiffusionImg2ImgPipeline (StableDiffusionXLImg2ImgPipeline with
    `sdxl`) on `image` (already at the served size), with the gateway's noise; `scheduler` (a config with
    `_class_name`) swaps the folder's scheduler through `from_config`; `loras` (file, scale) are loaded with
    diffusers' `load_lora_weights` and applied with `set_adapters`, as diffusers users apply them."""
    import diffusers

    pipe = load_diffusers_pipeline(model_dir, "Img2Img", sdxl=sdxl)
    if scheduler is not None:
        config = dict(scheduler)
        pipe.scheduler = getattr(diffusers, config.pop("_class_name")).from_config(config)
    if loras:
        names = [f"adapter{i}" for i in range(len(loras))]
        for name, (file, _) in zip(names, loras, strict=True):
            pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
        pipe.set_adapters(names, [scale for _, scale in loras])
    shape = (1, latent_channels, image.height // vae_scale_factor, image.width // vae_scale_factor)
    with seeded_like_gateway([seed], shape, sdxl=sdxl):
        return run_pipeline(
            pipe,
            image,
            prompt=prompt,
            negative_prompt=negative_prompt,
            strength=strength,
            steps=steps,
            guidance_scale=guidance_scale,
        )


# The inpaint pipelines (issue 25). diffusers' `StableDiffusion[XL]InpaintPipeline` draws, in order: the image's
# VAE sample (when a 4-channel UNet blends its latents back, or below strength 1.0), the starting noise, then the
# masked image's VAE sample (always, though a 4-channel UNet never reads it). The gateway draws the same three
# from one seed (`sampling.draw_inpaint_noise`); diffusers shares one VAE draw between images, so a single image.
INPAINT_MODULES = {
    False: "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint",
    True: "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint",
}


@contextmanager
def seeded_like_gateway_inpaint(
    seed: int, latent_shape: tuple[int, ...], *, sdxl: bool, encodes_image: bool
) -> Iterator[None]:
    """diffusers' inpaint draws fed the gateway's: `encodes_image` is false only for a 9-channel UNet at strength
    1.0 (diffusers' `is_strength_max` without `return_image_latents`), where the image itself is not encoded."""
    import importlib

    vae_module: Any = importlib.import_module("diffusers.models.autoencoders.vae")
    inpaint_module: Any = importlib.import_module(INPAINT_MODULES[sdxl])
    vae_noise, start_noise, masked_noise = draw_inpaint_noise(seed, latent_shape)
    queue = [*([vae_noise] if encodes_image else []), start_noise, masked_noise]
    with _randn_from(queue, vae_module, inpaint_module):
        yield


def load_diffusers_pipeline(model_dir: Path, kind: str, *, sdxl: bool) -> Any:
    """diffusers' `StableDiffusion[XL]<kind>Pipeline` ("Img2Img" or "Inpaint") on a saved folder (either kind of
    folder: the modules are the same), with no safety checker or watermark, as the gateway serves it."""
    import diffusers

    if sdxl:
        return getattr(diffusers, f"StableDiffusionXL{kind}Pipeline").from_pretrained(model_dir, add_watermarker=False)
    return getattr(diffusers, f"StableDiffusion{kind}Pipeline").from_pretrained(
        model_dir, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def load_inpaint_pipeline(model_dir: Path, *, sdxl: bool) -> Any:
    """diffusers' inpaint pipeline on a saved folder (an img2img or an inpaint one), its progress bar off."""
    pipe = load_diffusers_pipeline(model_dir, "Inpaint", sdxl=sdxl)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_inpaint(
    pipe: Any,
    image: Image.Image,
    mask: Image.Image,
    *,
    prompt: str,
    negative_prompt: str | None,
    strength: float,
    steps: int,
    guidance_scale: float,
    seed: int,
    mask_blur: int,
    latent_channels: int = 4,
    vae_scale_factor: int = 8,
) -> tuple[np.ndarray, Image.Image]:
    """uint8 HWC pixels of one diffusers inpaint call with the gateway's noise, and the blurred mask it used.

    `image` is already at the served size and `mask` an "L" image (255 = change) at the same size. As diffusers
    documents it: `mask_processor.blur(mask, blur_factor)`, the call (with `height`/`width`, or the pipeline
    would run at the UNet's native size), then `image_processor.apply_overlay(blurred, image, output)`."""
    import torch

    assert mask.mode == "L" and mask.size == image.size, (mask.mode, mask.size, image.size)
    blurred = pipe.mask_processor.blur(mask, blur_factor=mask_blur) if mask_blur else mask
    sdxl = "XL" in type(pipe).__name__
    encodes_image = pipe.unet.config.in_channels == 4 or strength < 1.0
    shape = (1, latent_channels, image.height // vae_scale_factor, image.width // vae_scale_factor)
    with seeded_like_gateway_inpaint(seed, shape, sdxl=sdxl, encodes_image=encodes_image), torch.no_grad():
        out = pipe(
            prompt=prompt,
            image=image,
            mask_image=blurred,
            height=image.height,
            width=image.width,
            strength=strength,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            negative_prompt=negative_prompt,
            output_type="pil",
        ).images[0]
    return np.asarray(pipe.image_processor.apply_overlay(blurred, image, out)), blurred
