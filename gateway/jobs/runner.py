"""The job runner: a bounded queue, a pool of workers, cancellation, progress, webhooks, recovery, retention.

Workers run jobs concurrently (`max_running_jobs`): their UNet steps reach Triton together and are batched.
Every state change is a compare-and-set in the store (`store.transition`), so a cancel racing a completion or
a pickup has one winner, and the loser answers with the winner's state. A worker never dies: store errors
are retried with backoff, any other failure ends its job `failed` with a code from the error table, and the
loop goes on. Progress lives in memory (no store write per step); the store is written a few times per job.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

from gateway.diffusion.img2img import GenerationCanceled
from gateway.errors import (
    ApiError,
    BackendUnavailable,
    Interrupted,
    JobFinished,
    NotFound,
    Overloaded,
    RunAttemptsExhausted,
    StoreUnavailable,
    status_and_code,
)
from gateway.jobs import webhooks
from gateway.jobs.model import (
    CANCELED,
    COMPLETED,
    FAILED,
    PROCESSING,
    QUEUED,
    DeliveryAttempt,
    Job,
    JobError,
    JobStatus,
    OutputImage,
    WebhookStatus,
    now_iso,
)
from gateway.jobs.store import JobStore, StaleJob, Transition, transition
from gateway.media.storage import Storage
from gateway.observability import request_context
from gateway.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

EventHook = Callable[[str, Any], None]  # (event, value) -> None, for metrics
STORE_RETRY_FIRST_S = 0.05
LISTENER_QUEUE_SIZE = 256
BACKEND_RETRY_MAX_S = 30.0
RETENTION_MAX_INTERVAL_S = 60.0


@dataclass(frozen=True)
class Progress:
    step: int
    total_steps: int
    queue_position: int | None


@dataclass(frozen=True)
class JobUpdate:
    """What an event-stream listener receives: the job and its live progress at that moment."""

    job: Job
    progress: Progress


class Executor(Protocol):
    def __call__(
        self, job: Job, *, on_step: Callable[[int, int], None], should_stop: Callable[[], bool]
    ) -> Awaitable[tuple[OutputImage, ...]]: ...


# Renders the webhook body of a finished job (the HTTP layer's job view; injected so jobs never import http).
Renderer = Callable[[Job, Progress], bytes]


@dataclass
class _Running:
    step: int = 0
    cancel: bool = False  # asked to stop (a cancel here, or seen on the lease renewal)
    lost: bool = False  # the lease went to someone else: stop, and write nothing


def _job_error(exc: ApiError) -> JobError:
    _, code = status_and_code(exc)
    return JobError(code=code, message=exc.message, details=exc.details)


_INTERNAL = JobError(code="internal_error", message="Internal server error", details=None)


class JobManager:
    def __init__(
        self,
        store: JobStore,
        execute: Executor,
        storage: Storage,
        settings: Settings,
        *,
        poster: webhooks.Poster,
        webhook_secret: str,
        render: Renderer,
        on_event: EventHook | None = None,
        worker_id: str | None = None,
    ) -> None:
        self.store = store
        self.execute = execute
        self.storage = storage
        self.settings = settings
        self.poster = poster
        self.webhook_secret = webhook_secret
        self.render = render
        self.on_event: EventHook = on_event or (lambda event, value: None)
        self.worker_id = worker_id or f"gw-{uuid.uuid4().hex[:12]}"
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._queued: dict[str, None] = {}  # insertion-ordered: queue positions
        self._running: dict[str, _Running] = {}
        self._done: dict[str, asyncio.Event] = {}
        self._delivering: set[str] = set()
        self._listeners: dict[str, set[asyncio.Queue[JobUpdate]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Recover what the last process left, then start the workers.

        SQLite serves one process, so every unfinished job found at start is an orphan of a process that died:
        a cancel it was asked for is honoured, a synchronous one (its caller is gone) fails `interrupted`, one
        that already crashed `max_run_attempts` runs fails `run_attempts_exhausted`, the rest run again.
        """
        for job in await self._retrying("recovery", "-", self.store.unfinished):
            await self._recover(job)
        for job in await self._retrying("recovery", "-", self.store.undelivered):
            self._start_delivery(job)
        for _ in range(self.settings.max_running_jobs):
            self._spawn(self._worker())
        self._spawn(self._retention_loop())

    async def _recover(self, job: Job) -> None:
        change: Transition
        if job.cancel_requested:
            change = functools.partial(Job.ended, status=CANCELED)
        elif not job.spec.asynchronous:
            interrupted = _job_error(
                Interrupted(
                    "The gateway restarted while this synchronous request ran",
                    "Retry the request; use webhook_url for work that must survive restarts",
                )
            )
            change = functools.partial(Job.ended, status=FAILED, error=interrupted)
        elif job.status == PROCESSING and job.run_attempts >= self.settings.max_run_attempts:
            exhausted = _job_error(
                RunAttemptsExhausted(
                    "The job failed repeatedly",
                    f"The gateway stopped {job.run_attempts} times while running this job; it is not retried",
                )
            )
            change = functools.partial(Job.ended, status=FAILED, error=exhausted)
        else:
            change = Job.requeued
        stored, applied = await self._retrying("recovery", job.id, lambda: transition(self.store, job, change))
        if not applied:
            return
        if stored.finished:
            log.info("recovery: job %s ends %s", stored.id, stored.status)
            self._after_final(stored)
        else:
            log.info("recovery: job %s queued again (run %d so far)", stored.id, stored.run_attempts)
            self._enqueue(stored.id)

    async def stop(self) -> None:
        """Stop workers; jobs they held stay `processing` in the store and are re-run on the next start."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _retrying(self, what: str, job_id: str, op: Callable[[], Awaitable[T]]) -> T:
        """Run a store operation until the store answers: backoff doubles up to `store_retry_max_s`."""
        delay = STORE_RETRY_FIRST_S
        while True:
            try:
                return await op()
            except StoreUnavailable as exc:
                log.warning(
                    "job %s: %s: store unavailable (%s); retrying in %.2f s", job_id, what, exc.__cause__, delay
                )
                self.on_event("store_retry", what)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.store_retry_max_s)

    # --- submission and queries --------------------------------------------------------------------------

    def check_admission(self) -> None:
        """503 with Retry-After instead of unbounded latency once the queue is full."""
        if len(self._queued) >= self.settings.max_queued_jobs:
            retry = max(1, math.ceil(len(self._queued) / max(1, self.settings.max_running_jobs)))
            raise Overloaded(
                "Too many requests in progress",
                f"{len(self._queued)} jobs are queued; retry in about {retry} s",
                headers={"Retry-After": str(retry)},
            )

    def enqueue_new(self, job: Job) -> None:
        """Queue a job the store just created."""
        self._enqueue(job.id)
        self.on_event("job_created", job.status)

    def _enqueue(self, job_id: str) -> None:
        self._queued[job_id] = None
        self._queue.put_nowait(job_id)
        self._gauges()

    def _gauges(self) -> None:
        self.on_event("queue_depth", (len(self._queued), len(self._running)))

    async def get(self, job_id: str, owner: str) -> Job:
        job = await self.store.get(job_id)
        if job is None or job.owner != owner:  # another key's job does not exist for this caller
            raise NotFound("Job not found", f"No job '{job_id}' for this API key")
        return job

    def progress(self, job: Job) -> Progress:
        total = job.spec.effective_steps
        running = self._running.get(job.id)
        if running is not None and job.status == PROCESSING:
            return Progress(min(running.step, total), total, None)
        if job.status == QUEUED:
            position = list(self._queued).index(job.id) + 1 if job.id in self._queued else None
            return Progress(0, total, position)
        return Progress(total if job.status == COMPLETED else job.steps_done, total, None)

    async def wait(self, job_id: str) -> Job:
        """The job once final (a synchronous request waits here)."""
        job = await self._existing(job_id)
        while not job.finished:
            event = self._done.setdefault(job_id, asyncio.Event())
            job = await self._existing(job_id)  # a final state written before the event existed is seen here
            if not job.finished:
                await event.wait()
                job = await self._existing(job_id)
        self._release_waiters(job_id)
        return job

    async def _existing(self, job_id: str) -> Job:
        job = await self.store.get(job_id)
        if job is None:
            raise NotFound("Job not found", f"No job '{job_id}'")
        return job

    def _release_waiters(self, job_id: str) -> None:
        """Wake everyone waiting for this job and forget it: no per-job state outlives a final state."""
        event = self._done.pop(job_id, None)
        if event is not None:
            event.set()

    async def cancel(self, job_id: str, owner: str) -> Job:
        """Cancel: a queued job ends `canceled` now; a running one stops before its next Triton call and the
        answer is its final state (`completed` when it finished first). Exactly one of cancel and the worker
        wins, so the answer always equals what the job ends as."""
        job = await self.get(job_id, owner)
        if job.finished:
            raise JobFinished("Job already finished", f"Job '{job_id}' is {job.status}")
        stored, applied = await transition(self.store, job, Job.cancel_requested_now)
        if stored.finished:
            if not applied:  # it finished between our read and our write
                raise JobFinished("Job already finished", f"Job '{job_id}' is {stored.status}")
            self._queued.pop(job_id, None)
            self._after_final(stored)
            return stored
        running = self._running.get(job_id)
        if running is not None:
            running.cancel = True  # the worker stops before its next Triton call
        return await self.wait(job_id)

    def subscribe(self, job_id: str) -> asyncio.Queue[JobUpdate]:
        queue: asyncio.Queue[JobUpdate] = asyncio.Queue(maxsize=LISTENER_QUEUE_SIZE)
        self._listeners.setdefault(job_id, set()).add(queue)
        return queue

    def unsubscribe(self, job_id: str, queue: asyncio.Queue[JobUpdate]) -> None:
        listeners = self._listeners.get(job_id)
        if listeners is not None:
            listeners.discard(queue)
            if not listeners:
                del self._listeners[job_id]

    def _notify(self, job: Job) -> None:
        listeners = self._listeners.get(job.id)
        if not listeners:
            return
        update = JobUpdate(job, self.progress(job))
        for queue in listeners:
            with contextlib.suppress(asyncio.QueueFull):  # a slow SSE reader misses intermediate steps
                queue.put_nowait(update)

    # --- running -----------------------------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            job_id = await self._queue.get()
            try:
                await self._process(job_id)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must cost one job at most, never the worker
                log.exception("worker %s: unexpected error on job %s", self.worker_id, job_id)

    def _lease_until(self) -> float:
        return time.time() + self.settings.job_lease_s

    async def _process(self, job_id: str) -> None:
        if job_id not in self._queued:
            return  # canceled while queued, or already taken
        del self._queued[job_id]
        running = self._running[job_id] = _Running()  # before the claim: a cancel that sees it running finds it
        try:
            job = await self._retrying(
                "claim", job_id, lambda: self.store.claim(job_id, self.worker_id, self._lease_until())
            )
            if job is None:
                return  # canceled meanwhile
            with request_context(job.request_id):  # every log line of this run names the creating request
                await self._run(job, running)
        finally:
            self._running.pop(job_id, None)
            self._gauges()

    async def _run(self, job: Job, running: _Running) -> None:
        log.info("job %s: running (attempt %d, request %s)", job.id, job.run_attempts, job.request_id)
        running.cancel = running.cancel or job.cancel_requested  # a cancel may have landed while the claim returned
        self._notify(job)
        self._gauges()
        renewer = asyncio.create_task(self._keep_lease(job.id, running))

        def on_step(done: int, total: int) -> None:
            # Shown against effective_steps (what diffusers counts); PNDM makes one extra UNet call.
            running.step = done
            self._notify(job)

        status: JobStatus = COMPLETED
        images: tuple[OutputImage, ...] = ()
        error: JobError | None = None
        try:
            images = await self.execute(job, on_step=on_step, should_stop=lambda: running.cancel or running.lost)
        except GenerationCanceled:
            status = CANCELED
        except BackendUnavailable as exc:
            if job.spec.asynchronous and job.run_attempts <= self.settings.job_retries:
                await self._retry_later(job, running)
                return
            status, error = FAILED, _job_error(exc)
        except ApiError as exc:
            status, error = FAILED, _job_error(exc)
        except Exception:
            log.exception("job %s failed (request %s)", job.id, job.request_id)
            status, error = FAILED, _INTERNAL
        finally:
            renewer.cancel()
            try:
                await renewer
            except asyncio.CancelledError:
                pass
            except Exception:  # the renewer's own failure must not cost the job its result
                log.exception("job %s: lease renewal failed", job.id)
        if running.lost:
            log.warning("job %s: lease lost while running; its result is dropped", job.id)
            await self._delete(images)
            return
        await self._finish(job, status, images=images, error=error, steps_done=running.step)

    async def _keep_lease(self, job_id: str, running: _Running) -> None:
        """Renew the lease at a third of its length; learn of a cancel requested elsewhere on the way."""
        while True:
            await asyncio.sleep(self.settings.job_lease_s / 3)
            try:
                renewed = await self.store.renew(job_id, self.worker_id, self._lease_until())
            except StoreUnavailable:
                continue  # the lease is long enough to survive a missed renewal
            if renewed is None:
                try:
                    current = await self.store.get(job_id)
                except StoreUnavailable:
                    continue
                running.lost = current is None or current.lease is None or current.lease.owner != self.worker_id
                if running.lost:
                    return
            elif renewed.cancel_requested:
                running.cancel = True

    async def _retry_later(self, job: Job, running: _Running) -> None:
        delay = min(BACKEND_RETRY_MAX_S, 2.0**job.run_attempts)
        log.warning("job %s: backend unavailable, retry %d in %.0f s", job.id, job.run_attempts, delay)
        stored = await self._retrying("release", job.id, lambda: self.store.release(job.id, self.worker_id))
        if stored is None:
            return
        if stored.finished:  # canceled while it waited
            self._after_final(stored)
        else:
            self._spawn(self._requeue_later(job.id, delay))

    async def _requeue_later(self, job_id: str, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        self._enqueue(job_id)

    async def _finish(
        self,
        job: Job,
        status: JobStatus,
        *,
        images: tuple[OutputImage, ...],
        error: JobError | None,
        steps_done: int,
    ) -> None:
        """Write the final state (retried until the store answers); the worker's result wins over a cancel
        that arrives after the last step, and a job someone else finished keeps that state."""

        def change(current: Job) -> Job | None:
            return current.finished_by(self.worker_id, status, images=images, error=error, steps_done=steps_done)

        try:
            stored, applied = await self._retrying("finish", job.id, lambda: transition(self.store, job, change))
        except StaleJob:  # deleted under us (retention cannot, while it runs): nothing to record
            stored, applied = job, False
        if not applied:
            log.warning("job %s: finished elsewhere as %s; result dropped", job.id, stored.status)
            await self._delete(images)
            return
        self._after_final(stored)

    async def _delete(self, images: tuple[OutputImage, ...]) -> None:
        for image in images:
            with contextlib.suppress(Exception):
                await self.storage.delete(image.name)

    def _after_final(self, job: Job) -> None:
        """Effects of a final state, run once by whoever wrote it: metrics, listeners, waiters, webhook."""
        log.info("job %s: %s", job.id, job.status)
        self.on_event("job_finished", job.status)
        self._notify(job)
        self._release_waiters(job.id)
        self._start_delivery(job)

    # --- webhooks ----------------------------------------------------------------------------------------

    def _start_delivery(self, job: Job) -> None:
        """One delivery loop per job at a time: the id is marked when the loop is spawned, so recovery and a
        final state reached meanwhile cannot start a second one."""
        if job.webhook is None or job.webhook.status != WebhookStatus.PENDING or job.id in self._delivering:
            return
        self._delivering.add(job.id)
        self._spawn(self._deliver(job))

    async def _deliver(self, job: Job) -> None:
        """Deliver a finished job's webhook, retrying with backoff."""
        try:
            await self._deliver_attempts(job)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("job %s: webhook delivery stopped", job.id)
        finally:
            self._delivering.discard(job.id)

    async def _deliver_attempts(self, job: Job) -> None:
        body = self.render(job, self.progress(job))
        secret = webhooks.key_secret(self.webhook_secret, job.owner)
        max_attempts = self.settings.webhook_max_attempts
        current = job
        while current.webhook is not None and current.webhook.status == WebhookStatus.PENDING:
            attempt = len(current.webhook.attempts)
            if attempt >= max_attempts:
                return
            if attempt > 0:
                await asyncio.sleep(webhooks.backoff_s(attempt, self.settings.webhook_backoff_s))
            try:
                code = await self.poster(current.webhook.url, body, webhooks.signed_headers(secret, job.id, body))
                result = DeliveryAttempt(now_iso(), code, None)
            except Exception as exc:  # any transport failure is one failed attempt
                result = DeliveryAttempt(now_iso(), None, f"{type(exc).__name__}: {exc}"[:300])
            current, applied = await self._record_delivery(current, result, max_attempts)
            if not applied:
                return
            settled = current.webhook is not None and current.webhook.status == WebhookStatus.FAILED
            outcome = "delivered" if result.ok else ("failed" if settled else "retry")
            self.on_event("webhook", outcome)

    async def _record_delivery(self, job: Job, attempt: DeliveryAttempt, max_attempts: int) -> tuple[Job, bool]:
        def change(current: Job) -> Job | None:
            return current.with_delivery(attempt, max_attempts)

        return await self._retrying("webhook", job.id, lambda: transition(self.store, job, change))

    # --- retention ---------------------------------------------------------------------------------------

    async def purge_expired(self) -> int:
        """Delete finished jobs older than the retention period, with their stored images."""
        cutoff = datetime.now(UTC) - timedelta(seconds=self.settings.retention_s)
        expired = await self.store.expired(cutoff.isoformat(timespec="milliseconds").replace("+00:00", "Z"))
        for job in expired:
            for name in job.stored_names:
                await self.storage.delete(name)
            await self.store.delete(job.id)
        return len(expired)

    async def _retention_loop(self) -> None:
        interval = max(1.0, min(RETENTION_MAX_INTERVAL_S, self.settings.retention_s / 10))
        while True:
            try:
                removed = await self.purge_expired()
                if removed:
                    log.info("retention: removed %d expired jobs and their images", removed)
            except Exception:
                log.exception("retention clean-up failed")
            await asyncio.sleep(interval)
