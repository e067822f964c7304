"""Request ids, the access log's format, CPU per stage and Prometheus metrics, without the web framework: every
layer may use them (the HTTP middleware and `/metrics` that feed them live in `gateway.http.middleware`).

Metrics live in a `CollectorRegistry`
owned by one `Metrics` object per app, never in prometheus_client's global registry, so several apps in one
process (tests) do not clash.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import Any, Generic, ParamSpec, TextIO, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

REQUEST_ID_HEADER = "X-Request-ID"
# What a client may send as its own request id: short and safe to echo into headers and log lines.
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
NO_REQUEST_ID = "-"
UNMATCHED_ROUTE = "unmatched"
# Methods outside this set are labelled "other", so a client inventing methods cannot grow the series count.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# From a 400 in a millisecond to a long synchronous diffusion run.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
JOB_STATUSES = ("queued", "processing", "completed", "failed", "canceled")
WEBHOOK_OUTCOMES = ("delivered", "retry", "failed")
TRITON_STATS_TIMEOUT_S = 2.0
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"

access_log = logging.getLogger("gateway.access")
log = logging.getLogger(__name__)

_request_id: ContextVar[str | None] = ContextVar("imagen_request_id", default=None)


def current_request_id() -> str | None:
    """The id of the request being served in this context (None outside a request)."""
    return _request_id.get()


@contextmanager
def request_context(request_id: str | None) -> Iterator[None]:
    """Run a block as part of a request (a worker running a job): its log lines carry that request's id."""
    token = _request_id.set(request_id)
    try:
        yield
    finally:
        _request_id.reset(token)


def bind_request_id(request_id: str) -> Token[str | None]:
    """Set the request id of this context until `unbind_request_id` (the HTTP middleware's, which leaves it set
    when the app raises, so the error handler's log line still carries it)."""
    return _request_id.set(request_id)


def unbind_request_id(token: Token[str | None]) -> None:
    _request_id.reset(token)


def new_request_id() -> str:
    return uuid.uuid4().hex


def accept_request_id(value: str | None) -> str:
    """Keep a client's id when it is a sane token (so its traces join ours), else mint one."""
    if value is not None and REQUEST_ID_PATTERN.fullmatch(value):
        return value
    return new_request_id()


# --- CPU per stage -----------------------------------------------------------------------------------------

P = ParamSpec("P")
R = TypeVar("R")

_stage_lock = threading.Lock()
_stage_seconds: dict[str, float] = {}
_stage_stack = threading.local()  # per thread: [name, started (thread_time)] of the open stages, innermost last


def _charge(name: str, seconds: float) -> None:
    with _stage_lock:
        _stage_seconds[name] = _stage_seconds.get(name, 0.0) + seconds


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Charge the calling thread's CPU time (`time.thread_time`) inside the block to stage `name`.

    Exported as `imagen_stage_cpu_seconds_total{stage=name}`: where the gateway's CPU goes per request (parse,
    hash, decode, encode...), for sizing gateway processes per GPU; the benchmark reads it before and after each
    run. Thread CPU, not wall time, so a stage waiting for a lock or I/O costs nothing. Stages nest exclusively:
    an inner stage's time is not also charged to the outer one, so the stages sum to at most the process's CPU.
    Wrap only synchronous code: a block spanning an `await` would be charged the other tasks run meanwhile.
    """
    stack: list[list[Any]] | None = getattr(_stage_stack, "open", None)
    if stack is None:
        stack = _stage_stack.open = []
    now = time.thread_time()
    if stack:
        outer = stack[-1]
        _charge(outer[0], now - outer[1])
    entry: list[Any] = [name, now]
    stack.append(entry)
    try:
        yield
    finally:
        now = time.thread_time()
        stack.pop()
        _charge(name, now - entry[1])
        if stack:
            stack[-1][1] = now


def staged(name: str, fn: Callable[P, R]) -> Callable[P, R]:
    """`fn` run inside `stage(name)`: for work handed to a thread (`run_in_executor(pool, staged(...), ...)`)."""

    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        with stage(name):
            return fn(*args, **kwargs)

    return run


def add_stage_seconds(name: str, seconds: float) -> None:
    """Charge CPU measured elsewhere (a worker process's) to stage `name`."""
    _charge(name, seconds)


def stage_seconds() -> dict[str, float]:
    """CPU seconds charged to each stage so far in this process."""
    with _stage_lock:
        return dict(_stage_seconds)


class StageCollector:
    """`imagen_stage_cpu_seconds_total{stage}`: the process's CPU per stage (see `stage`), plus the process total
    (`imagen_process_cpu_seconds_total`, user + system) so the unstaged rest (event loop, HTTP, gRPC) is known."""

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def _families(self) -> tuple[CounterMetricFamily, CounterMetricFamily]:
        return (
            CounterMetricFamily(
                "imagen_stage_cpu_seconds", "Gateway CPU time charged to each request stage", labels=["stage"]
            ),
            CounterMetricFamily("imagen_process_cpu_seconds", "CPU time (user + system) of this gateway process"),
        )

    def collect(self) -> Iterator[Metric]:
        stages, process = self._families()
        for name, seconds in sorted(stage_seconds().items()):
            stages.add_metric([name], seconds)
        process.add_metric([], time.process_time())
        yield stages
        yield process


# --- logging --------------------------------------------------------------------------------------------------


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every record so formats may use `%(request_id)s` (`-` outside requests)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id() or NO_REQUEST_ID
        return True


_HANDLER_MARK = "_imagen_observability"


def configure_logging(
    level: str | int = "info", *, fmt: str = LOG_FORMAT, stream: TextIO | None = None
) -> logging.Handler:
    """Install one stderr handler on the root logger whose lines carry the request id; idempotent.

    uvicorn's own loggers keep their handlers; the gateway's loggers (`gateway.*`, including the access log)
    propagate to this one. Calling it again replaces the handler it installed before, never another one.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream)  # None: stderr
    setattr(handler, _HANDLER_MARK, True)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler


# --- metrics --------------------------------------------------------------------------------------------------

# model -> {"inference_count": n, "execution_count": m}, as Triton's statistics count them since it started.
TritonCounts = Mapping[str, Mapping[str, int]]
TritonStatsSource = Callable[[], TritonCounts | Awaitable[TritonCounts]]


class TritonBatchCollector:
    """Exports the UNet's batching as Triton counts it: inferences (samples) over executions (batches).

    prometheus_client collects synchronously, so the (async) source is awaited by `refresh()` just before
    each scrape (`Metrics.render`), and `collect()` exports that snapshot. A source that fails or is slow
    (Triton down) leaves the snapshot empty: the scrape still answers, without these series.
    """

    def __init__(self, source: TritonStatsSource | None, *, timeout_s: float = TRITON_STATS_TIMEOUT_S) -> None:
        self.source = source
        self.timeout_s = timeout_s
        self._snapshot: dict[str, tuple[int, int]] = {}

    async def refresh(self) -> None:
        self._snapshot = {}
        if self.source is None:
            return
        try:
            result = self.source()
            if inspect.isawaitable(result):
                result = await asyncio.wait_for(result, timeout=self.timeout_s)
            if not isinstance(result, Mapping):
                raise TypeError(f"triton statistics must be a mapping, got {type(result).__name__}")
            snapshot = {}
            for model, counts in result.items():
                snapshot[str(model)] = (int(counts["inference_count"]), int(counts["execution_count"]))
        except Exception as exc:  # Triton down, model unloaded, timeout: skip the series, keep the scrape
            log.debug("triton statistics unavailable for /metrics: %r", exc)
            return
        self._snapshot = snapshot

    def _families(self) -> tuple[CounterMetricFamily, CounterMetricFamily, GaugeMetricFamily]:
        return (
            CounterMetricFamily("imagen_triton_inferences", "Samples run by the model in Triton", labels=["model"]),
            CounterMetricFamily("imagen_triton_executions", "Batched executions in Triton", labels=["model"]),
            GaugeMetricFamily(
                "imagen_triton_mean_batch_size", "Samples per execution since Triton started", labels=["model"]
            ),
        )

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        inferences, executions, mean = self._families()
        for model, (inference_count, execution_count) in sorted(self._snapshot.items()):
            inferences.add_metric([model], inference_count)
            executions.add_metric([model], execution_count)
            if execution_count > 0:
                mean.add_metric([model], inference_count / execution_count)
        yield inferences
        yield executions
        yield mean


# Probes and scrapes (`/readyz`, `/metrics`) need no key; each answer stands for this long, so however many
# arrive, Triton gets at most one readiness or statistics round per process per interval.
PROBE_CACHE_S = 1.0


class Coalesced(Generic[R]):
    """An async call answered at most once per `ttl_s`, concurrent callers sharing the call in flight: 600
    unauthenticated `/readyz` requests were ~5,400 Triton calls. A failure is not kept (the next caller retries)."""

    def __init__(self, call: Callable[[], Awaitable[R]], ttl_s: float = PROBE_CACHE_S) -> None:
        self.call = call
        self.ttl_s = ttl_s
        self.calls = 0
        self._lock = asyncio.Lock()
        self._value: tuple[float, R] | None = None

    def _fresh(self) -> R | None:
        if self._value is not None and time.monotonic() - self._value[0] < self.ttl_s:
            return self._value[1]
        return None

    async def __call__(self) -> R:
        if (value := self._fresh()) is not None:
            return value
        async with self._lock:
            if (value := self._fresh()) is not None:
                return value
            self.calls += 1
            result = await self.call()
            self._value = (time.monotonic(), result)
            return result


def triton_stats_source(
    statistics: Callable[[str], Awaitable[Mapping[str, Any]]], models: Callable[[], Iterable[str]]
) -> Callable[[], Awaitable[TritonCounts]]:
    """Build the `/metrics` source from `TritonEngine.statistics` and a callable naming the models (the UNets).

    Triton's JSON statistics spell uint64 counters as strings and list one entry per version: they are summed.
    A model whose statistics fail is left out; the others are still reported.
    """

    async def one(model: str) -> tuple[str, dict[str, int]] | None:
        try:
            stats = await statistics(model)
        except Exception as exc:
            log.debug("triton statistics for %s unavailable: %r", model, exc)
            return None
        entries = stats.get("model_stats") or []
        return model, {
            "inference_count": sum(int(e.get("inference_count", 0) or 0) for e in entries),
            "execution_count": sum(int(e.get("execution_count", 0) or 0) for e in entries),
        }

    async def source() -> TritonCounts:
        found = await asyncio.gather(*(one(m) for m in dict.fromkeys(models())))
        return dict(item for item in found if item is not None)

    return Coalesced(source)


# replica address -> {"in_flight": n, "calls": n, "failures": n, "healthy": 0 or 1}, read at each scrape.
TritonReplicaSource = Callable[[], Mapping[str, Mapping[str, float]]]


class TritonReplicaCollector:
    """Per-Triton-replica series from a pool's live counters (`TritonPool.replica_metrics`), read at scrape time,
    so a replica that leaves the pool (DNS no longer names it) leaves the exposition too."""

    def __init__(self) -> None:
        self.source: TritonReplicaSource | None = None

    def _families(self) -> tuple[GaugeMetricFamily, CounterMetricFamily, CounterMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily("imagen_triton_replica_in_flight", "Triton calls in flight", labels=["replica"]),
            CounterMetricFamily("imagen_triton_replica_calls", "Triton calls sent to the replica", labels=["replica"]),
            CounterMetricFamily("imagen_triton_replica_failures", "Triton calls that failed", labels=["replica"]),
            GaugeMetricFamily(
                "imagen_triton_replica_healthy", "1 while the replica takes calls, 0 while out", labels=["replica"]
            ),
        )

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        in_flight, calls, failures, healthy = self._families()
        try:
            replicas = dict(self.source()) if self.source is not None else {}
        except Exception as exc:  # a broken source must not break the scrape
            log.debug("triton replica metrics unavailable: %r", exc)
            replicas = {}
        for replica, values in sorted(replicas.items()):
            in_flight.add_metric([replica], float(values.get("in_flight", 0)))
            calls.add_metric([replica], float(values.get("calls", 0)))
            failures.add_metric([replica], float(values.get("failures", 0)))
            healthy.add_metric([replica], float(values.get("healthy", 0)))
        yield in_flight
        yield calls
        yield failures
        yield healthy


RESULT_CACHE_OUTCOMES = ("hit", "miss")
PRIORITIES = (0, 1, 2)  # the request's `priority` values (jobs.request; this module imports no layer)


class Metrics:
    """The registry and instruments of one app; the job system calls the helper methods."""

    def __init__(self, triton_stats: TritonStatsSource | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.http_requests = Counter(
            "imagen_http_requests",
            "HTTP requests by route template, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.http_duration = Histogram(
            "imagen_http_request_duration_seconds",
            "Time to the end of the response body, by route template and method",
            ["route", "method"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.http_in_flight = Gauge(
            "imagen_http_requests_in_flight", "HTTP requests being served now", registry=self.registry
        )
        self.jobs_queued = Gauge("imagen_jobs_queued", "Jobs waiting for a worker", registry=self.registry)
        self.jobs_running = Gauge("imagen_jobs_running", "Jobs being denoised now", registry=self.registry)
        self.jobs = Counter("imagen_jobs", "Jobs reaching a status", ["status"], registry=self.registry)
        self.webhook_deliveries = Counter(
            "imagen_webhook_deliveries",
            "Webhook delivery attempts by outcome (delivered, retry scheduled, failed for good)",
            ["outcome"],
            registry=self.registry,
        )
        self.store_retries = Counter(
            "imagen_job_store_retries",
            "Store operations a worker retried because the job store did not answer (locked, disk full)",
            ["operation"],
            registry=self.registry,
        )
        self.text_cache_hits = Counter(
            "imagen_text_embedding_cache_hits",
            "Prompts whose text embeddings came from the cache (no text-encoder call)",
            registry=self.registry,
        )
        self.text_cache_misses = Counter(
            "imagen_text_embedding_cache_misses",
            "Prompts sent to the text encoder (not in the cache, or the cache is off)",
            registry=self.registry,
        )
        # Issue 24: the time a job waited to start, by priority and the key's class (the operator's names from the
        # key file, never a key); step boundaries at which a running job paused for a higher priority, and the
        # time it paused; requests answered from the exact-result cache.
        self.queue_time = Histogram(
            "imagen_job_queue_seconds",
            "Time from creation to a worker's first start, by priority and key class",
            ["priority", "key_class"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.preemptions = Counter(
            "imagen_job_preemptions",
            "Step boundaries at which a running job paused for a higher-priority job, by the paused job's priority",
            ["priority"],
            registry=self.registry,
        )
        self.preempted_seconds = Counter(
            "imagen_job_preempted_seconds",
            "Time running jobs spent paused for higher-priority jobs, by the paused job's priority",
            ["priority"],
            registry=self.registry,
        )
        self.queued_by_priority = Gauge(
            "imagen_jobs_queued_by_priority",
            "Jobs waiting for a worker in the whole store, by priority (as of the last job creation)",
            ["priority"],
            registry=self.registry,
        )
        self.result_cache = Counter(
            "imagen_result_cache_lookups",
            "Exact-result cache lookups of cacheable requests (an explicit seed, not opted out), by outcome",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in RESULT_CACHE_OUTCOMES:
            self.result_cache.labels(outcome=outcome)
        for status in JOB_STATUSES:  # export zeros from the start, so rate() sees the first increment
            self.jobs.labels(status=status)
        for outcome in WEBHOOK_OUTCOMES:
            self.webhook_deliveries.labels(outcome=outcome)
        self.triton = TritonBatchCollector(triton_stats)
        self.registry.register(self.triton)
        self.triton_replicas = TritonReplicaCollector()
        self.registry.register(self.triton_replicas)
        self.registry.register(StageCollector())

    def watch_triton_replicas(self, source: TritonReplicaSource) -> None:
        """Export the per-replica series (in flight, calls, failures, healthy) of a Triton pool from now on."""
        self.triton_replicas.source = source

    def record_request(self, route: str, method: str, status: int, duration_s: float) -> None:
        self.http_requests.labels(route=route, method=method, status=str(status)).inc()
        self.http_duration.labels(route=route, method=method).observe(duration_s)

    def record_job(self, status: str) -> None:
        """Count a job reaching `status` (one of JOB_STATUSES; anything else is a bug, not a new series)."""
        if status not in JOB_STATUSES:
            raise ValueError(f"unknown job status {status!r}")
        self.jobs.labels(status=status).inc()

    def record_webhook(self, outcome: str) -> None:
        """Count one delivery attempt's outcome: delivered, retry (will try again) or failed (gave up)."""
        if outcome not in WEBHOOK_OUTCOMES:
            raise ValueError(f"unknown webhook outcome {outcome!r}")
        self.webhook_deliveries.labels(outcome=outcome).inc()

    def record_text_cache(self, hit: bool) -> None:
        """Count one text-embedding cache lookup (`TextEmbeddingCache(on_lookup=...)`)."""
        (self.text_cache_hits if hit else self.text_cache_misses).inc()

    def set_queue_depth(self, queued: int, running: int) -> None:
        self.jobs_queued.set(queued)
        self.jobs_running.set(running)

    def on_job_event(self, event: str, value: Any) -> None:
        """Adapter for `JobManager(on_event=...)`: its (event, value) hooks onto these instruments.

        Unknown events are ignored, so the job system can add events before metrics know them.
        """
        if event in ("job_created", "job_finished"):
            self.record_job(str(value))
        elif event == "queue_depth":
            queued, running = value
            self.set_queue_depth(int(queued), int(running))
        elif event == "webhook":
            self.record_webhook(str(value))
        elif event == "store_retry":
            self.store_retries.labels(operation=str(value)).inc()
        elif event == "queue_time":
            priority, key_class, seconds = value
            self.queue_time.labels(priority=str(priority), key_class=str(key_class)).observe(float(seconds))
        elif event == "preempted":
            priority, seconds = value
            self.preemptions.labels(priority=str(priority)).inc()
            self.preempted_seconds.labels(priority=str(priority)).inc(float(seconds))
        elif event == "queued_by_priority":
            for priority in PRIORITIES:
                self.queued_by_priority.labels(priority=str(priority)).set(float(value.get(priority, 0)))
        elif event == "result_cache":
            if value not in RESULT_CACHE_OUTCOMES:
                raise ValueError(f"unknown result cache outcome {value!r}")
            self.result_cache.labels(outcome=str(value)).inc()

    async def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition (format negotiated from `Accept`) and its content type, with fresh Triton counts."""
        await self.triton.refresh()
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
