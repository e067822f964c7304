"""Maintenance of the store: recovery at start, takeover of expired leases, retention.

With an exclusive store (SQLite: one process, locked at open) every unfinished job found at start is an orphan
of this process's previous life. With a shared store, a dead replica's jobs are found by their expired leases
instead, by whichever replica looks first. Either way an orphan is taken over by the same rules (`_recover`).
Retention deletes finished jobs past `retention_s` with their images, one replica at a time (a named lock),
and runs the storage sweep (`retention.StorageSweeper`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from gateway.errors import ApiError, Interrupted, RunAttemptsExhausted, StoreUnavailable, status_and_code
from gateway.jobs.events import EventKind, JobEvent, JobEvents
from gateway.jobs.model import CANCELED, FAILED, PROCESSING, Job, JobError, Lease
from gateway.jobs.outbox import Retrying, Spawn
from gateway.jobs.retention import StorageSweeper
from gateway.jobs.store import JobStore, Transition, transition
from gateway.media.storage import Storage
from gateway.settings import Settings

log = logging.getLogger(__name__)

RETENTION_MAX_INTERVAL_S = 60.0
RECLAIM_BATCH = 100  # expired leases taken over per pass
RETENTION_BATCH = 500  # expired jobs read and purged at a time


def job_error(exc: ApiError) -> JobError:
    """The error a job records: the code the API would answer for `exc`."""
    _, code = status_and_code(exc)
    return JobError(code=code, message=exc.message, details=exc.details)


def _if_lease_unchanged(job: Job, *, change: Transition, seen: Lease | None) -> Job | None:
    """`change`, only while the job still runs under the (expired) lease it was found with: a renewal or a new
    claim since then changes the lease, and its worker lives. No clock is read here: the store judged the
    expiry by its own (the database's, for a shared store)."""
    if job.status != PROCESSING or job.lease != seen:
        return None
    return change(job)


class Maintenance:
    def __init__(
        self,
        store: JobStore,
        storage: Storage,
        settings: Settings,
        *,
        worker_id: str,
        events: JobEvents,
        after_final: Callable[[Job], Awaitable[None]],
        running_here: Callable[[str], bool],
        retrying: Retrying,
        spawn: Spawn,
    ) -> None:
        self.store = store
        self.storage = storage
        self.settings = settings
        self.worker_id = worker_id
        self.events = events
        self.after_final = after_final  # a final state's effects (the workers': waiters, bus, outbox)
        self.running_here = running_here  # a job this process runs: alive, never taken over
        self.retrying = retrying
        self.spawn = spawn
        self._sweeper = StorageSweeper(  # objects no job owns, temp files: at start, then every sweep interval
            store, storage, grace_s=settings.storage_orphan_grace_s, interval_s=settings.storage_sweep_interval_s
        )

    async def recover_at_start(self) -> None:
        """With an exclusive store, take over every unfinished job: a cancel it was asked for is honoured, a
        synchronous one (its caller is gone) fails `interrupted`, one that already crashed `max_run_attempts`
        runs fails `run_attempts_exhausted`, the rest run again."""
        if self.store.exclusive:
            for job in await self.retrying("recovery", "-", self.store.unfinished):
                await self._recover(job, caller_gone=True)

    def start(self) -> None:
        self.spawn(self._reclaim_loop())
        self.spawn(self._retention_loop())

    async def _recover(self, job: Job, *, caller_gone: bool, lease_expired: bool = False) -> None:
        """Take over an orphaned job. A synchronous one is failed `interrupted` only when its caller is known
        gone (its process died with the store's only process); on a shared store its caller may still wait on
        another replica, so it runs again. With `lease_expired` (found by `expired_leases`), only while it still
        runs under the lease it was found with (its owner may have renewed it since it was read)."""
        change: Transition
        if job.cancel_requested:
            change = functools.partial(Job.ended, status=CANCELED)
        elif caller_gone and not job.spec.asynchronous:
            interrupted = job_error(
                Interrupted(
                    "The gateway restarted while this synchronous request ran",
                    "Retry the request; use webhook_url for work that must survive restarts",
                )
            )
            change = functools.partial(Job.ended, status=FAILED, error=interrupted)
        elif job.status == PROCESSING and job.run_attempts >= self.settings.max_run_attempts:
            exhausted = job_error(
                RunAttemptsExhausted(
                    "The job failed repeatedly",
                    f"Its worker stopped {job.run_attempts} times while running this job; it is not retried",
                )
            )
            change = functools.partial(Job.ended, status=FAILED, error=exhausted)
        else:
            change = Job.requeued
        if lease_expired:
            change = functools.partial(_if_lease_unchanged, change=change, seen=job.lease)
        stored, applied = await self.retrying("recovery", job.id, lambda: transition(self.store, job, change))
        if not applied:
            return
        if stored.finished:
            log.info("recovery: job %s ends %s", stored.id, stored.status)
            await self.after_final(stored)
        else:
            log.info("recovery: job %s queued again (run %d so far)", stored.id, stored.run_attempts)
            await self.events.publish(JobEvent(stored.id, EventKind.CREATED))

    async def _reclaim_loop(self) -> None:
        """Take over jobs whose lease expired (their replica died), every half lease."""
        while True:
            await asyncio.sleep(self.settings.job_lease_s / 2)
            try:
                for job in await self.store.expired_leases(RECLAIM_BATCH):  # expired by the store's clock
                    if self.running_here(job.id):
                        continue  # ours and alive: its renewals failed for a while; the next one restores it
                    log.warning("job %s: lease of %s expired; taking it over", job.id, job.lease)
                    await self._recover(job, caller_gone=False, lease_expired=True)
            except StoreUnavailable:
                continue
            except Exception:
                log.exception("reclaiming expired leases failed")

    async def purge_expired(self) -> int:
        """Delete finished jobs older than the retention period, with their stored images, `RETENTION_BATCH`
        jobs at a time (a deleted job leaves the next batch's query)."""
        cutoff = datetime.now(UTC) - timedelta(seconds=self.settings.retention_s)
        before = cutoff.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        removed = 0
        while True:
            expired = await self.store.expired(before, RETENTION_BATCH)
            for job in expired:
                for name in job.stored_names:
                    await self.storage.delete(name)
                await self.store.delete(job.id)
            removed += len(expired)
            if len(expired) < RETENTION_BATCH:
                return removed

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
