"""Token buckets with a stepped clock, and the middleware in front of the real `create_app` (no lifespan)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.app import create_app
from gateway.errors import ERROR_TABLE, RateLimited, status_and_code
from gateway.http.ratelimit import RateLimitMiddleware, TokenBucketLimiter, api_key_or_address, retry_after_s
from gateway.settings import Settings

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


def _limited_app(per_minute: float, burst: int, api_keys: frozenset[str]) -> Starlette:
    app = Starlette(
        routes=[
            Route("/v1/image-to-image", _ok, methods=["POST"]),
            Route("/v1/image-to-image/{job_id}", _ok, methods=["GET"]),
            Route("/v1/image-to-image/{job_id}/cancel", _ok, methods=["POST"]),
            Route("/v1/models", _ok, methods=["GET"]),
        ]
    )
    app.add_middleware(RateLimitMiddleware, per_minute=per_minute, burst=burst, key_fn=api_key_or_address(api_keys))
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
