"""The job-store contract: what the runner needs from a durable store, whatever the engine behind it.

The store is the queue: workers of every replica take work from it (`claim_next`), so any number of gateway
processes can share one store (PostgreSQL); SQLite implements the same contract for one process.

Every write is a compare-and-set on the job's `version`: `update(job)` succeeds only if the stored row still
has `job.version`, so the loser of a race learns it (`StaleJob`) and re-decides from the winner's copy.
Leases (`claim_next`/`claim`, `renew`, `release`) say which worker runs a job until when; a job whose lease
expired (its replica died) is found by `expired_leases` and taken over. Each claim mints a random claim id
(`Lease.claim`), and `renew`, `release` and the finish (`Job.finished_by`) require it, not only the worker's
name: a stale run of the same process (frozen, its job taken over and claimed again by that process) is refused.
Lease times are the store's clock, never the caller's: the caller passes a duration (`lease_s`), and
`expires_at` and `expired_leases` are computed from the database's clock on PostgreSQL (replicas' clocks may
disagree; a replica whose clock runs ahead must not see live leases as expired), the process's on SQLite (one
process). Webhook deliveries are an outbox on the job row (`claim_delivery`); singleton chores such as retention
take a named lock (`acquire_lock`). Each owner's webhook signing secrets are a row of their own
(`webhook_secrets`, `put_webhook_secrets`: compare-and-set on their version, so concurrent rotations have one
winner).

The store is also the fair queue (issue 24): within a priority level (`JobSpec.priority`, 0 bulk, 1 normal,
2 interactive; a higher level is always claimed first), jobs are claimed by start-time fair queuing, the per-job
form of deficit round robin on work cost. Each level has a virtual clock `V` (the largest `fair_tag` claimed so
far) and each owner the virtual finish of its last job there; `create` gives a new queued job the tag
`max(V, finish)` and moves the owner's finish on by the job's `share` (its work divided by the owner's weight),
so a key with a long queue has its later jobs tagged far ahead, and a key that was idle starts at `V`, next in
line. The same tables answer `queue_place` (what is ahead of a job, in jobs and work), and the queue-deadline
sweep (`overdue_in_queue`), the exact-result cache (`find_result`) and the wait estimates (`recent_finished`)
read their own columns.

Stores raise `StoreUnavailable` (never their driver's exceptions) when the engine does not answer, so the
runner can retry with backoff without knowing which engine it talks to. Times are epoch seconds; apart from
the job leases above, `now` is passed in (`not_before`, webhook deliveries, locks), so the caller's clock decides
and tests can move it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gateway.jobs.model import QUEUED, Job
from gateway.jobs.webhooks import SigningSecrets


class StaleJob(Exception):
    """A compare-and-set lost: the stored job changed since it was read (`current` is the stored copy)."""

    def __init__(self, current: Job | None) -> None:
        super().__init__(current.id if current else "job deleted")
        self.current = current


class IdempotencyConflict(Exception):
    """The key was used before with another request body."""


def scheduling_columns(job: Job) -> tuple[int, float, float | None, str | None, int, float | None]:
    """The scheduling columns both stores keep beside the JSON, in this order: priority, fair_tag,
    queue_deadline (only while queued: the deadline sweep's index holds the waiting jobs only), result_key, work,
    started_at."""
    deadline = job.queue_deadline if job.status == QUEUED else None
    return job.spec.priority, job.fair_tag, deadline, job.result_key, job.spec.work, job.started_at


@dataclass(frozen=True)
class QueuePlace:
    """Where a queued job stands: `position` is 1 + the queued jobs `claim_next` would take before it (a higher
    priority, or the same one and a smaller `(fair_tag, created_at, insertion order)`), `work_ahead` the sum of
    their `JobSpec.work` (UNet samples), what a wait estimate is made from. Every queued job that orders before it
    counts, one not yet due (a retry's `not_before`) or past its deadline (about to be swept) included."""

    position: int
    work_ahead: float


@dataclass(frozen=True)
class FinishedWork:
    """One completed job's measured service: its model, its work (UNet samples) and when it started and finished
    (epoch seconds); wait estimates divide work by the time it took."""

    model: str
    work: float
    started_at: float
    finished_at: float


class JobStore(Protocol):
    # True when one process owns the store (SQLite, locked at open): every unfinished job found at start is an
    # orphan of a dead process. False for a shared store: only expired leases are orphans.
    exclusive: bool

    async def create(self, job: Job, *, share: float = 1.0) -> Job:
        """Insert `job`; with an idempotency key already used by this owner, return that job instead
        (raise IdempotencyConflict when its request hash differs). Exactly one of concurrent creates wins.

        A new queued job gets its place in its priority's fair queue in the same transaction: `fair_tag =
        max(V[priority], finish[owner, priority])` (missing: 0) and the owner's finish becomes `fair_tag +
        share`, where `share` is the job's work divided by the owner's weight (the caller computes it). An
        idempotent duplicate, and a job created already finished (a completed cache hit), take no share.
        Concurrent creates of one owner are serialised on its share, so each gets a distinct tag."""
        ...

    async def get(self, job_id: str) -> Job | None: ...

    async def get_idempotent(self, owner: str, key: str) -> Job | None: ...

    async def update(self, job: Job) -> Job:
        """Write `job` if the stored version is still `job.version`; return it with the new version.
        Raise StaleJob (carrying the stored copy) otherwise."""
        ...

    async def claim(self, job_id: str, worker: str, lease_s: float) -> Job | None:
        """queued -> processing under a new claim of `worker` (`Job.claimed`: the lease's `claim` id), expiring
        `lease_s` from now by the store's clock; None if the job is not queued (canceled, taken)."""
        ...

    async def renew(self, job_id: str, worker: str, claim: str, lease_s: float) -> Job | None:
        """Extend the lease of `worker`'s claim `claim` to `lease_s` from now (the store's clock); None when that
        claim no longer holds it. The returned copy carries `cancel_requested`, so a worker learns of a cancel sent
        to another replica at its next renewal."""
        ...

    async def release(self, job_id: str, worker: str, claim: str, not_before: float = 0.0) -> Job | None:
        """processing -> queued (a retry, claimable from `not_before`), by the claim holding the lease; a job whose
        cancel was requested meanwhile ends canceled instead. None when that claim no longer holds it."""
        ...

    async def claim_next(self, worker: str, lease_s: float, now: float, *, min_priority: int = 0) -> Job | None:
        """A queued job with `not_before <= now` (the caller's clock, as `release` set it), a priority of at least
        `min_priority`, and not past its queue deadline (`queue_deadline` None or after `now`), moved to processing
        under a new claim of `worker` (`Job.claimed`), its lease expiring `lease_s` from now by the store's clock;
        None when there is none. The order is `priority` (highest first), then `fair_tag`, then `created_at`,
        then insertion order; the claim moves its priority's virtual clock to the job's tag, in the same
        transaction. So a higher priority always goes first; one owner's jobs go in creation order within a
        priority; and a key with a full queue does not keep another key's later job waiting behind its jobs: with
        owner A holding 100 queued jobs and owner B submitting one, B's job is claimed within one claim of the next
        one (on a tie of tags the older job goes first), and owners with jobs queued share the claims in inverse
        proportion to their jobs' `share`. Concurrent callers (other replicas) never get the same job and never
        wait on each other's row locks (PostgreSQL: `FOR UPDATE SKIP LOCKED`)."""
        ...

    async def expired_leases(self, limit: int) -> list[Job]:
        """Up to `limit` processing jobs whose lease expired by the store's clock, oldest first (a dead
        replica's, or a lease written before claim ids, which nobody can renew)."""
        ...

    async def count_queued(self) -> int:
        """Queued jobs in the whole store (admission control counts the fleet's queue, not one process's)."""
        ...

    async def count_active(self, owner: str) -> int:
        """Queued and processing jobs of `owner` (the per-key cap of job creation)."""
        ...

    async def queue_place(self, job: Job) -> QueuePlace | None:
        """Where the stored copy of `job` stands in the queue, in `claim_next`'s order (`QueuePlace`); None when
        it is not queued."""
        ...

    async def count_queued_by_priority(self) -> dict[int, int]:
        """Queued jobs in the whole store per priority (levels with none are left out): the metrics gauge."""
        ...

    async def overdue_in_queue(self, now: float, limit: int) -> list[Job]:
        """Up to `limit` queued jobs whose `queue_deadline` is at or before `now` (the caller's clock), oldest
        first: the sweep fails them `queue_timeout` (`Job.queue_timed_out`); `claim_next` never takes them."""
        ...

    async def find_result(self, owner: str, result_key: str) -> Job | None:
        """The newest completed job of `owner` with this `result_key` (the exact-result cache); None if none."""
        ...

    async def recent_finished(self, since: float, limit: int) -> list[FinishedWork]:
        """Up to `limit` completed jobs that a worker ran (`started_at` set: not cache hits) and that finished
        at or after `since` (epoch seconds), newest first: the measured service times of wait estimates."""
        ...

    async def claim_delivery(self, worker: str, lease_until: float, now: float) -> Job | None:
        """A final job whose webhook is pending and due (`next_attempt_at <= now`) with no live delivery lease,
        its outbox entry leased to `worker` (`Job.delivery_claimed`); None when there is none. The lease is
        released by recording the attempt (`Job.with_delivery` through `update`)."""
        ...

    async def acquire_lock(self, name: str, holder: str, until: float, now: float) -> bool:
        """A named lease for a chore one replica at a time does (retention): True when `holder` now holds `name`
        until `until` (it was free, expired, or already `holder`'s)."""
        ...

    async def unfinished(self) -> list[Job]:
        """Queued or processing jobs, oldest first (restart recovery)."""
        ...

    async def undelivered(self) -> list[Job]:
        """Finished jobs whose webhook is still pending (restart recovery)."""
        ...

    async def expired(self, before: str, limit: int) -> list[Job]:
        """At most `limit` finished jobs completed before `before` whose webhook is settled, oldest first
        (retention purges them a batch at a time: never every expired row in memory at once)."""
        ...

    async def webhook_secrets(self, owner: str) -> SigningSecrets | None:
        """The owner's webhook secrets; None before the first need."""
        ...

    async def put_webhook_secrets(self, proposed: SigningSecrets) -> SigningSecrets:
        """Compare-and-set: store `proposed` if the owner has none (`version` 1) or its stored version is
        `proposed.version - 1`; return what is stored afterwards (the winner's when the race was lost)."""
        ...

    async def delete(self, job_id: str) -> None: ...

    async def close(self) -> None: ...


Transition = Callable[[Job], Job | None]


async def transition(store: JobStore, job: Job, change: Transition, *, max_rounds: int = 16) -> tuple[Job, bool]:
    """Apply `change` with compare-and-set, re-reading on a lost race: returns (stored job, whether it applied).

    `change` returns the new job, or None when it does not apply to the current state (the caller then sees
    the winner's copy and `False`). Each round re-evaluates on the freshest copy, so the decision is always
    made on what is stored, never on a stale read.
    """
    current: Job | None = job
    fresh = False  # `job` may be an old read: a "does not apply" verdict on it is confirmed on a fresh copy
    for _ in range(max_rounds):
        if current is None:
            raise StaleJob(None)
        proposed = change(current)
        if proposed is None:
            if fresh:
                return current, False
            current, fresh = await store.get(current.id), True
            continue
        try:
            return await store.update(proposed), True
        except StaleJob as lost:
            current, fresh = lost.current, True
    raise StaleJob(current)  # a job contended past max_rounds is a bug worth a loud failure
