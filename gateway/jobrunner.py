"""The job manager: a bounded queue, a pool of workers, cancellation, progress, webhooks, recovery, retention.

Workers run jobs concurrently (`max_running_jobs`): their UNet steps reach Triton together and are batched.
Jobs are written to the store at each state change; a restarted gateway re-runs what was queued or running
(asynchronous jobs; a synchronous caller's connection is gone, so those end `failed`/`interrupted`) and
delivers pending webhooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from gateway import webhooks
from gateway.diffusion import GenerationCanceled
from gateway.errors import ApiError, BackendUnavailable, JobFinished, NotFound, Overloaded, status_and_code
from gateway.jobs import CANCELED, COMPLETED, FAILED, PROCESSING, QUEUED, Job, JobStore, now_iso
from gateway.service import ImageService
from gateway.settings import Settings

log = logging.getLogger(__name__)

# Hooks the app can attach for metrics: (event, value) -> None.
EventHook = Callable[[str, Any], None]


@dataclass
class _Running:
    step: int = 0
    total_steps: int = 0
    cancel: bool = False


def _error(exc: ApiError) -> dict[str, Any]:
    _, code = status_and_code(exc)
    return {"code": code, "message": exc.message, "details": exc.details}


class JobManager:
    def __init__(
        self,
        store: JobStore,
        service: ImageService,
        settings: Settings,
        *,
        poster: webhooks.Poster,
        webhook_secret: str,
        on_event: EventHook | None = None,
    ) -> None:
        self.store = store
        self.service = service
        self.settings = settings
        self.poster = poster
        self.webhook_secret = webhook_secret
        self.on_event = on_event or (lambda event, value: None)
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._queued: dict[str, None] = {}  # insertion-ordered: queue positions
        self._running: dict[str, _Running] = {}
        self._done: dict[str, asyncio.Event] = {}
        self._listeners: dict[str, set[asyncio.Queue[dict[str, Any]]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        for job in await self.store.unfinished():
            if job.webhook is None and not job.params.get("asynchronous"):
                job.status, job.completed_at = FAILED, now_iso()
                job.error = {
                    "code": "interrupted",
                    "message": "The gateway restarted while this synchronous request ran",
                    "details": "Retry the request; use webhook_url for work that must survive restarts",
                }
                await self.store.save(job)
                continue
            log.info("recovering job %s (%s)", job.id, job.status)
            job.status = QUEUED
            await self.store.save(job)
            self._enqueue(job.id)
        for job in await self.store.undelivered():
            self._spawn(self._deliver(job.id))
        for _ in range(self.settings.max_running_jobs):
            self._spawn(self._worker())
        self._spawn(self._retention_loop())

    async def stop(self) -> None:
        """Stop workers; jobs they held stay `processing` in the store and are re-run on the next start."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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

    async def submit(self, job: Job) -> Job:
        """Store and queue a job; an idempotent retry returns the stored job instead (not queued twice)."""
        stored = await self.store.create(job)
        if stored is job:
            self._enqueue(job.id)
            self.on_event("job_created", job.status)
        return stored

    def _enqueue(self, job_id: str) -> None:
        self._queued[job_id] = None
        self._done.setdefault(job_id, asyncio.Event())
        self._queue.put_nowait(job_id)
        self._gauges()

    def _gauges(self) -> None:
        self.on_event("queue_depth", (len(self._queued), len(self._running)))

    async def get(self, job_id: str, owner: str) -> Job:
        job = await self.store.get(job_id)
        if job is None or job.owner != owner:  # another key's job does not exist for this caller
            raise NotFound("Job not found", f"No job '{job_id}' for this API key")
        return job

    def progress(self, job: Job) -> dict[str, Any]:
        running = self._running.get(job.id)
        if running is not None:
            return {"step": running.step, "total_steps": running.total_steps, "queue_position": None}
        if job.status == QUEUED:
            position = list(self._queued).index(job.id) + 1 if job.id in self._queued else None
            return {"step": 0, "total_steps": job.params["effective_steps"], "queue_position": position}
        total = job.params["effective_steps"]
        done = total if job.status == COMPLETED else job.steps_done
        return {"step": done, "total_steps": total, "queue_position": None}

    def view(self, job: Job) -> dict[str, Any]:
        return self.service.view(job, self.progress(job))

    async def wait(self, job_id: str) -> Job:
        event = self._done.setdefault(job_id, asyncio.Event())
        job = await self.store.get(job_id)
        if job is not None and job.finished:
            return job
        await event.wait()
        job = await self.store.get(job_id)
        assert job is not None
        return job

    async def cancel(self, job_id: str, owner: str) -> Job:
        job = await self.get(job_id, owner)
        if job.finished:
            raise JobFinished("Job already finished", f"Job '{job_id}' is {job.status}")
        running = self._running.get(job_id)
        if running is not None:
            running.cancel = True  # the worker stops before its next Triton call
            job.cancel_requested = True
            await self.store.save(job)
            await self.wait(job_id)
            return await self.get(job_id, owner)
        self._queued.pop(job_id, None)
        await self._finish(job, CANCELED)
        return job

    def subscribe(self, job_id: str) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=256)
        self._listeners.setdefault(job_id, set()).add(queue)
        return queue

    def unsubscribe(self, job_id: str, queue: asyncio.Queue[dict[str, Any]]) -> None:
        listeners = self._listeners.get(job_id)
        if listeners is not None:
            listeners.discard(queue)
            if not listeners:
                del self._listeners[job_id]

    def _notify(self, job: Job) -> None:
        for queue in self._listeners.get(job.id, ()):
            with contextlib.suppress(asyncio.QueueFull):  # a slow SSE reader misses intermediate steps
                queue.put_nowait(self.view(job))

    # --- running -----------------------------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            job_id = await self._queue.get()
            if job_id not in self._queued:
                continue  # canceled while queued
            del self._queued[job_id]
            job = await self.store.get(job_id)
            if job is None or job.finished:
                continue
            await self._run(job)

    async def _run(self, job: Job) -> None:
        running = self._running[job.id] = _Running(total_steps=job.params["effective_steps"])
        job.status, job.run_attempts = PROCESSING, job.run_attempts + 1
        await self.store.save(job)
        self._notify(job)
        self._gauges()

        def on_step(done: int, total: int) -> None:
            # Shown against effective_steps (what diffusers counts); PNDM makes one extra UNet call.
            running.step = job.steps_done = min(done, running.total_steps)
            self._notify(job)

        try:
            job.result = await self.service.run(job, on_step=on_step, should_stop=lambda: running.cancel)
        except GenerationCanceled:
            await self._finish(job, CANCELED)
        except BackendUnavailable as exc:
            retriable = job.webhook is not None and job.run_attempts <= self.settings.job_retries
            if retriable:
                log.warning("job %s: backend unavailable, retry %d", job.id, job.run_attempts)
                job.status = QUEUED
                await self.store.save(job)
                self._spawn(self._requeue_later(job.id, delay_s=min(30.0, 2.0**job.run_attempts)))
            else:
                job.error = _error(exc)
                await self._finish(job, FAILED)
        except ApiError as exc:
            job.error = _error(exc)
            await self._finish(job, FAILED)
        except Exception:
            log.exception("job %s failed", job.id)
            job.error = {"code": "internal_error", "message": "Internal server error", "details": None}
            await self._finish(job, FAILED)
        else:
            await self._finish(job, COMPLETED)
        finally:
            self._running.pop(job.id, None)
            self._gauges()

    async def _requeue_later(self, job_id: str, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        self._enqueue(job_id)

    async def _finish(self, job: Job, status: str) -> None:
        job.status, job.completed_at = status, now_iso()
        await self.store.save(job)
        self.on_event("job_finished", status)
        self._notify(job)
        self._done.setdefault(job.id, asyncio.Event()).set()
        if job.webhook is not None:
            self._spawn(self._deliver(job.id))

    # --- webhooks ----------------------------------------------------------------------------------------

    async def _deliver(self, job_id: str) -> None:
        job = await self.store.get(job_id)
        if job is None or job.webhook is None or job.webhook.status != "pending":
            return
        body = json.dumps(self.view(job), separators=(",", ":")).encode()
        secret = webhooks.key_secret(self.webhook_secret, job.owner)
        attempt = len(job.webhook.attempts)
        while attempt < self.settings.webhook_max_attempts:
            if attempt > 0:
                await asyncio.sleep(webhooks.backoff_s(attempt, self.settings.webhook_backoff_s))
            attempt += 1
            try:
                status = await self.poster(job.webhook.url, body, webhooks.signed_headers(secret, job.id, body))
                result = webhooks.DeliveryAttempt(now_iso(), status, None)
            except Exception as exc:  # any transport failure is one failed attempt
                result = webhooks.DeliveryAttempt(now_iso(), None, f"{type(exc).__name__}: {exc}"[:300])
            job.webhook.attempts.append(asdict(result))
            if result.ok:
                job.webhook.status = "delivered"
            elif attempt >= self.settings.webhook_max_attempts:
                job.webhook.status = "failed"
            await self.store.save(job)
            outcome = "delivered" if result.ok else ("failed" if job.webhook.status == "failed" else "retry")
            self.on_event("webhook", outcome)
            if result.ok:
                return

    # --- retention ---------------------------------------------------------------------------------------

    async def purge_expired(self) -> int:
        cutoff = (datetime.now(UTC) - timedelta(seconds=self.settings.retention_s)).isoformat(timespec="milliseconds")
        expired = await self.store.expired(cutoff.replace("+00:00", "Z"))
        for job in expired:
            for name in self.service.stored_names(job):
                await self.service.storage.delete(name)
            await self.store.delete(job.id)
            self._done.pop(job.id, None)
        return len(expired)

    async def _retention_loop(self) -> None:
        interval = max(1.0, min(60.0, self.settings.retention_s / 10))
        while True:
            try:
                removed = await self.purge_expired()
                if removed:
                    log.info("retention: removed %d expired jobs and their images", removed)
            except Exception:
                log.exception("retention clean-up failed")
            await asyncio.sleep(interval)
