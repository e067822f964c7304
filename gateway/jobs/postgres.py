"""The shared job store: PostgreSQL, for several gateway replicas working from one queue.

`PostgresJobStore` keeps the `JobStore` contract (gateway/jobs/store.py) with psycopg 3's async driver and a
bounded connection pool. The job itself is stored as JSON (`data`, jsonb) and every field a query filters on
has its own column, written from the same `Job` in the same statement. Rules:

- Every write is a compare-and-set on `version` (`UPDATE ... WHERE id = %s AND version = %s`); a miss raises
  `StaleJob` with the stored copy.
- Lease operations (`claim`, `renew`, `release`, `claim_next`, `claim_delivery`) lock the row
  (`SELECT ... FOR UPDATE`, with `SKIP LOCKED` where the store picks the row), compute the new job with the
  pure transition of `Job` in Python, and write it in the same transaction: the SQL never re-implements a
  state change, and concurrent replicas never get the same job nor wait on each other's locks.
- Job lease times are the database's clock, never a replica's: `claim`, `renew` and `claim_next` read
  `clock_timestamp()` once the row is locked and add the lease's duration; `expired_leases` compares with
  `now()`. A replica whose clock runs ahead does not take live leases over.
- Idempotency is a unique index on (owner, idempotency_key): `INSERT ... ON CONFLICT DO NOTHING`, then the
  winner is read, so concurrent retries on different replicas create one job.
- The fair queue (see gateway/jobs/store.py): `create` takes the owner's share with one upsert of its
  `fair_shares` row (`... DO UPDATE ... RETURNING`), whose row lock serialises that owner's creates, in a
  savepoint that a duplicate rolls back; `claim_next` moves its priority's `fair_clock` row in its transaction.
- psycopg's and the pool's exceptions become `StoreUnavailable` in `_transaction`, and nowhere else.
- The schema is a list of versioned migrations applied under a transaction-scoped advisory lock, so replicas
  starting together apply it once (the others wait, then find it done).

`PostgresEvents` is the `JobEvents` bus on `LISTEN/NOTIFY`: one listening connection per process, reconnected
with backoff; publishing borrows a pooled connection. Events are hints (see gateway/jobs/events.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Final

import psycopg
from psycopg import AsyncConnection, AsyncCursor, sql
from psycopg_pool import AsyncConnectionPool

from gateway.errors import StoreUnavailable
from gateway.jobs.events import EventHandler, JobEvent
from gateway.jobs.model import (
    CANCELED,
    COMPLETED,
    FAILED,
    PROCESSING,
    QUEUED,
    Job,
    WebhookEvent,
    WebhookStatus,
    job_from_json,
    job_to_json,
    now_iso,
)
from gateway.jobs.store import FinishedWork, IdempotencyConflict, QueuePlace, StaleJob, scheduling_columns
from gateway.jobs.webhooks import SigningSecrets

log = logging.getLogger(__name__)

Row = tuple[Any, ...]
Cursor = AsyncCursor[Row]

CHANNEL: Final = "imagen_jobs"
# pg_advisory_xact_lock key of the schema migrations (b"imagen" as an integer): one per database.
MIGRATION_LOCK: Final = 0x696D6167656E
# A migration may wait for another replica's migration, and may rewrite rows: it gets its own, longer timeout.
MIGRATION_TIMEOUT_S: Final = 300.0

_FINAL = (COMPLETED, FAILED, CANCELED)

# Each entry is one schema version (its 1-based index); never edit one that has shipped, append a new one.
MIGRATIONS: Final[tuple[str, ...]] = (
    """
    CREATE TABLE jobs (
        id text PRIMARY KEY,
        seq bigint GENERATED ALWAYS AS IDENTITY,  -- insertion order: breaks ties of created_at
        owner text NOT NULL,
        status text NOT NULL,
        created_at timestamptz NOT NULL,
        completed_at timestamptz,
        idempotency_key text,
        version bigint NOT NULL,
        lease_owner text,
        lease_expires_at double precision,
        not_before double precision NOT NULL DEFAULT 0,
        webhook_status text,
        webhook_next_at double precision,
        webhook_lease_owner text,
        webhook_lease_until double precision,
        data jsonb NOT NULL
    );
    -- create: one job per (owner, key); the arbiter of INSERT ... ON CONFLICT.
    CREATE UNIQUE INDEX jobs_idempotency ON jobs (owner, idempotency_key) WHERE idempotency_key IS NOT NULL;
    -- claim_next (oldest due), count_queued, queue_position.
    CREATE INDEX jobs_queue ON jobs (created_at, seq) INCLUDE (not_before) WHERE status = 'queued';
    -- expired_leases.
    CREATE INDEX jobs_leases ON jobs (lease_expires_at) WHERE status = 'processing';
    -- unfinished (restart recovery).
    CREATE INDEX jobs_unfinished ON jobs (created_at, seq) WHERE status IN ('queued', 'processing');
    -- claim_delivery, undelivered: the webhook outbox.
    CREATE INDEX jobs_outbox ON jobs (webhook_next_at) WHERE webhook_status = 'pending';
    -- expired (retention).
    CREATE INDEX jobs_completed ON jobs (completed_at) WHERE completed_at IS NOT NULL;
    CREATE TABLE locks (
        name text PRIMARY KEY,
        holder text NOT NULL,
        until double precision NOT NULL
    );
    """,
    # 2. Fairness between keys: count_active (the per-key cap) and claim_next's active jobs per owner.
    """
    CREATE INDEX jobs_owner_active ON jobs (owner, status) WHERE status IN ('queued', 'processing');
    """,
    # 3. Standard Webhooks: the event an outbox entry delivers (`start` is due while the job runs), and each
    # owner's signing secrets (the previous one signs beside the current until `previous_until`).
    """
    ALTER TABLE jobs ADD COLUMN webhook_event text;
    CREATE TABLE webhook_secrets (
        owner text PRIMARY KEY,
        version bigint NOT NULL,
        current text NOT NULL,
        previous text,
        previous_until double precision NOT NULL DEFAULT 0
    );
    """,
    # 4. Issue 24: priorities and the fair queue (start-time fair queuing: each priority's virtual clock, each
    # (owner, priority)'s virtual finish), the queue deadline (NULL unless queued), the exact-result cache, and
    # wait estimates (`work`, `started_at`). Queued rows get their work from their spec (images x steps, twice
    # with guidance: `JobSpec.work`); the other new columns are what existing rows' JSON reads back as.
    """
    ALTER TABLE jobs ADD COLUMN priority integer NOT NULL DEFAULT 1;
    ALTER TABLE jobs ADD COLUMN fair_tag double precision NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN queue_deadline double precision;
    ALTER TABLE jobs ADD COLUMN result_key text;
    ALTER TABLE jobs ADD COLUMN work double precision NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN started_at double precision;
    UPDATE jobs SET work = (data->'spec'->>'num_images')::float8 * (data->'spec'->>'effective_steps')::float8
        * CASE WHEN (data->'spec'->>'guidance_scale')::float8 > 1 THEN 2 ELSE 1 END
        WHERE status = 'queued';
    -- claim_next (the fair queue's order), queue_place, count_queued; replaces jobs_queue (oldest first).
    CREATE INDEX jobs_fair_queue ON jobs (priority DESC, fair_tag, created_at, seq)
        INCLUDE (not_before, queue_deadline, work) WHERE status = 'queued';
    DROP INDEX jobs_queue;
    -- overdue_in_queue: the deadline sweep (the column is set on queued jobs only).
    CREATE INDEX jobs_queue_deadline ON jobs (queue_deadline) WHERE queue_deadline IS NOT NULL;
    -- find_result: the exact-result cache.
    CREATE INDEX jobs_result ON jobs (owner, result_key) WHERE result_key IS NOT NULL;
    -- recent_finished: completed jobs a worker ran, newest first.
    CREATE INDEX jobs_ran ON jobs (completed_at) WHERE status = 'completed' AND started_at IS NOT NULL;
    CREATE TABLE fair_clock (
        priority integer PRIMARY KEY,
        v double precision NOT NULL
    );
    INSERT INTO fair_clock (priority, v) VALUES (0, 0), (1, 0), (2, 0);
    CREATE TABLE fair_shares (
        owner text NOT NULL,
        priority integer NOT NULL,
        finish double precision NOT NULL,
        PRIMARY KEY (owner, priority)
    );
    """,
)
SCHEMA_VERSION: Final = len(MIGRATIONS)

_CREATE_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""

_INSERT = (
    "INSERT INTO jobs (id, owner, created_at, idempotency_key, status, completed_at, version, lease_owner,"
    " lease_expires_at, not_before, webhook_status, webhook_next_at, webhook_lease_owner, webhook_lease_until,"
    " webhook_event, priority, fair_tag, queue_deadline, result_key, work, started_at, data) VALUES"
    " (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb)"
    " ON CONFLICT DO NOTHING RETURNING version"
)
_UPDATE = (
    "UPDATE jobs SET status = %s, completed_at = %s, version = %s, lease_owner = %s, lease_expires_at = %s,"
    " not_before = %s, webhook_status = %s, webhook_next_at = %s, webhook_lease_owner = %s,"
    " webhook_lease_until = %s, webhook_event = %s, priority = %s, fair_tag = %s, queue_deadline = %s,"
    " result_key = %s, work = %s, started_at = %s, data = %s::jsonb WHERE id = %s AND version = %s"
)
_SELECT = "SELECT data::text, version FROM jobs"
# Start-time fair queuing (`create`): the owner's share row, inserted or moved on, answers the new job's tag
# `max(V[priority], finish)` (missing rows: 0) and becomes `tag + share`; its row lock serialises concurrent
# creates of one owner at one priority. (`EXCLUDED.finish` is `V + share`: `max(finish, V) + share` is
# `max(finish + share, EXCLUDED.finish)`.)
_TAKE_SHARE = (
    "INSERT INTO fair_shares AS s (owner, priority, finish) VALUES"
    " (%(owner)s, %(priority)s, COALESCE((SELECT v FROM fair_clock WHERE priority = %(priority)s), 0) + %(share)s)"
    " ON CONFLICT (owner, priority) DO UPDATE SET finish = GREATEST(s.finish + %(share)s, EXCLUDED.finish)"
    " RETURNING finish - %(share)s"
)
# claim_next: the claimed job's priority's virtual clock moves to its tag. Only a claim that moves it locks the
# row (one that does not is filtered out before the lock), so claims wait on each other only while advancing.
_ADVANCE_CLOCK = "UPDATE fair_clock SET v = %(tag)s WHERE priority = %(priority)s AND v < %(tag)s"
_FIRST_CLOCK = (  # a priority without a clock row yet (the migration made 0, 1 and 2)
    "INSERT INTO fair_clock (priority, v) SELECT %(priority)s, %(tag)s"
    " WHERE NOT EXISTS (SELECT 1 FROM fair_clock WHERE priority = %(priority)s)"
    " ON CONFLICT (priority) DO UPDATE SET v = GREATEST(fair_clock.v, EXCLUDED.v)"
)
# claim_next: the fair queue's order. The new queries name statuses literally ('queued' is `QUEUED`), so the
# planner matches the partial indexes in generic plans too.
_CLAIM_NEXT = (
    f"{_SELECT} WHERE status = 'queued' AND priority >= %s AND not_before <= %s"
    " AND (queue_deadline IS NULL OR queue_deadline > %s)"
    " ORDER BY priority DESC, fair_tag, created_at, seq LIMIT 1 FOR UPDATE SKIP LOCKED"
)


def _mutable(job: Job) -> tuple[Any, ...]:
    """The columns a write changes, in `_UPDATE`'s order (`scheduling_columns`' shared with SQLite)."""
    hook = job.webhook
    return (
        job.status,
        job.completed_at,
        job.version,
        job.lease.owner if job.lease else None,
        job.lease.expires_at if job.lease else None,
        job.not_before,
        hook.status if hook else None,
        hook.next_attempt_at if hook else None,
        hook.lease.owner if hook and hook.lease else None,
        hook.lease.expires_at if hook and hook.lease else None,
        hook.event if hook else None,
        *scheduling_columns(job),
        job_to_json(job).decode(),
    )


def _load(row: Row | None) -> Job | None:
    return None if row is None else job_from_json(row[0], version=row[1])


async def _one(cur: Cursor, query: str, args: tuple[Any, ...] = ()) -> Job | None:
    await cur.execute(query.encode(), args)
    return _load(await cur.fetchone())


async def _db_clock(cur: Cursor) -> float:
    """The database server's clock, epoch seconds, read now (`clock_timestamp()`, not the transaction's start:
    read after a row lock was granted, a wait for it does not shorten the lease)."""
    await cur.execute(b"SELECT extract(epoch FROM clock_timestamp())::float8")
    row = await cur.fetchone()
    if row is None:  # one row, always
        raise _unavailable()
    return float(row[0])


async def migrate(conn: AsyncConnection[Row]) -> list[int]:
    """Apply the migrations this database lacks, in one transaction under the migration advisory lock; returns
    the versions applied (empty when another replica did it first: it held the lock, this one waited)."""
    applied: list[int] = []
    async with conn.transaction():
        timeout_ms = int(MIGRATION_TIMEOUT_S * 1000)
        await conn.execute(f"SET LOCAL statement_timeout = {timeout_ms}".encode())
        await conn.execute(b"SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        await conn.execute(_CREATE_MIGRATIONS_TABLE.encode())
        cur = await conn.execute(b"SELECT version FROM schema_migrations")
        done = {row[0] for row in await cur.fetchall()}
        if done and max(done) > SCHEMA_VERSION:
            log.warning("job store schema %d is newer than this gateway's %d", max(done), SCHEMA_VERSION)
        for version, script in enumerate(MIGRATIONS, start=1):
            if version in done:
                continue
            await conn.execute(script.encode())  # no parameters: several statements in one call are allowed
            await conn.execute(b"INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
            applied.append(version)
    if applied:
        log.info("job store schema migrated to version %d (applied %s)", SCHEMA_VERSION, applied)
    return applied


async def _secrets(cur: Cursor, owner: str) -> SigningSecrets | None:
    await cur.execute(
        b"SELECT version, current, previous, previous_until FROM webhook_secrets WHERE owner = %s", (owner,)
    )
    row = await cur.fetchone()
    return None if row is None else SigningSecrets(owner, row[1], row[2], float(row[3]), int(row[0]))


def _unavailable() -> StoreUnavailable:
    return StoreUnavailable("The job store is unavailable", "Retry the request later")


class PostgresJobStore:
    """`JobStore` on PostgreSQL (see the module docstring). Build it with `await PostgresJobStore.open(url)`."""

    exclusive = False

    def __init__(self, pool: AsyncConnectionPool[AsyncConnection[Row]]) -> None:
        self._pool = pool

    @property
    def pool(self) -> AsyncConnectionPool[AsyncConnection[Row]]:
        return self._pool

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout_s: float = 5.0,
        statement_timeout_s: float = 5.0,
        pool_timeout_s: float = 5.0,
        application_name: str = "imagen-gateway",
    ) -> PostgresJobStore:
        """Open the pool (waiting for `min_size` connections) and migrate the schema. Raises StoreUnavailable
        when the server does not answer within `connect_timeout_s`."""
        options = (
            f"-c statement_timeout={int(statement_timeout_s * 1000)}"
            f" -c idle_in_transaction_session_timeout={int(max(60.0, 4 * statement_timeout_s) * 1000)}"
        )
        pool: AsyncConnectionPool[AsyncConnection[Row]] = AsyncConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            timeout=pool_timeout_s,
            open=False,
            name="imagen-jobs",
            check=AsyncConnectionPool.check_connection,  # a connection the server dropped is replaced, not used
            kwargs={
                "connect_timeout": max(1, round(connect_timeout_s)),
                "options": options,
                "application_name": application_name,
            },
        )
        try:
            await pool.open(wait=True, timeout=connect_timeout_s)
            async with pool.connection() as conn:
                await migrate(conn)
        except psycopg.Error as exc:
            await pool.close()
            log.warning("job store unavailable at open: %s", exc)
            raise _unavailable() from exc
        except BaseException:
            await pool.close()
            raise
        return cls(pool)

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Cursor]:
        """One pooled connection, one transaction (committed on exit, rolled back on error): the one boundary
        where the driver's and the pool's exceptions become StoreUnavailable."""
        try:
            async with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                yield cur
        except psycopg.OperationalError as exc:  # connection lost, server down, timeouts, pool timeout/closed
            log.warning("job store unavailable: %s", exc)
            raise _unavailable() from exc
        except psycopg.Error as exc:  # anything else the driver raises is a bug here: loud, but still ours
            log.error("job store error: %s", exc, exc_info=True)
            raise _unavailable() from exc

    # --- create and reads -----------------------------------------------------------------------------------

    async def create(self, job: Job, *, share: float = 1.0) -> Job:
        async with self._transaction() as cur:
            # A queued job takes its share in a savepoint, undone when the insert finds the job already there
            # (an idempotent duplicate takes none). The share row is locked before the insert: creates of one
            # owner take their tags, and commit, one at a time.
            stored = dataclasses.replace(job, version=1)
            if job.status == QUEUED:
                await cur.execute(b"SAVEPOINT take_share")
                args = {"owner": job.owner, "priority": job.spec.priority, "share": float(share)}
                await cur.execute(_TAKE_SHARE.encode(), args)
                row = await cur.fetchone()
                if row is None:  # one row, always
                    raise _unavailable()
                stored = dataclasses.replace(stored, fair_tag=float(row[0]))
            await cur.execute(
                _INSERT.encode(),
                (stored.id, stored.owner, stored.created_at, stored.idempotency_key, *_mutable(stored)),
            )
            if await cur.fetchone() is not None:
                return stored
            if job.status == QUEUED:
                await cur.execute(b"ROLLBACK TO SAVEPOINT take_share")
            # ON CONFLICT DO NOTHING: a concurrent insert of the same key waited for the winner's commit, so
            # the winner is visible to this (read committed) statement.
            if job.idempotency_key is not None:
                winner = await _one(
                    cur, f"{_SELECT} WHERE owner = %s AND idempotency_key = %s", (job.owner, job.idempotency_key)
                )
                if winner is not None:
                    if winner.request_hash != job.request_hash:
                        raise IdempotencyConflict(job.idempotency_key)
                    return winner
            same_id = await _one(cur, f"{_SELECT} WHERE id = %s", (job.id,))
        if same_id is not None and (same_id.owner, same_id.created_at, same_id.request_hash) == (
            job.owner,
            job.created_at,
            job.request_hash,
        ):
            return same_id  # this very create, retried after its commit's answer was lost
        log.error("job store: duplicate job id %s", job.id)
        raise StoreUnavailable("The job store is unavailable", f"duplicate job id {job.id}")

    async def get(self, job_id: str) -> Job | None:
        async with self._transaction() as cur:
            return await _one(cur, f"{_SELECT} WHERE id = %s", (job_id,))

    async def get_idempotent(self, owner: str, key: str) -> Job | None:
        async with self._transaction() as cur:
            return await _one(cur, f"{_SELECT} WHERE owner = %s AND idempotency_key = %s", (owner, key))

    async def _select(self, query: str, args: tuple[Any, ...] = ()) -> list[Job]:
        async with self._transaction() as cur:
            await cur.execute(query.encode(), args)
            rows = await cur.fetchall()
        return [job for job in map(_load, rows) if job is not None]

    async def unfinished(self) -> list[Job]:
        return await self._select(f"{_SELECT} WHERE status IN (%s, %s) ORDER BY created_at, seq", (QUEUED, PROCESSING))

    async def undelivered(self) -> list[Job]:
        return await self._select(
            f"{_SELECT} WHERE webhook_status = %s AND status IN (%s, %s, %s) ORDER BY created_at, seq",
            (WebhookStatus.PENDING, *_FINAL),
        )

    async def expired(self, before: str, limit: int) -> list[Job]:
        return await self._select(
            f"{_SELECT} WHERE completed_at IS NOT NULL AND completed_at < %s::timestamptz"
            " AND (webhook_status IS NULL OR webhook_status != %s) ORDER BY completed_at, id LIMIT %s",
            (before, WebhookStatus.PENDING, limit),
        )

    async def expired_leases(self, limit: int) -> list[Job]:
        # A processing job without a lease (none should exist) can be finished by nobody: an orphan too. `now()`
        # is the database's clock (this statement's transaction's start), the one `claim`/`renew` lease by.
        return await self._select(
            f"{_SELECT} WHERE status = %s"
            " AND (lease_expires_at IS NULL OR lease_expires_at < extract(epoch FROM now())::float8)"
            " ORDER BY created_at, seq LIMIT %s",
            (PROCESSING, limit),
        )

    async def count_queued(self) -> int:
        async with self._transaction() as cur:
            await cur.execute(b"SELECT count(*) FROM jobs WHERE status = %s", (QUEUED,))
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def count_active(self, owner: str) -> int:
        async with self._transaction() as cur:
            await cur.execute(
                b"SELECT count(*) FROM jobs WHERE owner = %s AND status IN (%s, %s)", (owner, QUEUED, PROCESSING)
            )
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def queue_place(self, job: Job) -> QueuePlace | None:
        """Counted on the stored row: None when the stored job is no longer queued. Ties are broken as
        `claim_next` breaks them (`created_at`, then insertion order)."""
        async with self._transaction() as cur:
            await cur.execute(
                b"SELECT 1 + count(q.id), COALESCE(sum(q.work), 0) FROM jobs j LEFT JOIN jobs q"
                b" ON q.status = 'queued' AND (q.priority > j.priority OR (q.priority = j.priority"
                b" AND (q.fair_tag, q.created_at, q.seq) < (j.fair_tag, j.created_at, j.seq)))"
                b" WHERE j.id = %s AND j.status = 'queued' GROUP BY j.id",
                (job.id,),
            )
            row = await cur.fetchone()
        return None if row is None else QueuePlace(int(row[0]), float(row[1]))

    async def count_queued_by_priority(self) -> dict[int, int]:
        async with self._transaction() as cur:
            await cur.execute(b"SELECT priority, count(*) FROM jobs WHERE status = 'queued' GROUP BY priority")
            rows = await cur.fetchall()
        return {int(priority): int(count) for priority, count in rows}

    async def overdue_in_queue(self, now: float, limit: int) -> list[Job]:
        return await self._select(
            f"{_SELECT} WHERE queue_deadline <= %s AND status = 'queued' ORDER BY created_at, seq LIMIT %s",
            (now, limit),
        )

    async def find_result(self, owner: str, result_key: str) -> Job | None:
        found = await self._select(
            f"{_SELECT} WHERE owner = %s AND result_key = %s AND status = %s"
            " ORDER BY completed_at DESC, seq DESC LIMIT 1",
            (owner, result_key, COMPLETED),
        )
        return found[0] if found else None

    async def recent_finished(self, since: float, limit: int) -> list[FinishedWork]:
        async with self._transaction() as cur:
            await cur.execute(
                b"SELECT data->'spec'->>'model', work, started_at, extract(epoch FROM completed_at)::float8"
                b" FROM jobs WHERE status = 'completed' AND started_at IS NOT NULL"
                b" AND completed_at >= to_timestamp(%s) ORDER BY completed_at DESC LIMIT %s",
                (since, limit),
            )
            rows = await cur.fetchall()
        return [
            FinishedWork(str(model), float(work), float(started), float(done)) for model, work, started, done in rows
        ]

    # --- writes ---------------------------------------------------------------------------------------------

    async def _write(self, cur: Cursor, job: Job) -> Job:
        """Compare-and-set: write `job` with the next version if the row still has `job.version`."""
        stored = dataclasses.replace(job, version=job.version + 1, updated_at=now_iso())
        await cur.execute(_UPDATE.encode(), (*_mutable(stored), job.id, job.version))
        if cur.rowcount != 1:
            raise StaleJob(await _one(cur, f"{_SELECT} WHERE id = %s", (job.id,)))
        return stored

    async def update(self, job: Job) -> Job:
        async with self._transaction() as cur:
            return await self._write(cur, job)

    async def _conditional(self, job_id: str, change: Callable[[Job], Job | None]) -> Job | None:
        """Lock the row, apply `change` (a `Job` transition) and write the result in one transaction."""
        async with self._transaction() as cur:
            job = await _one(cur, f"{_SELECT} WHERE id = %s FOR UPDATE", (job_id,))
            proposed = None if job is None else change(job)
            return None if proposed is None else await self._write(cur, proposed)

    async def _lease(
        self, query: str, args: tuple[Any, ...], lease_s: float, change: Callable[[Job, float], Job | None]
    ) -> Job | None:
        """Lock the first row `query` (`... FOR UPDATE [SKIP LOCKED]`) finds, then apply `change(job, lease_until)`
        with `lease_until` `lease_s` past the database's clock, and write it, in one transaction."""
        async with self._transaction() as cur:
            job = await _one(cur, query, args)
            if job is None:
                return None
            proposed = change(job, await _db_clock(cur) + lease_s)
            return None if proposed is None else await self._write(cur, proposed)

    async def _take(self, query: str, args: tuple[Any, ...], change: Callable[[Job], Job | None]) -> Job | None:
        """Lock the first row `query` (`... FOR UPDATE SKIP LOCKED LIMIT 1`) finds, apply `change`, write."""
        async with self._transaction() as cur:
            job = await _one(cur, query, args)
            proposed = None if job is None else change(job)
            return None if proposed is None else await self._write(cur, proposed)

    async def claim(self, job_id: str, worker: str, lease_s: float) -> Job | None:
        return await self._lease(
            f"{_SELECT} WHERE id = %s FOR UPDATE", (job_id,), lease_s, lambda job, until: job.claimed(worker, until)
        )

    async def renew(self, job_id: str, worker: str, claim: str, lease_s: float) -> Job | None:
        return await self._lease(
            f"{_SELECT} WHERE id = %s FOR UPDATE",
            (job_id,),
            lease_s,
            lambda job, until: job.renewed(worker, claim, until),
        )

    async def release(self, job_id: str, worker: str, claim: str, not_before: float = 0.0) -> Job | None:
        return await self._conditional(job_id, lambda job: job.released(worker, claim, not_before))

    async def claim_next(self, worker: str, lease_s: float, now: float, *, min_priority: int = 0) -> Job | None:
        """The first due job in the fair queue's order (see `JobStore.claim_next`), skipping rows other
        replicas hold; its priority's virtual clock moves to its tag in the same transaction."""
        async with self._transaction() as cur:
            job = await _one(cur, _CLAIM_NEXT, (min_priority, now, now))
            if job is None:
                return None
            proposed = job.claimed(worker, await _db_clock(cur) + lease_s)
            if proposed is None:
                return None
            clock = {"priority": proposed.spec.priority, "tag": proposed.fair_tag}
            await cur.execute(_ADVANCE_CLOCK.encode(), clock)
            if cur.rowcount == 0:
                await cur.execute(_FIRST_CLOCK.encode(), clock)
            return await self._write(cur, proposed)

    async def claim_delivery(self, worker: str, lease_until: float, now: float) -> Job | None:
        return await self._take(
            f"{_SELECT} WHERE webhook_status = %s AND (status IN (%s, %s, %s) OR (status = %s AND webhook_event = %s))"
            " AND webhook_next_at <= %s AND (webhook_lease_until IS NULL OR webhook_lease_until <= %s)"
            " ORDER BY webhook_next_at, created_at, seq LIMIT 1 FOR UPDATE SKIP LOCKED",
            (WebhookStatus.PENDING, *_FINAL, PROCESSING, WebhookEvent.START, now, now),
            lambda job: job.delivery_claimed(worker, lease_until, now),
        )

    async def acquire_lock(self, name: str, holder: str, until: float, now: float) -> bool:
        async with self._transaction() as cur:
            await cur.execute(
                b"INSERT INTO locks (name, holder, until) VALUES (%s, %s, %s)"
                b" ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, until = EXCLUDED.until"
                b" WHERE locks.holder = EXCLUDED.holder OR locks.until <= %s RETURNING holder",
                (name, holder, until, now),
            )
            return await cur.fetchone() is not None

    async def webhook_secrets(self, owner: str) -> SigningSecrets | None:
        async with self._transaction() as cur:
            return await _secrets(cur, owner)

    async def put_webhook_secrets(self, proposed: SigningSecrets) -> SigningSecrets:
        p = proposed
        async with self._transaction() as cur:
            if p.version == 1:  # concurrent first needs: one insert wins, the others read it
                await cur.execute(
                    b"INSERT INTO webhook_secrets (owner, version, current, previous, previous_until)"
                    b" VALUES (%s, %s, %s, %s, %s) ON CONFLICT (owner) DO NOTHING",
                    (p.owner, p.version, p.current, p.previous, p.previous_until),
                )
            else:  # a rotation: the row lock makes a concurrent one wait, then miss the version
                await cur.execute(
                    b"UPDATE webhook_secrets SET version = %s, current = %s, previous = %s, previous_until = %s"
                    b" WHERE owner = %s AND version = %s",
                    (p.version, p.current, p.previous, p.previous_until, p.owner, p.version - 1),
                )
            stored = await _secrets(cur, p.owner)
        if stored is None:
            log.error("job store: no webhook secrets for owner %s after a write", p.owner[:12])
            raise _unavailable()
        return stored

    async def delete(self, job_id: str) -> None:
        async with self._transaction() as cur:
            await cur.execute(b"DELETE FROM jobs WHERE id = %s", (job_id,))

    async def close(self) -> None:
        await self._pool.close()


class PostgresEvents:
    """`JobEvents` on PostgreSQL `LISTEN/NOTIFY` (channel `imagen_jobs`).

    `publish` runs `SELECT pg_notify(...)` on a connection borrowed from `pool` (the store's, shared: pass
    `owns_pool=False`), waiting at most `publish_timeout_s` for one; failures are logged and swallowed.
    `start` opens ONE dedicated listening connection in a background task, which delivers decoded events to
    the handler (malformed payloads are ignored), pings the server every `ping_s` of silence (a dead peer is
    noticed without TCP's help) and reconnects with exponential backoff and jitter when the connection drops.
    Notifications sent while it is disconnected are lost: events are hints, the store is the truth.
    """

    def __init__(
        self,
        url: str,
        pool: AsyncConnectionPool[AsyncConnection[Row]],
        *,
        owns_pool: bool = False,
        channel: str = CHANNEL,
        publish_timeout_s: float = 1.0,
        connect_timeout_s: float = 5.0,
        ping_s: float = 30.0,
        reconnect_min_s: float = 0.1,
        reconnect_max_s: float = 10.0,
        application_name: str = "imagen-events",
    ) -> None:
        self._url = url
        self._pool = pool
        self._owns_pool = owns_pool
        self._channel = channel
        self._publish_timeout_s = publish_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._ping_s = ping_s
        self._reconnect_min_s = reconnect_min_s
        self._reconnect_max_s = reconnect_max_s
        self._application_name = application_name
        self._handler: EventHandler | None = None
        self._task: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        self.connects = 0  # successful LISTENs so far (observability, tests)

    @property
    def listening(self) -> bool:
        return self._listening.is_set()

    async def start(self, handler: EventHandler) -> None:
        """Start listening; returns once LISTEN is in place (or after `connect_timeout_s`, the task retrying)."""
        self._handler = handler
        if self._task is None:
            self._task = asyncio.create_task(self._listen(), name="imagen-events-listen")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listening.wait(), self._connect_timeout_s)
        if not self._listening.is_set():
            log.warning("job events: not listening yet, retrying in the background")

    async def publish(self, event: JobEvent) -> None:
        try:
            async with self._pool.connection(timeout=self._publish_timeout_s) as conn:
                await conn.execute(b"SELECT pg_notify(%s, %s)", (self._channel, event.encode()))
        except (psycopg.Error, OSError) as exc:
            log.warning("job events: publish of %s failed: %s", event, exc)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._handler = None
        if self._owns_pool:
            await self._pool.close()

    async def _listen(self) -> None:
        delay = self._reconnect_min_s
        while True:
            connects = self.connects
            try:
                await self._listen_once()
            except (psycopg.Error, OSError, TimeoutError) as exc:
                log.warning("job events: listen connection lost (%s); reconnecting", exc)
            except Exception:  # a bug must not end the listener for good
                log.exception("job events: listener failed; reconnecting")
            finally:
                self._listening.clear()
            if self.connects > connects:
                delay = self._reconnect_min_s  # it was listening: retry at once; backoff is for failed connects
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))  # noqa: S311 (jitter, not a secret)
            delay = min(delay * 2, self._reconnect_max_s)

    async def _listen_once(self) -> None:
        conn = await AsyncConnection.connect(
            self._url,
            autocommit=True,
            connect_timeout=max(1, round(self._connect_timeout_s)),
            application_name=self._application_name,
        )
        async with conn:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
            self.connects += 1
            self._listening.set()
            log.info("job events: listening on %s", self._channel)
            while True:
                async for notify in conn.notifies(timeout=self._ping_s):
                    self._deliver(notify.payload)
                async with asyncio.timeout(self._connect_timeout_s):
                    await conn.execute(b"SELECT 1")  # silence: make sure the peer is still there

    def _deliver(self, payload: str) -> None:
        event = JobEvent.decode(payload)
        if event is None:
            log.debug("job events: ignored a malformed payload %r", payload[:80])
            return
        handler = self._handler
        if handler is None:
            return
        try:
            handler(event)
        except Exception:
            log.exception("job events: handler failed on %s", event)
