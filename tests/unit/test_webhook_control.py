"""Issue 22, point 2: webhook redelivery and secret rotation are bounded per key (each redelivery makes the
gateway POST to a URL of the caller's choosing; 200 calls in 1.4 s were all accepted before).

The routes are the real ones (`routes.routes`, the app's error handlers); the seam is the job system behind them.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from starlette.applications import Starlette

from gateway.errors import RateLimited, status_and_code
from gateway.http.ratelimit import TokenBucketLimiter, charge_webhook_control
from gateway.jobs.webhooks import SigningSecrets
from gateway.settings import Settings
from tests.unit.fakes import routes_app

KEY = "k" * 40


class FakeJobs:
    """What the rotate handler calls: the secret keeper, counting rotations."""

    def __init__(self) -> None:
        self.rotations = 0
        self.secrets = SimpleNamespace(rotate=self._rotate)

    async def _rotate(self, owner: str) -> SigningSecrets:
        self.rotations += 1
        return SigningSecrets(owner, current=f"whsec_{self.rotations}")


def _app(tmp_path: Path, jobs: FakeJobs, per_minute: float, burst: int) -> Starlette:
    settings = Settings(storage_dir=tmp_path, jobs_db=tmp_path / "jobs.sqlite3", api_keys=frozenset({KEY}))
    _, app = routes_app(settings, jobs=jobs, webhook_control=TokenBucketLimiter(per_minute, burst))
    return app


async def test_rotations_past_the_burst_are_429_with_retry_after(tmp_path: Path) -> None:
    jobs = FakeJobs()
    app = _app(tmp_path, jobs, per_minute=10, burst=10)
    auth = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        answers = [await http.post("/v1/webhook-secret/rotate", headers=auth) for _ in range(50)]
    assert [a.status_code for a in answers[:10]] == [200] * 10
    assert {a.status_code for a in answers[10:]} == {429} and jobs.rotations == 10
    refused = answers[-1]
    assert refused.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(refused.headers["Retry-After"]) <= 6  # one call per 6 s at 10 a minute


async def test_the_budget_is_per_key_and_names_the_limit() -> None:
    limiter = TokenBucketLimiter(per_minute=10, burst=2)
    await charge_webhook_control(limiter, "a")
    await charge_webhook_control(limiter, "a")
    with pytest.raises(RateLimited) as refused:
        await charge_webhook_control(limiter, "a")
    assert status_and_code(refused.value) == (429, "rate_limited")
    assert "redeliveries and secret rotations" in (refused.value.details or "")
    await charge_webhook_control(limiter, "b")  # another key's budget is its own
    await charge_webhook_control(TokenBucketLimiter(per_minute=0, burst=0), "a")  # 0 disables
