"""Issue 21: following a job is the jobs layer's (gateway.jobs.follow), the handlers only render it."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.jobs.follow import follow, wait_or_cancel
from gateway.jobs.model import CANCELED, COMPLETED, Job
from gateway.jobs.runner import JobUpdate, Progress
from tests.unit.fakes import make_job


class _Jobs:
    """The four JobManager calls `follow` and `wait_or_cancel` make, scripted."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.queue: asyncio.Queue[JobUpdate] = asyncio.Queue()
        self.subscribed = 0
        self.canceled: list[str] = []
        self.final = asyncio.get_running_loop().create_future()

    def subscribe(self, job_id: str) -> asyncio.Queue[JobUpdate]:
        self.subscribed += 1
        return self.queue

    def unsubscribe(self, job_id: str, queue: Any) -> None:
        self.subscribed -= 1

    async def get(self, job_id: str, owner: str) -> Job:
        return self.job

    async def progress(self, job: Job) -> Progress:
        return Progress(0, 4, 1)

    async def wait(self, job_id: str) -> Job:
        return await self.final

    async def cancel(self, job_id: str, owner: str) -> Job:
        self.canceled.append(job_id)
        self.final.set_result(self.job.ended(CANCELED))
        return self.job


async def test_follow_yields_each_change_a_heartbeat_between_and_ends_unsubscribed_when_final() -> None:
    job = make_job("img_f")
    jobs = _Jobs(job)
    seen = []
    async for update in follow(jobs, job, heartbeat_s=0.05):  # type: ignore[arg-type]
        seen.append((update.job.status, update.progress.step, update.heartbeat))
        if len(seen) == 2:  # the heartbeat: now a step moves, then the job completes
            jobs.queue.put_nowait(JobUpdate(None, Progress(2, 4, None)))
            jobs.queue.put_nowait(JobUpdate(job.ended(COMPLETED), Progress(4, 4, None)))
    assert seen == [
        ("queued", 0, False),
        ("queued", 0, True),
        ("queued", 0, False),  # after a heartbeat the job is read again (it may have changed on another replica)
        ("queued", 2, False),
        ("completed", 4, False),
    ]
    assert jobs.subscribed == 0


async def test_a_caller_that_goes_away_cancels_its_job_and_one_that_stays_gets_the_result() -> None:
    job = make_job("img_w")
    gone = _Jobs(job)
    result = await wait_or_cancel(gone, job, client_gone=_answer(True), poll_s=0.01)  # type: ignore[arg-type]
    assert gone.canceled == ["img_w"] and result.status == CANCELED

    stays = _Jobs(job)
    stays.final.set_result(job.ended(COMPLETED))
    result = await wait_or_cancel(stays, job, client_gone=_answer(False), poll_s=0.01)  # type: ignore[arg-type]
    assert stays.canceled == [] and result.status == COMPLETED


def _answer(value: bool) -> Any:
    async def client_gone() -> bool:
        return value

    return client_gone
