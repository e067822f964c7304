"""Per-key token bucket on job creation (`POST /v1/image-to-image`): 429 `rate_limited` with `Retry-After`.

A pure-ASGI middleware that answers before the body is read, so a client over its limit costs no parsing,
no decoding and no Triton time. Buckets are keyed by API key, or by client address for anonymous callers
(and for unknown keys, which are refused with 401 after this check anyway). Memory stays bounded: a bucket
idle long enough to have refilled is indistinguishable from a new one and is dropped, and a hard cap on the
number of buckets evicts the least recently used.

Two limiters behind one `Limiter` protocol, chosen by `make_limiter(settings)`:

- `TokenBucketLimiter`: buckets in this process's memory. Right for one gateway; with N replicas behind a
  load balancer a key could get N times its limit.
- `RedisTokenBucketLimiter` (when `IMAGEN_REDIS_URL` is set): the same token bucket, kept in Redis, so the
  limit holds in total across every replica using that Redis. It is GCRA (the generic cell rate algorithm,
  a token bucket stored as one number per key, its "theoretical arrival time"), run as one Lua script: one
  Redis round trip per limited request, atomic, timed by the Redis server's clock (replicas' clocks may
  disagree), one small key per caller that expires once its bucket would be full again. It decides exactly
  what the in-process bucket decides (burst, refill rate, the wait behind `Retry-After`).

  Why not the `limits` library: its strategies are fixed window, moving window and sliding-window counter,
  none of them a token bucket. The closest, a moving window of `burst` hits per `burst / rate` seconds, has
  the same burst and long-run rate but refills all at once: a client that spent its burst waits the whole
  window (10 s at 120/min, burst 20) where the bucket lets it go on at one request per 0.5 s. Its windows are
  whole seconds (burst 2 at 7/min would need 17.14 s), it times hits by each replica's own clock, and the
  wait for `Retry-After` takes a second round trip (`get_window_stats`) on every refusal. So: redis-py and
  twenty lines of Lua.

  If Redis does not answer (down, timeout, an error reply) the limiter FAILS OPEN TO THE LOCAL BUCKET: the
  request is decided by this replica's own `TokenBucketLimiter` with the same settings, a warning is logged
  once per outage, `imagen_rate_limit_redis_errors_total` counts the failures and
  `imagen_rate_limit_local_decisions_total` the requests decided locally. A rate limit guards capacity, not
  security (authentication is separate, and the admission limit on queued jobs still answers 503), so a
  Redis outage should not become an outage of job creation, as failing closed would make it; and falling back
  to the per-replica bucket rather than to no limit keeps a key within N times its limit meanwhile. After a
  failure Redis is not asked again for `retry_after_failure_s`, so an outage costs at most one timeout per
  replica per interval, not one per request. Connections come from a bounded `BlockingConnectionPool` with
  short timeouts; a command is retried only once, and only when its connection was closed (a pooled
  connection Redis dropped when it restarted), never after a timeout.

Costs. `take(key, cost)` takes `cost` tokens at once (1 for the request limit above). The same two limiters
also hold the per-key WORK budget (`make_work_limiter`: UNet samples per minute, `IMAGEN_WORK_PER_MINUTE` and
`IMAGEN_WORK_BURST`), which the job-creation use case charges after validation with the request's cost
(gateway/jobs/create.py, `work_cost`). A take is granted when the bucket holds `min(cost, burst)` tokens and
then charges the whole `cost`, so the bucket may go below zero: a request costlier than the burst is still
possible (from a full bucket) and its whole cost is paid back, at the refill rate, before the next grant. The
wait it answers is the time until `min(cost, burst)` tokens are there, so `Retry-After` grows with the cost.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import rate_limited
from gateway.http.auth import known_key
from gateway.http.responses import error_response
from gateway.settings import Settings

LIMITED_PATH = "/v1/image-to-image"
LIMITED_PATHS = frozenset({LIMITED_PATH, "/v1/images/edits"})  # the native creation and OpenAI's image edits
LIMITED_METHOD = "POST"
DEFAULT_MAX_BUCKETS = 100_000
# Redis: keys are `<prefix><key>`; connections at most this many per replica; every wait (a free pooled
# connection, connecting, the reply) at most `timeout_s`; after a failure, decide locally this long.
REDIS_KEY_PREFIX = "imagen:ratelimit:v1:"
REDIS_MAX_CONNECTIONS = 16
REDIS_TIMEOUT_S = 0.25
REDIS_RETRY_AFTER_FAILURE_S = 2.0

KeyFn = Callable[[Scope], str]
log = logging.getLogger(__name__)


WORK_KEY_PREFIX = "imagen:worklimit:v1:"
WEBHOOK_CONTROL_KEY_PREFIX = "imagen:webhookcontrol:v1:"


class Limiter(Protocol):
    """What the middleware needs: `take` `cost` tokens for a key, 0.0 when granted, else the seconds to wait
    (the job-creation use case's `WorkLimiter` is the same shape)."""

    per_minute: float
    burst: int

    @property
    def enabled(self) -> bool: ...

    async def take(self, key: str, cost: float = 1.0) -> float: ...

    async def aclose(self) -> None: ...


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

    def acquire(self, key: str, cost: float = 1.0) -> float:
        """Take `cost` tokens for `key`: 0.0 when granted (the bucket may go below zero: see the module
        docstring), else the seconds until `min(cost, burst)` tokens are available (nothing is taken)."""
        if not self.enabled or cost <= 0:
            return 0.0
        need = min(float(cost), float(self.burst))
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
        if bucket.tokens >= need - 1e-9:
            bucket.tokens -= float(cost)
            return 0.0
        return (need - bucket.tokens) / self.rate_per_s

    async def take(self, key: str, cost: float = 1.0) -> float:
        """`acquire`, as the `Limiter` protocol spells it."""
        return self.acquire(key, cost)

    async def aclose(self) -> None:
        """Nothing to release: the buckets are plain memory."""

    def _evict_idle(self, now: float) -> None:
        refill_s = self.refill_s
        while self._buckets:
            oldest = next(iter(self._buckets.values()))
            # A bucket in debt (below zero after a costly take) needs longer than `refill_s` to be full again.
            if now - oldest.updated < refill_s + max(0.0, -oldest.tokens) / self.rate_per_s:
                break
            self._buckets.popitem(last=False)


# GCRA: the bucket of KEYS[1] is its theoretical arrival time (TAT, integer microseconds of the Redis clock):
# the bucket holds `burst - (TAT - now) / interval` tokens. ARGV[1]: microseconds per token; ARGV[2]: burst;
# ARGV[3]: the cost (tokens charged); ARGV[4]: the tokens needed to grant, min(cost, burst). Returns 0 (granted,
# TAT advanced by `cost` intervals) or the microseconds until `need` tokens are there (refused, nothing written).
# Integer microseconds stay exact in Lua's doubles (2^53 us is 285 years). The key expires
# when the bucket would be full again, as a missing key means a full bucket.
_GCRA_SCRIPT = """
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local need = tonumber(ARGV[4])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tat = now
local stored = redis.call('GET', KEYS[1])
if stored then
  tat = math.max(tonumber(stored), now)
end
local wait = tat + need * interval - now - burst * interval
if wait > 0 then
  return wait
end
local new_tat = tat + cost * interval
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000))
return 0
"""


class RedisTokenBucketLimiter:
    """The token bucket of `TokenBucketLimiter`, shared by every replica through Redis (see the module docstring).

    One `EVAL` per `take`. When Redis fails, `take` answers from `fallback` (a local bucket of the same
    settings) for `retry_after_failure_s` (monotonic `clock`), counting and logging the failure.
    """

    def __init__(
        self,
        url: str,
        per_minute: float,
        burst: int,
        *,
        key_prefix: str = REDIS_KEY_PREFIX,
        max_connections: int = REDIS_MAX_CONNECTIONS,
        timeout_s: float = REDIS_TIMEOUT_S,
        retry_after_failure_s: float = REDIS_RETRY_AFTER_FAILURE_S,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
        metric_prefix: str = "imagen_rate_limit",
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.per_minute = float(per_minute)
        self.burst = int(burst)
        self.key_prefix = key_prefix
        self.retry_after_failure_s = retry_after_failure_s
        self.clock = clock
        self.fallback = TokenBucketLimiter(per_minute, burst, clock=clock)
        self._interval_us = max(1, round(60_000_000 / self.per_minute)) if self.enabled else 0
        # Connecting is lazy: nothing touches Redis (or an event loop) before the first `take`.
        self._pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,  # waiting for a free connection
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
            # One round trip. The one retry is for a closed connection (a pooled one that Redis dropped when it
            # restarted), on a fresh connection; a timeout is never retried: it is answered locally.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self._redis = Redis(connection_pool=self._pool)
        self._local_until: float | None = None  # set while Redis is considered down
        registry = registry if registry is not None else CollectorRegistry()
        self.redis_errors = Counter(
            f"{metric_prefix}_redis_errors",
            "Rate-limit decisions Redis failed to make (unreachable, timeout, error reply)",
            registry=registry,
        )
        self.local_decisions = Counter(
            f"{metric_prefix}_local_decisions",
            "Rate-limit decisions made by this replica's own bucket because Redis had failed",
            registry=registry,
        )

    @property
    def enabled(self) -> bool:
        return self.per_minute > 0 and self.burst > 0

    @property
    def redis_down(self) -> bool:
        """True while decisions are made locally after a Redis failure."""
        return self._local_until is not None and self.clock() < self._local_until

    async def take(self, key: str, cost: float = 1.0) -> float:
        if not self.enabled or cost <= 0:
            return 0.0
        if self.redis_down:
            return self._take_locally(key, cost)
        # Whole tokens in Redis (costs are counts of UNet samples or of requests): a fraction is rounded up.
        whole = max(1, math.ceil(cost - 1e-9))
        try:
            wait_us = await self._redis.eval(
                _GCRA_SCRIPT, 1, self.key_prefix + key, self._interval_us, self.burst, whole, min(whole, self.burst)
            )
        except (RedisError, OSError) as exc:
            self.redis_errors.inc()
            if self._local_until is None:
                log.warning(
                    "rate limiter: Redis failed (%s: %s); deciding with this replica's own buckets, "
                    "so the limit holds per replica until Redis answers again",
                    type(exc).__name__,
                    exc,
                )
            else:
                log.debug("rate limiter: Redis still failing (%s: %s)", type(exc).__name__, exc)
            self._local_until = self.clock() + self.retry_after_failure_s
            return self._take_locally(key, cost)
        if self._local_until is not None:
            log.warning("rate limiter: Redis answers again; the limit holds across replicas again")
            self._local_until = None
        return int(wait_us) / 1_000_000

    def _take_locally(self, key: str, cost: float = 1.0) -> float:
        self.local_decisions.inc()
        return self.fallback.acquire(key, cost)

    async def aclose(self) -> None:
        await self._redis.aclose()
        await self._pool.aclose()


def make_limiter(settings: Settings, *, registry: CollectorRegistry | None = None) -> Limiter:
    """The shared Redis bucket when `settings.redis_url` is set (and limiting is enabled), else the local one.

    `registry` receives the Redis limiter's two counters (pass the app's `Metrics.registry`).
    """
    per_minute, burst = settings.rate_limit_per_minute, settings.rate_limit_burst
    if settings.redis_url and per_minute > 0 and burst > 0:
        return RedisTokenBucketLimiter(settings.redis_url, per_minute, burst, registry=registry)
    return TokenBucketLimiter(per_minute, burst)


def _per_key_budget(
    settings: Settings,
    per_minute: float,
    burst: int,
    key_prefix: str,
    metric_prefix: str,
    registry: CollectorRegistry | None,
) -> Limiter:
    """A per-key budget beside the request limit: shared through Redis when `settings.redis_url` is set (its own
    key prefix and `<metric_prefix>_*` metrics), else local; 0 disables it."""
    if settings.redis_url and per_minute > 0 and burst > 0:
        return RedisTokenBucketLimiter(
            settings.redis_url, per_minute, burst, key_prefix=key_prefix, registry=registry, metric_prefix=metric_prefix
        )
    return TokenBucketLimiter(per_minute, burst)


def make_work_limiter(settings: Settings, *, registry: CollectorRegistry | None = None) -> Limiter:
    """The per-key work budget (UNet samples per minute, `IMAGEN_WORK_PER_MINUTE`/`IMAGEN_WORK_BURST`):
    injected into `CreateJob`, which charges each job's cost."""
    return _per_key_budget(
        settings, settings.work_per_minute, settings.work_burst, WORK_KEY_PREFIX, "imagen_work_limit", registry
    )


def make_webhook_control_limiter(settings: Settings, *, registry: CollectorRegistry | None = None) -> Limiter:
    """The per-key budget of webhook control calls (redeliver and rotate together,
    `IMAGEN_WEBHOOK_CONTROL_PER_MINUTE`/`_BURST`)."""
    return _per_key_budget(
        settings,
        settings.webhook_control_per_minute,
        settings.webhook_control_burst,
        WEBHOOK_CONTROL_KEY_PREFIX,
        "imagen_webhook_control_limit",
        registry,
    )


async def charge_webhook_control(limiter: Limiter, owner: str) -> None:
    """One webhook control call of `owner`, or 429 `rate_limited` with `Retry-After` when its budget is spent."""
    if not limiter.enabled:
        return
    wait_s = await limiter.take(owner)
    if wait_s > 0:
        raise rate_limited(
            "Webhook control limit exceeded",
            f"At most {limiter.per_minute:g} redeliveries and secret rotations a minute per API key (bursts of "
            f"{limiter.burst})",
            wait_s,
        )


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
        key = known_key(_header(scope, b"authorization"), api_keys)
        if key is not None:
            return "key:" + hashlib.sha256(key.encode()).hexdigest()[:32]
        return "addr:" + client_address(scope)

    return key_fn


class RateLimitMiddleware:
    """Applies a `Limiter` to `POST /v1/image-to-image` (and OpenAI's `POST /v1/images/edits`, the same job
    creation) only; every other request passes untouched.

    Without `limiter`, a local `TokenBucketLimiter(per_minute, burst)`; with one (`make_limiter(settings)`),
    that one, and `per_minute`/`burst` are ignored. The owner of a passed limiter closes it (`aclose`).
    """

    def __init__(
        self,
        app: ASGIApp,
        per_minute: float,
        burst: int,
        key_fn: KeyFn,
        *,
        limiter: Limiter | None = None,
    ) -> None:
        self.app = app
        self.key_fn = key_fn
        self.limiter: Limiter = limiter if limiter is not None else TokenBucketLimiter(per_minute, burst)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope.get("method") == LIMITED_METHOD
            and scope.get("path") in LIMITED_PATHS
            and self.limiter.enabled
        ):
            wait_s = await self.limiter.take(self.key_fn(scope))
            if wait_s > 0:
                limiter = self.limiter
                response = error_response(
                    rate_limited(
                        "Rate limit exceeded",
                        f"At most {limiter.per_minute:g} job creations per minute per API key "
                        f"(bursts of {limiter.burst})",
                        wait_s,
                    )
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
