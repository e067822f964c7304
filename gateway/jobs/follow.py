"""Following one job from a request: the synchronous wait (a caller that goes away cancels its job) and the
event stream's updates. They are the jobs layer's, not the handlers': the handlers only render what these give
(the HTTP layer's job view, server-sent events), and a client going away is a callable, not a framework object.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass

from gateway.errors import JobFinished
from gateway.jobs.model import Job
from gateway.jobs.runner import JobManager, JobUpdate, Progress

log = logging.getLogger("gateway")

# How often a synchronous wait asks whether its client is still there.
DISCONNECT_POLL_S = 0.25


async def wait_or_cancel(
    jobs: JobManager, job: Job, client_gone: Callable[[], Awaitable[bool]], *, poll_s: float = DISCONNECT_POLL_S
) -> Job:
    """The job once final; a client that goes away first cancels it (no more UNet steps are sent)."""
    waiter = asyncio.ensure_future(jobs.wait(job.id))
    try:
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=poll_s)
            if done:
                return waiter.result()
            if await client_gone():
                log.info("client gone: canceling job %s", job.id)
                with contextlib.suppress(JobFinished):
                    await jobs.cancel(job.id, job.owner)
                return await waiter
    finally:
        if not waiter.done():
            waiter.cancel()


@dataclass(frozen=True)
class Followed:
    """One step of `follow`: the job and its progress, or, with `heartbeat`, nothing new for `heartbeat_s`."""

    job: Job
    progress: Progress
    heartbeat: bool = False


async def follow(jobs: JobManager, job: Job, *, heartbeat_s: float) -> AsyncGenerator[Followed]:
    """The job on every change (progress steps, status), from its current state until it is final; between
    changes, a `heartbeat` every `heartbeat_s`. The subscription ends with the iteration."""
    queue = jobs.subscribe(job.id)
    try:
        current = await jobs.get(job.id, job.owner)
        progress = await jobs.progress(current)
        while True:
            yield Followed(current, progress)
            if current.finished:
                return
            try:
                update = await asyncio.wait_for(queue.get(), timeout=heartbeat_s)
            except TimeoutError:
                yield Followed(current, progress, heartbeat=True)
                update = JobUpdate(None, None)
            if update.job is not None:
                current = update.job
            elif update.progress is None:  # changed elsewhere (another replica): read it again
                current = await jobs.get(job.id, job.owner)
            progress = update.progress if update.progress is not None else await jobs.progress(current)
    finally:
        jobs.unsubscribe(job.id, queue)
