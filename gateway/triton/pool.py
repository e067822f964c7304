"""Several Triton replicas behind the one `Engine` interface: fewest calls in flight, retry elsewhere, health checks.

`IMAGEN_TRITON_URL` lists targets, comma-separated. `host:port` with an IP literal is one replica; with a DNS name
it is as many replicas as the name has addresses (a Kubernetes headless Service), re-resolved every
`resolve_interval_s`; a gRPC target URI (`dns:///...`, `unix:...`) is passed through as one replica. One
`host:port` is a pool of one, which behaves as the single `TritonEngine` did.

- **Choice.** Each call goes to the replica taking calls (live, the model not known to be missing) with the fewest
  calls in flight; ties go round-robin, so sequential calls alternate.
- **Retry elsewhere.** Inference has no side effects, so a call that fails as *unavailable* (UNAVAILABLE: refused,
  reset, shutting down; DEADLINE_EXCEEDED; NOT_FOUND: model not loaded there; RESOURCE_EXHAUSTED) is tried again on
  another replica: at most `max_attempts` replicas, all within the call's `timeout_s`. Each try gets the remaining
  budget, or at most `attempt_timeout_s` when set (only then can a deadline leave time to try elsewhere). Any other
  error (a bad request, a model failure) is the answer: it would fail the same everywhere.
  Every try carries the call's job priority (`client.triton_priority`).
- **Ejection.** A try failing UNAVAILABLE takes that replica out at once (NOT_FOUND takes it out for that model);
  a background task probes every replica every `health_interval_s` (server live, every model the pool has been
  asked about ready) and puts it back after one good probe, or takes it out after `PROBE_FAILURES_TO_EJECT`
  failed probes in a row (not live, no answer, a timeout): one probe lost to a busy server or a network blip does
  not take a serving replica out. A live server answering that a model is not ready takes the replica out for
  that model at once (an answer, not a failed probe). With no replica in, a call fails at once with
  `BackendUnavailable` (the job runner retries later).
- `models_ready` (`/readyz`) probes every replica now: true while at least one serves every model asked about.
  `statistics(model)` sums the replicas' entries (`model_stats`, as `/metrics` reads them) and keeps each
  replica's under `replicas`. `replica_metrics()` feeds the per-replica series of `/metrics`.

The pool is started lazily by its first call, inside the serving event loop (gRPC aio channels bind to a loop).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from gateway.errors import BackendUnavailable
from gateway.triton.client import DEFAULT_PRIORITY, TritonEngine, triton_status

if TYPE_CHECKING:
    from gateway.observability import Metrics
    from gateway.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_GRPC_PORT = 8001
PROBE_TIMEOUT_S = 2.0
RESOLVE_TIMEOUT_S = 5.0
STATS_TIMEOUT_S = 1.5
# Failed health probes in a row that take a replica out: 2, so one lost probe (a 2 s timeout while the server is
# saturated, a blip) is forgiven, and a replica that stopped answering is out within two rounds of
# `health_interval_s` (a call failing UNAVAILABLE takes it out at once, without waiting for probes).
PROBE_FAILURES_TO_EJECT = 2
_UNREACHABLE = "StatusCode.UNAVAILABLE"
_MODEL_MISSING = "StatusCode.NOT_FOUND"


class ReplicaClient(Protocol):
    """One replica's client: `TritonEngine`, or a fake in tests."""

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        *,
        timeout_s: float | None = None,
        priority: int = DEFAULT_PRIORITY,
    ) -> dict[str, np.ndarray]: ...

    async def is_live(self, *, timeout_s: float = PROBE_TIMEOUT_S) -> bool: ...

    async def model_ready(self, model: str, *, timeout_s: float = PROBE_TIMEOUT_S) -> bool: ...

    async def statistics(self, model: str) -> dict[str, Any]: ...

    async def close(self) -> None: ...


Connect = Callable[[str], ReplicaClient]
# (host, port) -> the IP addresses the name has now; raising (socket.gaierror...) keeps the last ones known.
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]


@dataclass(frozen=True)
class Target:
    """One comma-separated entry of the URL setting."""

    entry: str
    host: str
    port: int
    dynamic: bool  # a DNS name, resolved to its addresses

    @property
    def address(self) -> str:
        """The gRPC target as written (for a name never resolved: gRPC resolves it itself)."""
        return self.entry if self.port < 0 else format_address(self.host, self.port)


def format_address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def parse_targets(url: str) -> list[Target]:
    """`a:8001, b:8001` -> targets; `[::1]:8001` is IPv6; a missing port is Triton's gRPC default (8001)."""
    targets: list[Target] = []
    for raw in url.split(","):
        entry = raw.strip()
        if not entry:
            continue
        uri = "://" in entry or entry.startswith(("unix:", "dns:", "ipv4:", "ipv6:"))
        if uri or (entry.count(":") > 1 and not entry.startswith("[")):
            targets.append(Target(entry, entry, -1, dynamic=False))  # a gRPC target URI: gRPC's own business
            continue
        if entry.startswith("["):
            host, _, rest = entry[1:].partition("]")
            port_text = rest.removeprefix(":")
        else:
            host, _, port_text = entry.partition(":")
        try:
            port = int(port_text) if port_text else DEFAULT_GRPC_PORT
        except ValueError:
            raise ValueError(f"invalid Triton address {entry!r} (expected host:port)") from None
        if not host or not 0 < port < 65536:
            raise ValueError(f"invalid Triton address {entry!r} (expected host:port)")
        targets.append(Target(entry, host, port, dynamic=not _is_ip(host)))
    if not targets:
        raise ValueError(f"no Triton address in {url!r}")
    return targets


# Triton names are looked up in a thread of their own, not asyncio's default executor (shared with the rest of the
# gateway): a silent nameserver then holds these two threads (each refresh gives up after RESOLVE_TIMEOUT_S), and
# nothing else.
_DNS_EXECUTOR = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="imagen-triton-dns")


async def resolve_dns(host: str, port: int) -> list[str]:
    """The name's IPv4 addresses (or, when it has none, IPv6), sorted: `localhost` is one replica, not two."""
    infos = await asyncio.get_running_loop().run_in_executor(
        _DNS_EXECUTOR, lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    )
    v4 = sorted({str(info[4][0]) for info in infos if info[0] == socket.AF_INET})
    v6 = sorted({str(info[4][0]) for info in infos if info[0] == socket.AF_INET6})
    return v4 or v6


@dataclass(eq=False)
class Replica:
    address: str
    client: ReplicaClient
    in_flight: int = 0
    calls: int = 0
    failures: int = 0
    live: bool = True  # optimistic until probes say otherwise
    failed_probes: int = 0  # consecutive failed health probes (reset by a good one)
    ready: dict[str, bool] = field(default_factory=dict)  # model -> ready, as last probed (absent: unknown)
    retired: bool = False  # no longer named by the URL: closed once its last call ends

    def serves(self, model: str) -> bool:
        return self.live and self.ready.get(model, True)

    @property
    def healthy(self) -> bool:
        return self.live and all(self.ready.values())


class TritonPool:
    """Replicas of Triton with the interface of `TritonEngine` (infer, models_ready, statistics, close)."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float,
        max_attempts: int = 3,
        attempt_timeout_s: float | None = None,
        health_interval_s: float = 2.0,
        resolve_interval_s: float = 10.0,
        probe_timeout_s: float = PROBE_TIMEOUT_S,
        models: Iterable[str] = (),
        connect: Connect | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        self.url = url
        self.targets = parse_targets(url)
        self.timeout_s = timeout_s
        self.max_attempts = max(1, max_attempts)
        self.attempt_timeout_s = attempt_timeout_s
        self.health_interval_s = health_interval_s
        self.resolve_interval_s = resolve_interval_s
        self.probe_timeout_s = probe_timeout_s
        self._connect: Connect = connect or (lambda address: TritonEngine(address, timeout_s=timeout_s))
        self._resolve: Resolver = resolver or resolve_dns
        self._models: dict[str, None] = dict.fromkeys(models)
        self._replicas: dict[str, Replica] = {}
        self._resolved: dict[str, list[str]] = {}  # dynamic target entry -> its addresses last resolved
        self._turn = 0
        self._started = False
        self._start_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing: set[asyncio.Task[None]] = set()

    # --- the Engine interface ---------------------------------------------------------------------------------

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        *,
        priority: int = DEFAULT_PRIORITY,
    ) -> dict[str, np.ndarray]:
        await self._start()
        self._learn((model,))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        tried: set[str] = set()
        failure: BackendUnavailable | None = None
        while len(tried) < self.max_attempts:
            remaining = deadline - loop.time()
            replica = self._pick(model, tried)
            if replica is None or remaining <= 0:
                break
            tried.add(replica.address)
            budget = remaining if self.attempt_timeout_s is None else min(remaining, self.attempt_timeout_s)
            replica.in_flight += 1
            replica.calls += 1
            try:
                return await replica.client.infer(model, inputs, outputs, timeout_s=budget, priority=priority)
            except BackendUnavailable as exc:
                replica.failures += 1
                failure = exc
                self._after_unavailable(replica, model, exc)
            except asyncio.CancelledError:
                raise
            except Exception:
                replica.failures += 1  # BackendError (the request's own failure) or a bug: not retried
                raise
            finally:
                replica.in_flight -= 1
                if replica.retired and replica.in_flight == 0:
                    self._close_later(replica)
        if failure is not None:
            raise failure
        raise BackendUnavailable(
            "The inference backend is unavailable", f"No Triton replica can serve model '{model}' now; retry later"
        )

    async def models_ready(self, models: Sequence[str]) -> bool:
        await self._start()
        self._learn(models)
        await self._probe_all()
        return any(r.live and all(r.ready.get(m, False) for m in models) for r in self._replicas.values())

    async def statistics(self, model: str) -> dict[str, Any]:
        """`model_stats`: every replica's entries (summed by whoever adds them up); `replicas`: address -> stats."""
        by_replica = await self.statistics_by_replica(model)
        if not by_replica:
            raise BackendUnavailable(
                "The inference backend is unavailable", f"No Triton replica answered statistics for model '{model}'"
            )
        entries = [entry for stats in by_replica.values() for entry in stats.get("model_stats") or []]
        return {"model_stats": entries, "replicas": by_replica}

    async def statistics_by_replica(self, model: str) -> dict[str, dict[str, Any]]:
        await self._start()
        replicas = [r for r in self._replicas.values() if r.live]

        async def one(replica: Replica) -> dict[str, Any] | None:
            try:
                return await asyncio.wait_for(replica.client.statistics(model), STATS_TIMEOUT_S)
            except Exception as exc:  # down, slow or failing: left out of the sum
                log.debug("statistics of %s from %s unavailable: %r", model, replica.address, exc)
                return None

        found = await asyncio.gather(*(one(r) for r in replicas))
        return {r.address: stats for r, stats in zip(replicas, found, strict=True) if stats is not None}

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        replicas = list(self._replicas.values())
        self._replicas.clear()
        await asyncio.gather(*(r.client.close() for r in replicas), *self._closing, return_exceptions=True)
        self._started = False

    # --- inspection (metrics, tests) --------------------------------------------------------------------------

    @property
    def replicas(self) -> dict[str, Replica]:
        """Address -> replica, for the replicas the URL names now."""
        return dict(self._replicas)

    def replica_metrics(self) -> dict[str, dict[str, float]]:
        """The `Metrics.watch_triton_replicas` source: per replica in flight, calls, failures, healthy (0/1)."""
        return {
            r.address: {
                "in_flight": float(r.in_flight),
                "calls": float(r.calls),
                "failures": float(r.failures),
                "healthy": 1.0 if r.healthy else 0.0,
            }
            for r in self._replicas.values()
        }

    async def refresh(self) -> None:
        """Resolve the names and probe every replica now (the background tasks do both periodically)."""
        await self._start()
        await self._refresh_targets()
        await self._probe_all()

    # --- choice and health ------------------------------------------------------------------------------------

    def _learn(self, models: Iterable[str]) -> None:
        for model in models:
            self._models.setdefault(model, None)

    def _pick(self, model: str, tried: set[str]) -> Replica | None:
        candidates = [r for r in self._replicas.values() if r.address not in tried and r.serves(model)]
        if not candidates:
            return None
        start = self._turn % len(candidates)
        self._turn += 1
        return min(candidates[start:] + candidates[:start], key=lambda r: r.in_flight)

    def _after_unavailable(self, replica: Replica, model: str, exc: BackendUnavailable) -> None:
        status = triton_status(exc)
        if status == _UNREACHABLE:
            self._set_live(replica, False, f"call failed: {status}")
        elif status == _MODEL_MISSING:
            replica.ready[model] = False
            log.warning("triton replica %s out for %s: model not found", replica.address, model)
        # DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED: slow or busy, not down; tried elsewhere, kept in.

    def _set_live(self, replica: Replica, live: bool, why: str) -> None:
        if replica.live != live:
            if live:
                log.info("triton replica %s back in", replica.address)
            else:
                log.warning("triton replica %s out (%s)", replica.address, why)
        replica.live = live

    async def _probe(self, replica: Replica) -> None:
        models = list(self._models)
        timeout = self.probe_timeout_s
        try:
            live = await asyncio.wait_for(replica.client.is_live(timeout_s=timeout), timeout + 1.0)
            results: list[bool] = []
            if live and models:
                results = await asyncio.wait_for(
                    asyncio.gather(*(replica.client.model_ready(m, timeout_s=timeout) for m in models)), timeout + 1.0
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a probe that times out or breaks is a failed probe
            log.debug("probe of %s failed: %r", replica.address, exc)
            live, results = False, []
        if live:
            replica.failed_probes = 0
            ready = dict(zip(models, results, strict=True))
            newly_missing = [m for m, ok in ready.items() if not ok and replica.ready.get(m, True)]
            if newly_missing:
                log.warning("triton replica %s: models not ready: %s", replica.address, ", ".join(newly_missing))
            replica.ready = ready
            self._set_live(replica, True, "health check passed")
            return
        replica.failed_probes += 1
        if replica.live and replica.failed_probes < PROBE_FAILURES_TO_EJECT:
            log.info(
                "triton replica %s: health check failed (%d of %d in a row before it is taken out)",
                replica.address,
                replica.failed_probes,
                PROBE_FAILURES_TO_EJECT,
            )
            return  # kept in, as last probed
        replica.ready = dict.fromkeys(models, False)
        self._set_live(replica, False, f"{replica.failed_probes} health checks failed in a row")

    async def _probe_all(self) -> None:
        await asyncio.gather(*(self._probe(r) for r in list(self._replicas.values())))

    # --- replicas from the URL --------------------------------------------------------------------------------

    async def _start(self) -> None:
        if not self._started:
            async with self._start_lock:
                await self._start_once()

    async def _start_once(self) -> None:
        if self._started:
            return
        await self._refresh_targets()
        self._tasks.append(asyncio.create_task(self._every(self.health_interval_s, self._probe_all)))
        if any(t.dynamic for t in self.targets):
            self._tasks.append(
                asyncio.create_task(self._every(self.resolve_interval_s, self._refresh_targets, first_wait=True))
            )
        self._started = True
        log.info("triton replicas: %s", ", ".join(self._replicas))

    async def _every(
        self, interval_s: float, action: Callable[[], Awaitable[None]], *, first_wait: bool = False
    ) -> None:
        if first_wait:
            await asyncio.sleep(interval_s)
        while True:
            try:
                await action()
            except Exception:  # keep the loop: one bad round must not end health checks for good
                log.exception("triton pool background task failed")
            await asyncio.sleep(interval_s)

    async def _addresses(self, target: Target) -> list[str]:
        if not target.dynamic:
            return [target.address]
        try:
            found = list(await asyncio.wait_for(self._resolve(target.host, target.port), RESOLVE_TIMEOUT_S))
        except Exception as exc:
            log.warning("cannot resolve triton name %s: %r; keeping the addresses known", target.host, exc)
            found = []
        if found:
            addresses = [format_address(ip, target.port) for ip in found]
            if addresses != self._resolved.get(target.entry):
                log.info("triton name %s -> %s", target.host, ", ".join(addresses))
            self._resolved[target.entry] = addresses
            return addresses
        # Never resolved: let gRPC resolve the name itself, as a single engine would.
        return self._resolved.get(target.entry) or [target.address]

    async def _refresh_targets(self) -> None:
        wanted: dict[str, None] = {}
        for target in self.targets:
            wanted.update(dict.fromkeys(await self._addresses(target)))
        for address in wanted:
            if address not in self._replicas:
                self._replicas[address] = replica = Replica(address, self._connect(address))
                if self._started:
                    log.info("triton replica %s added", address)
                    await self._probe(replica)
        for address in [a for a in self._replicas if a not in wanted]:
            replica = self._replicas.pop(address)
            replica.retired = True
            log.info("triton replica %s removed (no longer resolved)", address)
            if replica.in_flight == 0:
                self._close_later(replica)

    def _close_later(self, replica: Replica) -> None:
        task = asyncio.create_task(replica.client.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


def make_triton(settings: Settings, *, metrics: Metrics | None = None) -> TritonPool:
    """The app's Triton: the replicas `triton_url` names (the bundled Triton when unset)."""
    pool = TritonPool(
        settings.triton_url or f"127.0.0.1:{settings.triton_grpc_port}",
        timeout_s=settings.triton_timeout_s,
        max_attempts=settings.triton_max_attempts,
        attempt_timeout_s=settings.triton_attempt_timeout_s,
        health_interval_s=settings.triton_health_interval_s,
        resolve_interval_s=settings.triton_resolve_interval_s,
    )
    if metrics is not None:
        metrics.watch_triton_replicas(pool.replica_metrics)
    return pool


__all__ = ["Replica", "ReplicaClient", "Target", "TritonPool", "make_triton", "parse_targets", "resolve_dns"]
