"""Per-key token bucket on job creation (`POST /v1/image-to-image`): 429 `rate_limited` with `Retry-After`.

A pure-ASGI middleware that answers before the body is read, so a client over its limit costs no parsing,
no decoding and no Triton time. Buckets are keyed by API key, or by client address for anonymous callers
(and for unknown keys, which are refused with 401 after this check anyway). Memory stays bounded: a bucket
idle long enough to have refilled is indistinguishable from a new one and is dropped, and a hard cap on the
number of buckets evicts the least recently used.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import RateLimited
from gateway.http.auth import check_bearer
from gateway.http.responses import error_response

LIMITED_PATH = "/v1/image-to-image"
LIMITED_METHOD = "POST"
DEFAULT_MAX_BUCKETS = 100_000

KeyFn = Callable[[Scope], str]


@dataclass
class _Bucket:
    tokens: float
    updated: float


class TokenBucketLimiter:
    """Token buckets per key: `burst` tokens at most, refilled at `per_minute` tokens a minute.

    `clock` is injectable (monotonic seconds) so tests can step time. Not thread-safe: used from one event loop.
    """

    def __init__(
        self,
        per_minute: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_buckets: int = DEFAULT_MAX_BUCKETS,
    ) -> None:
        if max_buckets < 1:
            raise ValueError("max_buckets must be at least 1")
        self.per_minute = float(per_minute)
        self.burst = int(burst)
        self.clock = clock
        self.max_buckets = max_buckets
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()  # least recently touched first

    @property
    def enabled(self) -> bool:
        """A zero (or negative) rate or burst disables limiting, as the settings document."""
        return self.per_minute > 0 and self.burst > 0

    @property
    def rate_per_s(self) -> float:
        return self.per_minute / 60.0

    @property
    def refill_s(self) -> float:
        """Time for an empty bucket to fill up: after that idle time a bucket equals a fresh one."""
        return self.burst / self.rate_per_s

    def __len__(self) -> int:
        return len(self._buckets)

    def acquire(self, key: str) -> float:
        """Take one token for `key`: 0.0 when granted, else the seconds until one token is available."""
        if not self.enabled:
            return 0.0
        now = self.clock()
        self._evict_idle(now)
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = _Bucket(tokens=float(self.burst), updated=now)
        else:
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(float(self.burst), bucket.tokens + elapsed * self.rate_per_s)
            bucket.updated = now
        self._buckets[key] = bucket  # most recently touched last
        while len(self._buckets) > self.max_buckets:
            self._buckets.popitem(last=False)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate_per_s

    def _evict_idle(self, now: float) -> None:
        refill_s = self.refill_s
        while self._buckets:
            oldest = next(iter(self._buckets.values()))
            if now - oldest.updated < refill_s:
                break
            self._buckets.popitem(last=False)


def retry_after_s(wait_s: float) -> int:
    """`Retry-After` in whole seconds, rounded up so a client that waits exactly that long gets a token."""
    return max(1, math.ceil(wait_s - 1e-9))


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            decoded: str = value.decode("latin-1")  # ASGI scope values are Any; header values are bytes
            return decoded
    return None


def client_address(scope: Scope) -> str:
    """The peer address uvicorn reports (behind a proxy, configure uvicorn's `--forwarded-allow-ips`)."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def api_key_or_address(api_keys: frozenset[str]) -> KeyFn:
    """Key function: the caller's API key when it is a known one, else its client address.

    Unknown tokens fall back to the address, so rotating made-up tokens does not mint fresh buckets. Keys are
    hashed so the limiter holds no secrets.
    """

    def key_fn(scope: Scope) -> str:
        key = check_bearer(_header(scope, b"authorization"), api_keys, allow_anonymous=True)
        if key is not None:
            return "key:" + hashlib.sha256(key.encode()).hexdigest()[:32]
        return "addr:" + client_address(scope)

    return key_fn


class RateLimitMiddleware:
    """Applies a `TokenBucketLimiter` to `POST /v1/image-to-image` only; every other request passes untouched."""

    def __init__(
        self,
        app: ASGIApp,
        per_minute: float,
        burst: int,
        key_fn: KeyFn,
        *,
        limiter: TokenBucketLimiter | None = None,
    ) -> None:
        self.app = app
        self.key_fn = key_fn
        self.limiter = limiter or TokenBucketLimiter(per_minute, burst)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope.get("method") == LIMITED_METHOD
            and scope.get("path") == LIMITED_PATH
            and self.limiter.enabled
        ):
            wait_s = self.limiter.acquire(self.key_fn(scope))
            if wait_s > 0:
                seconds = retry_after_s(wait_s)
                limiter = self.limiter
                response = error_response(
                    RateLimited(
                        "Rate limit exceeded",
                        f"At most {limiter.per_minute:g} job creations per minute per API key "
                        f"(bursts of {limiter.burst}); retry in {seconds} s",
                        headers={"Retry-After": str(seconds)},
                    )
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
