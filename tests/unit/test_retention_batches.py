"""Issue 22, point 9: retention and the orphan sweep never hold every expired row or every job at once."""

from __future__ import annotations

import asyncio
import functools
from typing import Any, cast

import pytest

from gateway.jobs import maintenance, retention
from gateway.jobs.model import FAILED, Job
from gateway.jobs.runner import JobManager
from gateway.jobs.store import transition
from tests.unit.fakes import InMemoryJobStore, MemoryStorage, make_job
from tests.unit.test_job_runner import small_settings


async def test_expired_jobs_are_purged_a_batch_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    store, storage = InMemoryJobStore(), MemoryStorage()
    for i in range(5):
        job = await store.create(make_job(f"j{i}"))
        await transition(store, job, functools.partial(Job.ended, status=FAILED))
        await storage.put(job.input.name, b"x", "image/png")
    await asyncio.sleep(0.002)
    batches: list[int] = []
    expired = store.expired

    async def counted(before: str, limit: int) -> list[Job]:
        found = await expired(before, limit)
        batches.append(len(found))
        return found

    monkeypatch.setattr(store, "expired", counted)
    monkeypatch.setattr(maintenance, "RETENTION_BATCH", 2)
    manager = JobManager(
        store,
        cast(Any, None),
        cast(Any, storage),
        small_settings(retention_s=0.0),
        poster=cast(Any, None),
        render=cast(Any, None),
    )
    assert await manager.purge_expired() == 5
    assert batches == [2, 2, 1] and storage.objects == {} and await store.get("j0") is None


async def test_the_sweep_remembers_a_bounded_number_of_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    """With room for 2 jobs, the first job is forgotten by the time its second object comes: looked up again."""
    store, storage = InMemoryJobStore(), MemoryStorage()
    for name in ("img_a_0.png", "img_b_0.png", "img_c_0.png", "img_a_1.png"):
        await storage.put(name, b"x", "image/png")
    lookups: list[str] = []
    get = store.get

    async def counted(job_id: str) -> Job | None:
        lookups.append(job_id)
        return await get(job_id)

    monkeypatch.setattr(store, "get", counted)
    monkeypatch.setattr(retention, "SWEEP_JOBS_KEPT", 2)
    result = await retention.sweep_storage(cast(Any, store), cast(Any, storage), older_than=float("inf"))
    assert result.orphans == 4 and storage.objects == {}
    assert lookups == ["img_a", "img_b", "img_c", "img_a"]
