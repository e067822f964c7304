"""`python -m benchmarks priority [--quick]`: what job priorities, wait estimates and the result cache do (issue 24).

The harness's service (`systems.service.Service`: the bundled Triton + the gateway, the tiny benchmark model,
the load generator's default request) is measured in three parts, each against a baseline of the same run:

1. Interactive latency under bulk load. A probe (one synchronous request at a time) is timed idle at priority 2,
   then while a closed loop of `--bulk-concurrency` synchronous priority-0 jobs of the same key runs, with
   `IMAGEN_MAX_RUNNING_JOBS` set below that concurrency so jobs always queue: probes at priority 2 and, as the
   baseline without priorities, at priority 0 (FIFO behind the bulk jobs), alternated so that drift on a shared
   machine hits both alike. Reported: medians and their ratios to idle (the issue's bound: 1.5 at priority 2).
2. Estimate accuracy. On a second service with a fresh job store (the estimator reads only this load's jobs),
   Poisson arrivals of asynchronous jobs at 80 % (`Plan.load_fraction`) of the capacity a closed loop reached in
   part 1; each job's `progress.estimated_finish_at` as created (or at the first poll that has one) against its
   `completed_at`, and whether the queue stayed steady.
3. Exact-result cache. A seeded request, then the identical request N times: latency, byte-identical outputs
   (`sha256`), and Triton's inference statistics of the pipeline's models unchanged by the cached requests.

The clients run in this process (asyncio, httpx), one event loop per part. Every request but part 3's carries
`cache: false` (the workload has a fixed seed: a cache hit would skip the model). Results:
`<date>-priority[-quick].{json,md}` in `--output` (docs/benchmarks.md, "Priorities, estimates and the result
cache", has the committed figures).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from benchmarks import pinning
from benchmarks.config import PORT_BASE, RESULTS_DIR, WORK_DIR, Workload
from benchmarks.models import ensure_model
from benchmarks.systems.service import ModelStats, Service, diff
from benchmarks.workload import request_body

SIZE = "tiny"
ACCEPTANCE_RATIO = 1.5  # issue 24: interactive latency under bulk load at most 1.5x idle
ESTIMATE_TOLERANCE = 0.3  # issue 24: time-to-finish estimates within +-30 %
CACHE_TARGET_MS = 50.0  # issue 24: an identical seeded request answered in under 50 ms
CACHE_SEED = 987_654  # part 3's seed: no load job used it (theirs is the workload's)
TIMEOUT_S = 300.0
_GAUGE = re.compile(
    r'^(imagen_jobs_queued|imagen_jobs_running|imagen_job_preemptions_total)(?:\{priority="(\d)"\})? (\S+)$'
)


@dataclass(frozen=True)
class Plan:
    """How much of each part runs; `--quick` and the options below scale it."""

    probes: int  # probes per kind: idle (half before, half after the load), loaded at 2, loaded at 0
    bulk_concurrency: int  # bulk jobs kept in flight (closed loop)
    max_running_jobs: int  # IMAGEN_MAX_RUNNING_JOBS, below bulk_concurrency so the bulk load queues
    bulk_warmup_s: float  # bulk load before the first loaded probe (the queue fills)
    capacity_s: float  # the clean closed loop measuring capacity (jobs/s)
    steady_s: float  # part 2's Poisson arrivals
    load_fraction: float  # part 2's arrival rate / capacity
    steady_warmup_fraction: float  # part 2's first jobs, left out of the headline figures
    cache_requests: int  # part 3's identical requests
    uncached_requests: int  # part 3's baseline: the same request with `cache: false`
    workload: Workload = field(default_factory=Workload)  # the load generator's default request (8 x 0.5)


PLANS = {
    "full": Plan(30, 8, 4, 3.0, 20.0, 60.0, 0.8, 0.2, 30, 5),
    "quick": Plan(12, 8, 4, 2.0, 10.0, 25.0, 0.8, 0.2, 15, 3),
}


def _epoch(iso: str | None) -> float | None:
    return None if iso is None else datetime.fromisoformat(iso).timestamp()


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _quantile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank quantile (q in 0..1); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


class Client:
    """One httpx client for the whole service: bodies pre-encoded, the job's timestamps read off each answer."""

    def __init__(self, service: Service) -> None:
        self.url = service.url
        self.base_url = service.base_url
        limits = httpx.Limits(max_connections=512, max_keepalive_connections=64)
        self.http = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(TIMEOUT_S))

    async def create(self, body: bytes, *, asynchronous: bool = False) -> tuple[float, dict[str, Any]]:
        """POST one job; (client latency in seconds, the job view). Raises on an unexpected status."""
        headers = {"content-type": "application/json", **({"prefer": "respond-async"} if asynchronous else {})}
        began = time.perf_counter()
        response = await self.http.post(self.url, content=body, headers=headers)
        latency = time.perf_counter() - began
        # An asynchronous request is answered 202, or 200 when it is final at once (a cache hit).
        if response.status_code not in ((200, 202) if asynchronous else (200,)):
            raise RuntimeError(f"{response.status_code}: {response.text[:300]}")
        return latency, response.json()

    async def job(self, job_id: str) -> dict[str, Any]:
        response = await self.http.get(f"{self.url}/{job_id}")
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    async def gauges(self) -> dict[str, float]:
        """The gateway's queue and running gauges and its preemption counters (by the paused job's priority)."""
        response = await self.http.get(f"{self.base_url}/metrics")
        found: dict[str, float] = {}
        for line in response.text.splitlines():
            match = _GAUGE.match(line)
            if match is not None:
                name, priority, value = match.groups()
                found[name if priority is None else f"{name}:{priority}"] = float(value)
        return found

    async def close(self) -> None:
        await self.http.aclose()


def _sample(latency_s: float, job: dict[str, Any]) -> dict[str, Any]:
    """One probe: client latency and the job's own split into waiting for a worker and running."""
    created, started, completed = (_epoch(job.get(k)) for k in ("created_at", "started_at", "completed_at"))
    return {
        "latency_s": latency_s,
        "queue_s": None if created is None or started is None else started - created,
        "run_s": None if started is None or completed is None else completed - started,
        "status": job.get("status"),
    }


def _latency_summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    latencies = [s["latency_s"] for s in samples]
    queues = [s["queue_s"] for s in samples if s["queue_s"] is not None]
    runs = [s["run_s"] for s in samples if s["run_s"] is not None]
    return {
        "requests": len(samples),
        "median_s": _median(latencies),
        "p90_s": _quantile(latencies, 0.9),
        "min_s": min(latencies, default=None),
        "max_s": max(latencies, default=None),
        "median_queue_s": _median(queues),
        "median_run_s": _median(runs),
        "samples": samples,
    }


class ClosedLoop:
    """`concurrency` client tasks, each sending its next synchronous job when the last one returns, until stopped;
    it counts completions, so a window of it gives the throughput."""

    def __init__(self, client: Client, body: bytes, concurrency: int) -> None:
        self.client, self.body, self.concurrency = client, body, concurrency
        self.completed: list[float] = []  # perf_counter at each completion
        self.errors: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _worker(self) -> None:
        while not self._stop.is_set():
            try:
                _, job = await self.client.create(self.body)
                if job.get("status") == "completed":
                    self.completed.append(time.perf_counter())
                else:
                    self.errors.append(str(job.get("status")))
            except (httpx.HTTPError, RuntimeError) as exc:  # recorded, and the loop goes on
                self.errors.append(f"{type(exc).__name__}: {exc}"[:200])

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self.concurrency)]

    async def stop(self) -> None:
        """Let the jobs in flight finish (no disconnect: that would cancel them), then end."""
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def rate(self, since: float, until: float) -> float:
        done = sum(1 for t in self.completed if since <= t <= until)
        return done / (until - since) if until > since else 0.0


async def _probes(client: Client, body: bytes, n: int, gap_s: float = 0.05) -> list[dict[str, Any]]:
    out = []
    for _ in range(n):
        latency, job = await client.create(body)
        out.append(_sample(latency, job))
        await asyncio.sleep(gap_s)
    return out


async def latency_part(service: Service, plan: Plan, bodies: dict[str, bytes]) -> dict[str, Any]:
    """Part 1 (and the capacity part 2 runs at): idle probes, probes under bulk load, a clean closed loop."""
    client = Client(service)
    try:
        warm = ClosedLoop(client, bodies["bulk"], plan.bulk_concurrency)  # every batch size the load will use
        warm.start()
        await asyncio.sleep(min(2.0, plan.bulk_warmup_s))
        await warm.stop()
        await _probes(client, bodies["probe_2"], 2)
        idle_stats = await asyncio.to_thread(service.stats)
        idle = await _probes(client, bodies["probe_2"], (plan.probes + 1) // 2)
        triton_idle = _triton_delta(idle_stats, await asyncio.to_thread(service.stats))
        bulk = ClosedLoop(client, bodies["bulk"], plan.bulk_concurrency)
        bulk.start()
        await asyncio.sleep(plan.bulk_warmup_s)
        before = await client.gauges()
        loaded_stats = await asyncio.to_thread(service.stats)
        began = time.perf_counter()
        loaded: dict[int, list[dict[str, Any]]] = {2: [], 0: []}
        for i in range(plan.probes):
            for priority in (2, 0) if i % 2 == 0 else (0, 2):  # alternated, so neither always goes first
                seen = await client.gauges()
                latency, job = await client.create(bodies[f"probe_{priority}"])
                loaded[priority].append(
                    {
                        **_sample(latency, job),
                        "queued_at_send": seen.get("imagen_jobs_queued"),
                        "running_at_send": seen.get("imagen_jobs_running"),
                    }
                )
                await asyncio.sleep(0.05)
        ended = time.perf_counter()
        triton_loaded = _triton_delta(loaded_stats, await asyncio.to_thread(service.stats))
        after = await client.gauges()
        await bulk.stop()
        capacity_loop = ClosedLoop(client, bodies["steady"], plan.bulk_concurrency)
        capacity_loop.start()
        await asyncio.sleep(min(1.0, plan.capacity_s / 4))  # the ramp (every worker's first job) is not counted
        cap_began = time.perf_counter()
        await asyncio.sleep(plan.capacity_s)
        cap_ended = time.perf_counter()
        await capacity_loop.stop()
        idle += await _probes(client, bodies["probe_2"], plan.probes // 2)
    finally:
        await client.close()
    idle_s = _latency_summary(idle)
    high, low = _latency_summary(loaded[2]), _latency_summary(loaded[0])
    all_loaded = loaded[2] + loaded[0]
    queued_seen = [s["queued_at_send"] for s in all_loaded if s["queued_at_send"] is not None]
    preempted = {
        str(p): after.get(f"imagen_job_preemptions_total:{p}", 0.0)
        - before.get(f"imagen_job_preemptions_total:{p}", 0.0)
        for p in (0, 1)
    }
    return {
        "idle_priority_2": idle_s,
        "loaded_priority_2": high,
        "loaded_priority_0": low,
        "ratios": {
            "priority_2_loaded/idle": _ratio(high["median_s"], idle_s["median_s"]),
            "priority_0_loaded/idle": _ratio(low["median_s"], idle_s["median_s"]),
            "priority_0_loaded/priority_2_loaded": _ratio(low["median_s"], high["median_s"]),
        },
        "acceptance": {
            "bound": ACCEPTANCE_RATIO,
            "met": (_ratio(high["median_s"], idle_s["median_s"]) or math.inf) <= ACCEPTANCE_RATIO,
        },
        "bulk": {
            "concurrency": plan.bulk_concurrency,
            "max_running_jobs": plan.max_running_jobs,
            "jobs_per_s_during_probes": bulk.rate(began, ended),
            "completed": len(bulk.completed),
            "errors": len(bulk.errors),
            "error_samples": bulk.errors[:3],
            # Saturation: the queue gauge when each loaded probe was sent (>0: every slot was taken).
            "queued_at_send_median": _median(queued_seen),
            "queued_at_send_min": min(queued_seen, default=None),
            "share_of_probes_with_queue": (sum(1 for q in queued_seen if q > 0) / len(queued_seen))
            if queued_seen
            else None,
            "preemptions_during_probes": preempted,  # step boundaries bulk jobs paused at
        },
        # Where Triton's time went per model (queue vs compute) while the idle probes and the loaded ones ran.
        "triton": {"idle_probes": triton_idle, "loaded": triton_loaded},
        "capacity": {
            "concurrency": plan.bulk_concurrency,
            "seconds": cap_ended - cap_began,
            "jobs_per_s": capacity_loop.rate(cap_began, cap_ended),
            "errors": len(capacity_loop.errors),
        },
    }


async def _tracked(client: Client, body: bytes, poll_s: float = 0.1) -> dict[str, Any]:
    """One asynchronous job: its estimate as created (else at the first poll that has one) and its id."""
    _, job = await client.create(body, asynchronous=True)
    source = "create"
    while job["progress"] is not None and job["progress"].get("estimated_finish_at") is None:
        if job["status"] in ("completed", "failed", "canceled"):
            break
        await asyncio.sleep(poll_s)
        job = await client.job(job["id"])
        source = "poll"
    progress = job.get("progress") or {}
    return {
        "id": job["id"],
        "created_at": job["created_at"],
        "estimated_finish_at": progress.get("estimated_finish_at"),
        "estimated_start_at": progress.get("estimated_start_at"),
        "estimate_source": source if progress.get("estimated_finish_at") is not None else None,
        "status_at_estimate": job["status"],
        "queue_position_at_estimate": progress.get("queue_position"),
        "estimate_seen_after_s": time.time() - (_epoch(job["created_at"]) or time.time()),
    }


def _within(relative_errors: Sequence[float]) -> float | None:
    if not relative_errors:
        return None
    return sum(1 for e in relative_errors if abs(e) <= ESTIMATE_TOLERANCE) / len(relative_errors)


def _error_stats(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """The estimates' errors, and how predictable the jobs were at all: the share a constant guess (the median
    actual time, known only afterwards) would have had within the tolerance."""
    errors = [j["relative_error"] for j in jobs if j.get("relative_error") is not None]
    absolute = [abs(e) for e in errors]
    actual = [j["actual_s"] for j in jobs if j.get("actual_s") is not None]
    typical = _median(actual)
    return {
        "jobs": len(jobs),
        "with_estimate": len(errors),
        "within_tolerance_share": _within(errors),
        "median_abs_relative_error": _median(absolute),
        "p90_abs_relative_error": _quantile(absolute, 0.9),
        "median_relative_error": _median(errors),  # the sign: > 0 estimates too late, < 0 too early
        "median_actual_s": typical,
        "p10_actual_s": _quantile(actual, 0.1),
        "p90_actual_s": _quantile(actual, 0.9),
        "median_estimated_s": _median([j["estimated_s"] for j in jobs if j.get("estimated_s") is not None]),
        "constant_guess_within_tolerance_share": _within([(typical - a) / a for a in actual if a > 0])
        if typical is not None
        else None,
    }


async def estimate_part(service: Service, plan: Plan, bodies: dict[str, bytes], capacity: float) -> dict[str, Any]:
    """Part 2: Poisson arrivals at a fraction of capacity; each job's estimated time to finish against the actual."""
    client = Client(service)
    rate = max(capacity * plan.load_fraction, 0.1)
    rng = random.Random(24)
    try:
        await _probes(client, bodies["steady"], 2)  # warm, and the first measured jobs for the estimator
        tasks: list[asyncio.Task[dict[str, Any]]] = []
        began = time.perf_counter()
        arrival = began
        while arrival - began < plan.steady_s:
            arrival += rng.expovariate(rate)
            delay = arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_tracked(client, bodies["steady"])))
        tracked = await asyncio.gather(*tasks)
        final: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + TIMEOUT_S
        while len(final) < len(tracked) and time.monotonic() < deadline:
            for entry in tracked:
                if entry["id"] not in final:
                    job = await client.job(entry["id"])
                    if job["status"] in ("completed", "failed", "canceled"):
                        final[entry["id"]] = job
            if len(final) < len(tracked):
                await asyncio.sleep(0.5)
    finally:
        await client.close()
    jobs = []
    first_created = min((_epoch(e["created_at"]) or 0.0 for e in tracked), default=0.0)
    for entry in tracked:
        job = final.get(entry["id"], {})
        created, completed = _epoch(entry["created_at"]), _epoch(job.get("completed_at"))
        estimated = _epoch(entry["estimated_finish_at"])
        started, estimated_start = _epoch(job.get("started_at")), _epoch(entry["estimated_start_at"])
        row = {
            **{k: v for k, v in entry.items() if k != "id"},
            "status": job.get("status"),
            "offset_s": (created or 0.0) - first_created,
            "actual_s": None if created is None or completed is None else completed - created,
            "estimated_s": None if created is None or estimated is None else estimated - created,
            "start_error_s": None if started is None or estimated_start is None else estimated_start - started,
        }
        ok = job.get("status") == "completed" and row["actual_s"] and row["estimated_s"] is not None
        row["relative_error"] = (row["estimated_s"] - row["actual_s"]) / row["actual_s"] if ok else None
        jobs.append(row)
    cutoff = plan.steady_s * plan.steady_warmup_fraction
    steady = [j for j in jobs if j["offset_s"] >= cutoff]
    # Was it steady? The queue a job found at creation, over the run's thirds, and the jobs served while they
    # arrived against the arrival rate (a queue that keeps growing is an overload, not a steady state).
    span = max((j["offset_s"] for j in jobs), default=0.0)
    thirds = [
        _median(
            [
                float(j["queue_position_at_estimate"] or 0)
                for j in jobs
                if k * span / 3 <= j["offset_s"] <= (k + 1) * span / 3
            ]
        )
        for k in range(3)
    ]
    done_by = [j["offset_s"] + j["actual_s"] for j in jobs if j["actual_s"] is not None]
    served = sum(1 for t in done_by if t <= span) / span if span > 0 else None
    arrived = len(jobs) / span if span > 0 else None  # the drawn arrivals' rate (Poisson: not exactly `rate`)
    grew = (thirds[2] or 0.0) > (thirds[0] or 0.0) + 2 or (served or 0.0) < 0.95 * (arrived or 0.0)
    return {
        "arrival_rate_per_s": rate,
        "capacity_jobs_per_s": capacity,
        "load_fraction": plan.load_fraction,
        "seconds": plan.steady_s,
        "warmup_s_excluded": cutoff,
        "tolerance": ESTIMATE_TOLERANCE,
        "steady": _error_stats(steady),
        "all": _error_stats(jobs),
        "not_completed": sum(1 for j in jobs if j["status"] != "completed"),
        "estimate_sources": {
            str(s): sum(1 for j in jobs if j["estimate_source"] == s) for s in ("create", "poll", None)
        },
        "status_at_estimate": {
            s: sum(1 for j in steady if j["status_at_estimate"] == s) for s in ("queued", "processing")
        },
        "median_queue_position_by_third": thirds,
        "arrived_per_s": arrived,
        "served_per_s_while_arriving": served,
        "steady_state": not grew,  # False: the queue grew (served < 95 % of arrivals, or the queue up by > 2)
        "median_start_error_s": _median([j["start_error_s"] for j in steady if j["start_error_s"] is not None]),
        "median_abs_start_error_s": _median(
            [abs(j["start_error_s"]) for j in steady if j["start_error_s"] is not None]
        ),
        "jobs": jobs,
    }


def _triton_delta(before: dict[str, ModelStats], after: dict[str, ModelStats]) -> dict[str, dict[str, Any]]:
    """Per model over an interval: requests, executions, mean queue time a request and compute time a batch."""
    out = {}
    for name, stats in diff(after, before).items():
        n, e = stats.success_count, stats.execution_count
        out[name] = {
            "requests": n,
            "executions": e,
            "queue_ms_per_request": stats.queue_ns / n / 1e6 if n else None,
            "compute_ms_per_execution": stats.compute_ns / e / 1e6 if e else None,
        }
    return out


def _counts(stats: dict[str, ModelStats]) -> dict[str, dict[str, int]]:
    return {
        name: {"requests": s.success_count, "inferences": s.inference_count, "executions": s.execution_count}
        for name, s in stats.items()
    }


async def cache_part(service: Service, plan: Plan, bodies: dict[str, bytes]) -> dict[str, Any]:
    """Part 3: a seeded request, then the identical one N times: latency, sha256, Triton's counts unchanged."""
    client = Client(service)
    try:
        first_latency, first = await client.create(bodies["cache"])
        before = _counts(await asyncio.to_thread(service.stats))
        repeats = []
        for _ in range(plan.cache_requests):
            latency, job = await client.create(bodies["cache"])
            repeats.append((latency, job))
        after = _counts(await asyncio.to_thread(service.stats))
        uncached = []
        for _ in range(plan.uncached_requests):
            latency, job = await client.create(bodies["cache_off"])
            uncached.append((latency, job))
    finally:
        await client.close()

    def digests(job: dict[str, Any]) -> list[str]:
        return [image["sha256"] for image in job.get("images", [])]

    latencies = [latency for latency, _ in repeats]
    first_digests = digests(first)
    cached_median = _median(latencies)
    return {
        "first": {"latency_s": first_latency, "cached": first.get("cached"), "sha256": first_digests},
        "cached_requests": len(repeats),
        "cached_flags_all_true": all(job.get("cached") is True for _, job in repeats),
        "median_s": cached_median,
        "p90_s": _quantile(latencies, 0.9),
        "max_s": max(latencies, default=None),
        "latencies_s": latencies,
        "identical_images": all(digests(job) == first_digests for _, job in repeats) and bool(first_digests),
        "triton_counts_before": before,
        "triton_counts_after": after,
        "triton_unchanged": before == after,
        "uncached_median_s": _median([latency for latency, _ in uncached]),
        "uncached_same_pixels": all(digests(job) == first_digests for _, job in uncached) if uncached else None,
        "ratio_cached/first": _ratio(cached_median, first_latency),
        "ratio_cached/uncached": _ratio(cached_median, _median([latency for latency, _ in uncached])),
        "target_ms": CACHE_TARGET_MS,
        "target_met": cached_median is not None and cached_median * 1e3 < CACHE_TARGET_MS,
    }


def bodies_for(plan: Plan, model: str) -> dict[str, bytes]:
    """Every request of the run: the load generator's default request with a priority and the cache choice."""
    base = request_body(plan.workload, model)

    def body(priority: int, *, cache: bool = False, seed: int | None = None) -> bytes:
        fields = {**base, "priority": priority, "cache": cache, **({"seed": seed} if seed is not None else {})}
        return json.dumps(fields).encode()

    return {
        "bulk": body(0),
        "probe_2": body(2),
        "probe_0": body(0),
        "steady": body(1),
        "cache": body(1, cache=True, seed=CACHE_SEED),
        "cache_off": body(1, cache=False, seed=CACHE_SEED),
    }


def run(plan: Plan, *, threads: int, port_base: int, work_dir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Both services, one after the other; the figures of the three parts."""
    os.environ.update(pinning.pinned_env(threads))
    files = ensure_model(SIZE, threads=threads, queue_delay_us=500, max_batch=16, root=work_dir)
    bodies = bodies_for(plan, files.name)
    log_dir = work_dir / SIZE / "logs-priority"
    log_dir.mkdir(parents=True, exist_ok=True)
    stamp = f"{os.getpid()}-{int(time.time())}"
    # Our own key throughout: no per-key rate, work budget or active-job cap (the load is one client by design);
    # the slots below the bulk concurrency, so the bulk load always has queued jobs; the exact-result cache on
    # (the harness's service turns it off; here only part 3's requests may use it: the others say `cache: false`).
    env = {
        "IMAGEN_MAX_RUNNING_JOBS": str(plan.max_running_jobs),
        "IMAGEN_WORK_PER_MINUTE": "0",
        "IMAGEN_MAX_ACTIVE_JOBS_PER_KEY": "0",
        "IMAGEN_RESULT_CACHE": "1",
    }
    results: dict[str, Any] = {"gateway_env": env, "model": files.name}
    loadavg = {"start": os.getloadavg()[0]}
    log(f"priority: part 1, bulk load at concurrency {plan.bulk_concurrency}, {plan.max_running_jobs} slots")
    with Service(
        files,
        port_base=port_base,
        threads=threads,
        log_dir=log_dir,
        gateway_env={**env, "IMAGEN_JOBS_DB": str(log_dir / f"jobs-latency-{stamp}.sqlite3")},
    ) as service:
        results["latency"] = asyncio.run(latency_part(service, plan, bodies))
    loadavg["after_latency"] = os.getloadavg()[0]
    capacity = results["latency"]["capacity"]["jobs_per_s"]
    log(f"priority: part 2, Poisson arrivals at {plan.load_fraction:.0%} of {capacity:.2f} jobs/s")
    with Service(
        files,
        port_base=port_base + 10,
        threads=threads,
        log_dir=log_dir,
        gateway_env={**env, "IMAGEN_JOBS_DB": str(log_dir / f"jobs-estimates-{stamp}.sqlite3")},
    ) as service:
        results["estimates"] = asyncio.run(estimate_part(service, plan, bodies, capacity))
        loadavg["after_estimates"] = os.getloadavg()[0]
        log("priority: part 3, the exact-result cache")
        results["cache"] = asyncio.run(cache_part(service, plan, bodies))
    loadavg["end"] = os.getloadavg()[0]
    results["loadavg_1m"] = loadavg
    return results


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f}"


def _x(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f} %"


def markdown(results: dict[str, Any]) -> str:
    """The three parts as tables, with what ran and the issue's bounds."""
    host, lat, est, cache = results["host"], results["latency"], results["estimates"], results["cache"]
    bulk, plan = lat["bulk"], results["plan"]
    wl = plan["workload"]
    env = ", ".join(f"`{k}={v}`" for k, v in results["gateway_env"].items())
    loads = ", ".join(f"{k} {v:.2f}" for k, v in results["loadavg_1m"].items())
    lines = [
        f"{host['cpu']}, {host['cpus']} CPUs; mode {results['mode']}; model {results['model']} (tiny), "
        f"{wl['steps']} steps x {wl['strength']} strength with guidance, {wl['image_side']} px PNG input; "
        f"gateway settings {env}; 1-minute load average {loads}.",
        "",
        "## 1. Interactive latency under bulk load",
        "",
        f"Bulk: a closed loop of {bulk['concurrency']} synchronous priority-0 jobs of one key, "
        f"{bulk['max_running_jobs']} running slots (`IMAGEN_MAX_RUNNING_JOBS`), so jobs queue: "
        f"{_x(bulk['queued_at_send_median'], 0)} queued (median; min {_x(bulk['queued_at_send_min'], 0)}) when "
        f"each loaded probe was sent, {_pct(bulk['share_of_probes_with_queue'])} of probes saw a queue; "
        f"{_x(bulk['jobs_per_s_during_probes'])} bulk jobs/s meanwhile, {bulk['errors']} errors; bulk jobs paused "
        f"at {bulk['preemptions_during_probes']['0']:.0f} step "
        "boundaries for priority-2 probes. Probes are synchronous, one at a time, the same key and request.",
        "",
        "| probe | requests | median (ms) | p90 (ms) | median wait for a worker (ms) | median run (ms) | / idle |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    rows = (
        ("idle, priority 2", lat["idle_priority_2"], 1.0),
        ("bulk load, priority 2", lat["loaded_priority_2"], lat["ratios"]["priority_2_loaded/idle"]),
        ("bulk load, priority 0 (FIFO baseline)", lat["loaded_priority_0"], lat["ratios"]["priority_0_loaded/idle"]),
    )
    for label, s, ratio in rows:
        lines.append(
            f"| {label} | {s['requests']} | {_ms(s['median_s'])} | {_ms(s['p90_s'])} | {_ms(s['median_queue_s'])} | "
            f"{_ms(s['median_run_s'])} | {_x(ratio)} |"
        )
    met = "met" if lat["acceptance"]["met"] else "NOT met"
    lines += ["", "Triton per model (mean queue ms a request / compute ms a batch; requests):", ""]
    for phase, label in (("idle_probes", "idle probes"), ("loaded", "bulk load with probes")):
        models = lat["triton"][phase]
        lines.append(
            f"- {label}: "
            + "; ".join(
                f"{name.removeprefix(results['model'] + '_')} "
                f"{_x(m['queue_ms_per_request'], 1)} / {_x(m['compute_ms_per_execution'], 1)} ({m['requests']})"
                for name, m in models.items()
                if m["requests"]
            )
        )
    lines += [
        "",
        f"Issue 24's bound, priority 2 under load at most {lat['acceptance']['bound']}x idle: **{met}** "
        f"({_x(lat['ratios']['priority_2_loaded/idle'])}x). Priority buys "
        f"{_x(lat['ratios']['priority_0_loaded/priority_2_loaded'], 1)}x against FIFO.",
        "",
        "## 2. Wait estimates",
        "",
        f"Poisson arrivals of asynchronous priority-1 jobs at {_x(est['arrival_rate_per_s'])}/s "
        f"({est['load_fraction']:.0%} of the {_x(est['capacity_jobs_per_s'])} jobs/s a closed loop of "
        f"{lat['capacity']['concurrency']} reached in part 1) for {est['seconds']:.0f} s, on a fresh job store; "
        f"the first {est['warmup_s_excluded']:.0f} s of arrivals are left out of the steady figures. Each job's "
        "`progress.estimated_finish_at` as created (or at the first poll that has one) against its "
        "`completed_at`, both from `created_at`. The last column: the share a constant guess, the median actual "
        "time (known only afterwards), would have had within +-30 %: how predictable the jobs were at all.",
        "",
        "| jobs | with an estimate | within +-30 % | median abs. error | p90 abs. error | median error (sign) "
        "| actual: median (p10-p90) ms | median estimated (ms) | a constant guess within +-30 % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, s in (("after warm-up", est["steady"]), ("all", est["all"])):
        lines.append(
            f"| {label}: {s['jobs']} | {s['with_estimate']} | {_pct(s['within_tolerance_share'])} | "
            f"{_pct(s['median_abs_relative_error'])} | {_pct(s['p90_abs_relative_error'])} | "
            f"{_pct(s['median_relative_error'])} | {_ms(s['median_actual_s'])} ({_ms(s['p10_actual_s'])}-"
            f"{_ms(s['p90_actual_s'])}) | {_ms(s['median_estimated_s'])} | "
            f"{_pct(s['constant_guess_within_tolerance_share'])} |"
        )
    share = est["steady"]["within_tolerance_share"]
    lines += [
        "",
        f"Issue 24's aim, estimates within +-30 % in a steady load run: "
        f"**{'met' if share is not None and share >= 0.5 else 'NOT met'} for the median job**, "
        f"{_pct(share)} of jobs within. Status when the estimate was read (after warm-up): "
        + ", ".join(f"{n} {status}" for status, n in est["status_at_estimate"].items())
        + f"; estimated start - actual start: median {_ms(est['median_start_error_s'])} ms (absolute: "
        f"{_ms(est['median_abs_start_error_s'])} ms). Steadiness: the queue position a job found at creation "
        f"(median per third of the run) {', '.join(_x(q, 0) for q in est['median_queue_position_by_third'])}; "
        f"{_x(est['served_per_s_while_arriving'])} jobs/s served while {_x(est['arrived_per_s'])}/s arrived: "
        + ("steady." if est["steady_state"] else "the queue grew, an overload rather than a steady state."),
        "",
        "## 3. Exact-result cache",
        "",
        "| request | latency (ms) |",
        "|---|---:|",
        f"| first (runs the model) | {_ms(cache['first']['latency_s'])} |",
        f"| `cache: false`, median of {results['plan']['uncached_requests']} | {_ms(cache['uncached_median_s'])} |",
        f"| identical, median of {cache['cached_requests']} (p90, max) | {_ms(cache['median_s'])} "
        f"({_ms(cache['p90_s'])}, {_ms(cache['max_s'])}) |",
        "",
        f"Cached / first: {_x(cache['ratio_cached/first'])}; every answer `cached: true`: "
        f"{cache['cached_flags_all_true']}; byte-identical images (sha256): {cache['identical_images']}; Triton's "
        f"inference statistics of the four models unchanged across the cached requests: {cache['triton_unchanged']}; "
        f"under {cache['target_ms']:.0f} ms: **{'met' if cache['target_met'] else 'NOT met'}**.",
    ]
    if results.get("notes"):
        lines += ["", "## Notes", "", *(f"- {note}" for note in results["notes"])]
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], output: Path) -> dict[str, Path]:
    output.mkdir(parents=True, exist_ok=True)
    stem = f"{results['started_at'][:10]}-priority{'-quick' if results['mode'] == 'quick' else ''}"
    paths = {"json": output / f"{stem}.json", "markdown": output / f"{stem}.md"}
    paths["json"].write_text(json.dumps(results, indent=1) + "\n")
    title = f"# Priorities, wait estimates, result cache ({results['started_at'][:10]})\n\n"
    paths["markdown"].write_text(title + markdown(results))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks priority", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer probes, shorter load runs (~2 min on 2 cores)")
    parser.add_argument("--probes", type=int, help="probes per kind (idle, loaded at 2, loaded at 0)")
    parser.add_argument("--bulk-concurrency", type=int, help="bulk jobs in flight (default 8)")
    parser.add_argument("--max-running-jobs", type=int, help="IMAGEN_MAX_RUNNING_JOBS (default 4)")
    parser.add_argument("--capacity-s", type=float, help="seconds of the capacity closed loop")
    parser.add_argument("--steady-s", type=float, help="seconds of Poisson arrivals for the estimates")
    parser.add_argument("--cache-requests", type=int, help="identical requests after the first")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads (CPU count)")
    parser.add_argument("--port-base", type=int, default=PORT_BASE + 100)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR, help="results folder")
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR, help="exported models, logs (git-ignored)")
    parser.add_argument("--note", action="append", default=[], help="a remark kept with the results (repeatable)")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    overrides = {
        name: value
        for name, value in (
            ("probes", args.probes),
            ("bulk_concurrency", args.bulk_concurrency),
            ("max_running_jobs", args.max_running_jobs),
            ("capacity_s", args.capacity_s),
            ("steady_s", args.steady_s),
            ("cache_requests", args.cache_requests),
        )
        if value is not None
    }
    plan = replace(PLANS[mode], **overrides)
    if plan.probes < 2 or plan.cache_requests < 1 or plan.bulk_concurrency < 1:
        parser.error("--probes takes 2 or more, --cache-requests and --bulk-concurrency 1 or more")
    if not 1 <= plan.max_running_jobs < plan.bulk_concurrency:
        parser.error("--max-running-jobs must be at least 1 and below --bulk-concurrency (the bulk load must queue)")

    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    began = time.time()
    results: dict[str, Any] = {
        "kind": "priority",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": mode,
        "host": pinning.host_facts(),
        "plan": asdict(plan),
        "notes": args.note,
        **run(plan, threads=args.threads, port_base=args.port_base, work_dir=args.work_dir, log=log),
    }
    results["duration_s"] = time.time() - began
    written = write(results, args.output)
    for kind, path in written.items():
        print(f"wrote {kind}: {path}")
    print()
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
