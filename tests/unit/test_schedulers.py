"""The numpy schedulers in gateway.schedulers against the real diffusers 0.39 classes (torch, CPU).

Each case builds the diffusers scheduler with `Cls.from_config(cfg)` and ours with `make_scheduler`,
compares the schedule, then runs the img2img part of the pipeline (get_timesteps, add_noise, then
scale_model_input + step with a deterministic fake denoiser) in both and compares every intermediate.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import diffusers
import numpy as np
import pytest
import torch
from diffusers.schedulers import scheduling_dpmsolver_multistep, scheduling_euler_ancestral_discrete

from gateway.diffusion.sampling import get_img2img_timesteps, prepare_initial_latents
from gateway.diffusion.schedulers import (
    SUPPORTED_SCHEDULERS,
    Scheduler,
    UnsupportedScheduler,
    make_scheduler,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

SD15 = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}
SD15_PNDM = {
    **SD15,
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
}
SD15_DDIM = {**SD15, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
SHAPE = (2, 4, 8, 8)
# Observed: bit-exact for most cases; DPM-Solver ~5e-7 of the array's scale (torch vs numpy log/exp ulps).
RTOL = ATOL = 2e-6
# Absolute float32 tolerance for values that pass near zero. Where a value comes out of cancellation (a log of
# a number near 1, a difference of nearby terms), its rounding error is a few float32 ulps of the inputs'
# scale, not of its own size, and torch's vectorized CPU kernels (which differ between AVX2 and AVX-512
# builds/CPUs) and numpy's need not round alike: e.g. -0.03345607 vs -0.03345612 (5e-8) among timesteps of
# scale 0.26 on an AMD EPYC. rtol alone cannot hold there; 1e-6 is about 8 float32 eps at scale 1.
F32_ATOL = 1e-6

# (class name, config, steps, strength)
CASES: list[tuple[str, dict[str, Any], int, float]] = [
    ("PNDMScheduler", SD15_PNDM, 10, 0.6),
    (
        "PNDMScheduler",
        {**SD15_PNDM, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
        10,
        0.6,
    ),
    ("PNDMScheduler", {**SD15_PNDM, "timestep_spacing": "linspace", "beta_schedule": "linear"}, 7, 1.0),
    ("DDIMScheduler", SD15_DDIM, 10, 0.6),
    (
        "DDIMScheduler",
        {**SD15_DDIM, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
        10,
        0.6,
    ),
    (
        "DDIMScheduler",
        {
            **SD15_DDIM,
            "prediction_type": "v_prediction",
            "timestep_spacing": "trailing",
            "rescale_betas_zero_snr": True,
            "set_alpha_to_one": True,
        },
        10,
        1.0,
    ),
    ("DDIMScheduler", {}, 10, 0.6),  # library defaults: linear betas, clip_sample=True, set_alpha_to_one=True
    (
        "DDIMScheduler",
        {
            "beta_schedule": "squaredcos_cap_v2",
            "timestep_spacing": "linspace",
            "thresholding": True,
            "prediction_type": "sample",
            "sample_max_value": 1.5,
        },
        10,
        0.6,
    ),
    ("EulerDiscreteScheduler", {**SD15, "timestep_spacing": "leading", "steps_offset": 1}, 10, 0.6),
    ("EulerDiscreteScheduler", {**SD15, "timestep_spacing": "trailing"}, 10, 0.6),  # sd-turbo style
    ("EulerDiscreteScheduler", {**SD15, "timestep_spacing": "trailing"}, 2, 0.5),  # sd-turbo img2img
    ("EulerDiscreteScheduler", {**SD15, "prediction_type": "v_prediction"}, 10, 0.6),
    (
        "EulerDiscreteScheduler",
        {**SD15, "use_karras_sigmas": True, "timestep_spacing": "leading", "steps_offset": 1},
        10,
        0.6,
    ),
    (
        "EulerDiscreteScheduler",
        {**SD15, "use_exponential_sigmas": True, "final_sigmas_type": "sigma_min"},
        10,
        0.6,
    ),
    (
        "EulerDiscreteScheduler",
        {**SD15, "interpolation_type": "log_linear", "prediction_type": "sample"},
        10,
        0.6,
    ),
    (
        "EulerDiscreteScheduler",
        {
            **SD15,
            "timestep_type": "continuous",
            "prediction_type": "v_prediction",
            "timestep_spacing": "trailing",
            "rescale_betas_zero_snr": True,
        },
        10,
        0.6,
    ),
    ("EulerAncestralDiscreteScheduler", {**SD15, "timestep_spacing": "leading", "steps_offset": 1}, 10, 0.6),
    (
        "EulerAncestralDiscreteScheduler",
        {**SD15, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
        10,
        0.6,
    ),
    ("EulerAncestralDiscreteScheduler", {**SD15}, 10, 1.0),
    ("DPMSolverMultistepScheduler", {**SD15, "timestep_spacing": "leading", "steps_offset": 1}, 10, 0.6),
    (
        "DPMSolverMultistepScheduler",
        {**SD15, "timestep_spacing": "leading", "steps_offset": 1, "prediction_type": "v_prediction"},
        25,
        0.8,
    ),
    ("DPMSolverMultistepScheduler", {**SD15, "use_karras_sigmas": True, "solver_order": 3}, 20, 0.7),
    (
        "DPMSolverMultistepScheduler",
        {
            **SD15,
            "solver_type": "heun",
            "timestep_spacing": "trailing",
            "euler_at_final": True,
            "final_sigmas_type": "sigma_min",
        },
        10,
        0.6,
    ),
    (
        "DPMSolverMultistepScheduler",
        {**SD15, "algorithm_type": "sde-dpmsolver++", "solver_order": 3},
        16,
        1.0,
    ),
    (
        "DPMSolverMultistepScheduler",
        {**SD15, "algorithm_type": "sde-dpmsolver++", "solver_type": "heun"},
        10,
        0.6,
    ),
    (
        "DPMSolverMultistepScheduler",
        {
            "beta_schedule": "squaredcos_cap_v2",
            "lambda_min_clipped": -5.1,
            "use_lu_lambdas": True,
            "thresholding": True,
            "prediction_type": "sample",
            "sample_max_value": 1.5,
        },
        12,
        0.9,
    ),
    ("DPMSolverMultistepScheduler", {**SD15, "use_exponential_sigmas": True}, 10, 0.6),
]


def _case_id(case: tuple[str, dict[str, Any], int, float]) -> str:
    name, cfg, steps, strength = case
    extra = ",".join(f"{k}={v}" for k, v in cfg.items() if k not in SD15 and k not in ("skip_prk_steps", "clip_sample"))
    return f"{name}[{extra}|{steps}@{strength}]"


def _derived_timesteps(cfg: dict[str, Any]) -> bool:
    keys = ("use_karras_sigmas", "use_exponential_sigmas", "use_lu_lambdas")
    return any(cfg.get(k) for k in keys) or cfg.get("timestep_type") == "continuous"


def fake_denoiser(sample: np.ndarray, timestep: Any) -> np.ndarray:
    """A fixed, smooth function of (sample, t) standing in for the UNet; both sides use this numpy code."""
    t = float(timestep)
    out = 0.7 * np.tanh(sample) + 0.05 * np.cos(t / 97.0) * sample + 0.01 * np.sin(t / 13.0)
    return out.astype(np.float32)


@contextmanager
def diffusers_noise_from(rng: np.random.Generator) -> Iterator[None]:
    """Make diffusers' step noise come from `rng` (same draws, same order as our `step(generator=...)`)."""

    def fake_randn(shape: Any, generator: Any = None, device: Any = None, dtype: Any = None, **_: Any) -> torch.Tensor:
        return torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32))

    modules = (scheduling_euler_ancestral_discrete, scheduling_dpmsolver_multistep)
    saved = [m.randn_tensor for m in modules]
    try:
        for m in modules:
            m.randn_tensor = fake_randn  # type: ignore[attr-defined]
        yield
    finally:
        for m, fn in zip(modules, saved, strict=True):
            m.randn_tensor = fn  # type: ignore[attr-defined]


def build_pair(name: str, cfg: dict[str, Any]) -> tuple[Any, Scheduler]:
    theirs = getattr(diffusers, name).from_config(cfg)
    ours = make_scheduler({"_class_name": name, "_diffusers_version": "0.39.0", **cfg})
    return theirs, ours


def diffusers_get_timesteps(scheduler: Any, steps: int, strength: float) -> tuple[torch.Tensor, int]:
    """StableDiffusionImg2ImgPipeline.get_timesteps, called unbound with only the scheduler it needs."""
    from diffusers import StableDiffusionImg2ImgPipeline

    class _Holder:
        pass

    holder = _Holder()
    holder.scheduler = scheduler  # type: ignore[attr-defined]
    return StableDiffusionImg2ImgPipeline.get_timesteps(holder, steps, strength, "cpu")  # type: ignore[arg-type]


def assert_close(ours: np.ndarray, theirs: torch.Tensor | np.ndarray, what: str) -> None:
    ref = theirs.numpy() if isinstance(theirs, torch.Tensor) else np.asarray(theirs)
    assert ours.dtype == ref.dtype, f"{what}: dtype {ours.dtype} != {ref.dtype}"
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    # atol scales with the array's magnitude: multistep solvers mix values of very different size.
    atol = ATOL * max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=atol, err_msg=what)


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_img2img_loop_matches_diffusers(case: tuple[str, dict[str, Any], int, float]) -> None:
    name, cfg, steps, strength = case
    theirs, ours = build_pair(name, cfg)
    assert ours.order == theirs.order
    assert ours.init_noise_sigma == pytest.approx(float(theirs.init_noise_sigma), rel=1e-6)

    theirs.set_timesteps(steps)
    ours.set_timesteps(steps)
    assert ours.timesteps.dtype == theirs.timesteps.numpy().dtype
    if np.issubdtype(ours.timesteps.dtype, np.integer) or not _derived_timesteps(cfg):
        np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())
    else:  # fractional timesteps derived from sigmas: torch's vector sqrt is not always correctly rounded
        np.testing.assert_allclose(ours.timesteps, theirs.timesteps.numpy(), rtol=1e-6, atol=F32_ATOL)
    if hasattr(theirs, "sigmas"):
        np.testing.assert_allclose(ours.sigmas, theirs.sigmas.numpy(), rtol=1e-6, atol=F32_ATOL)  # type: ignore[attr-defined]
    assert ours.init_noise_sigma == pytest.approx(float(theirs.init_noise_sigma), rel=1e-6)

    d_ts, d_n = diffusers_get_timesteps(theirs, steps, strength)
    o_ts, o_n = get_img2img_timesteps(ours, steps, strength)
    assert o_n == d_n
    np.testing.assert_array_equal(o_ts, ours.timesteps[len(ours.timesteps) - len(o_ts) :])
    np.testing.assert_allclose(o_ts, d_ts.numpy(), rtol=1e-6, atol=F32_ATOL)
    assert ours.begin_index == getattr(theirs, "begin_index", ours.begin_index)

    data = np.random.default_rng(1234)
    x0 = data.standard_normal(SHAPE, dtype=np.float32)
    noise = data.standard_normal(SHAPE, dtype=np.float32)
    d_lat = theirs.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), d_ts[:1].repeat(SHAPE[0]))
    o_lat = prepare_initial_latents(ours, x0, noise, o_ts[0])
    assert_close(o_lat, d_lat, "add_noise")

    d_rng, o_rng = np.random.default_rng(99), np.random.default_rng(99)
    with diffusers_noise_from(d_rng):
        for i, (d_t, o_t) in enumerate(zip(d_ts, o_ts, strict=True)):
            d_in = theirs.scale_model_input(d_lat, d_t)
            o_in = ours.scale_model_input(o_lat, o_t)
            assert_close(o_in, d_in, f"scale_model_input #{i}")
            # Each side feeds its own input to the same numpy denoiser, so errors can compound.
            d_out = torch.from_numpy(fake_denoiser(d_in.numpy(), d_t))
            o_out = fake_denoiser(o_in, o_t)
            d_lat = theirs.step(d_out, d_t, d_lat, return_dict=False)[0]
            o_lat = ours.step(o_out, o_t, o_lat, generator=o_rng)
            assert_close(o_lat, d_lat, f"step #{i} (t={o_t})")
            assert ours.step_index == getattr(theirs, "step_index", ours.step_index)
    assert np.isfinite(o_lat).all()


@pytest.mark.parametrize(
    "name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler"]
)
def test_add_noise_without_begin_index_looks_up_timestep(name: str) -> None:
    """With no begin index, add_noise finds each row's sigma by timestep (rows may differ)."""
    cfg = {**SD15, "timestep_spacing": "leading", "steps_offset": 1}
    theirs, ours = build_pair(name, cfg)
    theirs.set_timesteps(10)
    ours.set_timesteps(10)
    data = np.random.default_rng(5)
    x0 = data.standard_normal(SHAPE, dtype=np.float32)
    noise = data.standard_normal(SHAPE, dtype=np.float32)
    ts = ours.timesteps[[2, 7]]
    d = theirs.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), theirs.timesteps[[2, 7]])
    assert_close(ours.add_noise(x0, noise, ts), d, "add_noise by lookup")


def test_pndm_schedule_has_repeated_warmup_timestep() -> None:
    ours = make_scheduler({"_class_name": "PNDMScheduler", **SD15_PNDM})
    ours.set_timesteps(10)
    assert ours.timesteps.tolist() == [901, 801, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert ours.timesteps.dtype == np.int64


def test_timestep_dtypes() -> None:
    expected = {
        "DDIMScheduler": np.int64,
        "PNDMScheduler": np.int64,
        "EulerDiscreteScheduler": np.float32,
        "EulerAncestralDiscreteScheduler": np.float32,
        "DPMSolverMultistepScheduler": np.int64,
    }
    for name, dtype in expected.items():
        s = make_scheduler({"_class_name": name, **SD15, "skip_prk_steps": True})
        s.set_timesteps(5)
        assert s.timesteps.dtype == dtype, name


def test_unknown_class_lists_supported() -> None:
    with pytest.raises(UnsupportedScheduler) as info:
        make_scheduler({"_class_name": "LMSDiscreteScheduler"})
    assert isinstance(info.value, ValueError)
    for name in SUPPORTED_SCHEDULERS:
        assert name in str(info.value)
    with pytest.raises(UnsupportedScheduler):
        make_scheduler({"beta_start": 0.1})


@pytest.mark.parametrize(
    "config",
    [
        {"_class_name": "PNDMScheduler"},  # skip_prk_steps defaults to False (PRK warm-up not ported)
        {"_class_name": "PNDMScheduler", "skip_prk_steps": True, "prediction_type": "sample"},
        {"_class_name": "DDIMScheduler", "beta_schedule": "cosine"},
        {"_class_name": "DDIMScheduler", "timestep_spacing": "karras"},
        {"_class_name": "EulerDiscreteScheduler", "use_beta_sigmas": True},
        {"_class_name": "EulerAncestralDiscreteScheduler", "prediction_type": "sample"},
        {"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver"},
        {"_class_name": "DPMSolverMultistepScheduler", "use_flow_sigmas": True},
        {"_class_name": "DPMSolverMultistepScheduler", "variance_type": "learned_range"},
    ],
)
def test_unsupported_options_fail_at_build(config: dict[str, Any]) -> None:
    with pytest.raises(UnsupportedScheduler):
        make_scheduler(config)


def test_unknown_config_keys_are_ignored_like_from_config() -> None:
    s = make_scheduler({"_class_name": "EulerDiscreteScheduler", "clip_sample": False, "no_such_key": 3, **SD15})
    assert "no_such_key" not in s.config and "clip_sample" not in s.config


def test_euler_rejects_integer_timestep_like_diffusers() -> None:
    s = make_scheduler({"_class_name": "EulerDiscreteScheduler", **SD15})
    s.set_timesteps(4)
    x = np.zeros(SHAPE, dtype=np.float32)
    with pytest.raises(ValueError):
        s.step(x, 3, x)


def test_ddim_too_many_steps() -> None:
    s = make_scheduler({"_class_name": "DDIMScheduler", **SD15_DDIM})
    with pytest.raises(ValueError):
        s.set_timesteps(1001)


def test_euler_begin_index_and_step_index() -> None:
    """img2img sets begin_index; step_index appears at the first scale_model_input and counts steps."""
    s = make_scheduler({"_class_name": "EulerDiscreteScheduler", **SD15, "timestep_spacing": "trailing"})
    s.set_timesteps(10)
    ts, n = get_img2img_timesteps(s, 10, 0.6)
    assert (s.begin_index, s.step_index, n, len(ts)) == (4, None, 6, 6)
    x = np.ones(SHAPE, dtype=np.float32)
    s.scale_model_input(x, ts[0])
    assert s.step_index == 4
    s.step(x, ts[0], x)
    assert s.step_index == 5
    s.set_timesteps(10)
    assert (s.begin_index, s.step_index) == (None, None)


def test_ancestral_generator_list_draws_per_row() -> None:
    """A list of generators gives row i the draws of generator i, as diffusers' randn_tensor does."""
    cfg = {"_class_name": "EulerAncestralDiscreteScheduler", **SD15}
    x = np.ones(SHAPE, dtype=np.float32)
    a = make_scheduler(cfg)
    a.set_timesteps(5)
    both = a.step(x, a.timesteps[0], x, generator=[np.random.default_rng(1), np.random.default_rng(2)])
    for row, seed in enumerate((1, 2)):
        b = make_scheduler(cfg)
        b.set_timesteps(5)
        one = b.step(x[:1], b.timesteps[0], x[:1], generator=np.random.default_rng(seed))
        np.testing.assert_array_equal(both[row : row + 1], one)


def test_serving_modules_do_not_import_torch() -> None:
    code = (
        "import sys, gateway.app, gateway.__main__\n"
        "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=_repo_root())


def _repo_root() -> str:
    import pathlib

    return str(pathlib.Path(__file__).resolve().parents[2])
