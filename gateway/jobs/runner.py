"""The job runner: this process's dispatcher and workers, and `JobManager`, which runs them with the webhook
outbox (`outbox.py`) and maintenance (`maintenance.py`: recovery, takeover of expired leases, retention).

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
from datetime import datetime
from typing import Any, Protocol, TypeVar

from gateway.diffusion.img2img import GenerationCanceled
from gateway.errors import (
    ApiError,
    BackendUnavailable,
    JobFinished,
    NotFound,
    Overloaded,
    StoreUnavailable,
)
from gateway.jobs import webhooks
from gateway.jobs.events import EventKind, JobEvent, JobEvents, LocalEvents
from gateway.jobs.maintenance import Maintenance, job_error
from gateway.jobs.model import (
    CANCELED,
    COMPLETED,
    FAILED,
    PROCESSING,
    QUEUED,
    Job,
    JobError,
    JobStatus,
    OutputImage,
    WebhookEvent,
)
from gateway.jobs.outbox import EventHook, Outbox, Retrying, Spawn
from gateway.jobs.request import MAX_PRIORITY
from gateway.jobs.scheduling import StepGate, WaitEstimator
from gateway.jobs.store import JobStore, StaleJob, transition
from gateway.media.storage import Storage
from gateway.observability import request_context
from gateway.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

STORE_RETRY_FIRST_S = 0.05
LISTENER_QUEUE_SIZE = 256
BACKEND_RETRY_MAX_S = 30.0
PROGRESS_CACHE_SIZE = 10_000  # live progress of jobs running on other replicas, as heard on the bus
OVERDUE_BATCH = 100  # queued jobs past their max_queue_s ended per sweep (the rest at the next one)


@dataclass(frozen=True)
class Progress:
    step: int
    total_steps: int
    queue_position: int | None
    estimated_start_at: float | None = None  # epoch seconds, from measured times (scheduling.WaitEstimator)
    estimated_finish_at: float | None = None


@dataclass(frozen=True)
class JobUpdate:
    """What an event-stream listener receives: the job and its live progress; `job` None with a progress: only the
    step moved (heard on the bus); both None: the job changed elsewhere, read it again."""

    job: Job | None
    progress: Progress | None


class Executor(Protocol):
    def __call__(
        self,
        job: Job,
        *,
        on_step: Callable[[int, int], None],
        should_stop: Callable[[], bool],
        before_step: Callable[[], Awaitable[None]],
    ) -> Awaitable[tuple[OutputImage, ...]]: ...


# Renders the webhook body of a finished job (the HTTP layer's job view; injected so jobs never import http).
Renderer = Callable[[Job, Progress], bytes]


@dataclass
class _Running:
    claim: str  # the claim id of this run's lease: renew, release and finish name it
    step: int = 0
    cancel: bool = False  # asked to stop (a cancel here, on the bus, or seen on the lease renewal)
    lost: bool = False  # the lease went to someone else (another claim, ours included): stop, and write nothing
    published_at: float = 0.0  # when progress last went on the bus


_INTERNAL = JobError(code="internal_error", message="Internal server error", details=None)


def final_progress(job: Job) -> Progress:
    total = job.spec.effective_steps
    return Progress(total if job.status == COMPLETED else job.steps_done, total, None)


def _webhook_body(render: Renderer, job: Job) -> bytes:
    """A delivery's body: the job at its final progress, or at step 0 for its `start` event."""
    progress = final_progress(job) if job.finished else Progress(0, job.spec.effective_steps, None)
    return render(job, progress)


class Workers:
    """This process's dispatcher and workers, and what follows a job from here: progress, waiters, listeners,
    cancel. A final state wakes the outbox (`wake_outbox`), whoever wrote it."""

    def __init__(
        self,
        store: JobStore,
        execute: Executor,
        storage: Storage,
        settings: Settings,
        *,
        events: JobEvents,
        on_event: EventHook,
        worker_id: str,
        retrying: Retrying,
        spawn: Spawn,
        wake_outbox: Callable[[], None],
        run_elsewhere: Callable[[str], None] = lambda job_id: None,
    ) -> None:
        self.store = store
        self.execute = execute
        self.run_elsewhere = run_elsewhere  # another replica runs (or ended) this job: drop what was kept for it
        self.storage = storage
        self.settings = settings
        self.events = events
        self.on_event = on_event
        self.worker_id = worker_id
        self.retrying = retrying
        self.spawn = spawn
        self.wake_outbox = wake_outbox
        self._running: dict[str, _Running] = {}
        self._runs = 0  # runs in progress here: what the slots count (a stale run of a job taken over included)
        self._work = asyncio.Event()  # set when a job may be waiting (created, released, a slot freed)
        # Jobs yield to higher priorities at step boundaries (StepGate); a higher-priority job may start beyond
        # `max_running_jobs`, in one of `preempt_slots`, while lower ones run (they pause for it).
        self.gate = StepGate(on_preempted=lambda priority, waited: self.on_event("preempted", (priority, waited)))
        self.estimator = WaitEstimator(store, settings.estimate_window_s)
        self._done: dict[str, asyncio.Event] = {}
        self._listeners: dict[str, set[asyncio.Queue[JobUpdate]]] = {}
        self._remote: OrderedDict[str, tuple[int, int]] = OrderedDict()  # job id -> (step, total) from the bus
        self._recent_cancels: OrderedDict[str, bool] = OrderedDict()  # cancels heard for jobs not running here
        self._queued_estimate = 0  # the store's queue length as of the last count (metrics)

    def start(self) -> None:
        self.spawn(self._dispatch_loop())

    def running_here(self, job_id: str) -> bool:
        return job_id in self._running

    # --- the bus -----------------------------------------------------------------------------------------

    async def _publish(self, event: JobEvent) -> None:
        await self.events.publish(event)

    def on_bus_event(self, event: JobEvent) -> None:
        """Events from every replica, this one included."""
        if event.kind == EventKind.CREATED:
            self._work.set()
        elif event.kind == EventKind.PROGRESS:
            if event.job_id in self._running:
                return  # ours: local listeners already heard every step
            self.run_elsewhere(event.job_id)
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
            self.run_elsewhere(event.job_id)
            self._remote.pop(event.job_id, None)
            self._release_waiters(event.job_id)
            self._notify_changed(event.job_id)
            self.wake_outbox()

    # --- submission and queries --------------------------------------------------------------------------

    async def check_admission(self) -> None:
        """503 with Retry-After instead of unbounded latency once the fleet's queue is full."""
        by_priority = await self.store.count_queued_by_priority()
        queued = sum(by_priority.values())
        self._queued_estimate = queued
        self.on_event("queued_by_priority", by_priority)
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
        """Live progress, with the queue position and start/finish estimates of an unfinished job."""
        total = job.spec.effective_steps
        if job.status == PROCESSING:
            running = self._running.get(job.id)
            step = running.step if running is not None else self._remote.get(job.id, (job.steps_done, total))[0]
            step = min(step, total)
            estimate = await self.estimator.running(job, step, total)
            return Progress(step, total, None, estimate.start_at, estimate.finish_at)
        if job.status == QUEUED:
            place = await self.store.queue_place(job)
            if place is None:  # claimed or ended since it was read
                return Progress(0, total, None)
            free = self._runs < self.settings.max_running_jobs  # a slot is free here: it starts with the next claim
            estimate = await self.estimator.queued(job, place, slot_free=free)
            return Progress(0, total, place.position, estimate.start_at, estimate.finish_at)
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
            await self.after_final(stored)
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

    def _claimable_priority(self) -> int | None:
        """The lowest priority a claim may take now: any (0) while one of `max_running_jobs` slots is free; while
        they are all taken, only above the lowest priority denoising here (it will pause for the new job), in one
        of `preempt_slots`; None: nothing may start."""
        busy = self._runs
        if busy < self.settings.max_running_jobs:
            return 0
        lowest = self.gate.lowest()
        if busy >= self.settings.max_running_jobs + self.settings.preempt_slots or lowest is None:
            return None
        return lowest + 1 if lowest < MAX_PRIORITY else None

    async def _dispatch_loop(self) -> None:
        """Claim the next queued job (highest priority first, fair between keys: `JobStore.claim_next`) whenever a
        slot is free, or a job of a higher priority than one running here while none is; sleep until woken (a
        job created or released, a slot freed) or the poll interval. Jobs that waited past their `max_queue_s`
        fail here (any replica's dispatcher may end them). One claim query per wake-up per process."""
        next_sweep = 0.0
        while True:
            self._work.clear()
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + self.settings.job_poll_interval_s
                await self._fail_overdue()
            floor = self._claimable_priority()
            job = None
            if floor is not None:
                job = await self.retrying("claim", "-", functools.partial(self._claim_next, floor))
            if job is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._work.wait(), self.settings.job_poll_interval_s)
                continue
            self._queued_estimate = max(0, self._queued_estimate - 1)
            self._queue_time(job)
            stale = self._running.get(job.id)
            if stale is not None:  # an earlier run of ours (it stalled, the job was taken over): it lost the job
                stale.lost = True
            # Registered at once: a cancel arriving from now on finds it running here, and lower priorities pause.
            running = self._running[job.id] = _Running(
                job.lease.claim if job.lease else "",  # this claim's id ("" is held by no one: never happens)
                cancel=job.cancel_requested or self._recent_cancels.pop(job.id, False),
            )
            self.gate.enter(job.id, job.spec.priority)
            self._runs += 1
            if job.webhook is not None and job.webhook.event == WebhookEvent.START:
                self.wake_outbox()  # its `start` event is due
            self.spawn(self._process(job, running))
            self._work.set()  # there may be more: claim again while slots are free

    async def _claim_next(self, min_priority: int) -> Job | None:
        return await self.store.claim_next(
            self.worker_id, self.settings.job_lease_s, time.time(), min_priority=min_priority
        )

    def _queue_time(self, job: Job) -> None:
        """The time a job waited before its first start, by priority and the key's class (metrics)."""
        if job.run_attempts != 1:
            return
        created = datetime.fromisoformat(job.created_at).timestamp()
        started = job.started_at if job.started_at is not None else time.time()  # set by this very claim
        key_class = self.settings.key_policy(job.owner).key_class
        self.on_event("queue_time", (job.spec.priority, key_class, max(0.0, started - created)))

    async def _fail_overdue(self) -> None:
        """End `queue_timeout` the queued jobs past their `max_queue_s` (a bounded batch per sweep)."""
        try:
            overdue = await self.store.overdue_in_queue(time.time(), OVERDUE_BATCH)
        except StoreUnavailable:
            return  # the next sweep tries again; claim_next never starts an overdue job meanwhile
        for job in overdue:
            try:
                stored, applied = await transition(self.store, job, lambda j: j.queue_timed_out(time.time()))
            except (StaleJob, StoreUnavailable):
                continue
            if applied:
                await self.after_final(stored)

    async def _process(self, job: Job, running: _Running) -> None:
        running.cancel = running.cancel or self._recent_cancels.pop(job.id, False)
        try:
            with request_context(job.request_id):  # every log line of this run names the creating request
                await self._run(job, running)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug must cost one job at most, never the worker
            log.exception("worker %s: unexpected error on job %s", self.worker_id, job.id)
        finally:
            if self._running.get(job.id) is running:  # not a later run's entry (this one was stale)
                del self._running[job.id]
                self.gate.leave(job.id)
            self._runs -= 1
            self._work.set()  # a slot is free
            self._gauges()

    async def _run(self, job: Job, running: _Running) -> None:
        log.info("job %s: running (attempt %d, request %s)", job.id, job.run_attempts, job.request_id)
        total = job.spec.effective_steps
        self._notify(job, Progress(0, total, None))
        self._gauges()
        renewer = asyncio.create_task(self._keep_lease(job.id, running))
        claim = running.claim

        def on_step(done: int, calls: int) -> None:
            # Shown against effective_steps (what diffusers counts); PNDM makes one extra UNet call.
            running.step = done
            if done >= calls and self._running.get(job.id) is running:  # denoised: lower ones need not wait
                self.gate.leave(job.id)  # (a stale run of a job claimed again here leaves the new run's entry)
            progress = Progress(min(done, total), total, None)
            self._notify(job, progress)
            now = time.monotonic()
            if done >= total or now - running.published_at >= self.settings.progress_publish_interval_s:
                running.published_at = now  # other replicas hear at most a few steps per second of each job
                self.spawn(self._publish(JobEvent(job.id, EventKind.PROGRESS, progress.step, total)))

        status: JobStatus = COMPLETED
        images: tuple[OutputImage, ...] = ()
        error: JobError | None = None
        try:
            images = await self.execute(
                job,
                on_step=on_step,
                should_stop=lambda: running.cancel or running.lost,
                before_step=lambda: self.gate.turn(job.spec.priority),
            )
        except GenerationCanceled:
            status = CANCELED
        except BackendUnavailable as exc:
            if job.spec.asynchronous and job.run_attempts <= self.settings.job_retries:
                await self._retry_later(job, claim)
                return
            status, error = FAILED, job_error(exc)
        except ApiError as exc:
            status, error = FAILED, job_error(exc)
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
        await self._finish(job, claim, status, images=images, error=error, steps_done=running.step)

    async def _keep_lease(self, job_id: str, running: _Running) -> None:
        """Renew this run's lease (its claim) at a third of its length; learn of a cancel requested elsewhere on
        the way. A renewal refused because another claim holds the job (another replica's, or a later one of
        this process) means the job is lost to this run."""
        while not running.lost:
            await asyncio.sleep(self.settings.job_lease_s / 3)
            try:
                renewed = await self.store.renew(job_id, self.worker_id, running.claim, self.settings.job_lease_s)
                if renewed is None:
                    current = await self.store.get(job_id)
                    running.lost = running.lost or current is None or not current.held_by(self.worker_id, running.claim)
                elif renewed.cancel_requested:
                    running.cancel = True
            except StoreUnavailable:
                continue  # the lease is long enough to survive a missed renewal

    async def _retry_later(self, job: Job, claim: str) -> None:
        delay = min(BACKEND_RETRY_MAX_S, 2.0**job.run_attempts)
        log.warning("job %s: backend unavailable, retry %d in %.0f s", job.id, job.run_attempts, delay)
        stored = await self.retrying(
            "release", job.id, lambda: self.store.release(job.id, self.worker_id, claim, time.time() + delay)
        )
        if stored is None:  # lost meanwhile, or released by this claim already (a retry whose answer was lost)
            current = await self.retrying("release", job.id, lambda: self.store.get(job.id))
            if current is None or not (current.finished and current.finished_claim == claim):
                return
            stored = current  # canceled by this very release: its effects are still ours to run
        if stored.finished:  # canceled while it ran
            await self.after_final(stored)
        else:
            self.spawn(self._wake_later(delay))

    async def _wake_later(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        self._work.set()

    async def _finish(
        self,
        job: Job,
        claim: str,
        status: JobStatus,
        *,
        images: tuple[OutputImage, ...],
        error: JobError | None,
        steps_done: int,
    ) -> None:
        """Write the final state by this run's claim (retried until the store answers); the worker's result wins
        over a cancel that arrives after the last step, and a job someone else finished keeps that state. A retry
        that finds the job finished by this very claim learns that its earlier write committed (only its answer
        was lost): the images are the job's, kept."""

        def change(current: Job) -> Job | None:
            return current.finished_by(self.worker_id, claim, status, images=images, error=error, steps_done=steps_done)

        try:
            stored, applied = await self.retrying("finish", job.id, lambda: transition(self.store, job, change))
        except StaleJob:  # deleted under us (retention cannot, while it runs): nothing to record
            stored, applied = job, False
        if not applied and stored.finished and stored.finished_claim == claim:
            log.info("job %s: its final write had committed (the answer was lost)", job.id)
            applied = True
        if not applied:
            log.warning("job %s: finished elsewhere as %s; result dropped", job.id, stored.status)
            await self._delete(images)
            return
        await self.after_final(stored)

    async def _delete(self, images: tuple[OutputImage, ...]) -> None:
        for image in images:
            with contextlib.suppress(Exception):
                await self.storage.delete(image.name)

    async def after_final(self, job: Job) -> None:
        """Effects of a final state, run once by whoever wrote it: metrics, local listeners and waiters, the
        bus (waiters and listeners on other replicas), the webhook outbox."""
        log.info("job %s: %s", job.id, job.status)
        self.on_event("job_finished", job.status)
        self.estimator.invalidate()
        self._notify(job, final_progress(job))
        self._release_waiters(job.id)
        if job.webhook is not None:
            self.wake_outbox()
        await self._publish(JobEvent(job.id, EventKind.FINAL))


class JobManager:
    """The job system of one process, as the rest of the gateway sees it: the workers, the webhook outbox and
    maintenance over one store, started and stopped together, sharing one bus, one task set and one store
    retry."""

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
        run_elsewhere: Callable[[str], None] | None = None,
    ) -> None:
        """`run_elsewhere(job_id)`: told when the bus reports a job this process does not run progressing or ended
        (app.py drops the job's kept input: `DecodedInputs.drop`)."""
        self.store = store
        self.settings = settings
        # Per-key signing secrets in the store; a configured `webhook_secret` seeds their first values.
        self.secrets = webhooks.SecretKeeper(store, seed=webhook_secret, overlap_s=settings.webhook_secret_overlap_s)
        self.events: JobEvents = events or LocalEvents()
        self.on_event: EventHook = on_event or (lambda event, value: None)
        self.worker_id = worker_id or f"gw-{uuid.uuid4().hex[:12]}"
        self._tasks: set[asyncio.Task[Any]] = set()
        self.outbox = Outbox(
            store,
            settings,
            worker_id=self.worker_id,
            poster=poster,
            body=functools.partial(_webhook_body, render),
            secrets=self.secrets,
            on_event=self.on_event,
            retrying=self._retrying,
            spawn=self._spawn,
        )
        self.workers = Workers(
            store,
            execute,
            storage,
            settings,
            events=self.events,
            on_event=self.on_event,
            worker_id=self.worker_id,
            retrying=self._retrying,
            spawn=self._spawn,
            wake_outbox=self.outbox.wake,
            run_elsewhere=run_elsewhere or (lambda job_id: None),
        )
        self.maintenance = Maintenance(
            store,
            storage,
            settings,
            worker_id=self.worker_id,
            events=self.events,
            after_final=self.workers.after_final,
            running_here=self.workers.running_here,
            retrying=self._retrying,
            spawn=self._spawn,
        )

    # --- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen to the bus, recover what a dead process left (an exclusive store's orphans; a shared store's
        are found by their expired leases, by whichever replica looks first), then start the loops."""
        await self.events.start(self.workers.on_bus_event)
        await self.maintenance.recover_at_start()
        self.workers.start()
        self.outbox.start()
        self.maintenance.start()

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

    # --- what the rest of the gateway calls --------------------------------------------------------------

    async def check_admission(self) -> None:
        await self.workers.check_admission()

    async def enqueue_new(self, job: Job) -> None:
        await self.workers.enqueue_new(job)

    async def finished_new(self, job: Job) -> None:
        """A job created final (answered from the exact-result cache): its final-state effects, as a worker's."""
        await self.workers.after_final(job)

    async def get(self, job_id: str, owner: str) -> Job:
        return await self.workers.get(job_id, owner)

    async def progress(self, job: Job) -> Progress:
        return await self.workers.progress(job)

    async def wait(self, job_id: str) -> Job:
        return await self.workers.wait(job_id)

    async def cancel(self, job_id: str, owner: str) -> Job:
        return await self.workers.cancel(job_id, owner)

    def subscribe(self, job_id: str) -> asyncio.Queue[JobUpdate]:
        return self.workers.subscribe(job_id)

    def unsubscribe(self, job_id: str, queue: asyncio.Queue[JobUpdate]) -> None:
        self.workers.unsubscribe(job_id, queue)

    async def redeliver(self, job_id: str, owner: str) -> Job:
        """Send the job's final event again through the outbox (another key's job does not exist here)."""
        return await self.outbox.redeliver(await self.workers.get(job_id, owner))

    async def purge_expired(self) -> int:
        return await self.maintenance.purge_expired()
