"""The webhook outbox: deliveries are rows in the store, so retries survive restarts and move between replicas.

A delivery loop claims due deliveries (`claim_delivery`: one replica at a time per job, by lease), sends each
one signed (Standard Webhooks, per-owner secrets) and records the attempt, which releases the lease and sets the
next retry's due time. `wake` is the hint that one may be due now (a job claimed or finished, a redelivery
asked for); without it the loop still finds them every `job_poll_interval_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, TypeVar

from gateway.errors import NothingToRedeliver, StoreUnavailable
from gateway.jobs import webhooks
from gateway.jobs.model import DeliveryAttempt, Job, WebhookEvent, WebhookStatus, now_iso
from gateway.jobs.store import JobStore, transition
from gateway.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

EventHook = Callable[[str, Any], None]  # (event, value) -> None, for metrics
Spawn = Callable[[Coroutine[Any, Any, Any]], None]  # runs a coroutine as a task the runner cancels at stop
WebhookBody = Callable[[Job], bytes]  # a delivery's body: the job as the API shows it (rendered by http)
MAX_DELIVERIES = 16  # webhook POSTs in flight per process


class Retrying(Protocol):
    """A store operation run until the store answers (the runner's backoff, shared by every part)."""

    def __call__(self, what: str, job_id: str, op: Callable[[], Awaitable[T]]) -> Awaitable[T]: ...


class Outbox:
    """The webhook outbox of one process: claims due deliveries, sends them signed, records each attempt."""

    def __init__(
        self,
        store: JobStore,
        settings: Settings,
        *,
        worker_id: str,
        poster: webhooks.Poster,
        body: WebhookBody,
        secrets: webhooks.SecretKeeper,
        on_event: EventHook,
        retrying: Retrying,
        spawn: Spawn,
    ) -> None:
        self.store = store
        self.settings = settings
        self.worker_id = worker_id
        self.poster = poster
        self.body = body
        self.secrets = secrets
        self.on_event = on_event
        self.retrying = retrying
        self.spawn = spawn
        self._due = asyncio.Event()  # set when a webhook may be due
        self._deliveries = asyncio.Semaphore(MAX_DELIVERIES)
        self._delivering: set[str] = set()

    def start(self) -> None:
        self.spawn(self._delivery_loop())

    def wake(self) -> None:
        """A delivery may be due now: claim without waiting for the poll."""
        self._due.set()

    async def _delivery_loop(self) -> None:
        """Claim due webhook deliveries (one replica at a time per job, by lease) and send them; retries are
        due again at their backoff time, so they survive restarts and move between replicas."""
        while True:
            await self._deliveries.acquire()
            try:
                self._due.clear()
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
                    await asyncio.wait_for(self._due.wait(), self.settings.job_poll_interval_s)
                continue
            self.spawn(self._deliver(job))
            self._due.set()  # there may be more due

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

    async def redeliver(self, job: Job) -> Job:
        """Send the job's final event again (same `webhook-id`, new timestamp and signature) through the outbox:
        it survives restarts and one replica sends it. `job` is the caller's own (ownership is checked before)."""
        stored, applied = await transition(self.store, job, Job.redelivery_requested)
        if not applied:
            if not stored.finished:
                raise NothingToRedeliver("Job not finished", f"Job '{job.id}' is {stored.status}: no final event yet")
            hook = stored.webhook
            if hook is not None and hook.event == WebhookEvent.COMPLETED and hook.status == WebhookStatus.PENDING:
                raise NothingToRedeliver(
                    "Delivery in progress",
                    f"Job '{job.id}''s final event is still being delivered ({hook.tries} attempts so far): "
                    "redeliver once it is delivered or has failed",
                )
            raise NothingToRedeliver(
                "Nothing to redeliver",
                f"Job '{job.id}' has no webhook for its final event (see webhook_url and webhook_events)",
            )
        self._due.set()
        return stored

    async def _attempt_delivery(self, job: Job) -> None:
        hook = job.webhook
        if hook is None:
            return
        event = hook.event
        body = self.body(job)
        signing = await self.retrying("webhook secret", job.id, lambda: self.secrets.signing(job.owner))
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

        current, applied = await self.retrying("webhook", job.id, lambda: transition(self.store, job, change))
        if not applied:
            return
        if current.webhook is None or current.webhook.event != event:  # superseded: the next event may be due
            self.on_event("webhook", "delivered" if result.ok else "failed")
            self._due.set()
            return
        settled = current.webhook.status == WebhookStatus.FAILED
        self.on_event("webhook", "delivered" if result.ok else ("failed" if settled else "retry"))
        if not result.ok and not settled:
            self.spawn(self._wake_later(next_at - time.time()))

    async def _wake_later(self, delay_s: float) -> None:
        await asyncio.sleep(max(0.0, delay_s))
        self._due.set()
