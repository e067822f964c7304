"""`TritonPool` with fake replicas at the client seam: choice, retry elsewhere, ejection, DNS, metrics, settings."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from gateway.errors import BackendError, BackendUnavailable
from gateway.observability import Metrics, triton_stats_source
from gateway.settings import Settings
from gateway.triton.client import (
    DEFAULT_PRIORITY,
    PRIORITY_LEVELS,
    TritonEngine,
    translate_triton_errors,
    triton_priority,
    triton_status,
)
from gateway.triton.pool import PROBE_FAILURES_TO_EJECT, TritonPool, make_triton, parse_targets

UNET = "m_unet"
VAE = "m_vae"
WAIT_S = 5.0  # bound on every wait for a background task


def triton_error(status: str, model: str = UNET) -> BaseException:
    """What `TritonEngine` raises for a Triton failure of this gRPC status."""
    try:
        with translate_triton_errors(model):
            raise InferenceServerException("fake failure", status=status)
    except (BackendUnavailable, BackendError) as exc:
        return exc
    raise AssertionError("not translated")


UNAVAILABLE = "StatusCode.UNAVAILABLE"
DEADLINE = "StatusCode.DEADLINE_EXCEEDED"
NOT_FOUND = "StatusCode.NOT_FOUND"
INVALID = "StatusCode.INVALID_ARGUMENT"


class FakeReplica:
    """A replica's client: `live`, `models` (None: every model ready), `fail(model) -> exception | None`,
    `gate` (calls wait for it), and the calls it received."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.live = True
        self.models: set[str] | None = None
        self.fail: Callable[[str], BaseException | None] = lambda model: None
        self.gate: asyncio.Event | None = None
        self.delay_s = 0.0
        self.calls: list[tuple[str, float | None]] = []
        self.priorities: list[int] = []
        self.in_flight = 0
        self.closed = False
        self.stats_entries: list[dict[str, Any]] = []

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        *,
        timeout_s: float | None = None,
        priority: int = DEFAULT_PRIORITY,
    ) -> dict[str, np.ndarray]:
        self.calls.append((model, timeout_s))
        self.priorities.append(priority)
        self.in_flight += 1
        try:
            if not self.live:
                raise triton_error(UNAVAILABLE, model)
            if self.gate is not None:
                await self.gate.wait()
            if self.delay_s:
                await asyncio.sleep(min(self.delay_s, timeout_s or self.delay_s))
                if timeout_s is not None and self.delay_s > timeout_s:
                    raise triton_error(DEADLINE, model)
            failure = self.fail(model)
            if failure is not None:
                raise failure
            return {name: np.full((1,), len(self.calls), np.float32) for name in outputs}
        finally:
            self.in_flight -= 1

    async def is_live(self, *, timeout_s: float = 2.0) -> bool:
        return self.live

    async def model_ready(self, model: str, *, timeout_s: float = 2.0) -> bool:
        return self.live and (self.models is None or model in self.models)

    async def statistics(self, model: str) -> dict[str, Any]:
        if not self.live:
            raise triton_error(UNAVAILABLE, model)
        return {"model_stats": self.stats_entries}

    async def close(self) -> None:
        self.closed = True


class World:
    """The fake replicas by address (created on connect) and a fake DNS."""

    def __init__(self) -> None:
        self.replicas: dict[str, FakeReplica] = {}
        self.dns: dict[str, list[str] | BaseException] = {}
        self.lookups = 0

    def connect(self, address: str) -> FakeReplica:
        replica = self.replicas.get(address)
        if replica is None or replica.closed:
            replica = self.replicas[address] = FakeReplica(address)
        return replica

    async def resolve(self, host: str, port: int) -> Sequence[str]:
        self.lookups += 1
        answer = self.dns[host]
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def pool(self, url: str, **kwargs: Any) -> TritonPool:
        kwargs.setdefault("timeout_s", 5.0)
        kwargs.setdefault("health_interval_s", 3600.0)  # tests probe with refresh() unless they want the loop
        kwargs.setdefault("resolve_interval_s", 3600.0)
        return TritonPool(url, connect=self.connect, resolver=self.resolve, **kwargs)


@pytest.fixture
async def world() -> AsyncIterator[World]:
    yield World()


async def call(pool: TritonPool, model: str = UNET) -> dict[str, np.ndarray]:
    return await pool.infer(model, {"x": np.zeros((1,), np.float32)}, ["y"])


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


# --- the URL setting ------------------------------------------------------------------------------------------


def test_parse_targets() -> None:
    a, b, c, d = parse_targets(" 10.0.0.1:8001, triton.ns.svc:9001 ,[::1]:7001,tritonhost")
    assert (a.address, a.dynamic) == ("10.0.0.1:8001", False)
    assert (b.host, b.port, b.dynamic) == ("triton.ns.svc", 9001, True)
    assert (c.address, c.dynamic) == ("[::1]:7001", False)
    assert (d.host, d.port, d.dynamic) == ("tritonhost", 8001, True)
    (uri,) = parse_targets("dns:///triton:8001")
    assert (uri.address, uri.dynamic) == ("dns:///triton:8001", False)
    for bad in ("", " , ", "host:notaport", "host:0", ":8001"):
        with pytest.raises(ValueError):
            parse_targets(bad)


def test_settings_and_factory() -> None:
    settings = Settings.from_env(
        {
            "IMAGEN_TRITON_URL": "10.0.0.1:8001,10.0.0.2:8001",
            "IMAGEN_TRITON_RESOLVE_INTERVAL_S": "7",
            "IMAGEN_TRITON_HEALTH_INTERVAL_S": "1.5",
            "IMAGEN_TRITON_MAX_ATTEMPTS": "2",
            "IMAGEN_TRITON_ATTEMPT_TIMEOUT_S": "30",
            "IMAGEN_TRITON_TIMEOUT_S": "60",
        }
    )
    metrics = Metrics()
    pool = make_triton(settings, metrics=metrics)
    assert [t.address for t in pool.targets] == ["10.0.0.1:8001", "10.0.0.2:8001"]
    assert (pool.timeout_s, pool.max_attempts, pool.attempt_timeout_s) == (60.0, 2, 30.0)
    assert (pool.health_interval_s, pool.resolve_interval_s) == (1.5, 7.0)
    assert metrics.triton_replicas.source == pool.replica_metrics
    default = make_triton(Settings(triton_grpc_port=8101))
    assert [t.address for t in default.targets] == ["127.0.0.1:8101"]
    assert (default.max_attempts, default.attempt_timeout_s) == (3, None)


def test_triton_status_of_translated_errors() -> None:
    assert triton_status(triton_error(UNAVAILABLE)) == UNAVAILABLE
    assert isinstance(triton_error(DEADLINE), BackendUnavailable)
    assert isinstance(triton_error(INVALID), BackendError)
    assert triton_status(BackendUnavailable("x", "y")) == ""


# --- choice ---------------------------------------------------------------------------------------------------


async def test_one_url_is_one_replica_with_the_whole_timeout(world: World) -> None:
    pool = world.pool("10.0.0.1:8001", timeout_s=120.0)
    out = await call(pool)
    assert out["y"].shape == (1,)
    (only,) = world.replicas.values()
    assert only.address == "10.0.0.1:8001" and only.calls[0][0] == UNET
    assert 119.0 < (only.calls[0][1] or 0) <= 120.0
    await pool.close()
    assert only.closed


async def test_idle_replicas_take_turns(world: World) -> None:
    pool = world.pool("10.0.0.1:1,10.0.0.2:1")
    for _ in range(6):
        await call(pool)
    assert [len(r.calls) for r in world.replicas.values()] == [3, 3]
    await pool.close()


async def test_least_in_flight_is_chosen(world: World) -> None:
    pool = world.pool("10.0.0.1:1,10.0.0.2:1,10.0.0.3:1")
    await pool.refresh()
    a, b, c = (world.replicas[f"10.0.0.{i}:1"] for i in (1, 2, 3))
    a.gate, b.gate = asyncio.Event(), asyncio.Event()
    held = [asyncio.create_task(call(pool)) for _ in range(2)]  # one on a, one on b: c is free
    await wait_until(lambda: a.in_flight == 1 and b.in_flight == 1, "a and b busy")
    for _ in range(4):  # every sequential call finds c the least busy
        await call(pool)
    assert (len(a.calls), len(b.calls), len(c.calls)) == (1, 1, 4)
    a.gate.set()
    b.gate.set()
    await asyncio.gather(*held)
    assert pool.replica_metrics()["10.0.0.3:1"] == {"in_flight": 0.0, "calls": 4.0, "failures": 0.0, "healthy": 1.0}
    await pool.close()


# --- retry elsewhere ------------------------------------------------------------------------------------------


async def test_unavailable_is_retried_elsewhere_and_ejects(world: World) -> None:
    pool = world.pool("10.0.0.1:1,10.0.0.2:1")
    await pool.refresh()
    a, b = world.replicas.values()
    a.live = False  # killed: calls fail UNAVAILABLE, but no health check has run yet
    for _ in range(4):
        await call(pool)
    assert len(a.calls) == 1 and len(b.calls) == 4  # tried once, then out
    assert not pool.replicas[a.address].live
    assert pool.replica_metrics()[a.address]["failures"] == 1.0
    assert pool.replica_metrics()[a.address]["healthy"] == 0.0
    await pool.close()


async def test_the_priority_goes_with_every_try(world: World) -> None:
    """A job's priority reaches the replica that answers, the retry elsewhere included; none sent: the default."""
    pool = world.pool("10.0.0.1:1,10.0.0.2:1")
    await pool.refresh()
    a, b = world.replicas.values()
    a.live = False
    await pool.infer(UNET, {"x": np.zeros((1,), np.float32)}, ["y"], priority=2)
    await call(pool)
    assert a.priorities == [2] and b.priorities == [2, DEFAULT_PRIORITY]
    await pool.close()


async def test_deadline_is_retried_elsewhere_without_ejecting(world: World) -> None:
    pool = world.pool("10.0.0.1:1,10.0.0.2:1", timeout_s=1.0, attempt_timeout_s=0.1)
    a, b = (world.connect(f"10.0.0.{i}:1") for i in (1, 2))
    a.delay_s = 10.0  # slow: its try times out
    started = time.monotonic()
    await call(pool)
    assert time.monotonic() - started < 0.5
    assert len(a.calls) == 1 and len(b.calls) == 1
    assert a.calls[0][1] == pytest.approx(0.1)
    assert pool.replicas[a.address].live  # slow is not down
    await pool.close()


async def test_total_time_is_bounded_by_the_call_timeout(world: World) -> None:
    pool = world.pool("10.0.0.1:1,10.0.0.2:1,10.0.0.3:1", timeout_s=0.3, attempt_timeout_s=0.2)
    for i in (1, 2, 3):
        world.connect(f"10.0.0.{i}:1").delay_s = 10.0
    started = time.monotonic()
    with pytest.raises(BackendUnavailable):
        await call(pool)
    assert time.monotonic() - started < 0.6
    budgets = [t or 0.0 for r in world.replicas.values() for _, t in r.calls]
    assert len(budgets) == 2 and budgets[0] == pytest.approx(0.2) and budgets[1] < 0.11  # the rest of 0.3 s
    await pool.close()


async def test_attempts_are_bounded(world: World) -> None:
    pool = world.pool(",".join(f"10.0.0.{i}:1" for i in range(1, 6)), max_attempts=3)
    for i in range(1, 6):
        world.connect(f"10.0.0.{i}:1").live = False
    with pytest.raises(BackendUnavailable) as caught:
        await call(pool)
    assert triton_status(caught.value) == UNAVAILABLE
    assert sum(len(r.calls) for r in world.replicas.values()) == 3
    await pool.close()


async def test_backend_errors_are_not_retried(world: World) -> None:
    pool = world.pool("10.0.0.1:1,10.0.0.2:1")
    for i in (1, 2):
        world.connect(f"10.0.0.{i}:1").fail = lambda model: triton_error(INVALID, model)
    with pytest.raises(BackendError):
        await call(pool)
    assert sum(len(r.calls) for r in world.replicas.values()) == 1
    assert all(r.live for r in pool.replicas.values())
    await pool.close()


async def test_missing_model_goes_elsewhere_for_that_model_only(world: World) -> None:
    pool = world.pool("10.0.0.1:1,10.0.0.2:1")
    a, b = (world.connect(f"10.0.0.{i}:1") for i in (1, 2))
    a.fail = lambda model: triton_error(NOT_FOUND, model) if model == VAE else None
    for _ in range(3):
        await call(pool, VAE)
    assert [m for m, _ in a.calls] == [VAE] and len(b.calls) == 3
    for _ in range(4):
        await call(pool, UNET)
    assert sum(1 for m, _ in a.calls if m == UNET) == 2  # still in for the other model
    await pool.close()


# --- health ---------------------------------------------------------------------------------------------------


async def test_ejection_and_readmission_by_health_checks(world: World) -> None:
    pool = world.pool("10.0.0.1:1,10.0.0.2:1", health_interval_s=0.02)
    await call(pool)  # starts the pool and its health loop; learns the model
    a, b = (world.replicas[f"10.0.0.{i}:1"] for i in (1, 2))
    a.live = False
    await wait_until(lambda: not pool.replicas[a.address].live, "a taken out")
    before = len(a.calls)
    for _ in range(4):
        await call(pool)
    assert len(a.calls) == before  # out: no call tried it
    a.live = True
    await wait_until(lambda: pool.replicas[a.address].live, "a put back")
    for _ in range(4):
        await call(pool)
    assert len(a.calls) == before + 2
    # A replica live but without a model the pool serves is out for that model.
    b.models = {VAE}
    await wait_until(lambda: not pool.replicas[b.address].serves(UNET), "b out for the unet")
    assert pool.replicas[b.address].serves(VAE) and not pool.replicas[b.address].healthy
    await pool.close()


async def test_one_failed_probe_keeps_a_replica_in_and_failures_in_a_row_take_it_out(world: World) -> None:
    """Issue 22: a lost probe (a timeout while the server is busy, a blip) between good ones is forgiven;
    PROBE_FAILURES_TO_EJECT in a row take the replica out; one good probe puts it back."""
    assert PROBE_FAILURES_TO_EJECT >= 2
    pool = world.pool("10.0.0.1:1,10.0.0.2:1")
    await call(pool)  # learns the model
    await pool.refresh()
    a = world.replicas["10.0.0.1:1"]
    for _ in range(3):  # fail, good, fail, good...: never PROBE_FAILURES_TO_EJECT in a row
        a.live = False
        for _ in range(PROBE_FAILURES_TO_EJECT - 1):
            await pool.refresh()
        assert pool.replicas[a.address].live and pool.replicas[a.address].serves(UNET)
        a.live = True
        await pool.refresh()
    before = len(a.calls)
    for _ in range(4):
        await call(pool)
    assert len(a.calls) == before + 2  # still taking its turn
    a.live = False
    for _ in range(PROBE_FAILURES_TO_EJECT):
        await pool.refresh()
    assert not pool.replicas[a.address].live
    assert pool.replica_metrics()[a.address]["healthy"] == 0.0
    before = len(a.calls)
    for _ in range(4):
        await call(pool)
    assert len(a.calls) == before  # out: no call tried it
    a.live = True
    await pool.refresh()
    assert pool.replicas[a.address].live
    await pool.close()


async def test_a_probe_that_breaks_counts_as_failed(world: World) -> None:
    pool = world.pool("10.0.0.1:1,10.0.0.2:1")
    await pool.refresh()
    a = world.replicas["10.0.0.1:1"]

    async def breaks(*, timeout_s: float = 2.0) -> bool:
        raise OSError("connection reset")

    a.is_live = breaks  # type: ignore[method-assign]
    await pool.refresh()
    assert pool.replicas[a.address].live  # one failed probe: kept in
    for _ in range(PROBE_FAILURES_TO_EJECT - 1):
        await pool.refresh()
    assert not pool.replicas[a.address].live
    await pool.close()


async def test_all_down_fails_fast(world: World) -> None:
    pool = world.pool("10.0.0.1:1,10.0.0.2:1", timeout_s=120.0)
    await pool.refresh()
    for replica in world.replicas.values():
        replica.live = False
    for _ in range(PROBE_FAILURES_TO_EJECT):
        await pool.refresh()
    started = time.monotonic()
    with pytest.raises(BackendUnavailable):
        await call(pool)
    assert time.monotonic() - started < 0.1
    assert all(not r.calls for r in world.replicas.values())
    assert not await pool.models_ready([UNET])
    await pool.close()


async def test_models_ready_needs_one_replica_with_every_model(world: World) -> None:
    pool = world.pool("10.0.0.1:1,10.0.0.2:1")
    a, b = (world.connect(f"10.0.0.{i}:1") for i in (1, 2))
    assert await pool.models_ready([UNET, VAE])
    a.models = {UNET}
    assert await pool.models_ready([UNET, VAE])  # b has both
    b.models = {VAE}
    assert not await pool.models_ready([UNET, VAE])  # each lacks one
    assert await pool.models_ready([UNET])
    a.models = None
    b.live = False
    assert await pool.models_ready([UNET, VAE])
    await pool.close()


# --- DNS ------------------------------------------------------------------------------------------------------


async def test_dns_name_is_re_resolved(world: World) -> None:
    world.dns["triton"] = ["10.0.0.1", "10.0.0.2"]
    pool = world.pool("triton:8001", resolve_interval_s=0.02)
    for _ in range(4):
        await call(pool)
    assert sorted(pool.replicas) == ["10.0.0.1:8001", "10.0.0.2:8001"]
    old = world.replicas["10.0.0.1:8001"]
    old.gate = asyncio.Event()
    held = asyncio.create_task(call(pool))  # in flight on .1 while it leaves the name
    await wait_until(lambda: old.in_flight == 1, "held on .1")
    world.dns["triton"] = ["10.0.0.2", "10.0.0.3"]
    await wait_until(lambda: sorted(pool.replicas) == ["10.0.0.2:8001", "10.0.0.3:8001"], "re-resolved")
    assert not old.closed  # closed only once its call ended
    old.gate.set()
    await held
    await wait_until(lambda: old.closed, "removed replica closed")
    for _ in range(4):
        await call(pool)
    assert len(world.replicas["10.0.0.3:8001"].calls) == 2
    # A failed lookup keeps the addresses known.
    lookups = world.lookups
    world.dns["triton"] = OSError("NXDOMAIN")
    await wait_until(lambda: world.lookups > lookups + 1, "looked up again")
    assert sorted(pool.replicas) == ["10.0.0.2:8001", "10.0.0.3:8001"]
    await pool.close()


async def test_unresolvable_name_falls_back_to_grpc_resolution(world: World) -> None:
    world.dns["triton"] = OSError("no DNS yet")
    pool = world.pool("triton:8001")
    await call(pool)
    assert list(pool.replicas) == ["triton:8001"]  # gRPC resolves it, as a single engine did
    world.dns["triton"] = ["10.0.0.9"]
    await pool.refresh()
    assert list(pool.replicas) == ["10.0.0.9:8001"]
    assert world.replicas["triton:8001"].closed
    await pool.close()


# --- statistics and metrics -----------------------------------------------------------------------------------


async def test_statistics_sum_over_replicas(world: World) -> None:
    pool = world.pool("10.0.0.1:1,10.0.0.2:1,10.0.0.3:1")
    for i, (inferences, executions) in enumerate([(10, 4), (6, 2), (99, 99)], start=1):
        replica = world.connect(f"10.0.0.{i}:1")
        replica.stats_entries = [
            {"name": UNET, "version": "1", "inference_count": str(inferences), "execution_count": str(executions)}
        ]
    world.replicas["10.0.0.3:1"].live = False  # down: left out, the others still counted
    stats = await pool.statistics(UNET)
    assert sorted(stats["replicas"]) == ["10.0.0.1:1", "10.0.0.2:1"]
    counts = await triton_stats_source(pool.statistics, lambda: [UNET])()
    assert counts == {UNET: {"inference_count": 16, "execution_count": 6}}
    for replica in world.replicas.values():
        replica.live = False
    with pytest.raises(BackendUnavailable):
        await pool.statistics(UNET)
    await pool.close()


async def test_replica_series_in_metrics(world: World) -> None:
    pool = world.pool("10.0.0.1:1,10.0.0.2:1")
    metrics = Metrics()
    metrics.watch_triton_replicas(pool.replica_metrics)
    world.connect("10.0.0.1:1").live = False
    for _ in range(3):
        await call(pool)
    body, _ = await metrics.render()
    text = body.decode()
    assert 'imagen_triton_replica_calls_total{replica="10.0.0.1:1"} 1.0' in text
    assert 'imagen_triton_replica_calls_total{replica="10.0.0.2:1"} 3.0' in text
    assert 'imagen_triton_replica_failures_total{replica="10.0.0.1:1"} 1.0' in text
    assert 'imagen_triton_replica_healthy{replica="10.0.0.1:1"} 0.0' in text
    assert 'imagen_triton_replica_in_flight{replica="10.0.0.2:1"} 0.0' in text
    await pool.close()
    assert "imagen_triton_replica_calls_total{" not in (await metrics.render())[0].decode()


async def test_close_stops_background_tasks(world: World) -> None:
    world.dns["triton"] = ["10.0.0.1"]
    pool = world.pool("triton:1,10.0.0.2:1", health_interval_s=0.01, resolve_interval_s=0.01)
    await call(pool)
    await pool.close()
    lookups = world.lookups
    await asyncio.sleep(0.05)
    assert world.lookups == lookups
    assert all(r.closed for r in world.replicas.values())


# --- priority ---------------------------------------------------------------------------------------------------


def test_triton_priority_levels() -> None:
    """Triton serves level 1 first: interactive (2) -> 1, normal (1) -> 2, bulk (0) -> 3; 0 is never sent (Triton
    would read it as the model's default level)."""
    assert [triton_priority(p) for p in range(PRIORITY_LEVELS)] == [3, 2, 1]
    assert triton_priority(DEFAULT_PRIORITY) == 2
    for bad in (-1, PRIORITY_LEVELS):
        with pytest.raises(ValueError, match="priority"):
            triton_priority(bad)


class RecordingGrpcClient:
    """Stands in for tritonclient's aio client: records each `infer`'s keyword arguments."""

    def __init__(self) -> None:
        self.kwargs: list[dict[str, Any]] = []

    async def infer(self, model: str, inputs: Any, **kwargs: Any) -> Any:
        self.kwargs.append(kwargs)
        return type("Result", (), {"as_numpy": staticmethod(lambda name: np.zeros((1,), np.float32))})()

    async def close(self) -> None:
        pass


@pytest.mark.parametrize(("priority", "level"), [(0, 3), (1, 2), (2, 1), (None, 2)])
async def test_the_engine_sends_tritons_level(priority: int | None, level: int) -> None:
    engine = TritonEngine("127.0.0.1:1", timeout_s=5.0)
    await engine._client.close()
    engine._client = fake = RecordingGrpcClient()
    kwargs = {} if priority is None else {"priority": priority}
    await engine.infer(UNET, {"x": np.zeros((1,), np.float32)}, ["y"], **kwargs)
    assert fake.kwargs[0]["priority"] == level
