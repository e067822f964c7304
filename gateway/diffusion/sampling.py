"""Pure numpy pieces of diffusers' StableDiffusionImg2ImgPipeline and StableDiffusionXLImg2ImgPipeline (0.39.0),
so the gateway can drive the denoising loop around Triton calls without torch. No I/O here; every function
mirrors one step of the diffusers pipeline and says which.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from gateway.diffusion.schedulers import SUPPORTED_SCHEDULERS, Scheduler, default_config

__all__ = [
    "MAX_SEED",
    "MIN_SEED",
    "apply_guidance",
    "blend_unmasked",
    "denormalize_latents_for_decode",
    "do_classifier_free_guidance",
    "draw_inpaint_noise",
    "draw_noise",
    "draw_noise_from",
    "get_img2img_timesteps",
    "image_seeds",
    "img2img_effective_steps",
    "img2img_scheduler_config",
    "latent_mask",
    "noise_generator",
    "prepare_initial_latents",
    "prepare_inpaint_latents",
    "sample_latents",
    "sdxl_add_time_ids",
    "sdxl_negative_is_zeros",
]

_F32 = np.float32


def img2img_effective_steps(num_inference_steps: int, strength: float) -> int:
    """How many denoising steps diffusers' img2img runs: `int(steps * strength)`, at most `steps`."""
    return min(int(num_inference_steps * strength), num_inference_steps)


def get_img2img_timesteps(scheduler: Scheduler, num_inference_steps: int, strength: float) -> tuple[np.ndarray, int]:
    """Skip the noisiest part of the schedule so img2img keeps `1 - strength` of the input image.

    Exactly `StableDiffusionImg2ImgPipeline.get_timesteps`: call `scheduler.set_timesteps(steps)` first.
    Returns `(timesteps to run, steps - t_start)`. Loop over the returned timesteps, not the count: for
    PNDM they are one longer (its schedule has `steps + 1` entries). The count is 0 when
    `int(steps * strength) == 0`; diffusers then fails later, so callers should reject that request.
    """
    t_start = max(num_inference_steps - img2img_effective_steps(num_inference_steps, strength), 0)
    begin = t_start * scheduler.order
    timesteps = scheduler.timesteps[begin:]
    scheduler.set_begin_index(begin)
    return timesteps, num_inference_steps - t_start


MIN_SEED = 0
MAX_SEED = 2**32 - 1  # numpy's legacy seeding range; what most clients expect a "seed" to be


def image_seeds(seed: int, count: int) -> list[int]:
    """Image i of a request uses seed + i (wrapping at MAX_SEED), so any image can be reproduced alone."""
    return [(seed + i) % (MAX_SEED + 1) for i in range(count)]


def noise_generator(seed: int) -> np.random.Generator:
    """The one generator a request image draws all its randomness from (PCG64, so it is portable)."""
    return np.random.Generator(np.random.PCG64(seed))


def draw_noise_from(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Draw (VAE sample noise, first-timestep noise) from `rng`, in the order diffusers draws them.

    Keep using `rng` afterwards (e.g. as `step(..., generator=rng)` of an ancestral scheduler) so one
    seed fixes the whole run.
    """
    vae_noise = rng.standard_normal(shape, dtype=_F32)
    timestep_noise = rng.standard_normal(shape, dtype=_F32)
    return vae_noise, timestep_noise


def draw_noise(seed: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """`draw_noise_from(noise_generator(seed), shape)`: two float32 standard-normal arrays of `shape`."""
    return draw_noise_from(noise_generator(seed), shape)


def draw_inpaint_noise(seed: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(VAE sample noise, first-timestep noise, masked image's VAE sample noise) of a masked request's image.

    The first two are `draw_noise(seed, shape)`'s draws, so a request without a mask keeps its pixels; the third
    is the next draw of the same generator (diffusers' `prepare_mask_latents` encodes the masked image after
    `prepare_latents` has drawn the starting noise).
    """
    rng = noise_generator(seed)
    vae_noise, timestep_noise = draw_noise_from(rng, shape)
    masked_noise = rng.standard_normal(shape, dtype=_F32)
    return vae_noise, timestep_noise, masked_noise


def sample_latents(
    latent_parameters: np.ndarray,
    noise: np.ndarray,
    scaling_factor: float,
    shift_factor: float | None = None,
) -> np.ndarray:
    """Sample the VAE posterior and scale it into the denoiser's latent space.

    `latent_parameters` is [B, 2C, h, w] = mean and logvar on the channel axis; this is diffusers'
    `DiagonalGaussianDistribution(...).sample()` with `noise` as its draw, then `scaling_factor * x`
    (Stable Diffusion img2img) or `(x - shift_factor) * scaling_factor` when `shift_factor` is given.
    """
    if latent_parameters.ndim < 2 or latent_parameters.shape[1] % 2:
        raise ValueError(f"latent_parameters need an even channel axis 1, got shape {latent_parameters.shape}")
    mean, logvar = np.split(latent_parameters, 2, axis=1)
    if noise.shape != mean.shape:
        raise ValueError(f"noise shape {noise.shape} does not match the latent shape {mean.shape}")
    logvar = np.clip(logvar, -30.0, 20.0)
    std = np.exp(0.5 * logvar)
    sample = mean + std * noise
    scale = _F32(scaling_factor)
    if shift_factor is not None:
        latents: np.ndarray = (sample - _F32(shift_factor)) * scale
    else:
        latents = scale * sample
    return latents


def do_classifier_free_guidance(guidance_scale: float) -> bool:
    """CFG runs (doubling the UNet batch) only when guidance_scale > 1, as in diffusers."""
    return guidance_scale > 1


def apply_guidance(noise_pred: np.ndarray, guidance_scale: float) -> np.ndarray:
    """Classifier-free guidance: uncond + g * (cond - uncond).

    `noise_pred` is [2B, ...] in diffusers' order, unconditional (negative prompt) rows first.
    """
    if noise_pred.shape[0] % 2:
        raise ValueError(f"guidance needs an even batch (uncond + cond), got {noise_pred.shape[0]}")
    uncond, cond = np.split(noise_pred, 2, axis=0)
    guided: np.ndarray = uncond + _F32(guidance_scale) * (cond - uncond)
    return guided


def prepare_initial_latents(
    scheduler: Scheduler, init_latents: np.ndarray, noise: np.ndarray, first_timestep: Any
) -> np.ndarray:
    """Noise the encoded image to the first timestep run (diffusers `prepare_latents` + `add_noise`)."""
    batch = init_latents.shape[0]
    timesteps = np.repeat(np.asarray(first_timestep).reshape(1), batch)
    return scheduler.add_noise(init_latents, noise, timesteps)


def prepare_inpaint_latents(
    scheduler: Scheduler,
    image_latents: np.ndarray | None,
    noise: np.ndarray,
    first_timestep: Any,
    is_strength_max: bool,
) -> np.ndarray:
    """The starting latents of a masked request (diffusers inpaint `prepare_latents`).

    At strength 1.0 (`is_strength_max`) pure noise scaled by the scheduler's `init_noise_sigma`, whatever the
    image; otherwise the image's latents noised to the first timestep, as img2img (`prepare_initial_latents`).
    """
    if is_strength_max:
        latents: np.ndarray = noise * _F32(scheduler.init_noise_sigma)
        return latents
    if image_latents is None:
        raise ValueError("image_latents are needed below strength 1.0")
    return prepare_initial_latents(scheduler, image_latents, noise, first_timestep)


def latent_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """The pixel mask `[B, 1, H, W]` at latent resolution: diffusers' `F.interpolate(mask, size=(H/f, W/f))`.

    Mode "nearest" reads source pixel `floor(dst * f)`, which for sides that are multiples of `factor` (the
    processed sizes always are) is the top-left pixel of each `factor` x `factor` block.
    """
    if mask.ndim != 4 or factor < 1 or mask.shape[2] % factor or mask.shape[3] % factor:
        raise ValueError(f"mask of shape {mask.shape} cannot be sampled every {factor} pixels")
    return np.ascontiguousarray(mask[:, :, ::factor, ::factor])


def blend_unmasked(
    scheduler: Scheduler,
    latents: np.ndarray,
    image_latents: np.ndarray,
    noise: np.ndarray,
    mask: np.ndarray,
    next_timestep: Any | None,
) -> np.ndarray:
    """After `scheduler.step`: keep the denoised latents where `mask` is 1, the image's elsewhere (4-channel UNet).

    diffusers' inpaint loop (SD 1294-1307): the image's latents are noised with the starting noise to the
    next timestep run (`next_timestep`), or taken clean after the last step (`None`), then
    `(1 - mask) * image + mask * latents`. `mask` is the latent mask (`latent_mask`), one row or one per row.
    Call it right after `step`: sigma schedulers' `add_noise` then reads the next sigma from their step index.
    """
    proper = image_latents
    if next_timestep is not None:
        timesteps = np.repeat(np.asarray(next_timestep).reshape(1), image_latents.shape[0])
        proper = scheduler.add_noise(image_latents, noise, timesteps)
    m = mask.astype(latents.dtype, copy=False)
    blended: np.ndarray = (1 - m) * proper + m * latents
    return blended


def denormalize_latents_for_decode(
    latents: np.ndarray, scaling_factor: float, shift_factor: float | None = None
) -> np.ndarray:
    """Undo `sample_latents`' scaling before `vae.decode`: latents / scaling_factor (+ shift_factor)."""
    out = latents / _F32(scaling_factor)
    if shift_factor is not None:
        out = out + _F32(shift_factor)
    return out


def img2img_scheduler_config(config: Mapping[str, Any], family: str = "sd") -> dict[str, Any]:
    """The scheduler config as `StableDiffusionImg2ImgPipeline.__init__` leaves it (SDXL's pipeline rewrites
    nothing: family "sdxl" gets the config verbatim).

    diffusers rewrites outdated configs when the pipeline is built: `steps_offset` becomes 1 and a true
    `clip_sample` becomes False (both judged on the config with the class defaults filled in, so a DDIM
    config without these keys is changed too). Apply this to a verbatim scheduler_config.json to get
    the schedule diffusers would actually run.
    """
    out = dict(config)
    if family == "sdxl":
        return out
    name = out.get("_class_name")
    filled: dict[str, Any] = dict(out)
    if isinstance(name, str) and name in SUPPORTED_SCHEDULERS:
        filled = {**default_config(name), **out}
    if filled.get("steps_offset", 1) != 1:
        out["steps_offset"] = 1
    if filled.get("clip_sample", False) is True:
        out["clip_sample"] = False
    return out


def sdxl_add_time_ids(
    height: int,
    width: int,
    *,
    requires_aesthetics_score: bool,
    aesthetic_score: float,
    negative_aesthetic_score: float,
) -> tuple[np.ndarray, np.ndarray]:
    """SDXL img2img's `_get_add_time_ids` with its defaults: (time ids, negative time ids), each [1, n] float32.

    The original and target sizes are the processed image's (height, width), the crop offset (0, 0). A refiner
    (`requires_aesthetics_score`) ends with the aesthetic score instead of the target size: 5 ids, not 6.
    """
    size, crop = (float(height), float(width)), (0.0, 0.0)
    if requires_aesthetics_score:
        ids, negative = [*size, *crop, aesthetic_score], [*size, *crop, negative_aesthetic_score]
    else:
        ids = negative = [*size, *crop, *size]
    return np.array([ids], dtype=_F32), np.array([negative], dtype=_F32)


def sdxl_negative_is_zeros(negative_prompt: str, force_zeros_for_empty_prompt: bool) -> bool:
    """SDXL's unconditional branch is all zeros (not the encoded "") when there is no negative prompt and the
    pipeline's config says `force_zeros_for_empty_prompt`. The API has no null/"" distinction after styling: an
    empty negative prompt is no negative prompt (diffusers' `negative_prompt=None`)."""
    return force_zeros_for_empty_prompt and negative_prompt == ""
