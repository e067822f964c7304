"""Issue 22, point 9: one key cannot hold every connection slot with event streams (a per-key cap per process)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from gateway.jobs.model import owner_of
from gateway.settings import Settings
from tests.unit.fakes import make_job, routes_app

KEY, OTHER = "k" * 40, "o" * 40


class OneJob:
    async def get(self, job_id: str, owner: str) -> Any:
        return make_job(job_id, owner=owner)


async def test_past_the_cap_a_keys_stream_is_429_and_another_key_is_not_held_back(tmp_path: Path) -> None:
    settings = Settings(
        storage_dir=tmp_path,
        jobs_db=tmp_path / "j.sqlite3",
        api_keys=frozenset({KEY, OTHER}),
        max_event_streams_per_key=2,
    )
    handlers, app = routes_app(settings, jobs=OneJob())
    handlers._streams[owner_of(KEY)] = 2  # two streams of this key open in this process
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        refused = await http.get("/v1/image-to-image/img_a/events", headers={"Authorization": f"Bearer {KEY}"})
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited"
    assert refused.headers["Retry-After"] == "15"
    handlers._check_streams(owner_of(OTHER))  # another key's streams are its own
