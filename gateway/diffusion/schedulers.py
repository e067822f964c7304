"""Numpy ports of diffusers 0.39.0 schedulers, so the serving path never imports torch/diffusers.

Each class mirrors the diffusers class of the same name: same config keys and defaults, same timesteps,
same stateful `step` (a scheduler instance serves one request), and the same float32 arithmetic in the
same order, so results agree with diffusers to float32 rounding. Options that are not ported raise
`UnsupportedScheduler` when the scheduler is built, never later in a request.

Two torch details are reproduced on purpose: `torch.linspace(..., dtype=float32)` on CPU computes each
element with one fused multiply-add from the nearer end (`_torch_linspace_f32`), and `torch.cumprod` on
CPU accumulates float32 in float64 (`_cumprod_f32`). Both feed `alphas_cumprod`, which every result
depends on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "SCHEDULER_NAMES",
    "SUPPORTED_SCHEDULERS",
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "Generators",
    "PNDMScheduler",
    "Scheduler",
    "UnsupportedScheduler",
    "default_config",
    "make_scheduler",
    "scheduler_choices",
    "scheduler_class",
    "scheduler_name",
    "swap_scheduler_config",
]

Generators = np.random.Generator | Sequence[np.random.Generator] | None
"""One generator for the whole batch, or one per batch row (as diffusers' `randn_tensor` accepts)."""

_F32 = np.float32


class UnsupportedScheduler(ValueError):
    """A scheduler class or option this port does not implement; raised when the scheduler is built."""


# --------------------------------------------------------------------------------------------------
# Shared numerics (each mirrors a torch/diffusers helper bit for bit where that is feasible)
# --------------------------------------------------------------------------------------------------


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """`torch.linspace(start, end, steps, dtype=torch.float32)` as the CPU kernel computes it.

    The kernel evaluates `fma(step, i, start)` for the first half and `fma(-step, steps-1-i, end)` for the
    rest; a float64 evaluation rounded once to float32 reproduces that, while `np.linspace` differs by an
    ulp in about a third of the entries.
    """
    if steps <= 0:
        return np.zeros(0, dtype=_F32)
    s, e = _F32(start), _F32(end)
    if steps == 1:
        return np.array([s], dtype=_F32)
    step = np.float64(_F32((e - s) / _F32(steps - 1)))
    idx = np.arange(steps, dtype=np.float64)
    low = np.float64(s) + step * idx
    high = np.float64(e) - step * (steps - 1 - idx)
    return np.where(idx < steps // 2, low, high).astype(_F32)


def _cumprod_f32(values: np.ndarray) -> np.ndarray:
    """`torch.cumprod` of a float32 CPU tensor: the running product is float64, each output rounded."""
    return np.cumprod(values.astype(np.float64)).astype(_F32)


def _betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """diffusers `betas_for_alpha_bar`, cosine transform ("squaredcos_cap_v2"): float64, then float32."""

    def alpha_bar_fn(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar_fn(t2) / alpha_bar_fn(t1), max_beta))
    return np.array(betas, dtype=_F32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """diffusers `rescale_zero_terminal_snr` (arXiv 2305.08891, Algorithm 1), in float32."""
    alphas = _F32(1.0) - betas
    alphas_bar_sqrt = np.sqrt(_cumprod_f32(alphas))
    sqrt_0 = alphas_bar_sqrt[0].copy()
    sqrt_t = alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = alphas_bar_sqrt - sqrt_t
    alphas_bar_sqrt = alphas_bar_sqrt * (sqrt_0 / (sqrt_0 - sqrt_t))
    alphas_bar = alphas_bar_sqrt * alphas_bar_sqrt
    alphas = np.concatenate([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (_F32(1.0) - alphas).astype(_F32)


def _make_betas(config: Mapping[str, Any]) -> np.ndarray:
    """The training beta schedule exactly as the diffusers constructors build it."""
    n = int(config["num_train_timesteps"])
    if config.get("trained_betas") is not None:
        return np.asarray(config["trained_betas"], dtype=_F32)
    schedule = config["beta_schedule"]
    if schedule == "linear":
        return _torch_linspace_f32(config["beta_start"], config["beta_end"], n)
    if schedule == "scaled_linear":
        root = _torch_linspace_f32(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, n)
        betas: np.ndarray = root * root
        return betas
    if schedule == "squaredcos_cap_v2":
        return _betas_for_alpha_bar(n)
    raise UnsupportedScheduler(
        f"beta_schedule {schedule!r} is not supported; use 'linear', 'scaled_linear' or 'squaredcos_cap_v2'"
    )


def _threshold_sample(sample: np.ndarray, ratio: float, max_value: float) -> np.ndarray:
    """diffusers `_threshold_sample` (Imagen dynamic thresholding); torch and numpy quantiles agree."""
    dtype = sample.dtype
    work = sample if dtype in (np.float32, np.float64) else sample.astype(_F32)
    batch, channels, *rest = work.shape
    flat = work.reshape(batch, channels * int(np.prod(rest)))
    s = np.quantile(np.abs(flat), ratio, axis=1).astype(flat.dtype)
    s = np.minimum(np.maximum(s, flat.dtype.type(1)), flat.dtype.type(max_value))[:, None]
    out = np.minimum(np.maximum(flat, -s), s) / s
    thresholded: np.ndarray = out.reshape(work.shape).astype(dtype)
    return thresholded


def _randn(shape: tuple[int, ...], generator: Generators) -> np.ndarray:
    """Standard-normal float32 noise as `randn_tensor` draws it: one generator, or one row per generator."""
    if generator is None:
        return np.random.default_rng().standard_normal(shape, dtype=_F32)
    if isinstance(generator, np.random.Generator):
        return generator.standard_normal(shape, dtype=_F32)
    generators = list(generator)
    if len(generators) == 1:
        return generators[0].standard_normal(shape, dtype=_F32)
    if len(generators) != shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]}")
    row = (1, *shape[1:])
    return np.concatenate([g.standard_normal(row, dtype=_F32) for g in generators], axis=0)


def _broadcast_per_sample(values: np.ndarray, ndim: int) -> np.ndarray:
    """Flatten a per-sample coefficient and append singleton axes, as diffusers' `unsqueeze(-1)` loops do."""
    values = values.reshape(-1)
    return values.reshape(values.shape + (1,) * max(ndim - 1, 0))


# --------------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------------


class Scheduler:
    """Common surface of the ported schedulers; instances are stateful and serve one request each."""

    order: ClassVar[int] = 1
    defaults: ClassVar[Mapping[str, Any]] = {}
    timesteps: np.ndarray
    num_inference_steps: int | None

    def __init__(self, **config: Any) -> None:
        # Like diffusers' from_config: unknown keys (and "_"-prefixed metadata) are ignored.
        self.config: dict[str, Any] = {
            **self.defaults,
            **{k: v for k, v in config.items() if k in self.defaults},
        }
        self.num_inference_steps = None
        self._step_index: int | None = None
        self._begin_index: int | None = None

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial noise (1.0 for DDPM-style schedulers)."""
        return 1.0

    @property
    def step_index(self) -> int | None:
        """Index into `timesteps` of the next `step` (None until the first step or scale_model_input)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """First index used, set by the pipeline (img2img starts part-way through the schedule)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Tell the scheduler where the run starts, so it need not search `timesteps` for the first one."""
        self._begin_index = begin_index

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Compute `timesteps` (and sigmas) for a run of `num_inference_steps` steps."""
        raise NotImplementedError

    def scale_model_input(self, sample: np.ndarray, timestep: Any = None) -> np.ndarray:
        """Scale the denoiser input for this timestep (identity for DDPM-style schedulers)."""
        return sample

    def step(
        self,
        model_output: np.ndarray,
        timestep: Any,
        sample: np.ndarray,
        generator: Generators = None,
    ) -> np.ndarray:
        """Advance one step and return the previous (less noisy) sample."""
        raise NotImplementedError

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
        """Forward-diffuse `original_samples` to `timesteps` (one per batch row)."""
        raise NotImplementedError

    @staticmethod
    def _check_steps(num_inference_steps: int) -> int:
        steps = int(num_inference_steps)
        if steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        return steps

    def _require(self, key: str, allowed: Sequence[Any]) -> None:
        """Refuse an option value this port does not implement (at build time, not mid-request)."""
        value = self.config[key]
        if value not in allowed:
            raise UnsupportedScheduler(
                f"{type(self).__name__}: {key}={value!r} is not supported; supported: {list(allowed)!r}"
            )


_SPACINGS = ("leading", "trailing", "linspace")


# --------------------------------------------------------------------------------------------------
# DDPM-style (alphas_cumprod indexed by integer timestep): DDIM, PNDM
# --------------------------------------------------------------------------------------------------


class _AlphaScheduler(Scheduler):
    """Shared state of schedulers that index `alphas_cumprod` by the integer training timestep."""

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self._require("timestep_spacing", _SPACINGS)
        betas = _make_betas(self.config)
        if self.config.get("rescale_betas_zero_snr"):
            betas = _rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas = (_F32(1.0) - betas).astype(_F32)
        self.alphas_cumprod = _cumprod_f32(self.alphas)
        self.final_alpha_cumprod = _F32(1.0) if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]
        n = int(self.config["num_train_timesteps"])
        self.timesteps = np.arange(0, n)[::-1].copy().astype(np.int64)

    def _alpha_prev(self, prev_timestep: int) -> np.float32:
        return self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
        """q(x_t | x_0): sqrt(a_t) * x0 + sqrt(1 - a_t) * noise (diffusers DDIM/PNDM `add_noise`)."""
        alphas_cumprod = self.alphas_cumprod.astype(original_samples.dtype)
        idx = np.asarray(timesteps).astype(np.int64).reshape(-1)
        ndim = original_samples.ndim
        sqrt_alpha_prod = _broadcast_per_sample(np.sqrt(alphas_cumprod[idx]), ndim)
        sqrt_one_minus_alpha_prod = _broadcast_per_sample(np.sqrt(1 - alphas_cumprod[idx]), ndim)
        noisy: np.ndarray = sqrt_alpha_prod * original_samples + sqrt_one_minus_alpha_prod * noise
        return noisy


class DDIMScheduler(_AlphaScheduler):
    """diffusers `DDIMScheduler` with eta = 0 (deterministic DDIM)."""

    defaults: ClassVar[Mapping[str, Any]] = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "clip_sample": True,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "clip_sample_range": 1.0,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    }

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self._require("prediction_type", ("epsilon", "sample", "v_prediction"))

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Integer timesteps, highest first (diffusers DDIM `set_timesteps`)."""
        steps = self._check_steps(num_inference_steps)
        n = int(self.config["num_train_timesteps"])
        if steps > n:
            raise ValueError(f"num_inference_steps ({steps}) cannot exceed num_train_timesteps ({n})")
        self.num_inference_steps = steps
        spacing = self.config["timestep_spacing"]
        if spacing == "linspace":
            timesteps = np.linspace(0, n - 1, steps).round()[::-1].copy().astype(np.int64)
        elif spacing == "leading":
            step_ratio = n // steps
            timesteps = (np.arange(0, steps) * step_ratio).round()[::-1].copy().astype(np.int64)
            timesteps += int(self.config["steps_offset"])
        else:  # trailing
            timesteps = np.round(np.arange(n, 0, -(n / steps))).astype(np.int64)
            timesteps -= 1
        self.timesteps = timesteps

    def step(
        self,
        model_output: np.ndarray,
        timestep: Any,
        sample: np.ndarray,
        generator: Generators = None,
    ) -> np.ndarray:
        """DDIM update x_t -> x_{t-1} with eta = 0; `generator` is unused (no noise is added)."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        t = int(timestep)
        # diffusers uses num_train_timesteps // steps for every spacing (not the actual gap).
        prev_t = t - int(self.config["num_train_timesteps"]) // self.num_inference_steps
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self._alpha_prev(prev_t)
        beta_prod_t = 1 - alpha_prod_t
        prediction_type = self.config["prediction_type"]
        if prediction_type == "epsilon":
            pred_original_sample = (sample - np.sqrt(beta_prod_t) * model_output) / np.sqrt(alpha_prod_t)
            pred_epsilon = model_output
        elif prediction_type == "sample":
            pred_original_sample = model_output
            pred_epsilon = (sample - np.sqrt(alpha_prod_t) * pred_original_sample) / np.sqrt(beta_prod_t)
        else:  # v_prediction
            pred_original_sample = np.sqrt(alpha_prod_t) * sample - np.sqrt(beta_prod_t) * model_output
            pred_epsilon = np.sqrt(alpha_prod_t) * model_output + np.sqrt(beta_prod_t) * sample
        if self.config["thresholding"]:
            pred_original_sample = _threshold_sample(
                pred_original_sample,
                self.config["dynamic_thresholding_ratio"],
                self.config["sample_max_value"],
            )
        elif self.config["clip_sample"]:
            r = self.config["clip_sample_range"]
            pred_original_sample = np.clip(pred_original_sample, -r, r).astype(pred_original_sample.dtype)
        # eta = 0: std_dev_t = 0, so the direction term is sqrt(1 - a_prev) * eps.
        pred_sample_direction = np.sqrt(1 - alpha_prod_t_prev) * pred_epsilon
        prev_sample: np.ndarray = np.sqrt(alpha_prod_t_prev) * pred_original_sample + pred_sample_direction
        return prev_sample


class PNDMScheduler(_AlphaScheduler):
    """diffusers `PNDMScheduler` with `skip_prk_steps=True` (pseudo linear multistep, PLMS, only)."""

    defaults: ClassVar[Mapping[str, Any]] = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "skip_prk_steps": False,
        "set_alpha_to_one": False,
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
        "steps_offset": 0,
    }

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        if not self.config["skip_prk_steps"]:
            raise UnsupportedScheduler(
                "PNDMScheduler: only skip_prk_steps=True (PLMS) is supported, as Stable Diffusion configs use"
            )
        self._require("prediction_type", ("epsilon", "v_prediction"))
        self.pndm_order = 4
        self.counter = 0
        self.cur_sample: np.ndarray | None = None
        self.ets: list[np.ndarray] = []

    def set_timesteps(self, num_inference_steps: int) -> None:
        """PLMS timesteps: `steps + 1` entries, the second one repeated (diffusers' warm-up step)."""
        steps = self._check_steps(num_inference_steps)
        n = int(self.config["num_train_timesteps"])
        self.num_inference_steps = steps
        spacing = self.config["timestep_spacing"]
        if spacing == "linspace":
            base = np.linspace(0, n - 1, steps).round().astype(np.int64)
        elif spacing == "leading":
            base = (np.arange(0, steps) * (n // steps)).round()
            base += int(self.config["steps_offset"])
        else:  # trailing
            base = np.round(np.arange(n, 0, -(n / steps)))[::-1].astype(np.int64)
            base -= 1
        plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].copy()
        self.timesteps = plms.astype(np.int64)
        self.ets = []
        self.counter = 0
        self.cur_sample = None

    def step(
        self,
        model_output: np.ndarray,
        timestep: Any,
        sample: np.ndarray,
        generator: Generators = None,
    ) -> np.ndarray:
        """One PLMS step (diffusers `step_plms`); `generator` is unused."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        t = int(timestep)
        gap = int(self.config["num_train_timesteps"]) // self.num_inference_steps
        prev_t = t - gap
        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:
            prev_t = t
            t = t + gap
        ets = self.ets
        if len(ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(ets) == 1 and self.counter == 1:
            model_output = (model_output + ets[-1]) / 2
            assert self.cur_sample is not None
            sample = self.cur_sample
            self.cur_sample = None
        elif len(ets) == 2:
            model_output = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            model_output = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            model_output = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        prev_sample = self._get_prev_sample(sample, t, prev_t, model_output)
        self.counter += 1
        return prev_sample

    def _get_prev_sample(
        self, sample: np.ndarray, timestep: int, prev_timestep: int, model_output: np.ndarray
    ) -> np.ndarray:
        """Formula (9) of the PNDM paper, as diffusers `_get_prev_sample`."""
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self._alpha_prev(prev_timestep)
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        if self.config["prediction_type"] == "v_prediction":
            model_output = np.sqrt(alpha_prod_t) * model_output + np.sqrt(beta_prod_t) * sample
        sample_coeff = np.sqrt(alpha_prod_t_prev / alpha_prod_t)
        denom = alpha_prod_t * np.sqrt(beta_prod_t_prev) + np.sqrt(alpha_prod_t * beta_prod_t * alpha_prod_t_prev)
        prev_sample: np.ndarray = sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * model_output / denom
        return prev_sample


# --------------------------------------------------------------------------------------------------
# Sigma-indexed schedulers (k-diffusion style): Euler, Euler ancestral, DPM-Solver++
# --------------------------------------------------------------------------------------------------


def _sigma_to_t(sigma: np.ndarray | float, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of `sigma`, by interpolating in log-sigma (diffusers `_sigma_to_t`)."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low = log_sigmas[low_idx]
    high = log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    t: np.ndarray = (1 - w) * low_idx + w * high_idx
    return t.reshape(sigma.shape)


def _karras_sigmas(config: Mapping[str, Any], in_sigmas: np.ndarray, steps: int) -> np.ndarray:
    """Karras et al. (2022) rho=7 schedule between the config's (or the input's) sigma_min and sigma_max."""
    sigma_min = config.get("sigma_min")
    sigma_max = config.get("sigma_max")
    sigma_min = sigma_min if sigma_min is not None else in_sigmas[-1].item()
    sigma_max = sigma_max if sigma_max is not None else in_sigmas[0].item()
    rho = 7.0
    ramp = np.linspace(0, 1, steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas: np.ndarray = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return sigmas


def _exponential_sigmas(config: Mapping[str, Any], in_sigmas: np.ndarray, steps: int) -> np.ndarray:
    """Sigmas evenly spaced in log between sigma_max and sigma_min (diffusers `_convert_to_exponential`)."""
    sigma_min = config.get("sigma_min")
    sigma_max = config.get("sigma_max")
    sigma_min = sigma_min if sigma_min is not None else in_sigmas[-1].item()
    sigma_max = sigma_max if sigma_max is not None else in_sigmas[0].item()
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), steps))


class _SigmaScheduler(Scheduler):
    """Shared state of schedulers that walk a sigma table with an internal `step_index`."""

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self._require("timestep_spacing", _SPACINGS)
        betas = _make_betas(self.config)
        zero_snr = bool(self.config.get("rescale_betas_zero_snr"))
        if zero_snr:
            betas = _rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas = (_F32(1.0) - betas).astype(_F32)
        self.alphas_cumprod = _cumprod_f32(self.alphas)
        if zero_snr:
            # diffusers: avoid an infinite sigma at the last training step.
            self.alphas_cumprod[-1] = _F32(2.0**-24)
        self.sigmas = np.zeros(0, dtype=_F32)

    def _train_sigmas(self) -> np.ndarray:
        """sqrt((1 - a) / a) for every training timestep, ascending in t (float32, like diffusers)."""
        ac = self.alphas_cumprod
        sigmas: np.ndarray = np.sqrt((1 - ac) / ac)
        return sigmas

    def _spaced_timesteps(self, steps: int) -> np.ndarray:
        """Float timesteps for Euler-style schedulers (diffusers' three `timestep_spacing` rules)."""
        n = int(self.config["num_train_timesteps"])
        spacing = self.config["timestep_spacing"]
        if spacing == "linspace":
            return np.linspace(0, n - 1, steps, dtype=_F32)[::-1].copy()
        if spacing == "leading":
            timesteps = (np.arange(0, steps) * (n // steps)).round()[::-1].copy().astype(_F32)
            timesteps += int(self.config["steps_offset"])
            return timesteps
        timesteps = np.arange(n, 0, -(n / steps)).round().copy().astype(_F32)
        timesteps -= 1
        return timesteps

    def index_for_timestep(self, timestep: Any, schedule_timesteps: np.ndarray | None = None) -> int:
        """Position of `timestep` in the schedule; the second match if it repeats (diffusers rule)."""
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        indices = np.flatnonzero(schedule == np.asarray(timestep))
        if len(indices) == 0:
            raise ValueError(f"timestep {timestep!r} is not in this scheduler's timesteps")
        return int(indices[1 if len(indices) > 1 else 0])

    def _init_step_index(self, timestep: Any) -> None:
        if self._begin_index is None:
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def _noise_indices(self, timesteps: np.ndarray) -> list[int]:
        """Sigma indices for `add_noise`: the begin/step index when known, else a timestep lookup."""
        timesteps = np.asarray(timesteps).reshape(-1)
        if self._begin_index is None:
            return [self.index_for_timestep(t, self.timesteps) for t in timesteps]
        if self._step_index is not None:
            return [self._step_index] * timesteps.shape[0]
        return [self._begin_index] * timesteps.shape[0]

    @staticmethod
    def _reject_integer_timestep(timestep: Any) -> None:
        # diffusers refuses int / integer tensors here to catch `enumerate` indices passed as timesteps.
        if isinstance(timestep, (int, np.integer)) and not isinstance(timestep, bool):
            raise ValueError("pass one of scheduler.timesteps (a float) as the timestep, not an integer index")


class _EulerBase(_SigmaScheduler):
    """Sigma bookkeeping common to the two Euler schedulers."""

    @property
    def init_noise_sigma(self) -> float:
        """Largest sigma, or sqrt(sigma_max^2 + 1) for "leading" spacing (as diffusers)."""
        max_sigma = self.sigmas.max()
        if self.config["timestep_spacing"] in ("linspace", "trailing"):
            return float(max_sigma)
        return float(np.sqrt(max_sigma * max_sigma + 1))

    def scale_model_input(self, sample: np.ndarray, timestep: Any = None) -> np.ndarray:
        """Divide by sqrt(sigma^2 + 1) so the denoiser sees unit-variance input."""
        if self._step_index is None:
            self._init_step_index(timestep)
        assert self._step_index is not None
        sigma = self.sigmas[self._step_index]
        scaled: np.ndarray = sample / np.sqrt(sigma * sigma + 1)
        return scaled

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
        """x0 + sigma * noise at the sigma of `timesteps` (or of the begin/step index once known)."""
        sigmas = self.sigmas.astype(original_samples.dtype)
        sigma = _broadcast_per_sample(sigmas[self._noise_indices(timesteps)], original_samples.ndim)
        noisy: np.ndarray = original_samples + noise * sigma
        return noisy

    def _pred_original_sample(self, model_output: np.ndarray, sample: np.ndarray, sigma: np.float32) -> np.ndarray:
        if self.config["prediction_type"] == "v_prediction":
            x0: np.ndarray = model_output * (-sigma / np.sqrt(sigma * sigma + 1)) + (sample / (sigma * sigma + 1))
            return x0
        if self.config["prediction_type"] in ("sample", "original_sample"):
            return model_output
        return sample - sigma * model_output  # epsilon


class EulerDiscreteScheduler(_EulerBase):
    """diffusers `EulerDiscreteScheduler` (Karras et al. Algorithm 2, deterministic: s_churn = 0)."""

    defaults: ClassVar[Mapping[str, Any]] = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "prediction_type": "epsilon",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "sigma_min": None,
        "sigma_max": None,
        "timestep_spacing": "linspace",
        "timestep_type": "discrete",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "final_sigmas_type": "zero",
    }

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self._require("prediction_type", ("epsilon", "v_prediction", "sample", "original_sample"))
        self._require("interpolation_type", ("linear", "log_linear"))
        self._require("timestep_type", ("discrete", "continuous"))
        self._require("final_sigmas_type", ("zero", "sigma_min"))
        if self.config["use_beta_sigmas"]:
            raise UnsupportedScheduler("EulerDiscreteScheduler: use_beta_sigmas (needs scipy) is not supported")
        if sum(bool(self.config[k]) for k in ("use_karras_sigmas", "use_exponential_sigmas")) > 1:
            raise UnsupportedScheduler("only one of use_karras_sigmas / use_exponential_sigmas may be set")
        n = int(self.config["num_train_timesteps"])
        sigmas = self._train_sigmas()[::-1]
        self.timesteps = np.linspace(0, n - 1, n, dtype=float)[::-1].copy().astype(_F32)
        if self._continuous_v():
            self.timesteps = (0.25 * np.log(sigmas)).astype(_F32)
        self.sigmas = np.concatenate([sigmas, np.zeros(1, dtype=_F32)]).astype(_F32)

    def _continuous_v(self) -> bool:
        return bool(self.config["timestep_type"] == "continuous" and self.config["prediction_type"] == "v_prediction")

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Float32 timesteps and the matching sigma table (diffusers Euler `set_timesteps`)."""
        steps = self._check_steps(num_inference_steps)
        self.num_inference_steps = steps
        timesteps = self._spaced_timesteps(steps)
        train_sigmas = self._train_sigmas()
        log_sigmas = np.log(train_sigmas)
        if self.config["interpolation_type"] == "linear":
            sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        else:  # log_linear: torch.linspace(...).exp() in float32
            sigmas = np.exp(_torch_linspace_f32(float(log_sigmas[-1]), float(log_sigmas[0]), steps + 1))
        if self.config["use_karras_sigmas"]:
            sigmas = _karras_sigmas(self.config, sigmas, steps)
            timesteps = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
        elif self.config["use_exponential_sigmas"]:
            sigmas = _exponential_sigmas(self.config, sigmas, steps)
            timesteps = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
        if self.config["final_sigmas_type"] == "sigma_min":
            ac0 = self.alphas_cumprod[0]
            sigma_last = np.sqrt((1 - ac0) / ac0)
        else:
            sigma_last = 0
        sigmas = np.concatenate([sigmas, [sigma_last]]).astype(_F32)
        if self._continuous_v():
            self.timesteps = (0.25 * np.log(sigmas[:-1])).astype(_F32)
        else:
            self.timesteps = np.asarray(timesteps).astype(_F32)
        self.sigmas = sigmas
        self._step_index = None
        self._begin_index = None

    def step(
        self,
        model_output: np.ndarray,
        timestep: Any,
        sample: np.ndarray,
        generator: Generators = None,
    ) -> np.ndarray:
        """Euler step from sigma to the next sigma; `generator` is unused (s_churn = 0 adds no noise)."""
        self._reject_integer_timestep(timestep)
        if self._step_index is None:
            self._init_step_index(timestep)
        assert self._step_index is not None
        sample = sample.astype(_F32, copy=False)
        sigma = self.sigmas[self._step_index]
        sigma_hat = sigma  # gamma = 0 because s_churn = 0, so sigma_hat = sigma * (gamma + 1) = sigma
        pred_original_sample = self._pred_original_sample(model_output, sample, sigma_hat)
        derivative = (sample - pred_original_sample) / sigma_hat
        dt = self.sigmas[self._step_index + 1] - sigma_hat
        prev_sample: np.ndarray = (sample + derivative * dt).astype(model_output.dtype, copy=False)
        self._step_index += 1
        return prev_sample


class EulerAncestralDiscreteScheduler(_EulerBase):
    """diffusers `EulerAncestralDiscreteScheduler`: Euler step to sigma_down, plus fresh noise * sigma_up."""

    defaults: ClassVar[Mapping[str, Any]] = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "prediction_type": "epsilon",
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        # diffusers raises NotImplementedError for "sample" at step time.
        self._require("prediction_type", ("epsilon", "v_prediction"))
        n = int(self.config["num_train_timesteps"])
        sigmas = self._train_sigmas()
        self.sigmas = np.concatenate([sigmas[::-1], [0.0]]).astype(_F32)
        self.timesteps = np.linspace(0, n - 1, n, dtype=float)[::-1].copy()

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Float32 timesteps and interpolated sigmas (diffusers EulerAncestral `set_timesteps`)."""
        steps = self._check_steps(num_inference_steps)
        self.num_inference_steps = steps
        timesteps = self._spaced_timesteps(steps)
        train_sigmas = self._train_sigmas()
        sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(_F32)
        self.timesteps = timesteps
        self._step_index = None
        self._begin_index = None

    def step(
        self,
        model_output: np.ndarray,
        timestep: Any,
        sample: np.ndarray,
        generator: Generators = None,
    ) -> np.ndarray:
        """Ancestral step; draws one standard-normal array of `model_output.shape` from `generator`."""
        self._reject_integer_timestep(timestep)
        if self._step_index is None:
            self._init_step_index(timestep)
        assert self._step_index is not None
        sigma = self.sigmas[self._step_index]
        sample = sample.astype(_F32, copy=False)
        pred_original_sample = self._pred_original_sample(model_output, sample, sigma)
        sigma_from = self.sigmas[self._step_index]
        sigma_to = self.sigmas[self._step_index + 1]
        sigma_from_sq = sigma_from * sigma_from
        sigma_to_sq = sigma_to * sigma_to
        sigma_up = np.sqrt(sigma_to_sq * (sigma_from_sq - sigma_to_sq) / sigma_from_sq)
        sigma_down = np.sqrt(sigma_to_sq - sigma_up * sigma_up)
        derivative = (sample - pred_original_sample) / sigma
        dt = sigma_down - sigma
        prev_sample: np.ndarray = sample + derivative * dt
        noise = _randn(tuple(model_output.shape), generator).astype(model_output.dtype, copy=False)
        prev_sample = (prev_sample + noise * sigma_up).astype(model_output.dtype, copy=False)
        self._step_index += 1
        return prev_sample


class DPMSolverMultistepScheduler(_SigmaScheduler):
    """diffusers `DPMSolverMultistepScheduler` for algorithm_type "dpmsolver++" / "sde-dpmsolver++".

    Stable Diffusion 2 uses the defaults: dpmsolver++, solver_order 2, midpoint, lower_order_final.
    """

    defaults: ClassVar[Mapping[str, Any]] = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "solver_order": 2,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -float("inf"),
        "variance_type": None,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
        "sigma_min": None,
        "sigma_max": None,
    }

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        # diffusers silently maps these legacy names (schedulers swapped in from DEIS / UniPC configs).
        if self.config["algorithm_type"] == "deis":
            self.config["algorithm_type"] = "dpmsolver++"
        if self.config["solver_type"] in ("logrho", "bh1", "bh2"):
            self.config["solver_type"] = "midpoint"
        self._require("algorithm_type", ("dpmsolver++", "sde-dpmsolver++"))
        self._require("solver_type", ("midpoint", "heun"))
        self._require("solver_order", (1, 2, 3))
        self._require("prediction_type", ("epsilon", "sample", "v_prediction"))
        self._require("final_sigmas_type", ("zero", "sigma_min"))
        self._require("variance_type", (None,))
        for key in ("use_beta_sigmas", "use_flow_sigmas", "use_dynamic_shifting"):
            if self.config[key]:
                raise UnsupportedScheduler(f"DPMSolverMultistepScheduler: {key}=True is not supported")
        if sum(bool(self.config[k]) for k in ("use_karras_sigmas", "use_exponential_sigmas")) > 1:
            raise UnsupportedScheduler("only one of use_karras_sigmas / use_exponential_sigmas may be set")
        ac = self.alphas_cumprod
        self.alpha_t = np.sqrt(ac)
        self.sigma_t = np.sqrt(1 - ac)
        self.lambda_t = np.log(self.alpha_t) - np.log(self.sigma_t)
        self.sigmas = self._train_sigmas()
        n = int(self.config["num_train_timesteps"])
        self.timesteps = np.linspace(0, n - 1, n, dtype=_F32)[::-1].copy()
        self.model_outputs: list[np.ndarray | None] = [None] * int(self.config["solver_order"])
        self.lower_order_nums = 0

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Integer timesteps and the sigma table (diffusers DPM-Solver `set_timesteps`)."""
        steps = self._check_steps(num_inference_steps)
        cfg = self.config
        n = int(cfg["num_train_timesteps"])
        lambda_min = _F32(cfg["lambda_min_clipped"])
        clipped_idx = int(np.searchsorted(self.lambda_t[::-1], lambda_min, side="left"))
        last_timestep = n - clipped_idx
        spacing = cfg["timestep_spacing"]
        if spacing == "linspace":
            timesteps = np.linspace(0, last_timestep - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif spacing == "leading":
            step_ratio = last_timestep // (steps + 1)
            timesteps = (np.arange(0, steps + 1) * step_ratio).round()[::-1][:-1].copy().astype(np.int64)
            timesteps += int(cfg["steps_offset"])
        else:  # trailing
            timesteps = np.arange(last_timestep, 0, -(n / steps)).round().copy().astype(np.int64)
            timesteps -= 1
        sigmas = self._train_sigmas()
        log_sigmas = np.log(sigmas)
        if cfg["use_karras_sigmas"]:
            sigmas = _karras_sigmas(cfg, np.flip(sigmas).copy(), steps)
            timesteps = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
            if cfg["beta_schedule"] != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        elif cfg["use_lu_lambdas"]:
            lambdas = np.flip(log_sigmas.copy())
            ramp = np.linspace(0, 1, steps)
            lambda_min_v, lambda_max_v = lambdas[-1].item(), lambdas[0].item()
            sigmas = np.exp(lambda_max_v + ramp * (lambda_min_v - lambda_max_v))
            timesteps = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
            if cfg["beta_schedule"] != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        elif cfg["use_exponential_sigmas"]:
            sigmas = _exponential_sigmas(cfg, np.flip(sigmas).copy(), steps)
            timesteps = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
        if cfg["final_sigmas_type"] == "sigma_min":
            ac0 = self.alphas_cumprod[0]
            sigma_last = np.sqrt((1 - ac0) / ac0)
        else:
            sigma_last = 0
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(_F32)
        self.timesteps = np.asarray(timesteps).astype(np.int64)
        self.num_inference_steps = len(self.timesteps)
        self.model_outputs = [None] * int(cfg["solver_order"])
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep: Any, schedule_timesteps: np.ndarray | None = None) -> int:
        """Like the Euler lookup, but an unknown timestep maps to the last index (diffusers DPM rule)."""
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        candidates = np.flatnonzero(schedule == np.asarray(timestep))
        if len(candidates) == 0:
            return len(self.timesteps) - 1
        return int(candidates[1 if len(candidates) > 1 else 0])

    @staticmethod
    def _alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
        alpha_t = 1 / np.sqrt(sigma * sigma + 1)
        return alpha_t, sigma * alpha_t

    @staticmethod
    def _lambda(alpha: np.float32, sigma: np.float32) -> np.float32:
        with np.errstate(divide="ignore"):  # sigma = 0 at the final step gives lambda = +inf, as in torch
            lam: np.float32 = np.log(alpha) - np.log(sigma)
            return lam

    def _convert_model_output(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """Turn the model output into a data (x0) prediction, as dpmsolver++ needs."""
        assert self._step_index is not None
        prediction_type = self.config["prediction_type"]
        if prediction_type == "sample":
            x0_pred = model_output
        else:
            alpha_t, sigma_t = self._alpha_sigma(self.sigmas[self._step_index])
            if prediction_type == "epsilon":
                x0_pred = (sample - sigma_t * model_output) / alpha_t
            else:  # v_prediction
                x0_pred = alpha_t * sample - sigma_t * model_output
        if self.config["thresholding"]:
            x0_pred = _threshold_sample(
                x0_pred, self.config["dynamic_thresholding_ratio"], self.config["sample_max_value"]
            )
        return x0_pred

    def _first_order(self, model_output: np.ndarray, sample: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
        assert self._step_index is not None
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[self._step_index + 1])
        alpha_s, sigma_s = self._alpha_sigma(self.sigmas[self._step_index])
        h = self._lambda(alpha_t, sigma_t) - self._lambda(alpha_s, sigma_s)
        if self.config["algorithm_type"] == "dpmsolver++":
            x_t: np.ndarray = (sigma_t / sigma_s) * sample - (alpha_t * (np.exp(-h) - 1.0)) * model_output
            return x_t
        assert noise is not None
        x_t = (
            (sigma_t / sigma_s * np.exp(-h)) * sample
            + (alpha_t * (1 - np.exp(-2.0 * h))) * model_output
            + sigma_t * np.sqrt(1.0 - np.exp(-2 * h)) * noise
        )
        return x_t

    def _second_order(self, sample: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
        assert self._step_index is not None
        i = self._step_index
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[i + 1])
        alpha_s0, sigma_s0 = self._alpha_sigma(self.sigmas[i])
        alpha_s1, sigma_s1 = self._alpha_sigma(self.sigmas[i - 1])
        lambda_t = self._lambda(alpha_t, sigma_t)
        lambda_s0 = self._lambda(alpha_s0, sigma_s0)
        lambda_s1 = self._lambda(alpha_s1, sigma_s1)
        m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
        assert m0 is not None and m1 is not None
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        d0, d1 = m0, (1.0 / r0) * (m0 - m1)
        midpoint = self.config["solver_type"] == "midpoint"
        if self.config["algorithm_type"] == "dpmsolver++":
            if midpoint:
                x_t: np.ndarray = (
                    (sigma_t / sigma_s0) * sample
                    - (alpha_t * (np.exp(-h) - 1.0)) * d0
                    - 0.5 * (alpha_t * (np.exp(-h) - 1.0)) * d1
                )
                return x_t
            x_t = (
                (sigma_t / sigma_s0) * sample
                - (alpha_t * (np.exp(-h) - 1.0)) * d0
                + (alpha_t * ((np.exp(-h) - 1.0) / h + 1.0)) * d1
            )
            return x_t
        assert noise is not None
        if midpoint:
            x_t = (
                (sigma_t / sigma_s0 * np.exp(-h)) * sample
                + (alpha_t * (1 - np.exp(-2.0 * h))) * d0
                + 0.5 * (alpha_t * (1 - np.exp(-2.0 * h))) * d1
                + sigma_t * np.sqrt(1.0 - np.exp(-2 * h)) * noise
            )
            return x_t
        x_t = (
            (sigma_t / sigma_s0 * np.exp(-h)) * sample
            + (alpha_t * (1 - np.exp(-2.0 * h))) * d0
            + (alpha_t * ((1.0 - np.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * d1
            + sigma_t * np.sqrt(1.0 - np.exp(-2 * h)) * noise
        )
        return x_t

    def _third_order(self, sample: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
        assert self._step_index is not None
        i = self._step_index
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[i + 1])
        alpha_s0, sigma_s0 = self._alpha_sigma(self.sigmas[i])
        alpha_s1, sigma_s1 = self._alpha_sigma(self.sigmas[i - 1])
        alpha_s2, sigma_s2 = self._alpha_sigma(self.sigmas[i - 2])
        lambda_t = self._lambda(alpha_t, sigma_t)
        lambda_s0 = self._lambda(alpha_s0, sigma_s0)
        lambda_s1 = self._lambda(alpha_s1, sigma_s1)
        lambda_s2 = self._lambda(alpha_s2, sigma_s2)
        m0, m1, m2 = self.model_outputs[-1], self.model_outputs[-2], self.model_outputs[-3]
        assert m0 is not None and m1 is not None and m2 is not None
        h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
        r0, r1 = h_0 / h, h_1 / h
        d0 = m0
        d1_0, d1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
        if self.config["algorithm_type"] == "dpmsolver++":
            x_t: np.ndarray = (
                (sigma_t / sigma_s0) * sample
                - (alpha_t * (np.exp(-h) - 1.0)) * d0
                + (alpha_t * ((np.exp(-h) - 1.0) / h + 1.0)) * d1
                - (alpha_t * ((np.exp(-h) - 1.0 + h) / h**2 - 0.5)) * d2
            )
            return x_t
        assert noise is not None
        x_t = (
            (sigma_t / sigma_s0 * np.exp(-h)) * sample
            + (alpha_t * (1.0 - np.exp(-2.0 * h))) * d0
            + (alpha_t * ((1.0 - np.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * d1
            + (alpha_t * ((1.0 - np.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * d2
            + sigma_t * np.sqrt(1.0 - np.exp(-2 * h)) * noise
        )
        return x_t

    def step(
        self,
        model_output: np.ndarray,
        timestep: Any,
        sample: np.ndarray,
        generator: Generators = None,
    ) -> np.ndarray:
        """One multistep DPM-Solver++ update; the SDE variant draws one noise array from `generator`."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        assert self._step_index is not None
        cfg = self.config
        n_steps = len(self.timesteps)
        lower_order_final = (self._step_index == n_steps - 1) and (
            cfg["euler_at_final"] or (cfg["lower_order_final"] and n_steps < 15) or cfg["final_sigmas_type"] == "zero"
        )
        lower_order_second = (self._step_index == n_steps - 2) and cfg["lower_order_final"] and n_steps < 15
        converted = self._convert_model_output(model_output, sample)
        order = int(cfg["solver_order"])
        for i in range(order - 1):
            self.model_outputs[i] = self.model_outputs[i + 1]
        self.model_outputs[-1] = converted
        sample = sample.astype(_F32, copy=False)
        noise = _randn(tuple(converted.shape), generator) if cfg["algorithm_type"] == "sde-dpmsolver++" else None
        with np.errstate(divide="ignore", invalid="ignore"):
            if order == 1 or self.lower_order_nums < 1 or lower_order_final:
                prev_sample = self._first_order(converted, sample, noise)
            elif order == 2 or self.lower_order_nums < 2 or lower_order_second:
                prev_sample = self._second_order(sample, noise)
            else:
                prev_sample = self._third_order(sample, noise)
        if self.lower_order_nums < order:
            self.lower_order_nums += 1
        self._step_index += 1
        return prev_sample.astype(converted.dtype, copy=False)

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
        """alpha(sigma) * x0 + sigma(sigma) * noise at the sigma of `timesteps` (or the begin/step index)."""
        sigmas = self.sigmas.astype(original_samples.dtype)
        sigma = _broadcast_per_sample(sigmas[self._noise_indices(timesteps)], original_samples.ndim)
        alpha_t = 1 / np.sqrt(sigma * sigma + 1)
        sigma_t = sigma * alpha_t
        noisy: np.ndarray = alpha_t * original_samples + sigma_t * noise
        return noisy


_REGISTRY: dict[str, type[Scheduler]] = {
    cls.__name__: cls
    for cls in (
        DDIMScheduler,
        PNDMScheduler,
        EulerDiscreteScheduler,
        EulerAncestralDiscreteScheduler,
        DPMSolverMultistepScheduler,
    )
}

SUPPORTED_SCHEDULERS: tuple[str, ...] = tuple(_REGISTRY)


def default_config(class_name: str) -> dict[str, Any]:
    """The class's constructor defaults (what diffusers fills in for keys a config omits)."""
    cls = _REGISTRY.get(class_name)
    if cls is None:
        raise UnsupportedScheduler(
            f"scheduler {class_name!r} is not supported; supported: {', '.join(SUPPORTED_SCHEDULERS)}"
        )
    return dict(cls.defaults)


def make_scheduler(config: Mapping[str, Any]) -> Scheduler:
    """Build a fresh scheduler from a diffusers scheduler config (as in scheduler_config.json).

    `_class_name` picks the class; other "_"-prefixed keys and keys the class does not know are ignored,
    as diffusers' `from_config` does.
    """
    name = config.get("_class_name")
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise UnsupportedScheduler(f"scheduler {name!r} is not supported; supported: {', '.join(SUPPORTED_SCHEDULERS)}")
    return cls(**{k: v for k, v in config.items() if not k.startswith("_")})


# --------------------------------------------------------------------------------------------------
# A scheduler per request: the API's names, and diffusers' `from_config` swap
# --------------------------------------------------------------------------------------------------

SCHEDULER_NAMES: Mapping[str, str] = {
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
}
"""The request's `scheduler` names (AUTOMATIC1111/ComfyUI style) and the diffusers class each one is."""


def scheduler_class(name: str) -> str | None:
    """The diffusers class a request's `scheduler` names (a short name or the class name itself), else None."""
    if name in SCHEDULER_NAMES:
        return SCHEDULER_NAMES[name]
    return name if name in _REGISTRY else None


def scheduler_name(class_name: str) -> str | None:
    """The short API name of a diffusers scheduler class (None for a class this port lacks)."""
    return next((short for short, cls in SCHEDULER_NAMES.items() if cls == class_name), None)


def swap_scheduler_config(config: Mapping[str, Any], class_name: str) -> dict[str, Any]:
    """`<class_name>.from_config(config)`'s config, as diffusers' `SchedulerMixin.from_config` builds it.

    Keys the config only holds because its class used their defaults (`_use_default_values`) are dropped, so
    the target's own defaults apply; keys the target does not know are dropped; every other key is kept
    (beta schedule, `timestep_spacing`, `steps_offset`, `prediction_type`, ...). The model's own class keeps
    its config as it is, so naming a model's own scheduler runs exactly what omitting it runs.
    """
    if config.get("_class_name") == class_name:
        return dict(config)
    known = default_config(class_name)
    defaulted = config.get("_use_default_values") or ()
    kept = {k: v for k, v in config.items() if k in known and k not in defaulted}
    return {"_class_name": class_name, **kept}


def scheduler_choices(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Short name -> the config it runs on a model whose scheduler config is `config`, for every name whose
    swapped config this port can build (e.g. `pndm` needs `skip_prk_steps`, which only PNDM configs set)."""
    choices = {}
    for short, class_name in SCHEDULER_NAMES.items():
        swapped = swap_scheduler_config(config, class_name)
        try:
            make_scheduler(swapped)
        except UnsupportedScheduler:
            continue
        choices[short] = swapped
    return choices
