"""gateway.pipeline against the diffusers code it mirrors (img2img pipeline, DiagonalGaussianDistribution)."""

from __future__ import annotations

from typing import Any

import diffusers
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
from diffusers.models.autoencoders import vae as diffusers_vae
from diffusers.schedulers import scheduling_dpmsolver_multistep, scheduling_euler_ancestral_discrete

from gateway.diffusion.sampling import (
    apply_guidance,
    blend_unmasked,
    denormalize_latents_for_decode,
    do_classifier_free_guidance,
    draw_inpaint_noise,
    draw_noise,
    draw_noise_from,
    get_img2img_timesteps,
    img2img_scheduler_config,
    latent_mask,
    noise_generator,
    prepare_initial_latents,
    prepare_inpaint_latents,
    sample_latents,
)
from gateway.diffusion.schedulers import make_scheduler

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

# Absolute float32 tolerance for values that pass near zero. Where a value comes out of cancellation (a log of
# a number near 1, a difference of nearby terms), its rounding error is a few float32 ulps of the inputs'
# scale, not of its own size, and torch's vectorized CPU kernels (which differ between AVX2 and AVX-512
# builds/CPUs) and numpy's need not round alike: e.g. -0.03345607 vs -0.03345612 (5e-8) among timesteps of
# scale 0.26 on an AMD EPYC. rtol alone cannot hold there; 1e-6 is about 8 float32 eps at scale 1.
F32_ATOL = 1e-6

SD15 = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}
LATENT_SHAPE = (2, 4, 8, 8)


def _pipeline(scheduler: Any, cls: Any = StableDiffusionImg2ImgPipeline) -> Any:
    """A real img2img (or `cls`) pipeline holding only a scheduler (its __init__ rewrites the config as it would,
    and get_timesteps needs nothing else)."""
    return cls(
        vae=None,
        text_encoder=None,
        tokenizer=None,
        unet=None,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# ---------------------------------------------------------------------------------------------- timesteps


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("PNDMScheduler", {"skip_prk_steps": True, "steps_offset": 1}),
        ("DDIMScheduler", {"clip_sample": False, "steps_offset": 1}),
        ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
        ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "leading", "steps_offset": 1}),
        ("DPMSolverMultistepScheduler", {"timestep_spacing": "leading", "steps_offset": 1}),
    ],
)
@pytest.mark.parametrize(("steps", "strength"), [(10, 0.6), (10, 1.0), (30, 0.7), (7, 0.29), (4, 0.1), (50, 0.75)])
def test_get_img2img_timesteps_matches_pipeline(name: str, extra: dict[str, Any], steps: int, strength: float) -> None:
    cfg = {**SD15, **extra}
    pipe = _pipeline(getattr(diffusers, name).from_config(cfg))
    pipe.scheduler.set_timesteps(steps)
    d_ts, d_n = pipe.get_timesteps(steps, strength, "cpu")

    ours = make_scheduler({"_class_name": name, **cfg})
    ours.set_timesteps(steps)
    o_ts, o_n = get_img2img_timesteps(ours, steps, strength)
    assert o_n == d_n
    np.testing.assert_array_equal(o_ts, d_ts.numpy())
    assert ours.begin_index == getattr(pipe.scheduler, "begin_index", ours.begin_index)


def test_get_img2img_timesteps_plain_numbers() -> None:
    s = make_scheduler({"_class_name": "DDIMScheduler", **SD15, "steps_offset": 1})
    s.set_timesteps(10)
    ts, n = get_img2img_timesteps(s, 10, 0.6)
    assert ts.tolist() == [501, 401, 301, 201, 101, 1]
    assert (n, s.begin_index) == (6, 4)


# -------------------------------------------------------------------------------------- pipeline config


@pytest.mark.parametrize(
    "config",
    [
        {"_class_name": "DDIMScheduler"},
        {"_class_name": "DDIMScheduler", "clip_sample": False, "steps_offset": 1},
        {"_class_name": "PNDMScheduler", **SD15, "skip_prk_steps": True, "clip_sample": True},
        {"_class_name": "EulerDiscreteScheduler", **SD15, "timestep_spacing": "leading"},
        {"_class_name": "DPMSolverMultistepScheduler", "steps_offset": 2},
    ],
)
def test_img2img_scheduler_config_matches_pipeline_init(config: dict[str, Any]) -> None:
    """The pipeline rewrites steps_offset / clip_sample; the effective schedules must then agree."""
    theirs = getattr(diffusers, config["_class_name"]).from_config(config)
    pipe = _pipeline(theirs)
    fixed = img2img_scheduler_config(config)
    for key in ("steps_offset", "clip_sample"):
        if key in pipe.scheduler.config and key in make_scheduler(fixed).config:
            assert make_scheduler(fixed).config[key] == pipe.scheduler.config[key], key
    ours = make_scheduler(fixed)
    pipe.scheduler.set_timesteps(10)
    ours.set_timesteps(10)
    np.testing.assert_array_equal(ours.timesteps, pipe.scheduler.timesteps.numpy())


# ------------------------------------------------------------------------------------------------ latents


def test_sample_latents_matches_diagonal_gaussian(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    mean = rng.standard_normal(LATENT_SHAPE, dtype=np.float32)
    # Wide enough that some logvars fall outside diffusers' clamp range [-30, 20].
    logvar = rng.standard_normal(LATENT_SHAPE, dtype=np.float32) * np.float32(20)
    params = np.concatenate([mean, logvar], axis=1)
    noise = rng.standard_normal(LATENT_SHAPE, dtype=np.float32)
    monkeypatch.setattr(diffusers_vae, "randn_tensor", lambda *a, **k: torch.from_numpy(noise.copy()))

    dist = diffusers_vae.DiagonalGaussianDistribution(torch.from_numpy(params))
    theirs = 0.18215 * dist.sample(generator=None)  # pipeline_stable_diffusion_img2img.prepare_latents
    ours = sample_latents(params, noise, 0.18215)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6, atol=F32_ATOL)

    theirs_shifted = (dist.sample(generator=None) - 0.0609) * 1.5305  # SD3-style (x - shift) * scale
    np.testing.assert_allclose(
        sample_latents(params, noise, 1.5305, 0.0609), theirs_shifted.numpy(), rtol=1e-6, atol=F32_ATOL
    )


def test_sample_latents_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        sample_latents(np.zeros((1, 3, 2, 2), np.float32), np.zeros((1, 1, 2, 2), np.float32), 1.0)
    with pytest.raises(ValueError):
        sample_latents(np.zeros((1, 8, 2, 2), np.float32), np.zeros((1, 4, 3, 2), np.float32), 1.0)


def test_denormalize_inverts_scaling() -> None:
    x = np.random.default_rng(1).standard_normal(LATENT_SHAPE, dtype=np.float32)
    out = denormalize_latents_for_decode(x, 0.18215)
    np.testing.assert_array_equal(out, (torch.from_numpy(x) / 0.18215).numpy())
    out = denormalize_latents_for_decode(x, 1.5305, 0.0609)
    np.testing.assert_array_equal(out, (torch.from_numpy(x) / 1.5305 + 0.0609).numpy())
    assert out.dtype == np.float32


@pytest.mark.parametrize("name", ["PNDMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_prepare_initial_latents_matches_pipeline(name: str) -> None:
    cfg = {**SD15, "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading"}
    theirs = getattr(diffusers, name).from_config(cfg)
    pipe = _pipeline(theirs)
    theirs.set_timesteps(20)
    d_ts, _ = pipe.get_timesteps(20, 0.75, "cpu")
    ours = make_scheduler({"_class_name": name, **cfg})
    ours.set_timesteps(20)
    o_ts, _ = get_img2img_timesteps(ours, 20, 0.75)

    rng = np.random.default_rng(3)
    x0 = rng.standard_normal(LATENT_SHAPE, dtype=np.float32)
    noise = rng.standard_normal(LATENT_SHAPE, dtype=np.float32)
    latent_timestep = d_ts[:1].repeat(LATENT_SHAPE[0])  # as StableDiffusionImg2ImgPipeline.__call__
    d = theirs.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), latent_timestep)
    o = prepare_initial_latents(ours, x0, noise, o_ts[0])
    assert o.dtype == np.float32
    np.testing.assert_allclose(o, d.numpy(), rtol=1e-6, atol=F32_ATOL)


# ----------------------------------------------------------------------------------------------- guidance


def test_apply_guidance_matches_diffusers_chunk_order() -> None:
    rng = np.random.default_rng(4)
    pred = rng.standard_normal((4, 4, 8, 8), dtype=np.float32)
    t = torch.from_numpy(pred)
    uncond, text = t.chunk(2)
    expected = uncond + 7.5 * (text - uncond)
    out = apply_guidance(pred, 7.5)
    assert out.shape == (2, 4, 8, 8) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-6, atol=F32_ATOL)


def test_apply_guidance_plain_math() -> None:
    uncond = np.full((1, 1, 1, 1), 1.0, np.float32)
    cond = np.full((1, 1, 1, 1), 3.0, np.float32)
    pred = np.concatenate([uncond, cond])
    assert apply_guidance(pred, 1.0).item() == 3.0  # g = 1 is the conditional prediction
    assert apply_guidance(pred, 0.0).item() == 1.0  # g = 0 is the unconditional one
    assert apply_guidance(pred, 2.5).item() == 6.0
    with pytest.raises(ValueError):
        apply_guidance(np.zeros((3, 1, 1, 1), np.float32), 7.5)


def test_do_classifier_free_guidance() -> None:
    assert do_classifier_free_guidance(7.5)
    assert do_classifier_free_guidance(1.01)
    assert not do_classifier_free_guidance(1.0)
    assert not do_classifier_free_guidance(0.0)


# -------------------------------------------------------------------------------------------------- noise


def test_draw_noise_is_deterministic_and_ordered() -> None:
    shape = (1, 4, 8, 8)
    vae_noise, t_noise = draw_noise(42, shape)
    again = draw_noise(42, shape)
    np.testing.assert_array_equal(vae_noise, again[0])
    np.testing.assert_array_equal(t_noise, again[1])
    assert vae_noise.dtype == t_noise.dtype == np.float32
    assert vae_noise.shape == t_noise.shape == shape
    assert not np.array_equal(vae_noise, t_noise)

    rng = np.random.Generator(np.random.PCG64(42))
    # The VAE sample noise is drawn first, then the first-timestep noise.
    np.testing.assert_array_equal(vae_noise, rng.standard_normal(shape, dtype=np.float32))
    np.testing.assert_array_equal(t_noise, rng.standard_normal(shape, dtype=np.float32))

    other = draw_noise(43, shape)
    assert not np.array_equal(vae_noise, other[0])


def test_draw_noise_from_continues_the_stream() -> None:
    shape = (1, 4, 4, 4)
    rng = noise_generator(7)
    first = draw_noise_from(rng, shape)
    after = rng.standard_normal(shape, dtype=np.float32)
    ref = np.random.Generator(np.random.PCG64(7))
    np.testing.assert_array_equal(first[0], ref.standard_normal(shape, dtype=np.float32))
    np.testing.assert_array_equal(first[1], ref.standard_normal(shape, dtype=np.float32))
    np.testing.assert_array_equal(after, ref.standard_normal(shape, dtype=np.float32))
    np.testing.assert_array_equal(draw_noise(7, shape)[0], first[0])


def test_draw_inpaint_noise_keeps_the_first_two_draws() -> None:
    shape = (1, 4, 8, 8)
    vae, start, masked = draw_inpaint_noise(11, shape)
    old_vae, old_start = draw_noise(11, shape)
    np.testing.assert_array_equal(vae, old_vae)
    np.testing.assert_array_equal(start, old_start)
    rng = noise_generator(11)
    draw_noise_from(rng, shape)
    np.testing.assert_array_equal(masked, rng.standard_normal(shape, dtype=np.float32))
    assert masked.dtype == np.float32 and masked.shape == shape
    assert not np.array_equal(masked, start)


# ----------------------------------------------------------------------------------------------- inpaint

INPAINT_SCHEDULERS = [
    ("PNDMScheduler", {"skip_prk_steps": True, "steps_offset": 1}),
    ("DDIMScheduler", {"clip_sample": False, "steps_offset": 1}),
    ("EulerDiscreteScheduler", {"timestep_spacing": "leading", "steps_offset": 1}),
    ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}),
    ("DPMSolverMultistepScheduler", {"timestep_spacing": "leading", "steps_offset": 1}),
]


def _inpaint_pipeline(scheduler: Any) -> Any:
    return _pipeline(scheduler, StableDiffusionInpaintPipeline)


def test_latent_mask_is_torch_nearest() -> None:
    rng = np.random.default_rng(5)
    mask = (rng.random((2, 1, 48, 32)) < 0.5).astype(np.float32)
    theirs = torch.nn.functional.interpolate(torch.from_numpy(mask), size=(48 // 8, 32 // 8))  # SD 771
    ours = latent_mask(mask, 8)
    assert ours.shape == (2, 1, 6, 4) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, theirs.numpy())
    np.testing.assert_array_equal(ours, mask[:, :, ::8, ::8])
    with pytest.raises(ValueError):
        latent_mask(mask[:, :, :44], 8)


@pytest.mark.parametrize(("name", "extra"), INPAINT_SCHEDULERS, ids=[n for n, _ in INPAINT_SCHEDULERS])
@pytest.mark.parametrize(("steps", "strength"), [(8, 0.75), (6, 1.0)])  # both run a 6-step loop
def test_blend_unmasked_loop_matches_inpaint_pipeline(
    name: str, extra: dict[str, Any], steps: int, strength: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 4-channel inpaint loop (SD 1262-1307) with eps = 0.1 * x, diffusers' scheduler against ours."""
    cfg = {**SD15, **extra}
    pipe = _inpaint_pipeline(getattr(diffusers, name).from_config(cfg))
    theirs = pipe.scheduler
    ours = make_scheduler({"_class_name": name, **dict(theirs.config)})
    theirs.set_timesteps(steps)
    ours.set_timesteps(steps)
    d_ts, d_n = pipe.get_timesteps(steps, strength, "cpu")
    o_ts, o_n = get_img2img_timesteps(ours, steps, strength)
    assert d_n == o_n == 6 and len(d_ts) == len(o_ts)
    is_strength_max = strength == 1.0

    rng = np.random.default_rng(21)
    image_latents = rng.standard_normal(LATENT_SHAPE, dtype=np.float32)
    noise = rng.standard_normal(LATENT_SHAPE, dtype=np.float32)
    pixel_mask = np.zeros((1, 1, 64, 64), np.float32)
    pixel_mask[:, :, 8:40, 16:56] = 1.0
    pixel_mask[:, :, 50:, :9] = 1.0  # covers one latent cell's top-left pixel only at column 0
    lm = latent_mask(pixel_mask, 8)
    assert 0 < lm.sum() < lm.size

    # diffusers: prepare_latents (SD 731-736) and prepare_mask_latents' mask, repeated to the batch
    d_img, d_noise = torch.from_numpy(image_latents), torch.from_numpy(noise)
    latent_timestep = d_ts[:1].repeat(LATENT_SHAPE[0])
    d_start = d_noise if is_strength_max else theirs.add_noise(d_img, d_noise, latent_timestep)
    d_lat = d_start * theirs.init_noise_sigma if is_strength_max else d_start  # SD 734-736
    d_mask = torch.nn.functional.interpolate(torch.from_numpy(pixel_mask), size=(8, 8)).repeat(LATENT_SHAPE[0], 1, 1, 1)
    o_lat = prepare_inpaint_latents(ours, None if is_strength_max else image_latents, noise, o_ts[0], is_strength_max)
    np.testing.assert_allclose(o_lat, d_lat.numpy(), rtol=1e-6, atol=F32_ATOL)

    step_rng = np.random.default_rng(99)  # ancestral / SDE draws on diffusers' side
    o_rng = np.random.default_rng(99)

    def fake_randn(shape: Any, generator: Any = None, device: Any = None, dtype: Any = None, **_: Any) -> torch.Tensor:
        return torch.from_numpy(step_rng.standard_normal(tuple(shape), dtype=np.float32))

    for module in (scheduling_euler_ancestral_discrete, scheduling_dpmsolver_multistep):
        monkeypatch.setattr(module, "randn_tensor", fake_randn)

    for i, (d_t, o_t) in enumerate(zip(d_ts, o_ts, strict=True)):
        d_in = theirs.scale_model_input(d_lat, d_t)
        d_lat = theirs.step(0.1 * d_in, d_t, d_lat, return_dict=False)[0]
        init_latents_proper = d_img
        if i < len(d_ts) - 1:
            init_latents_proper = theirs.add_noise(init_latents_proper, d_noise, torch.tensor([d_ts[i + 1]]))
        d_lat = (1 - d_mask) * init_latents_proper + d_mask * d_lat

        o_in = ours.scale_model_input(o_lat, o_t)
        o_lat = ours.step(0.1 * o_in, o_t, o_lat, generator=o_rng)
        o_lat = blend_unmasked(ours, o_lat, image_latents, noise, lm, o_ts[i + 1] if i + 1 < len(o_ts) else None)
        assert o_lat.dtype == np.float32
        np.testing.assert_allclose(o_lat, d_lat.numpy(), rtol=1e-6, atol=F32_ATOL, err_msg=f"step {i} (t={o_t})")

    keep = np.broadcast_to(lm == 0, o_lat.shape)
    np.testing.assert_array_equal(o_lat[keep], image_latents[keep])  # clean image latents outside the mask


def test_prepare_inpaint_latents_needs_the_image_below_strength_one() -> None:
    s = make_scheduler({"_class_name": "DDIMScheduler", **SD15, "steps_offset": 1})
    s.set_timesteps(10)
    noise = np.ones(LATENT_SHAPE, np.float32)
    with pytest.raises(ValueError):
        prepare_inpaint_latents(s, None, noise, s.timesteps[0], False)
    np.testing.assert_array_equal(prepare_inpaint_latents(s, None, noise, s.timesteps[0], True), noise)
