"""The job runner: workers that take jobs from the store, cancellation, progress, webhooks, recovery, retention.

The store is the queue, so any number of replicas share the work: a dispatcher claims the oldest queued job
whenever one of this process's `max_running_jobs` slots is free (their UNet steps reach Triton together and
are batched). Replicas tell each other what happened through a best-effort event bus (`events.JobEvents`:
created, progress, cancel, final); missing an event only delays an action until a fallback poll.

Every state change is a compare-and-set in the store (`store.transition`), so a cancel racing a completion or
a pickup has one winner, and the loser answers with the winner's state. A worker never dies: store errors
are retried with backoff, any other failure ends its job `failed` with a code from the error table, and the
loop goes on. Progress lives in memory and on the bus (throttled); the store is written a few times per job.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
import uuid
from collections import OrderedDict
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
    NothingToRedeliver,
    Overloaded,
    RunAttemptsExhausted,
    StoreUnavailable,
    status_and_code,
)
from gateway.jobs import webhooks
from gateway.jobs.events import EventKind, JobEvent, JobEvents, LocalEvents
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
    WebhookEvent,
    WebhookStatus,
    now_iso,
)
from gateway.jobs.retention import StorageSweeper
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
RECLAIM_BATCH = 100  # expired leases taken over per pass
MAX_DELIVERIES = 16  # webhook POSTs in flight per process
PROGRESS_CACHE_SIZE = 10_000  # live progress of jobs running on other replicas, as heard on the bus


@dataclass(frozen=True)
class Progress:
    step: int
    total_steps: int
    queue_position: int | None


@dataclass(frozen=True)
class JobUpdate:
    """What an event-stream listener receives: the job and its live progress; `job` None with a progress: only the
    step moved (heard on the bus); both None: the job changed elsewhere, read it again."""

    job: Job | None
    progress: Progress | None


class Executor(Protocol):
    def __call__(
        self, job: Job, *, on_step: Callable[[int, int], None], should_stop: Callable[[], bool]
    ) -> Awaitable[tuple[OutputImage, ...]]: ...


# Renders the webhook body of a finished job (the HTTP layer's job view; injected so jobs never import http).
Renderer = Callable[[Job, Progress], bytes]


@dataclass
class _Running:
    step: int = 0
    cancel: bool = False  # asked to stop (a cancel here, on the bus, or seen on the lease renewal)
    lost: bool = False  # the lease went to someone else: stop, and write nothing
    published_at: float = 0.0  # when progress last went on the bus


def _job_error(exc: ApiError) -> JobError:
    _, code = status_and_code(exc)
    return JobError(code=code, message=exc.message, details=exc.details)


_INTERNAL = JobError(code="internal_error", message="Internal server error", details=None)


def _if_lease_expired(job: Job, *, change: Transition, now: float) -> Job | None:
    if job.status == PROCESSING and job.lease is not None and job.lease.expires_at >= now:
        return None  # renewed since it was read: its worker lives
    return change(job)


def final_progress(job: Job) -> Progress:
    total = job.spec.effective_steps
    return Progress(total if job.status == COMPLETED else job.steps_done, total, None)


class JobManager:
    def __init__(
        self,
        store: JobStore,
        execute: Executor,
        storage: Storage,
        settings: Settings,
        *,
        poster: webhooks.Poster,
        render: Renderer,
        webhook_secret: str | None = None,
        events: JobEvents | None = None,
        on_event: EventHook | None = None,
        worker_id: str | None = None,
    ) -> None:
        self.store = store
        self.execute = execute
        self.storage = storage
        self.settings = settings
        self.poster = poster
        # Per-key signing secrets in the store; a configured `webhook_secret` seeds their first values.
        self.secrets = webhooks.SecretKeeper(store, seed=webhook_secret, overlap_s=settings.webhook_secret_overlap_s)
        self.render = render
        self.events: JobEvents = events or LocalEvents()
        self.on_event: EventHook = on_event or (lambda event, value: None)
        self.worker_id = worker_id or f"gw-{uuid.uuid4().hex[:12]}"
        self._running: dict[str, _Running] = {}
        self._slots = asyncio.Semaphore(settings.max_running_jobs)
        self._work = asyncio.Event()  # set when a job may be waiting (created, released, a slot freed)
        self._outbox = asyncio.Event()  # set when a webhook may be due
        self._deliveries = asyncio.Semaphore(MAX_DELIVERIES)
        self._done: dict[str, asyncio.Event] = {}
        self._delivering: set[str] = set()
        self._listeners: dict[str, set[asyncio.Queue[JobUpdate]]] = {}
        self._remote: OrderedDict[str, tuple[int, int]] = OrderedDict()  # job id -> (step, total) from the bus
        self._recent_cancels: OrderedDict[str, bool] = OrderedDict()  # cancels heard for jobs not running here
        self._tasks: set[asyncio.Task[Any]] = set()
        self._queued_estimate = 0  # the store's queue length as of the last count (metrics)
        self._sweeper = StorageSweeper(  # objects no job owns, temp files: at start, then every sweep interval
            store, storage, grace_s=settings.storage_orphan_grace_s, interval_s=settings.storage_sweep_interval_s
        )

    # --- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen to the bus, recover what a dead process left, then start the loops.

        With an exclusive store (SQLite: one process, locked at open) every unfinished job found at start is an
        orphan: a cancel it was asked for is honoured, a synchronous one (its caller is gone) fails
        `interrupted`, one that already crashed `max_run_attempts` runs fails `run_attempts_exhausted`, the rest
        run again. With a shared store, a dead replica's jobs are found by their expired leases instead
        (`_reclaim_loop`), whoever looks first.
        """
        await self.events.start(self._on_bus_event)
        if self.store.exclusive:
            for job in await self._retrying("recovery", "-", self.store.unfinished):
                await self._recover(job, caller_gone=True)
        self._spawn(self._dispatch_loop())
        self._spawn(self._delivery_loop())
        self._spawn(self._reclaim_loop())
        self._spawn(self._retention_loop())

    async def _recover(self, job: Job, *, caller_gone: bool, expired_before: float | None = None) -> None:
        """Take over an orphaned job. A synchronous one is failed `interrupted` only when its caller is known
        gone (its process died with the store's only process); on a shared store its caller may still wait on
        another replica, so it runs again. With `expired_before`, only while its lease is still expired (its
        owner may have renewed it since it was read)."""
        change: Transition
        if job.cancel_requested:
            change = functools.partial(Job.ended, status=CANCELED)
        elif caller_gone and not job.spec.asynchronous:
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
                    f"Its worker stopped {job.run_attempts} times while running this job; it is not retried",
                )
            )
            change = functools.partial(Job.ended, status=FAILED, error=exhausted)
        else:
            change = Job.requeued
        if expired_before is not None:
            change = functools.partial(_if_lease_expired, change=change, now=expired_before)
        stored, applied = await self._retrying("recovery", job.id, lambda: transition(self.store, job, change))
        if not applied:
            return
        if stored.finished:
            log.info("recovery: job %s ends %s", stored.id, stored.status)
            await self._after_final(stored)
        else:
            log.info("recovery: job %s queued again (run %d so far)", stored.id, stored.run_attempts)
            await self._publish(JobEvent(stored.id, EventKind.CREATED))

    async def stop(self) -> None:
        """Stop the loops; jobs they held stay `processing` in the store and are taken over (at the next start
        with SQLite, when their lease expires with a shared store)."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.events.close()

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

    # --- the bus -----------------------------------------------------------------------------------------

    async def _publish(self, event: JobEvent) -> None:
        await self.events.publish(event)

    def _on_bus_event(self, event: JobEvent) -> None:
        """Events from every replica, this one included."""
        if event.kind == EventKind.CREATED:
            self._work.set()
        elif event.kind == EventKind.PROGRESS:
            if event.job_id in self._running:
                return  # ours: local listeners already heard every step
            self._remote[event.job_id] = (event.step, event.total)
            self._remote.move_to_end(event.job_id)
            while len(self._remote) > PROGRESS_CACHE_SIZE:
                self._remote.popitem(last=False)
            self._notify_progress(event.job_id, Progress(event.step, event.total, None))
        elif event.kind == EventKind.CANCEL:
            running = self._running.get(event.job_id)
            if running is not None:
                running.cancel = True  # the worker stops before its next Triton call
            else:  # perhaps claimed here a moment ago and not registered yet: remembered for a while
                self._recent_cancels[event.job_id] = True
                while len(self._recent_cancels) > PROGRESS_CACHE_SIZE:
                    self._recent_cancels.popitem(last=False)
        elif event.kind == EventKind.FINAL:
            self._remote.pop(event.job_id, None)
            self._release_waiters(event.job_id)
            self._notify_changed(event.job_id)
            self._outbox.set()

    # --- submission and queries --------------------------------------------------------------------------

    async def check_admission(self) -> None:
        """503 with Retry-After instead of unbounded latency once the fleet's queue is full."""
        queued = await self.store.count_queued()
        self._queued_estimate = queued
        if queued >= self.settings.max_queued_jobs:
            retry = max(1, math.ceil(queued / max(1, self.settings.max_running_jobs)))
            raise Overloaded(
                "Too many requests in progress",
                f"{queued} jobs are queued; retry in about {retry} s",
                headers={"Retry-After": str(retry)},
            )

    async def enqueue_new(self, job: Job) -> None:
        """Tell every replica's dispatcher that the store has a new job."""
        self.on_event("job_created", job.status)
        self._queued_estimate += 1
        self._gauges()
        await self._publish(JobEvent(job.id, EventKind.CREATED))

    def _gauges(self) -> None:
        self.on_event("queue_depth", (self._queued_estimate, len(self._running)))

    async def get(self, job_id: str, owner: str) -> Job:
        job = await self.store.get(job_id)
        if job is None or job.owner != owner:  # another key's job does not exist for this caller
            raise NotFound("Job not found", f"No job '{job_id}' for this API key")
        return job

    async def progress(self, job: Job) -> Progress:
        total = job.spec.effective_steps
        if job.status == PROCESSING:
            running = self._running.get(job.id)
            if running is not None:
                return Progress(min(running.step, total), total, None)
            step, _ = self._remote.get(job.id, (job.steps_done, total))
            return Progress(min(step, total), total, None)
        if job.status == QUEUED:
            return Progress(0, total, await self.store.queue_position(job))
        return final_progress(job)

    async def wait(self, job_id: str) -> Job:
        """The job once final (a synchronous request waits here): woken by the bus, re-read at least every
        `job_poll_interval_s` in case an event was missed."""
        job = await self._existing(job_id)
        while not job.finished:
            event = self._done.setdefault(job_id, asyncio.Event())
            job = await self._existing(job_id)  # a final state written before the event existed is seen here
            if not job.finished:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), self.settings.job_poll_interval_s)
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
        """Cancel: a queued job ends `canceled` now; a running one (on any replica) stops before its next Triton
        call and the answer is its final state (`completed` when it finished first). Exactly one of cancel and
        the worker wins, so the answer always equals what the job ends as."""
        job = await self.get(job_id, owner)
        if job.finished:
            raise JobFinished("Job already finished", f"Job '{job_id}' is {job.status}")
        stored, applied = await transition(self.store, job, Job.cancel_requested_now)
        if stored.finished:
            if not applied:  # it finished between our read and our write
                raise JobFinished("Job already finished", f"Job '{job_id}' is {stored.status}")
            await self._after_final(stored)
            return stored
        running = self._running.get(job_id)
        if running is not None:
            running.cancel = True  # runs here: the worker stops before its next Triton call
        else:
            await self._publish(JobEvent(job_id, EventKind.CANCEL))
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

    def _put(self, job_id: str, update: JobUpdate) -> None:
        for queue in self._listeners.get(job_id, ()):
            with contextlib.suppress(asyncio.QueueFull):  # a slow SSE reader misses intermediate steps
                queue.put_nowait(update)

    def _notify(self, job: Job, progress: Progress) -> None:
        if job.id in self._listeners:
            self._put(job.id, JobUpdate(job, progress))

    def _notify_progress(self, job_id: str, progress: Progress) -> None:
        if job_id in self._listeners:
            self._put(job_id, JobUpdate(None, progress))

    def _notify_changed(self, job_id: str) -> None:
        """The job changed elsewhere: listeners re-read it (a `JobUpdate` with neither job nor live step)."""
        if job_id in self._listeners:
            self._put(job_id, JobUpdate(None, None))

    # --- running -----------------------------------------------------------------------------------------

    def _lease_until(self) -> float:
        return time.time() + self.settings.job_lease_s

    async def _dispatch_loop(self) -> None:
        """Claim the oldest queued job whenever a slot is free; sleep until woken (or the poll interval) when the
        store has none. One claim query per wake-up per process, whatever the number of slots."""
        while True:
            await self._slots.acquire()
            try:
                self._work.clear()
                job = await self._retrying(
                    "claim", "-", lambda: self.store.claim_next(self.worker_id, self._lease_until(), time.time())
                )
            except BaseException:
                self._slots.release()
                raise
            if job is None:
                self._slots.release()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._work.wait(), self.settings.job_poll_interval_s)
                continue
            self._queued_estimate = max(0, self._queued_estimate - 1)
            # Registered at once: a cancel arriving from now on finds it running here.
            self._running[job.id] = _Running(cancel=job.cancel_requested or self._recent_cancels.pop(job.id, False))
            if job.webhook is not None and job.webhook.event == WebhookEvent.START:
                self._outbox.set()  # its `start` event is due
            self._spawn(self._process(job))
            self._work.set()  # there may be more: claim again while slots are free

    async def _process(self, job: Job) -> None:
        running = self._running[job.id]
        running.cancel = running.cancel or self._recent_cancels.pop(job.id, False)
        try:
            with request_context(job.request_id):  # every log line of this run names the creating request
                await self._run(job, running)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug must cost one job at most, never the worker
            log.exception("worker %s: unexpected error on job %s", self.worker_id, job.id)
        finally:
            self._running.pop(job.id, None)
            self._slots.release()
            self._gauges()

    async def _run(self, job: Job, running: _Running) -> None:
        log.info("job %s: running (attempt %d, request %s)", job.id, job.run_attempts, job.request_id)
        total = job.spec.effective_steps
        self._notify(job, Progress(0, total, None))
        self._gauges()
        renewer = asyncio.create_task(self._keep_lease(job.id, running))

        def on_step(done: int, _calls: int) -> None:
            # Shown against effective_steps (what diffusers counts); PNDM makes one extra UNet call.
            running.step = done
            progress = Progress(min(done, total), total, None)
            self._notify(job, progress)
            now = time.monotonic()
            if done >= total or now - running.published_at >= self.settings.progress_publish_interval_s:
                running.published_at = now  # other replicas hear at most a few steps per second of each job
                self._spawn(self._publish(JobEvent(job.id, EventKind.PROGRESS, progress.step, total)))

        status: JobStatus = COMPLETED
        images: tuple[OutputImage, ...] = ()
        error: JobError | None = None
        try:
            images = await self.execute(job, on_step=on_step, should_stop=lambda: running.cancel or running.lost)
        except GenerationCanceled:
            status = CANCELED
        except BackendUnavailable as exc:
            if job.spec.asynchronous and job.run_attempts <= self.settings.job_retries:
                await self._retry_later(job)
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
                if renewed is None:
                    current = await self.store.get(job_id)
                    running.lost = current is None or current.lease is None or current.lease.owner != self.worker_id
                    if running.lost:
                        return
                elif renewed.cancel_requested:
                    running.cancel = True
            except StoreUnavailable:
                continue  # the lease is long enough to survive a missed renewal

    async def _retry_later(self, job: Job) -> None:
        delay = min(BACKEND_RETRY_MAX_S, 2.0**job.run_attempts)
        log.warning("job %s: backend unavailable, retry %d in %.0f s", job.id, job.run_attempts, delay)
        stored = await self._retrying(
            "release", job.id, lambda: self.store.release(job.id, self.worker_id, time.time() + delay)
        )
        if stored is None:
            return
        if stored.finished:  # canceled while it ran
            await self._after_final(stored)
        else:
            self._spawn(self._wake_later(delay))

    async def _wake_later(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        self._work.set()

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
        await self._after_final(stored)

    async def _delete(self, images: tuple[OutputImage, ...]) -> None:
        for image in images:
            with contextlib.suppress(Exception):
                await self.storage.delete(image.name)

    async def _after_final(self, job: Job) -> None:
        """Effects of a final state, run once by whoever wrote it: metrics, local listeners and waiters, the
        bus (waiters and listeners on other replicas), the webhook outbox."""
        log.info("job %s: %s", job.id, job.status)
        self.on_event("job_finished", job.status)
        self._notify(job, final_progress(job))
        self._release_waiters(job.id)
        if job.webhook is not None:
            self._outbox.set()
        await self._publish(JobEvent(job.id, EventKind.FINAL))

    # --- recovery of a dead replica's jobs ---------------------------------------------------------------

    async def _reclaim_loop(self) -> None:
        """Take over jobs whose lease expired (their replica died), every half lease."""
        while True:
            await asyncio.sleep(self.settings.job_lease_s / 2)
            try:
                now = time.time()
                for job in await self.store.expired_leases(now, RECLAIM_BATCH):
                    if job.id in self._running:
                        continue  # ours and alive: its renewals failed for a while; the next one restores it
                    log.warning("job %s: lease of %s expired; taking it over", job.id, job.lease)
                    await self._recover(job, caller_gone=False, expired_before=now)
            except StoreUnavailable:
                continue
            except Exception:
                log.exception("reclaiming expired leases failed")

    # --- webhooks: an outbox in the store ----------------------------------------------------------------

    async def _delivery_loop(self) -> None:
        """Claim due webhook deliveries (one replica at a time per job, by lease) and send them; retries are
        due again at their backoff time, so they survive restarts and move between replicas."""
        while True:
            await self._deliveries.acquire()
            try:
                self._outbox.clear()
                now = time.time()
                until = now + self.settings.webhook_timeout_s * 2 + self.settings.job_poll_interval_s
                job = await self.store.claim_delivery(self.worker_id, until, now)
            except StoreUnavailable:
                job = None
            except BaseException:
                self._deliveries.release()
                raise
            if job is None:
                self._deliveries.release()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._outbox.wait(), self.settings.job_poll_interval_s)
                continue
            self._spawn(self._deliver(job))
            self._outbox.set()  # there may be more due

    async def _deliver(self, job: Job) -> None:
        """One delivery attempt, recorded (which releases the outbox lease)."""
        if job.id in self._delivering:  # the outbox lease makes this rare: an expired lease re-claimed by us
            self._deliveries.release()
            return
        self._delivering.add(job.id)
        try:
            await self._attempt_delivery(job)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("job %s: webhook delivery failed", job.id)
        finally:
            self._delivering.discard(job.id)
            self._deliveries.release()

    async def redeliver(self, job_id: str, owner: str) -> Job:
        """Send the job's final event again (same `webhook-id`, new timestamp and signature) through the outbox:
        it survives restarts and one replica sends it."""
        job = await self.get(job_id, owner)
        stored, applied = await transition(self.store, job, Job.redelivery_requested)
        if not applied:
            if not stored.finished:
                raise NothingToRedeliver("Job not finished", f"Job '{job_id}' is {stored.status}: no final event yet")
            raise NothingToRedeliver(
                "Nothing to redeliver",
                f"Job '{job_id}' has no webhook for its final event (see webhook_url and webhook_events)",
            )
        self._outbox.set()
        return stored

    async def _attempt_delivery(self, job: Job) -> None:
        hook = job.webhook
        if hook is None:
            return
        event = hook.event
        progress = final_progress(job) if job.finished else Progress(0, job.spec.effective_steps, None)
        body = self.render(job, progress)
        signing = await self._retrying("webhook secret", job.id, lambda: self.secrets.signing(job.owner))
        headers = webhooks.signed_headers(signing, webhooks.event_id(job.id, event), body)
        try:
            code = await self.poster(hook.url, body, headers)
            result = DeliveryAttempt(now_iso(), code, None, event)
        except Exception as exc:  # any transport failure is one failed attempt
            result = DeliveryAttempt(now_iso(), None, f"{type(exc).__name__}: {exc}"[:300], event)
        next_at = time.time() + webhooks.backoff_s(hook.tries + 1, self.settings.webhook_backoff_s)
        max_attempts = self.settings.webhook_max_attempts

        def change(current: Job) -> Job | None:
            return current.with_delivery(result, max_attempts, next_at)

        current, applied = await self._retrying("webhook", job.id, lambda: transition(self.store, job, change))
        if not applied:
            return
        if current.webhook is None or current.webhook.event != event:  # superseded: the next event may be due
            self.on_event("webhook", "delivered" if result.ok else "failed")
            self._outbox.set()
            return
        settled = current.webhook.status == WebhookStatus.FAILED
        self.on_event("webhook", "delivered" if result.ok else ("failed" if settled else "retry"))
        if not result.ok and not settled:
            self._spawn(self._wake_outbox_later(next_at - time.time()))

    async def _wake_outbox_later(self, delay_s: float) -> None:
        await asyncio.sleep(max(0.0, delay_s))
        self._outbox.set()

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
        """One replica at a time purges (a named lock lasting twice the interval)."""
        interval = max(1.0, min(RETENTION_MAX_INTERVAL_S, self.settings.retention_s / 10))
        while True:
            try:
                now = time.time()
                held = await self.store.acquire_lock("retention", self.worker_id, now + 2 * interval, now)
                # An exclusive store has one process: a lock its previous (dead) process left must not delay
                # the clean-up at start.
                if held or self.store.exclusive:
                    removed = await self.purge_expired()
                    if removed:
                        log.info("retention: removed %d expired jobs and their images", removed)
                    await self._sweeper.run_if_due()
            except Exception:
                log.exception("retention clean-up failed")
            await asyncio.sleep(interval)
