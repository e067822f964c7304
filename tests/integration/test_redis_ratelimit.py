"""Two real gateway replicas (`python -m gateway` subprocesses) sharing one real Redis: one rate limit in total.

The requests are job creations with a `text/plain` body: the limiter counts them (it answers before the body is
read), and past it the gateway refuses them at once (415), so the test costs no decoding and no Triton time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.triton.server import TritonServer
from tests.fixtures_redis import RedisServer, running_redis
from tests.integration.conftest import API_KEY, Repository
from tests.integration.gateways import SubprocessGateway, subprocess_gateway

pytestmark = pytest.mark.integration

BURST = 5
HEADERS = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "text/plain"}


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


def _burst(replicas: list[SubprocessGateway], count: int) -> list[httpx.Response]:
    """`count` job creations, alternating between the replicas."""
    with httpx.Client(timeout=10) as http:
        return [
            http.post(f"{replicas[i % len(replicas)].url}/v1/image-to-image", content=b"x", headers=HEADERS)
            for i in range(count)
        ]


def _metric(replica: SubprocessGateway, name: str) -> float:
    for line in httpx.get(f"{replica.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics of {replica.url}:\n{replica.log_tail()}")


def test_two_replicas_share_one_limit_and_fall_back_to_their_own_without_redis(
    triton: TritonServer, repository: Repository, redis_server: RedisServer, tmp_path: Path
) -> None:
    env = {
        "IMAGEN_REDIS_URL": redis_server.url,
        "IMAGEN_API_KEYS": API_KEY,
        "IMAGEN_RATE_LIMIT_PER_MINUTE": "1",  # one token a minute: no refill during the test
        "IMAGEN_RATE_LIMIT_BURST": str(BURST),
    }
    with (
        subprocess_gateway(triton, repository, tmp_path / "a", **env) as first,
        subprocess_gateway(triton, repository, tmp_path / "b", **env) as second,
    ):
        responses = _burst([first, second], 4 * BURST)
        statuses = [r.status_code for r in responses]
        assert statuses[:BURST] == [415] * BURST, [(r.status_code, r.text) for r in responses]
        assert statuses[BURST:] == [429] * (3 * BURST)  # the burst in total, not once per replica
        for refused in responses[BURST:]:
            assert 1 <= int(refused.headers["retry-after"]) <= 60
            assert refused.json()["error"]["code"] == "rate_limited"
        for replica in (first, second):
            assert _metric(replica, "imagen_rate_limit_redis_errors_total") == 0
            assert httpx.get(f"{replica.url}/v1/models", headers=HEADERS, timeout=10).status_code == 200

        # Redis gone: each replica fails open to its own bucket (a fresh one: BURST more each), and says so.
        redis_server.stop()
        try:
            statuses = [r.status_code for r in _burst([first, second], 2 * BURST + 4)]
        finally:
            redis_server.start()
        assert statuses.count(415) == 2 * BURST and statuses.count(429) == 4
        for replica in (first, second):
            assert _metric(replica, "imagen_rate_limit_redis_errors_total") >= 1
            assert _metric(replica, "imagen_rate_limit_local_decisions_total") == BURST + 2
            assert "rate limiter: Redis failed" in replica.log_tail(100_000)
