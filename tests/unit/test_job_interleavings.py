"""Many interleavings of pickup, run, completion and cancel, over a store that yields at every call."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import BackendUnavailable, JobFinished
from gateway.jobs import runner
from gateway.jobs.model import CANCELED, COMPLETED, FAILED, TERMINAL, Job, WebhookStatus
from gateway.jobs.runner import JobManager
from gateway.settings import Settings
from tests.unit.fakes import FakeExecutor, InMemoryJobStore, MemoryStorage, RecordingPoster, make_job, make_spec, render

DEADLINE_S = 2.0
LOOPS = 4  # the manager's own tasks: dispatch, webhook outbox, lease reclaim, retention


@dataclass(frozen=True)
class Plan:
    steps: int
    yields: tuple[int, ...]  # sleep(0)s inside each executor step
    pickup_after: int  # sleep(0)s before the job is announced (the dispatcher may find it first, polling)
    cancel_after: int  # sleep(0)s before the cancel is sent (from the start of the scenario)
    failure: str  # "none" | "backend" (async: released and re-queued once) | "bug"
    asynchronous: bool
    poster_yields: int


plans = st.integers(1, 4).flatmap(
    lambda steps: st.builds(
        Plan,
        steps=st.just(steps),
        yields=st.tuples(*[st.integers(0, 3)] * steps),
        pickup_after=st.integers(0, 6),
        cancel_after=st.integers(0, 60),
        failure=st.sampled_from(["none", "none", "backend", "bug"]),
        asynchronous=st.booleans(),
        poster_yields=st.integers(0, 3),
    )
)


async def _spin(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def scenario(plan: Plan) -> None:
    store = InMemoryJobStore(yields=True)
    storage = MemoryStorage()
    failure: list[BaseException | None] = {
        "none": [],
        "backend": [BackendUnavailable("down")],
        "bug": [RuntimeError("bug")],
    }[plan.failure]
    executor = FakeExecutor(
        storage, steps=plan.steps, fail_with=failure, yields_per_step=lambda job_id, step: plan.yields[step]
    )

    class Poster(RecordingPoster):
        async def __call__(self, url: str, body: bytes, headers: Any) -> int:
            await _spin(plan.poster_yields)
            return await super().__call__(url, body, headers)

    poster = Poster()
    manager = JobManager(
        store,
        executor,
        storage,
        Settings(
            max_running_jobs=1,
            job_lease_s=60.0,
            job_poll_interval_s=0.01,
            progress_publish_interval_s=0.0,
            store_retry_max_s=0.01,
            webhook_backoff_s=0.0,
            retention_s=1e9,
            job_retries=1,
        ),
        poster=poster,
        webhook_secret="s",
        render=render,
        worker_id="w",
    )
    await manager.start()
    try:
        job = await store.create(
            make_job("j", webhook="http://hook.test/j", spec=make_spec(asynchronous=plan.asynchronous))
        )

        async def pickup() -> None:
            await _spin(plan.pickup_after)
            await manager.enqueue_new(job)

        async def cancel() -> Job | JobFinished:
            await _spin(plan.cancel_after)
            try:
                return await manager.cancel(job.id, job.owner)
            except JobFinished as exc:
                return exc

        _, answer = await asyncio.wait_for(asyncio.gather(pickup(), cancel()), DEADLINE_S)
        final = await asyncio.wait_for(manager.wait(job.id), DEADLINE_S)

        def busy() -> bool:
            queued = any(not j.finished for j in store.all())
            return len(manager._tasks) > LOOPS or bool(manager.workers._running) or queued

        async def quiet() -> None:  # webhook delivered, re-queue timers fired: only the manager's loops left
            while busy():  # noqa: ASYNC110 (polls state)
                await asyncio.sleep(0.001)

        await asyncio.wait_for(quiet(), DEADLINE_S)
        final = store.peek(job.id)
        assert final is not None
        history = [w.job for w in store.writes if w.job.id == job.id]

        # Exactly one final state: one write enters it, and nothing is written over it but webhook records.
        entered = [i for i, j in enumerate(history) if j.finished and (i == 0 or not history[i - 1].finished)]
        assert len(entered) == 1, [(j.status, j.version) for j in history]
        assert all(j.status == final.status and j.images == final.images for j in history[entered[0] :])
        assert final.status in TERMINAL
        assert not (final.status == CANCELED and final.images), "canceled with images"
        if final.status != COMPLETED:
            assert final.images == () and set(storage.objects) == set(), storage.objects
        # Cancel's answer is what the job ended as.
        if isinstance(answer, JobFinished):
            assert final.status != CANCELED
        else:
            assert answer.status == final.status and answer.images == final.images
        # The webhook: one POST, carrying the final state.
        assert len(poster.calls) == 1, [c.payload for c in poster.calls]
        assert poster.calls[0].payload["status"] == final.status
        assert final.webhook is not None and final.webhook.status == WebhookStatus.DELIVERED
        # Nothing left behind; versions strictly increase, one per write.
        assert [j.id for j in store.all() if not j.finished] == []
        assert [j.version for j in history] == list(range(1, len(history) + 1))
        if final.status == FAILED:
            assert final.error is not None and final.error.code in {"internal_error", "backend_unavailable"}
    finally:
        await asyncio.wait_for(manager.stop(), DEADLINE_S)


@settings(
    max_examples=300,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(plan=plans)
def test_cancel_completion_and_pickup_interleavings(plan: Plan) -> None:
    with (
        mock.patch.object(runner, "BACKEND_RETRY_MAX_S", 0.001),
        mock.patch.object(runner, "STORE_RETRY_FIRST_S", 0.001),
    ):
        asyncio.run(scenario(plan))
