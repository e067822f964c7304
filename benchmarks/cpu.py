"""Where the CPU of a service run goes: per process (psutil) and, inside the gateway, per request stage.

Processes: the gateway (with any image worker processes it started), `tritonserver` itself, and each Triton
Python-backend stub (one process per model instance, found among tritonserver's children by the model's folder
in its command line), plus the load generator (reported, not counted as the service's CPU). CPU = user + system
seconds.

Stages: the gateway's `imagen_stage_cpu_seconds_total{stage}` (`gateway.observability.stage`) and its
`imagen_process_cpu_seconds_total`, read from its /metrics before and after a run; `other` = the process's CPU
minus the stages' (the event loop, HTTP parsing, gRPC I/O, asyncio, logging, what no stage wraps).
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterable, Mapping
from typing import Any

import psutil

GATEWAY, TRITON, LOADGEN = "gateway", "tritonserver", "loadgen"
STUB_PREFIX = "stub:"
OTHER_STAGE = "other"
_SAMPLE = re.compile(
    r'^(imagen_stage_cpu_seconds_total|imagen_process_cpu_seconds_total)(?:\{stage="([^"]*)"\})? (\S+)$'
)


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def _tree_cpu_s(process: psutil.Process) -> float:
    """The process and its live children (the gateway's image worker processes, `IMAGEN_IMAGE_POOL=processes`)."""
    total = _cpu_s(process)
    for child in process.children(recursive=True):
        try:
            total += _cpu_s(child)
        except psutil.Error:  # exited meanwhile
            continue
    return total


class ProcessCpu:
    """CPU seconds per named process of one service: snapshot before and after a run, subtract."""

    def __init__(self, gateway_pid: int, triton_pid: int, models: Iterable[str], loadgen_pid: int | None) -> None:
        self.processes: dict[str, psutil.Process] = {
            GATEWAY: psutil.Process(gateway_pid),
            TRITON: psutil.Process(triton_pid),
        }
        if loadgen_pid is not None:
            self.processes[LOADGEN] = psutil.Process(loadgen_pid)
        for stub in self.processes[TRITON].children(recursive=True):
            try:
                args = stub.cmdline()
            except psutil.Error:
                continue
            for model in models:
                if any(f"/{model}/" in arg for arg in args):
                    self.processes[f"{STUB_PREFIX}{model}"] = stub
        missing = [m for m in models if f"{STUB_PREFIX}{m}" not in self.processes]
        if missing:
            raise RuntimeError(f"no Triton stub process found for {missing}")

    def snapshot(self) -> dict[str, float]:
        return {name: _tree_cpu_s(p) if name == GATEWAY else _cpu_s(p) for name, p in self.processes.items()}

    def resident_gib(self) -> dict[str, float]:
        """Resident memory per process now (after a run: what each model stub holds after its largest batch)."""
        out = {}
        for name, process in self.processes.items():
            try:
                out[name] = process.memory_info().rss / 2**30
            except psutil.Error:  # exited
                continue
        return out


def parse_stage_metrics(text: str) -> tuple[dict[str, float], float]:
    """Prometheus text -> (CPU seconds per stage, the gateway process's CPU seconds)."""
    stages: dict[str, float] = {}
    process = 0.0
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, label, value = match.groups()
        if name == "imagen_process_cpu_seconds_total":
            process = float(value)
        elif label is not None:
            stages[label] = float(value)
    return stages, process


def scrape_stages(base_url: str) -> tuple[dict[str, float], float]:
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as response:  # noqa: S310 (our loopback URL)
        return parse_stage_metrics(response.read().decode())


def subtract(after: Mapping[str, float], before: Mapping[str, float]) -> dict[str, float]:
    return {name: value - before.get(name, 0.0) for name, value in after.items()}


def run_cpu(
    processes: Mapping[str, float], stages: Mapping[str, float], gateway_process_s: float, images: int
) -> dict[str, Any]:
    """One run's CPU figures: per process, gateway ms per image and share of the service's CPU, per stage."""
    service_s = sum(v for k, v in processes.items() if k != LOADGEN)
    gateway_s = processes.get(GATEWAY, 0.0)
    staged = {k: max(v, 0.0) for k, v in stages.items() if v > 0}
    # `other`: the gateway's CPU (its process tree, so image worker processes count) minus the stages'; without
    # psutil's figure, the gateway's own `imagen_process_cpu_seconds_total`.
    total = processes.get(GATEWAY, gateway_process_s)
    staged[OTHER_STAGE] = max(total - sum(staged.values()), 0.0)
    per_image = 1e3 / images if images else float("nan")
    return {
        "process_cpu_s": dict(processes),
        "service_cpu_s": service_s,
        "gateway_cpu_s": gateway_s,
        "gateway_cpu_ms_per_image": gateway_s * per_image,
        "gateway_cpu_share": gateway_s / service_s if service_s > 0 else None,
        "stage_cpu_s": staged,
        "stage_cpu_ms_per_image": {k: v * per_image for k, v in staged.items()},
    }
