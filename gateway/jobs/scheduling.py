"""Priorities inside one process, and wait estimates.

`StepGate`: a running job yields to higher-priority jobs at its boundaries. Before each UNet step, and before its
other Triton stages and image work, a job of priority p waits while a job of a higher priority is denoising in
this process, so the higher one's calls are the only ones this process sends to Triton (across gateways, only
batchers exported with `--triton-priority-levels` order the queue). No work is lost: the paused job keeps its
latents and goes on from the same step.

`WaitEstimator`: a queued job's start and finish, and a running job's finish, from measured times: the service
time per unit of work (UNet samples) of each model and the fleet's throughput, both read from the jobs that
finished in the last `estimate_window_s` (the store holds them, so every replica estimates from the same
measurements). Nothing is estimated before something was measured: the fields stay null.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from gateway.jobs.model import Job
from gateway.jobs.store import FinishedWork, JobStore, QueuePlace

# Finished jobs read per refresh (newest first) and how often the rates are re-read: the estimate of every view
# in between uses the last reading (one store query per replica every few seconds, whatever the traffic).
RATE_SAMPLE_LIMIT = 500
RATE_REFRESH_S = 5.0


class StepGate:
    """Which jobs are denoising in this process, by priority; `turn` waits while a higher priority is."""

    def __init__(self, on_preempted: Callable[[int, float], None] = lambda priority, waited_s: None) -> None:
        self._denoising: dict[str, int] = {}  # job id -> priority
        self._changed = asyncio.Event()  # set (and replaced) whenever a job leaves: waiters look again
        self.on_preempted = on_preempted  # (priority, seconds paused) per step boundary a job yielded at

    def enter(self, job_id: str, priority: int) -> None:
        self._denoising[job_id] = priority

    def leave(self, job_id: str) -> None:
        if self._denoising.pop(job_id, None) is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    def lowest(self) -> int | None:
        """The lowest priority denoising here (None: none is): what a higher-priority job would preempt."""
        return min(self._denoising.values(), default=None)

    def outranked(self, priority: int) -> bool:
        return any(other > priority for other in self._denoising.values())

    async def turn(self, priority: int) -> None:
        """Return when no job of a higher priority is denoising here (at once, the common case)."""
        if not self.outranked(priority):
            return
        began = time.monotonic()
        while self.outranked(priority):
            await self._changed.wait()
        self.on_preempted(priority, time.monotonic() - began)


@dataclass(frozen=True)
class Rates:
    """What the window's finished jobs measured: seconds of service per unit of work, per model and overall,
    and the fleet's throughput in work per second while it was busy."""

    seconds_per_work: Mapping[str, float]
    overall_seconds_per_work: float
    throughput: float
    mean_work: float


def measure(finished: list[FinishedWork]) -> Rates | None:
    """Rates from finished jobs; None without any (nothing measured, nothing estimated)."""
    usable = [f for f in finished if f.work > 0 and f.finished_at > f.started_at]
    if not usable:
        return None
    per_model: dict[str, tuple[float, float]] = {}
    for f in usable:
        busy, work = per_model.get(f.model, (0.0, 0.0))
        per_model[f.model] = (busy + f.finished_at - f.started_at, work + f.work)
    total_busy = sum(busy for busy, _ in per_model.values())
    total_work = sum(work for _, work in per_model.values())
    # Throughput while busy: the work done over the union of the jobs' run intervals (idle gaps in the window
    # would otherwise make a loaded service look slow).
    spans = sorted((f.started_at, f.finished_at) for f in usable)
    covered, (start, end) = 0.0, spans[0]
    for s, e in spans[1:]:
        if s > end:
            covered += end - start
            start, end = s, e
        else:
            end = max(end, e)
    covered += end - start
    return Rates(
        seconds_per_work={model: busy / work for model, (busy, work) in per_model.items()},
        overall_seconds_per_work=total_busy / total_work,
        throughput=total_work / covered,
        mean_work=total_work / len(usable),
    )


@dataclass(frozen=True)
class Estimate:
    start_at: float | None  # epoch seconds
    finish_at: float | None


NO_ESTIMATE = Estimate(None, None)


class WaitEstimator:
    """Start and finish estimates from the store's recent measurements (see the module docstring)."""

    def __init__(self, store: JobStore, window_s: float, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.window_s = window_s
        self.clock = clock
        self._rates: Rates | None = None
        self._read_at: float | None = None  # monotonic time of the last reading; None: read at the next estimate

    def invalidate(self) -> None:
        """A job finished here: the next estimate re-reads the measurements (other replicas' within seconds)."""
        self._read_at = None

    async def rates(self) -> Rates | None:
        now = time.monotonic()
        if self._read_at is None or now - self._read_at >= RATE_REFRESH_S:
            self._read_at = now
            finished = await self.store.recent_finished(self.clock() - self.window_s, RATE_SAMPLE_LIMIT)
            self._rates = measure(finished)
        return self._rates

    def _service_s(self, job: Job, rates: Rates) -> float:
        per_work = rates.seconds_per_work.get(job.spec.model, rates.overall_seconds_per_work)
        return job.spec.work * per_work

    async def queued(self, job: Job, place: QueuePlace, *, slot_free: bool = False) -> Estimate:
        """A queued job starts once the work ahead of it is done, at the fleet's measured throughput, and, when no
        slot is free here, about half a job more (the running jobs are, on average, half done)."""
        rates = await self.rates()
        if rates is None:
            return NO_ESTIMATE
        residual = 0.0 if slot_free else rates.mean_work / 2
        start = self.clock() + (place.work_ahead + residual) / rates.throughput
        return Estimate(start, start + self._service_s(job, rates))

    async def running(self, job: Job, step: int, total: int) -> Estimate:
        """A running job's finish: its pace so far carried over the steps left (after its first step), else its
        model's measured service time."""
        started = job.started_at
        if started is None:
            return NO_ESTIMATE
        now = self.clock()
        if step > 0:
            return Estimate(started, now + (now - started) * (total - step) / step)
        rates = await self.rates()
        if rates is None:
            return Estimate(started, None)
        return Estimate(started, max(now, started + self._service_s(job, rates)))
