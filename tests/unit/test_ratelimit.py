"""Token buckets with a stepped clock, the middleware in front of the real `create_app` (no lifespan), and the
shared bucket of several replicas in a real Redis server (tests/fixtures_redis.py)."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.app import create_app
from gateway.errors import ERROR_TABLE, RateLimited, retry_after_s, status_and_code
from gateway.http.ratelimit import (
    REDIS_RETRY_AFTER_FAILURE_S,
    Limiter,
    RateLimitMiddleware,
    RedisTokenBucketLimiter,
    TokenBucketLimiter,
    api_key_or_address,
    make_limiter,
)
from gateway.settings import Settings
from tests.fixtures_redis import RedisServer, running_redis
from tests.helpers import free_port

KEY_A, KEY_B = "key-a-0123456789", "key-b-0123456789"


class Clock:
    """Manual monotonic time, stepped by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_rate_limited_is_in_the_error_table() -> None:
    assert ERROR_TABLE[RateLimited] == (429, "rate_limited")
    assert status_and_code(RateLimited("x")) == (429, "rate_limited")


def test_burst_then_steady_rate() -> None:
    clock = Clock()
    limiter = TokenBucketLimiter(per_minute=60, burst=3, clock=clock)  # one token a second
    assert [limiter.acquire("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("k") == pytest.approx(1.0)
    clock.advance(0.25)
    assert limiter.acquire("k") == pytest.approx(0.75)  # a refused request costs nothing
    clock.advance(0.75)
    assert limiter.acquire("k") == 0.0
    assert limiter.acquire("k") == pytest.approx(1.0)


def test_refill_is_capped_at_the_burst() -> None:
    clock = Clock()
    limiter = TokenBucketLimiter(per_minute=120, burst=2, clock=clock)
    limiter.acquire("k")
    limiter.acquire("k")
    clock.advance(3600)
    assert [limiter.acquire("k") for _ in range(2)] == [0.0, 0.0]
    assert limiter.acquire("k") == pytest.approx(0.5)


def test_keys_are_independent() -> None:
    limiter = TokenBucketLimiter(per_minute=1, burst=1, clock=Clock())
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("a") == pytest.approx(60.0)
    assert limiter.acquire("b") == 0.0


@pytest.mark.parametrize(("per_minute", "burst"), [(0, 20), (120, 0), (-1, 5)])
def test_zero_disables(per_minute: float, burst: int) -> None:
    limiter = TokenBucketLimiter(per_minute=per_minute, burst=burst, clock=Clock())
    assert not limiter.enabled
    assert all(limiter.acquire("k") == 0.0 for _ in range(1000))
    assert len(limiter) == 0


@pytest.mark.parametrize(
    ("wait", "header"), [(0.0001, 1), (0.5, 1), (1.0, 1), (1.0000001, 2), (8.57, 9), (59.2, 60), (60.0, 60)]
)
def test_retry_after_is_the_ceiling_in_whole_seconds(wait: float, header: int) -> None:
    assert retry_after_s(wait) == header


def test_idle_buckets_are_evicted_once_they_would_be_full_again() -> None:
    clock = Clock()
    limiter = TokenBucketLimiter(per_minute=60, burst=5, clock=clock)  # full again after 5 s
    for i in range(100):
        limiter.acquire(f"client-{i}")
    assert len(limiter) == 100
    clock.advance(4.9)
    limiter.acquire("late")
    assert len(limiter) == 101
    clock.advance(0.2)  # the first 100 are now indistinguishable from fresh buckets
    limiter.acquire("later")
    assert len(limiter) == 2


def test_the_bucket_count_is_capped_least_recently_used_first() -> None:
    clock = Clock()
    limiter = TokenBucketLimiter(per_minute=1, burst=1, clock=clock, max_buckets=3)
    for key in ("a", "b", "c"):
        limiter.acquire(key)
    limiter.acquire("a")  # touched again: "b" is now the least recently used
    limiter.acquire("d")
    assert len(limiter) == 3
    assert limiter.acquire("c") > 0 and limiter.acquire("a") > 0  # kept, still empty
    assert limiter.acquire("b") == 0.0  # forgotten, so it starts full again


# --- the middleware -------------------------------------------------------------------------------------------


def _client(app: Any, client_ip: str = "127.0.0.1") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app, client=(client_ip, 50000))
    return httpx.AsyncClient(transport=transport, base_url="http://t")


async def _ok(request: Request) -> Response:
    return JSONResponse({"ok": True})


def _limited_app(per_minute: float, burst: int, api_keys: frozenset[str], limiter: Limiter | None = None) -> Starlette:
    app = Starlette(
        routes=[
            Route("/v1/image-to-image", _ok, methods=["POST"]),
            Route("/v1/image-to-image/{job_id}", _ok, methods=["GET"]),
            Route("/v1/image-to-image/{job_id}/cancel", _ok, methods=["POST"]),
            Route("/v1/models", _ok, methods=["GET"]),
        ]
    )
    app.add_middleware(
        RateLimitMiddleware, per_minute=per_minute, burst=burst, key_fn=api_key_or_address(api_keys), limiter=limiter
    )
    return app


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_only_job_creation_is_limited() -> None:
    app = _limited_app(per_minute=1, burst=1, api_keys=frozenset({KEY_A}))
    async with _client(app) as http:
        assert (await http.post("/v1/image-to-image", headers=_bearer(KEY_A))).status_code == 200
        assert (await http.post("/v1/image-to-image", headers=_bearer(KEY_A))).status_code == 429
        for _ in range(5):
            assert (await http.get("/v1/image-to-image/j1", headers=_bearer(KEY_A))).status_code == 200
            assert (await http.post("/v1/image-to-image/j1/cancel", headers=_bearer(KEY_A))).status_code == 200
            assert (await http.get("/v1/models", headers=_bearer(KEY_A))).status_code == 200


async def test_429_has_the_spec_shape_and_retry_after() -> None:
    app = _limited_app(per_minute=7, burst=2, api_keys=frozenset({KEY_A}))
    async with _client(app) as http:
        for _ in range(2):
            assert (await http.post("/v1/image-to-image", headers=_bearer(KEY_A))).status_code == 200
        response = await http.post("/v1/image-to-image", headers=_bearer(KEY_A))
    assert response.status_code == 429
    assert response.headers["retry-after"] == "9"  # 60/7 = 8.57 s until the next token
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == "rate_limited"
    assert body["error"]["message"] and "9 s" in body["error"]["details"]


async def test_buckets_per_api_key_and_per_address_for_anonymous_callers() -> None:
    app = _limited_app(per_minute=1, burst=1, api_keys=frozenset({KEY_A, KEY_B}))
    async with _client(app, "10.0.0.1") as first, _client(app, "10.0.0.2") as second:
        assert (await first.post("/v1/image-to-image", headers=_bearer(KEY_A))).status_code == 200
        assert (await first.post("/v1/image-to-image", headers=_bearer(KEY_A))).status_code == 429
        # The same key from another address shares the bucket; another key has its own.
        assert (await second.post("/v1/image-to-image", headers=_bearer(KEY_A))).status_code == 429
        assert (await first.post("/v1/image-to-image", headers=_bearer(KEY_B))).status_code == 200
        # Anonymous and unknown tokens are keyed by address: made-up tokens do not mint fresh buckets.
        assert (await first.post("/v1/image-to-image")).status_code == 200
        assert (await first.post("/v1/image-to-image", headers=_bearer("made-up-1"))).status_code == 429
        assert (await first.post("/v1/image-to-image", headers=_bearer("made-up-2"))).status_code == 429
        assert (await second.post("/v1/image-to-image", headers=_bearer("made-up-3"))).status_code == 200


async def test_disabled_limit_passes_everything() -> None:
    app = _limited_app(per_minute=0, burst=20, api_keys=frozenset({KEY_A}))
    async with _client(app) as http:
        statuses = {(await http.post("/v1/image-to-image", headers=_bearer(KEY_A))).status_code for _ in range(50)}
    assert statuses == {200}


async def test_in_front_of_the_real_app_the_limit_applies_before_the_body_is_read(tmp_path: Path) -> None:
    """Over the limit, even a body that would be refused (415) gets 429: no parsing work is done for it."""
    settings = Settings(
        model_repository=tmp_path / "models",
        storage_dir=tmp_path / "images",
        jobs_db=tmp_path / "jobs.sqlite3",
        api_keys=frozenset({KEY_A}),
        rate_limit_per_minute=60,
        rate_limit_burst=2,
    )
    app = create_app(settings)
    app.add_middleware(
        RateLimitMiddleware,
        per_minute=settings.rate_limit_per_minute,
        burst=settings.rate_limit_burst,
        key_fn=api_key_or_address(settings.api_keys),
    )
    headers = {**_bearer(KEY_A), "Content-Type": "text/plain"}
    async with _client(app) as http:
        statuses = [
            (await http.post("/v1/image-to-image", content=b"x", headers=headers)).status_code for _ in range(4)
        ]
        health = await http.get("/healthz")
    assert statuses == [415, 415, 429, 429]
    assert health.status_code == 200


# --- the shared bucket in a real Redis (tests/fixtures_redis.py) ----------------------------------------------


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def prefix() -> str:
    """A key namespace per test, so tests sharing the module's Redis never see each other's buckets."""
    return f"test:{uuid.uuid4().hex}:"


@asynccontextmanager
async def _replicas(
    url: str, count: int, per_minute: float, burst: int, **kwargs: Any
) -> AsyncIterator[list[RedisTokenBucketLimiter]]:
    """`count` limiters on one Redis, as `count` gateway replicas would have."""
    limiters = [RedisTokenBucketLimiter(url, per_minute, burst, **kwargs) for _ in range(count)]
    try:
        yield limiters
    finally:
        for limiter in limiters:
            await limiter.aclose()


async def test_replicas_share_one_burst(redis_server: RedisServer, prefix: str) -> None:
    async with _replicas(redis_server.url, 2, per_minute=1, burst=5, key_prefix=prefix) as (first, second):
        waits = [await (first if i % 2 else second).take("k") for i in range(12)]
        assert waits[:5] == [0.0] * 5  # 5 in total, not 5 each
        assert all(59.0 < w <= 60.0 for w in waits[5:])  # one token a minute: a refusal costs nothing
        assert await first.take("other") == 0.0  # keys stay independent
        assert not first.redis_down and not second.redis_down


async def test_concurrent_burst_across_replicas_grants_exactly_the_burst(
    redis_server: RedisServer, prefix: str
) -> None:
    async with _replicas(redis_server.url, 3, per_minute=1, burst=7, key_prefix=prefix) as limiters:
        waits = await asyncio.gather(*(limiters[i % 3].take("k") for i in range(30)))
    assert sum(w == 0.0 for w in waits) == 7


async def test_the_shared_bucket_decides_like_the_local_one(redis_server: RedisServer, prefix: str) -> None:
    """Burst, then the refill rate, and the wait behind Retry-After: the numbers of `test_burst_then_steady_rate`."""
    async with _replicas(redis_server.url, 2, per_minute=60, burst=3, key_prefix=prefix) as (first, second):
        assert [await first.take("k"), await second.take("k"), await first.take("k")] == [0.0, 0.0, 0.0]
        assert await second.take("k") == pytest.approx(1.0, abs=0.1)
    async with _replicas(redis_server.url, 2, per_minute=600, burst=1, key_prefix=prefix) as (first, second):
        assert await first.take("fast") == 0.0
        wait = await second.take("fast")
        assert 0.0 < wait <= 0.1
        await asyncio.sleep(wait + 0.02)
        assert await second.take("fast") == 0.0


async def test_a_bucket_key_expires_once_it_would_be_full_again(redis_server: RedisServer, prefix: str) -> None:
    async with _replicas(redis_server.url, 1, per_minute=60, burst=5, key_prefix=prefix) as (limiter,):
        for _ in range(3):
            await limiter.take("k")
    client = redis.Redis.from_url(redis_server.url)
    try:
        keys = client.keys(prefix + "*")
        assert keys == [(prefix + "k").encode()]
        assert 2000 < client.pttl(keys[0]) <= 3000  # 3 tokens spent at one a second: full again in 3 s
    finally:
        client.close()


async def test_connections_per_replica_are_bounded(redis_server: RedisServer, prefix: str) -> None:
    client = redis.Redis.from_url(redis_server.url)
    try:
        before = int(client.info("clients")["connected_clients"])
        registry = CollectorRegistry()
        # What is bounded here is the connections, not the latency: a timeout generous enough for a loaded CI host
        # (the default 0.25 s made this flaky there), so every take is Redis's.
        replicas = _replicas(
            redis_server.url, 1, 6000, 1000, key_prefix=prefix, max_connections=2, registry=registry, timeout_s=10.0
        )
        async with replicas as (limiter,):
            waits = await asyncio.gather(*(limiter.take(f"k{i % 5}") for i in range(200)))
            during = int(client.info("clients")["connected_clients"])
        assert waits == [0.0] * 200 and registry.get_sample_value("imagen_rate_limit_redis_errors_total") == 0
        assert during - before <= 2
    finally:
        client.close()


async def test_the_429_is_the_same_in_front_of_two_replicas(redis_server: RedisServer, prefix: str) -> None:
    async with _replicas(redis_server.url, 2, per_minute=7, burst=2, key_prefix=prefix) as (first, second):
        apps = [
            _limited_app(7, 2, frozenset({KEY_A}), limiter=first),
            _limited_app(7, 2, frozenset({KEY_A}), limiter=second),
        ]
        async with _client(apps[0]) as one, _client(apps[1]) as two:
            assert (await one.post("/v1/image-to-image", headers=_bearer(KEY_A))).status_code == 200
            assert (await two.post("/v1/image-to-image", headers=_bearer(KEY_A))).status_code == 200
            response = await one.post("/v1/image-to-image", headers=_bearer(KEY_A))
            assert (await two.get("/v1/models", headers=_bearer(KEY_A))).status_code == 200
    assert response.status_code == 429
    assert response.headers["retry-after"] == "9"  # 60/7 = 8.57 s, as with one process
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == "rate_limited"
    assert "bursts of 2" in body["error"]["details"] and "9 s" in body["error"]["details"]


def _counter(registry: CollectorRegistry, name: str) -> float:
    value = registry.get_sample_value(name)
    assert value is not None
    return value


async def test_redis_unreachable_fails_open_to_the_local_bucket(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing listens on the port: each replica limits alone, logs one warning, counts in its metrics."""
    registry = CollectorRegistry()
    clock = Clock()
    url = f"redis://127.0.0.1:{free_port()}/0"
    caplog.set_level(logging.WARNING, logger="gateway.http.ratelimit")
    async with _replicas(url, 1, per_minute=60, burst=2, registry=registry, clock=clock) as (limiter,):
        started = time.monotonic()
        waits = [await limiter.take("k") for _ in range(3)]
        assert time.monotonic() - started < 2.0
    assert waits[:2] == [0.0, 0.0] and waits[2] == pytest.approx(1.0)  # the local bucket's answers
    assert limiter.redis_down
    assert _counter(registry, "imagen_rate_limit_redis_errors_total") == 1  # asked once, then locally
    assert _counter(registry, "imagen_rate_limit_local_decisions_total") == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Redis failed" in warnings[0].getMessage()


async def test_a_redis_that_does_not_answer_costs_one_timeout(caplog: pytest.LogCaptureFixture) -> None:
    """A port that accepts but never replies: the request waits `timeout_s` once, then decides locally."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        registry = CollectorRegistry()
        async with _replicas(url, 1, per_minute=60, burst=5, timeout_s=0.2, registry=registry) as (limiter,):
            started = time.monotonic()
            assert await limiter.take("k") == 0.0
            first_s = time.monotonic() - started
            started = time.monotonic()
            assert [await limiter.take("k") for _ in range(4)] == [0.0] * 4
            rest_s = time.monotonic() - started
    assert 0.15 < first_s < 1.5 and rest_s < 0.1
    assert _counter(registry, "imagen_rate_limit_redis_errors_total") == 1


def _down(limiter: RedisTokenBucketLimiter) -> bool:
    return limiter.redis_down


async def test_redis_going_away_and_coming_back(tmp_path: Path, prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.http.ratelimit")
    server = RedisServer(tmp_path / "redis")
    server.start()
    clock = Clock()
    try:
        async with _replicas(server.url, 2, 1, 3, key_prefix=prefix, clock=clock) as (first, second):
            assert [await first.take("k"), await second.take("k")] == [0.0, 0.0]  # shared: 1 token left
            server.stop()
            # Down: each replica decides with its own full bucket (the limit holds per replica meanwhile).
            assert [await first.take("k") for _ in range(4)][:3] == [0.0] * 3
            assert _down(first)
            server.start()
            assert await first.take("k") > 0  # still local until the retry interval is over
            clock.advance(REDIS_RETRY_AFTER_FAILURE_S + 0.1)
            assert await first.take("x") == 0.0  # Redis again (it restarted empty: no persistence)
            assert not _down(first)
            assert await second.take("x") == 0.0
            assert all(w > 50 for w in [await first.take("x"), await second.take("x"), await first.take("x")][1:])
    finally:
        server.stop()
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("Redis failed" in m for m in messages) and any("answers again" in m for m in messages)


def test_make_limiter_and_the_setting(tmp_path: Path) -> None:
    env = {"IMAGEN_REDIS_URL": "redis://10.0.0.9:6379/2", "IMAGEN_RATE_LIMIT_BURST": "4"}
    settings = Settings.from_env(env)
    assert settings.redis_url == "redis://10.0.0.9:6379/2"
    assert Settings.from_env({}).redis_url is None
    limiter = make_limiter(settings)  # nothing connects before the first request
    assert isinstance(limiter, RedisTokenBucketLimiter) and (limiter.per_minute, limiter.burst) == (120.0, 4)
    assert isinstance(make_limiter(Settings.from_env({})), TokenBucketLimiter)
    disabled = Settings.from_env({**env, "IMAGEN_RATE_LIMIT_PER_MINUTE": "0"})
    assert isinstance(make_limiter(disabled), TokenBucketLimiter) and not make_limiter(disabled).enabled


def test_the_middleware_keeps_a_passed_limiter_even_when_it_is_empty() -> None:
    limiter = TokenBucketLimiter(per_minute=1, burst=1)
    assert len(limiter) == 0  # falsy: `limiter or default` would drop it
    middleware = RateLimitMiddleware(Starlette(), 99, 99, api_key_or_address(frozenset()), limiter=limiter)
    assert middleware.limiter is limiter


# --- costs: the per-key work budget (UNet samples) ----------------------------------------------------------


def test_work_cost_is_images_times_effective_steps_doubled_with_guidance() -> None:
    from gateway.jobs.admission import work_cost

    assert work_cost(4, 150, 1.0, 7.5) == 1200  # the costliest request the schema allows
    assert work_cost(1, 30, 0.7, 7.5) == 2 * 21  # int(30 * 0.7) = 21 steps, guidance doubles the batch
    assert work_cost(2, 30, 0.5, 1.0) == 2 * 15  # guidance_scale 1 runs no unconditional branch
    assert work_cost(1, 10, 0.1, 0.0) == 1


def test_a_costly_take_waits_for_its_cost_and_pays_it_in_full() -> None:
    clock = Clock()
    limiter = TokenBucketLimiter(per_minute=60, burst=100, clock=clock)  # one token a second
    assert limiter.acquire("k", 20) == 0.0  # 80 left
    assert limiter.acquire("k", 100) == pytest.approx(20.0)  # needs 100: 20 s, nothing taken
    assert limiter.acquire("k", 2) == 0.0  # a cheap request still passes: 78 left
    clock.advance(22)
    assert limiter.acquire("k", 1200) == 0.0  # costlier than the burst: granted from a full bucket...
    assert limiter.acquire("k", 1) == pytest.approx(1101.0)  # ...and its whole cost is paid back first
    clock.advance(1101)
    assert limiter.acquire("k", 1) == 0.0


def test_a_bucket_in_debt_is_not_evicted_as_if_full() -> None:
    clock = Clock()
    limiter = TokenBucketLimiter(per_minute=60, burst=10, clock=clock)
    assert limiter.acquire("k", 100) == 0.0  # -90
    clock.advance(20)  # past refill_s (10 s), still 70 in debt
    assert limiter.acquire("other") == 0.0  # runs eviction
    assert limiter.acquire("k") == pytest.approx(71.0)


async def test_create_job_answers_429_with_a_retry_after_from_the_cost() -> None:
    from types import SimpleNamespace
    from typing import cast

    from gateway.jobs.admission import Admission
    from gateway.jobs.create import Caller, CreateJob
    from tests.unit.fakes import InMemoryJobStore

    class Jobs:
        async def check_admission(self) -> None:
            return None

    clock = Clock()
    limiter = TokenBucketLimiter(per_minute=60, burst=100, clock=clock)
    admission = Admission(
        pipelines=cast(
            Any,
            {
                "m": SimpleNamespace(
                    manifest=SimpleNamespace(inpainting=False), scheduler_config={"_class_name": "PNDMScheduler"}
                )
            },
        ),
        http=cast(Any, None),
        policy=cast(Any, None),
        fetch_timeout_s=1.0,
    )
    create = CreateJob(
        admission=admission,
        store=InMemoryJobStore(),
        jobs=cast(Any, Jobs()),
        storage=cast(Any, None),
        decoded=cast(Any, None),
        work_limiter=limiter,
    )
    costly = {"image": "aGVsbG8=", "prompt": "a cat", "model": "m", "num_images": 4, "steps": 150, "strength": 1.0}
    limiter.acquire("owner-a", 75)  # 25 left: the costly request needs a full bucket (its cost exceeds the burst)
    with pytest.raises(RateLimited) as refused:
        await create(costly, Caller(owner="owner-a"))
    assert status_and_code(refused.value) == (429, "rate_limited")
    assert refused.value.headers["Retry-After"] == "75"  # 75 tokens short at one a second
    assert "1200 UNet samples" in (refused.value.details or "")
    assert limiter.acquire("owner-b", 100) == 0.0  # another key's budget is its own


async def test_the_shared_bucket_charges_costs_like_the_local_one(redis_server: RedisServer, prefix: str) -> None:
    async with _replicas(redis_server.url, 2, per_minute=60, burst=100, key_prefix=prefix) as (first, second):
        assert await first.take("k", 20) == 0.0
        wait = await second.take("k", 100)
        assert 19.0 < wait <= 20.0
        assert await second.take("k", 2) == 0.0
        assert await first.take("j", 1200) == 0.0  # from a full bucket, then in debt
        assert 1100.0 < await second.take("j", 1) <= 1101.0
