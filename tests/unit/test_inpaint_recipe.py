"""Issue 25, the recipe's masked modes over a fake Triton that records every feed: unmasked requests send what
img2img always sent; a masked request on a 4-channel UNet sends UNet calls indistinguishable from unmasked ones
(so Triton batches them together) and ends with the image's own latents outside the mask; an inpainting
(9-channel) UNet gets `[latents, mask, masked-image latents]`. The pixel parity with diffusers' inpaint
pipelines is an integration test."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from gateway.diffusion import sampling as math
from gateway.diffusion.img2img import Generation, Img2ImgPipeline
from gateway.diffusion.manifest import PipelineManifest
from gateway.diffusion.schedulers import Scheduler, make_scheduler
from gateway.errors import ERROR_TABLE, InvalidRequest
from tests.unit.fakes import FakeTriton, tiny_manifest

F = 8  # the tiny manifest's VAE factor
H, W = 32, 48  # a 4 x 6 latent grid


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (1, 3, H, W)).astype(np.float32)


def _mask() -> np.ndarray:
    """Change the top-left 16 x 24 pixels and one 8 x 8 block on the bottom row; keep the rest."""
    mask = np.zeros((1, 1, H, W), np.float32)
    mask[:, :, :16, :24] = 1
    mask[:, :, 24:, 40:] = 1
    return mask


def _gen(
    *,
    mask: np.ndarray | None = None,
    strength: float = 0.6,
    guidance: float = 5.0,
    seeds: Sequence[int] = (7, 8),
    image: np.ndarray | None = None,
) -> Generation:
    return Generation(
        "a cat",
        "dog",
        _image() if image is None else image,
        strength=strength,
        steps=6,
        guidance_scale=guidance,
        seeds=list(seeds),
        mask=mask,
    )


async def _run(manifest: PipelineManifest, gen: Generation) -> FakeTriton:
    triton = FakeTriton(manifest, encoder_sees_pixels=True)
    await Img2ImgPipeline(manifest, triton)(gen)  # type: ignore[arg-type]
    return triton


def _encoded(manifest: PipelineManifest, image: np.ndarray) -> np.ndarray:
    """The fake VAE encoder's answer for `image` (see `FakeTriton(encoder_sees_pixels=True)`)."""
    params = np.zeros((image.shape[0], 2 * manifest.latent_channels, H // F, W // F), np.float32)
    params[:, : manifest.latent_channels] = image[:, :1, ::F, ::F]
    return params


def _scheduler(manifest: PipelineManifest, gen: Generation) -> tuple[Scheduler, np.ndarray]:
    scheduler = make_scheduler(math.img2img_scheduler_config(dict(manifest.scheduler), manifest.family))
    scheduler.set_timesteps(gen.steps)
    timesteps, _ = math.get_img2img_timesteps(scheduler, gen.steps, gen.strength)
    return scheduler, timesteps


def _draws(seeds: Sequence[int], count: int = 3) -> tuple[np.ndarray, ...]:
    per = [math.draw_inpaint_noise(s, (1, 4, H // F, W // F)) for s in seeds]
    return tuple(np.concatenate([d[k] for d in per]) for k in range(count))


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"])
@pytest.mark.parametrize("guidance", [1.0, 5.0])
async def test_unmasked_requests_send_what_img2img_always_sent(tmp_path: Path, scheduler: str, guidance: float) -> None:
    """The img2img recipe written out here (before issue 25's branches), feed by feed, bit for bit."""
    manifest = tiny_manifest(tmp_path, scheduler=scheduler)
    gen = _gen(guidance=guidance)
    triton = await _run(manifest, gen)
    n, cfg = len(gen.seeds), guidance > 1
    assert [model for model, _ in triton.calls] == [
        "tiny_text_encoder", "tiny_vae_encoder", *["tiny_unet"] * 3, "tiny_vae_decoder",
    ]  # fmt: skip
    (vae_feed,) = triton.feeds["tiny_vae_encoder"]
    np.testing.assert_array_equal(vae_feed["sample_in"], gen.image)
    vae_noise, start_noise = _draws(gen.seeds, 2)
    init = math.sample_latents(np.repeat(_encoded(manifest, gen.image), n, 0), vae_noise, manifest.scaling_factor)
    sched, timesteps = _scheduler(manifest, gen)
    latents = math.prepare_initial_latents(sched, init, start_noise, timesteps[0])
    step_rng = np.random.Generator(np.random.PCG64([gen.seeds[0], n]))
    for t, feed in zip(timesteps, triton.feeds["tiny_unet"], strict=True):
        model_in = sched.scale_model_input(np.concatenate([latents, latents]) if cfg else latents, t)
        np.testing.assert_array_equal(feed["sample_in"], model_in.astype(np.float32))
        np.testing.assert_array_equal(feed["timestep_in"], np.full((len(model_in), 1), t, np.float32))
        pred = 0.1 * feed["sample_in"]  # the fake UNet's answer
        latents = sched.step(math.apply_guidance(pred, guidance) if cfg else pred, t, latents, generator=step_rng)
    (decoded,) = triton.feeds["tiny_vae_decoder"]
    np.testing.assert_array_equal(
        decoded["latent_sample_in"], math.denormalize_latents_for_decode(latents, manifest.scaling_factor)
    )


@pytest.mark.parametrize("strength", [0.6, 1.0])
async def test_a_masked_4_channel_request_calls_triton_as_an_unmasked_one(tmp_path: Path, strength: float) -> None:
    """The batching precondition: the same models, the same input names, dtypes and shapes, call by call."""
    manifest = tiny_manifest(tmp_path)
    plain = await _run(manifest, _gen(strength=strength))
    masked = await _run(manifest, _gen(strength=strength, mask=_mask()))
    assert masked.calls == plain.calls  # (model, {name: shape}) of every call, in order
    for model, feeds in plain.feeds.items():
        for ours, theirs in zip(masked.feeds[model], feeds, strict=True):
            assert {k: v.dtype for k, v in ours.items()} == {k: v.dtype for k, v in theirs.items()}
    # The image is encoded as it is (a 4-channel UNet never sees the masked image).
    np.testing.assert_array_equal(masked.feeds["tiny_vae_encoder"][0]["sample_in"], _image())


@pytest.mark.parametrize(
    "scheduler",
    ["DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"],
)
@pytest.mark.parametrize("strength", [0.6, 1.0])
async def test_after_the_last_step_the_kept_cells_are_the_images_latents_exactly(
    tmp_path: Path, scheduler: str, strength: float
) -> None:
    manifest = tiny_manifest(tmp_path, scheduler=scheduler)
    gen = _gen(strength=strength, mask=_mask())
    triton = await _run(manifest, gen)
    vae_noise, _, _ = _draws(gen.seeds)
    image_latents = math.sample_latents(
        np.repeat(_encoded(manifest, gen.image), len(gen.seeds), 0), vae_noise, manifest.scaling_factor
    )
    expected = math.denormalize_latents_for_decode(image_latents, manifest.scaling_factor)
    decoded = triton.feeds["tiny_vae_decoder"][0]["latent_sample_in"]
    keep = np.broadcast_to(math.latent_mask(_mask(), F) == 0, decoded.shape)
    assert keep.any() and not keep.all()
    np.testing.assert_array_equal(decoded[keep], expected[keep])  # bit-exact, no tolerance
    assert not np.array_equal(decoded[~keep], expected[~keep])  # the masked cells were denoised


async def test_at_strength_1_a_masked_request_starts_from_noise_alone(tmp_path: Path) -> None:
    """diffusers' is_strength_max: `noise * init_noise_sigma`, whatever the image (img2img would noise it)."""
    manifest = tiny_manifest(tmp_path, scheduler="EulerDiscreteScheduler")
    firsts = []
    for image in (_image(1), _image(2)):
        triton = await _run(manifest, _gen(strength=1.0, mask=_mask(), image=image))
        firsts.append(triton.feeds["tiny_unet"][0]["sample_in"])
    gen = _gen(strength=1.0)
    sched, timesteps = _scheduler(manifest, gen)
    start = _draws(gen.seeds)[1] * np.float32(sched.init_noise_sigma)
    expected = sched.scale_model_input(np.concatenate([start, start]), timesteps[0]).astype(np.float32)
    np.testing.assert_array_equal(firsts[0], expected)
    np.testing.assert_array_equal(firsts[1], expected)


@pytest.mark.parametrize("strength", [0.6, 1.0])
@pytest.mark.parametrize("guidance", [1.0, 5.0])
async def test_an_inpainting_unet_gets_latents_mask_and_masked_image_latents(
    tmp_path: Path, strength: float, guidance: float
) -> None:
    manifest = tiny_manifest(tmp_path, scheduler="EulerDiscreteScheduler", unet_in_channels=9)
    assert manifest.inpainting
    mask = _mask()
    gen = _gen(strength=strength, guidance=guidance, mask=mask)
    triton = await _run(manifest, gen)
    n, cfg = len(gen.seeds), guidance > 1
    # One VAE call: [image, masked image] below strength 1.0, the masked image alone at 1.0.
    (vae_feed,) = triton.feeds["tiny_vae_encoder"]
    masked_image = gen.image * (mask < 0.5)
    encoded = [masked_image] if strength == 1.0 else [gen.image, masked_image]
    np.testing.assert_array_equal(vae_feed["sample_in"], np.concatenate(encoded))
    _, start_noise, masked_noise = _draws(gen.seeds)
    masked_latents = math.sample_latents(
        np.repeat(_encoded(manifest, masked_image), n, 0), masked_noise, manifest.scaling_factor
    )
    lmask = np.repeat(math.latent_mask(mask, F), n, 0)
    rows = n * (2 if cfg else 1)
    unet_feeds = triton.feeds["tiny_unet"]
    for feed in unet_feeds:
        sample = feed["sample_in"]
        assert sample.shape == (rows, 9, H // F, W // F) and sample.dtype == np.float32
        np.testing.assert_array_equal(sample[:, 4:5], np.concatenate([lmask] * (rows // n)))
        np.testing.assert_array_equal(sample[:, 5:], np.concatenate([masked_latents] * (rows // n)))
    if strength == 1.0:  # pure noise first, as for a 4-channel UNet
        sched, timesteps = _scheduler(manifest, gen)
        start = start_noise * np.float32(sched.init_noise_sigma)
        first = sched.scale_model_input(np.concatenate([start] * (rows // n)), timesteps[0]).astype(np.float32)
        np.testing.assert_array_equal(unet_feeds[0]["sample_in"][:, :4], first)
    (decoded,) = triton.feeds["tiny_vae_decoder"]
    assert decoded["latent_sample_in"].shape == (n, 4, H // F, W // F)


async def test_an_inpainting_model_without_a_mask_is_a_400_naming_mask(tmp_path: Path) -> None:
    manifest = tiny_manifest(tmp_path, unet_in_channels=9)
    triton = FakeTriton(manifest)
    with pytest.raises(InvalidRequest) as raised:
        await Img2ImgPipeline(manifest, triton)(_gen())  # type: ignore[arg-type]
    assert ERROR_TABLE[type(raised.value)] == (400, "invalid_request")
    assert raised.value.message == "Invalid field 'mask'" and "mask" in (raised.value.details or "")
    assert triton.calls == []  # refused before any work
