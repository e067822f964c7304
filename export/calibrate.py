"""`python -m export --calibrate`: the batch policy of the UNet and both VAE halves, measured on this host.

On a GPU a bigger batch is nearly free per row; on CPUs the per-row cost stops falling after a row or two
(the 512 px UNet on 2 cores: 1.02 s a row alone, 0.92 at 2 rows, about 1.5 at 4), so large batches buy nothing and
hold memory. Each component's ONNX is timed with the session settings its config.pbtxt gives the python runner
(through the runner's own `session_options`, so the two cannot drift) at 1, 2, 4, 8... rows at the model's
native size (per-sample timesteps for the UNet), and its config and the manifest get the policy the times call for.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.lora import LORA_INPUT, empty_lora_feeds_for
from export.repository import (
    MANIFEST_SUFFIX,
    config_parameters,
    model_name,
    python_runner,
    render_dynamic_batching,
)

# The batch sizes tried, doubling, up to the export's --max-batch-size.
BATCHES = (1, 2, 4, 8)
# Timed calls per batch size after one warm-up call (the first call allocates and picks kernels): their median.
# At least REPEATS, and more until MIN_TIMED_S have been timed, so a millisecond model is not timed on noise.
REPEATS = 2
MIN_TIMED_S = 0.5
# A doubling is worth its rows' wait and memory only if it cuts the per-row cost by at least this much; smaller
# gains are within the run-to-run noise of a shared host.
MIN_GAIN = 0.05
# The UNet's queue delay: this fraction of one 1-row call, so a lone request waits at most that much longer for
# company, while concurrent requests' steps, which arrive within a call of each other, get merged.
QUEUE_DELAY_FRACTION = 0.1
# What one more Triton execution costs beside the model's own time (the python backend's IPC and the gateway's
# call: the benchmark's identity probe measures ~0.8 ms through Triton, the gateway ~1 ms of CPU a call), so a
# millisecond model is not split into executions whose overhead outweighs the rows' time.
EXECUTION_OVERHEAD_S = 0.002
# A guided image's UNet step is one call of 2 rows (unconditional and conditional): the batch limit never goes
# below it, so the gateway never splits a one-image request's step in two round trips.
GUIDED_ROWS = 2
RULE = (
    f"best: the largest doubling b -> 2b, from 1 row, at which the per-row time with a {EXECUTION_OVERHEAD_S} s "
    f"execution overhead still falls, (t(2b) + o)/2b < (1 - {MIN_GAIN}) x (t(b) + o)/b (measuring stops at "
    f"the first that does not); max_batch_size: max(best, {GUIDED_ROWS}) within --max-batch-size; "
    "preferred_batch_size: [best] when above 1; "
    f"max_queue_delay_microseconds: 0 when best is 1, else {QUEUE_DELAY_FRACTION} x t(1)"
)
CALIBRATION_FILE = "calibration.json"


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int
    preferred_batch_size: tuple[int, ...]
    max_queue_delay_us: int


def best_batch(seconds: Mapping[int, float]) -> int:
    """The batch at which the per-row cost, with the execution overhead, stops falling (`RULE`)."""

    def per_row(batch: int) -> float:
        return (seconds[batch] + EXECUTION_OVERHEAD_S) / batch

    best = 1
    while 2 * best in seconds and per_row(2 * best) < (1 - MIN_GAIN) * per_row(best):
        best *= 2
    return best


def choose_policy(seconds: Mapping[int, float], cap: int | None = None, floor: int = GUIDED_ROWS) -> BatchPolicy:
    """The policy for measured seconds per call by batch size (`RULE`), within `cap` (--max-batch-size) and at
    least `floor` rows (the UNet's: one guided image; a VAE's: 1)."""
    best = best_batch(seconds) if cap is None else min(best_batch(seconds), cap)
    limit = max(best, floor) if cap is None else min(max(best, floor), cap)
    if best == 1:
        return BatchPolicy(limit, (), 0)
    return BatchPolicy(limit, (best,), round(QUEUE_DELAY_FRACTION * seconds[1] * 1e6))


def worth_doubling(seconds: Mapping[int, float], batch: int) -> bool:
    """Whether the measurement at `batch` still calls for trying 2 x `batch` (`RULE`)."""
    return best_batch(seconds) == batch


def render_batching(policy: BatchPolicy, *, priority_levels: bool = False) -> str:
    """The policy's `dynamic_batching` line, with the priority levels when the export configured them."""
    return render_dynamic_batching(
        policy.max_queue_delay_us, policy.preferred_batch_size, priority_levels=priority_levels
    )


# The components whose batch policy is measured, and the fewest rows each may be limited to: the UNet's step of
# one guided image is 2 rows in one call; a VAE call is one image's row. (The text encoder's calls are short and
# mostly skipped by the gateway's embedding cache: it keeps the export's limit.)
CALIBRATED = {"unet": GUIDED_ROWS, "vae_encoder": 1, "vae_decoder": 1}


def native_side(manifest: Mapping[str, Any], component: str) -> int:
    """The side of the component's image input at the native size: pixels for the VAE encoder, else latents."""
    native = int(manifest["native_resolution"])
    return native if component == "vae_encoder" else native // int(manifest["vae_scale_factor"])


def component_feeds(
    manifest: Mapping[str, Any], component: str, batch: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Inputs of `batch` rows at the native size (`native_side`), one timestep per row, the text window's length."""
    side = native_side(manifest, component)
    feeds = {}
    for spec in manifest["components"][component]["inputs"].values():
        dtype = np.float16 if spec["datatype"] == "FP16" else np.float32
        shape = [batch] + [side if d == -1 else int(d) for d in spec["shape"][1:]]
        if spec["name"] == "timestep":
            feeds[spec["name"]] = np.linspace(1, 999, batch).astype(dtype)  # per sample, as the gateway sends
        else:
            feeds[spec["name"]] = rng.standard_normal(shape).astype(dtype)
    return feeds


def _host() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu = found.group(1) if found else cpu
    except OSError:  # not Linux
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()}


def calibrate(
    staging: Path, manifest: dict[str, Any], max_batch_size: int, report: Callable[[str], None] = print
) -> dict[str, BatchPolicy]:
    """Measure and write the batch policy of each calibrated component (`CALIBRATED`) the pipeline has, then the
    manifest once with every component's new `max_batch_size`."""
    runner = python_runner()
    policies = {
        component: calibrate_component(staging, manifest, component, max_batch_size, runner, report)
        for component in CALIBRATED
        if component in manifest["components"]
    }
    (staging / f"{manifest['name']}{MANIFEST_SUFFIX}").write_text(json.dumps(manifest, indent=2) + "\n")
    return policies


def calibrate_component(
    staging: Path,
    manifest: dict[str, Any],
    component: str,
    max_batch_size: int,
    runner: Any,
    report: Callable[[str], None] = print,
) -> BatchPolicy:
    """Time one staged component with the python `runner`'s session settings, write its batch policy into its
    config.pbtxt and into `manifest` (the caller writes the manifest), and the measurement into
    `<model>/calibration.json`."""
    import onnxruntime as ort

    model_dir = staging / model_name(str(manifest["name"]), component)
    config_path = model_dir / "config.pbtxt"
    config = config_path.read_text()
    params = config_parameters(config)
    providers = runner._providers("MODEL", "0")  # CUDA where a GPU instance would use it, else the CPU
    session = ort.InferenceSession(
        str(model_dir / "1" / params.get("onnx_file", "model.onnx")),
        runner.session_options(params),
        providers=providers,
    )
    rng = np.random.default_rng(0)
    seconds: dict[int, float] = {}
    for batch in (b for b in BATCHES if b <= max_batch_size):
        if batch > 1 and not worth_doubling(seconds, batch // 2):
            break
        feeds = component_feeds(manifest, component, batch, rng)
        # With LoRA slots: rows without adapters (the common case, and what the batch policy is for).
        feeds.pop(LORA_INPUT, None)
        feeds.update(empty_lora_feeds_for({i.name: list(i.shape) for i in session.get_inputs()}))
        session.run(None, feeds)  # warm-up
        times: list[float] = []
        while len(times) < REPEATS or sum(times) < MIN_TIMED_S:
            start = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - start)
        seconds[batch] = statistics.median(times)
        report(
            f"calibrate: {component} at {batch} row(s): {seconds[batch]:.3f} s a call, "
            f"{seconds[batch] / batch:.3f} s a row"
        )
    del session
    policy = choose_policy(seconds, max_batch_size, floor=CALIBRATED[component])
    if component != "unet":  # only the UNet's steps arrive together and gain from waiting for company
        policy = BatchPolicy(policy.max_batch_size, policy.preferred_batch_size, 0)
    config = re.sub(r"^max_batch_size: \d+$", f"max_batch_size: {policy.max_batch_size}", config, flags=re.MULTILINE)
    levels = re.search(r"^dynamic_batching \{.*priority_levels.*\}$", config, flags=re.MULTILINE) is not None
    batching = render_batching(policy, priority_levels=levels)
    config = re.sub(r"^dynamic_batching \{.*\}$", batching, config, flags=re.MULTILINE)
    config_path.write_text(config)
    manifest["components"][component]["max_batch_size"] = policy.max_batch_size
    record = {
        "host": {**_host(), "onnxruntime": ort.__version__, "providers": session_providers(providers)},
        "settings": {**params, "side": native_side(manifest, component)},
        "timed_calls": f"median of at least {REPEATS} calls and {MIN_TIMED_S} s, after one warm-up call",
        "seconds_per_call": {str(b): s for b, s in seconds.items()},
        "seconds_per_row": {str(b): s / b for b, s in seconds.items()},
        "policy": asdict(policy),
        "rule": RULE if component == "unet" else f"{RULE}; floor 1 row and no queue delay for {component}",
    }
    (model_dir / CALIBRATION_FILE).write_text(json.dumps(record, indent=2) + "\n")
    report(
        f"calibrate: {component} max_batch_size {policy.max_batch_size}, preferred "
        f"{list(policy.preferred_batch_size)}, queue delay {policy.max_queue_delay_us} us"
    )
    return policy


def session_providers(providers: list[Any]) -> list[str]:
    return [p if isinstance(p, str) else str(p[0]) for p in providers]
