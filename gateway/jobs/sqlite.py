"""The embedded job store: one SQLite file (WAL), for a gateway running as one process.

Every call runs on one dedicated thread (SQLite serialises writes anyway), so a slow or locked database
stalls job-store calls only, never the event loop or the threads that decode images. Every write is a
compare-and-set on `version` in the `WHERE`; sqlite3's exceptions become `StoreUnavailable` here and
nowhere else. The schema is versioned with `PRAGMA user_version`; each migration runs in one transaction.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from gateway.errors import StoreUnavailable
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
from gateway.observability import staged

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long one statement waits for a lock held by another connection before it reports the store unavailable
# (the runner then retries with backoff, so a longer lock delays jobs but loses none).
BUSY_TIMEOUT_S = 5.0
DB_FILE_MODE = 0o600  # the job store holds secrets and prompts: owner only
SCHEMA_VERSION = 6

_CREATE_V1 = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at TEXT NOT NULL,
    completed_at TEXT,
    idempotency_key TEXT,
    webhook_status TEXT,
    data TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs (owner, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, created_at);
"""
_MIGRATE_V2 = """
ALTER TABLE jobs ADD COLUMN version INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN lease_owner TEXT;
ALTER TABLE jobs ADD COLUMN lease_expires_at REAL;
"""
# The store became the queue (claim_next, retry delays) and the webhook outbox; named locks for chores.
_MIGRATE_V3 = """
ALTER TABLE jobs ADD COLUMN not_before REAL NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN webhook_next_at REAL NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN webhook_lease_until REAL;
CREATE INDEX IF NOT EXISTS jobs_outbox ON jobs (webhook_status, webhook_next_at);
CREATE TABLE IF NOT EXISTS locks (name TEXT PRIMARY KEY, holder TEXT NOT NULL, until REAL NOT NULL);
"""
# Fairness between keys: count_active (the per-key cap) and claim_next's active jobs per owner.
_MIGRATE_V4 = """
CREATE INDEX IF NOT EXISTS jobs_owner_status ON jobs (owner, status);
"""
# Standard Webhooks: the event an outbox entry delivers (`start` is due while the job runs), and each owner's
# signing secrets (the previous one signs beside the current until `previous_until`).
_MIGRATE_V5 = """
ALTER TABLE jobs ADD COLUMN webhook_event TEXT;
CREATE TABLE IF NOT EXISTS webhook_secrets (
    owner TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    current TEXT NOT NULL,
    previous TEXT,
    previous_until REAL NOT NULL DEFAULT 0
);
"""
# Issue 24: priorities and the fair queue (claim_next's order; `queue_deadline` is NULL unless queued), the
# exact-result cache, and wait estimates (`started_at`, `work`, and the completed jobs by `completed_at`). Each
# priority's virtual clock and each (owner, priority)'s virtual finish: start-time fair queuing (`create`).
_MIGRATE_V6 = """
ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 1;
ALTER TABLE jobs ADD COLUMN fair_tag REAL NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN queue_deadline REAL;
ALTER TABLE jobs ADD COLUMN result_key TEXT;
ALTER TABLE jobs ADD COLUMN work REAL NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN started_at REAL;
CREATE INDEX IF NOT EXISTS jobs_claim ON jobs (status, priority DESC, fair_tag, created_at);
CREATE INDEX IF NOT EXISTS jobs_result ON jobs (owner, result_key) WHERE result_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_queue_deadline ON jobs (status, queue_deadline) WHERE queue_deadline IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (status, completed_at);
CREATE TABLE IF NOT EXISTS fair_clock (priority INTEGER PRIMARY KEY, v REAL NOT NULL);
CREATE TABLE IF NOT EXISTS fair_shares (
    owner TEXT NOT NULL,
    priority INTEGER NOT NULL,
    finish REAL NOT NULL,
    PRIMARY KEY (owner, priority)
);
"""


def _legacy_to_v2(job_id: str, data: dict[str, Any]) -> dict[str, Any]:
    """Rows written before schema 2 kept the request as an untyped `params` dict; give them the typed spec."""
    params = data.pop("params")
    data["spec"] = {
        **{k: params[k] for k in ("prompt", "negative_prompt", "model", "strength", "steps", "guidance_scale")},
        **{k: params[k] for k in ("seed", "style", "num_images", "webhook_url", "processed_size", "effective_steps")},
        "asynchronous": bool(params.get("asynchronous", False)),
    }
    result = data.pop("result", None) or {}
    data["images"] = [{"name": f"{job_id}_{i}.png", **image} for i, image in enumerate(result.get("images", []))]
    return data


def _statements(script: str) -> list[str]:
    return [statement.strip() for statement in script.split(";") if statement.strip()]


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """`BEGIN IMMEDIATE` (take the write lock now, not at the first write) ... COMMIT, or ROLLBACK on error."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        with suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _take_share(db: sqlite3.Connection, owner: str, priority: int, share: float) -> float:
    """Start-time fair queuing: a new job's tag is the later of its priority's virtual clock and the owner's
    virtual finish (missing rows: 0); the owner's finish moves `share` past it. Called in create's transaction."""
    clock = db.execute("SELECT v FROM fair_clock WHERE priority = ?", (priority,)).fetchone()
    finish = db.execute("SELECT finish FROM fair_shares WHERE owner = ? AND priority = ?", (owner, priority)).fetchone()
    tag = max(clock[0] if clock else 0.0, finish[0] if finish else 0.0)
    db.execute(
        "INSERT INTO fair_shares (owner, priority, finish) VALUES (?, ?, ?)"
        " ON CONFLICT (owner, priority) DO UPDATE SET finish = excluded.finish",
        (owner, priority, tag + share),
    )
    return float(tag)


def _read_secrets(db: sqlite3.Connection, owner: str) -> SigningSecrets | None:
    row = db.execute(
        "SELECT version, current, previous, previous_until FROM webhook_secrets WHERE owner = ?", (owner,)
    ).fetchone()
    return None if row is None else SigningSecrets(owner, row[1], row[2], row[3], row[0])


# Every write sets these columns from the job (`SqliteJobStore._mutable_columns`, in this order).
_INSERT = (
    "INSERT INTO jobs (id, owner, created_at, idempotency_key, status, completed_at, webhook_status, data, version,"
    " lease_owner, lease_expires_at, not_before, webhook_next_at, webhook_lease_until, webhook_event, priority,"
    " fair_tag, queue_deadline, result_key, work, started_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_UPDATE = (
    "UPDATE jobs SET status = ?, completed_at = ?, webhook_status = ?, data = ?, version = ?, lease_owner = ?,"
    " lease_expires_at = ?, not_before = ?, webhook_next_at = ?, webhook_lease_until = ?, webhook_event = ?,"
    " priority = ?, fair_tag = ?, queue_deadline = ?, result_key = ?, work = ?, started_at = ?"
    " WHERE id = ? AND version = ?"
)


class StoreInUse(Exception):
    """Another live process holds this SQLite job store (SQLite serves one gateway process)."""


def _lock_exclusively(path: Path) -> int:
    """Hold an exclusive `flock` on `<db>.lock` for the process's life: a second gateway on the same file would
    re-run this one's jobs and send their webhooks twice. The kernel drops the lock when the process dies."""
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreInUse(
            f"the job store {path} is in use by another gateway process; SQLite serves one process: "
            "use PostgreSQL (IMAGEN_JOBS_DB=postgresql://...) to run several gateways"
        ) from None
    return fd


def _owner_only(path: Path) -> None:
    """The file (and its WAL and shared-memory files, which SQLite creates with the file's mode) readable by this
    user only: it holds every key's webhook secrets and every job's prompt. Created so when missing; an existing
    file is narrowed to it."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, DB_FILE_MODE))
    for name in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with suppress(FileNotFoundError):
            os.chmod(name, DB_FILE_MODE)


def check_not_in_use(path: Path) -> None:
    """Raise StoreInUse now if another process holds the store (the launcher's early, one-line refusal; the
    lock the store takes when it opens remains the guarantee)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(_lock_exclusively(path))


class SqliteJobStore:
    """`JobStore` on one SQLite file (see the module docstring)."""

    exclusive = True  # locked by this process at open: every unfinished job found at start is an orphan

    def __init__(self, path: Path, *, busy_timeout_s: float = BUSY_TIMEOUT_S) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock_exclusively(path)
        _owner_only(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobstore")
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=busy_timeout_s)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a job is on disk before its 202/200 (WAL fsync per commit)
            self._migrate()
        except sqlite3.Error:
            self._db.close()
            os.close(self._lock_fd)
            raise

    def _migrate(self) -> None:
        """Bring the file to SCHEMA_VERSION under one write lock: a second process starting at the same moment
        waits, then finds the work done (the version is re-read inside the transaction)."""
        with _transaction(self._db) as db:
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if version < 1:
                for statement in _statements(_CREATE_V1):
                    db.execute(statement)
            if version < 2:
                columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
                if "version" not in columns:
                    for statement in _statements(_MIGRATE_V2):
                        db.execute(statement)
                for job_id, raw in db.execute("SELECT id, data FROM jobs").fetchall():
                    data = json.loads(raw)
                    if "params" in data:
                        upgraded = json.dumps(_legacy_to_v2(job_id, data))
                        db.execute("UPDATE jobs SET data = ? WHERE id = ?", (upgraded, job_id))
            if version < 3:
                for statement in _statements(_MIGRATE_V3):
                    db.execute(statement)
            if version < 4:
                for statement in _statements(_MIGRATE_V4):
                    db.execute(statement)
            if version < 5:
                for statement in _statements(_MIGRATE_V5):
                    db.execute(statement)
            if version < 6:
                for statement in _statements(_MIGRATE_V6):
                    db.execute(statement)
                # Jobs still waiting carry their work (queue_place's `work_ahead`); the other new columns of
                # existing rows are what their JSON reads back as (the model's defaults).
                for job_id, raw, row_version in db.execute(
                    "SELECT id, data, version FROM jobs WHERE status = ?", (QUEUED,)
                ).fetchall():
                    work = job_from_json(raw, version=row_version).spec.work
                    db.execute("UPDATE jobs SET work = ? WHERE id = ?", (work, job_id))
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` on the store's thread; the one boundary where sqlite3 errors become ours."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, staged("job_store", fn), self._db)
        except sqlite3.Error as exc:
            log.warning("job store error: %s", exc)
            raise StoreUnavailable("The job store is unavailable", "Retry the request later") from exc

    @staticmethod
    def _load(row: tuple[Any, ...] | None) -> Job | None:
        return None if row is None else job_from_json(row[0], version=row[1])

    async def create(self, job: Job, *, share: float = 1.0) -> Job:
        def run(connection: sqlite3.Connection) -> Job:
            with _transaction(connection) as db:
                if job.idempotency_key is not None:
                    existing = self._load(
                        db.execute(
                            "SELECT data, version FROM jobs WHERE owner = ? AND idempotency_key = ?",
                            (job.owner, job.idempotency_key),
                        ).fetchone()
                    )
                    if existing is not None:
                        if existing.request_hash != job.request_hash:
                            raise IdempotencyConflict(job.idempotency_key)
                        return existing
                stored = replace(job, version=1)
                if job.status == QUEUED:
                    stored = replace(stored, fair_tag=_take_share(db, job.owner, job.spec.priority, share))
                db.execute(
                    _INSERT,
                    (
                        stored.id,
                        stored.owner,
                        stored.created_at,
                        stored.idempotency_key,
                        *self._mutable_columns(stored),
                    ),
                )
                return stored

        return await self._call(run)

    @staticmethod
    def _mutable_columns(job: Job) -> tuple[Any, ...]:
        """The columns a write sets, in `_UPDATE`'s order: those queries filter on, beside the JSON
        (`scheduling_columns`' shared with PostgreSQL)."""
        hook = job.webhook
        return (
            job.status,
            job.completed_at,
            hook.status if hook else None,
            job_to_json(job).decode(),
            job.version,
            job.lease.owner if job.lease else None,
            job.lease.expires_at if job.lease else None,
            job.not_before,
            hook.next_attempt_at if hook else 0.0,
            hook.lease.expires_at if hook and hook.lease else None,
            hook.event if hook else None,
            *scheduling_columns(job),
        )

    async def get(self, job_id: str) -> Job | None:
        return await self._call(
            lambda db: self._load(db.execute("SELECT data, version FROM jobs WHERE id = ?", (job_id,)).fetchone())
        )

    async def get_idempotent(self, owner: str, key: str) -> Job | None:
        return await self._call(
            lambda db: self._load(
                db.execute(
                    "SELECT data, version FROM jobs WHERE owner = ? AND idempotency_key = ?", (owner, key)
                ).fetchone()
            )
        )

    def _write(self, db: sqlite3.Connection, job: Job) -> Job:
        """Compare-and-set: write `job` with the next version if the row still has `job.version`."""
        stored = replace(job, version=job.version + 1, updated_at=now_iso())
        cursor = db.execute(
            _UPDATE,
            (*self._mutable_columns(stored), job.id, job.version),
        )
        if cursor.rowcount != 1:
            raise StaleJob(self._load(db.execute("SELECT data, version FROM jobs WHERE id = ?", (job.id,)).fetchone()))
        return stored

    async def update(self, job: Job) -> Job:
        return await self._call(lambda db: self._write(db, job))

    async def _conditional(self, job_id: str, change: Callable[[Job], Job | None]) -> Job | None:
        return await self._claim_first("SELECT data, version FROM jobs WHERE id = ?", (job_id,), change)

    # Lease times are the process's clock: one process uses this store (see `_lock_exclusively`).

    async def claim(self, job_id: str, worker: str, lease_s: float) -> Job | None:
        return await self._conditional(job_id, lambda job: job.claimed(worker, time.time() + lease_s))

    async def renew(self, job_id: str, worker: str, claim: str, lease_s: float) -> Job | None:
        return await self._conditional(job_id, lambda job: job.renewed(worker, claim, time.time() + lease_s))

    async def release(self, job_id: str, worker: str, claim: str, not_before: float = 0.0) -> Job | None:
        return await self._conditional(job_id, lambda job: job.released(worker, claim, not_before))

    async def _claim_first(self, select: str, args: tuple[Any, ...], change: Callable[[Job], Job | None]) -> Job | None:
        """Read the first row `select` finds and compare-and-set it in one write transaction (one process and
        one store thread: no other claimant can interleave)."""

        def run(connection: sqlite3.Connection) -> Job | None:
            with _transaction(connection) as db:
                job = self._load(db.execute(select, args).fetchone())
                proposed = None if job is None else change(job)
                return None if proposed is None else self._write(db, proposed)

        return await self._call(run)

    async def claim_next(self, worker: str, lease_s: float, now: float, *, min_priority: int = 0) -> Job | None:
        """The first due job in the fair queue's order (see `JobStore.claim_next`); its priority's virtual clock
        moves to its tag in the same transaction."""

        def run(connection: sqlite3.Connection) -> Job | None:
            with _transaction(connection) as db:
                job = self._load(
                    db.execute(
                        "SELECT data, version FROM jobs WHERE status = ? AND priority >= ? AND not_before <= ?"
                        " AND (queue_deadline IS NULL OR queue_deadline > ?)"
                        " ORDER BY priority DESC, fair_tag, created_at, rowid LIMIT 1",
                        (QUEUED, min_priority, now, now),
                    ).fetchone()
                )
                proposed = None if job is None else job.claimed(worker, time.time() + lease_s)
                if proposed is None:
                    return None
                db.execute(
                    "INSERT INTO fair_clock (priority, v) VALUES (?, ?)"
                    " ON CONFLICT (priority) DO UPDATE SET v = max(v, excluded.v)",
                    (proposed.spec.priority, proposed.fair_tag),
                )
                return self._write(db, proposed)

        return await self._call(run)

    async def claim_delivery(self, worker: str, lease_until: float, now: float) -> Job | None:
        return await self._claim_first(
            "SELECT data, version FROM jobs WHERE webhook_status = ? AND webhook_next_at <= ?"
            " AND (status IN (?, ?, ?) OR (status = ? AND webhook_event = ?))"
            " AND (webhook_lease_until IS NULL OR webhook_lease_until <= ?)"
            " ORDER BY webhook_next_at, created_at LIMIT 1",
            (WebhookStatus.PENDING, now, COMPLETED, FAILED, CANCELED, PROCESSING, WebhookEvent.START, now),
            lambda job: job.delivery_claimed(worker, lease_until, now),
        )

    async def expired_leases(self, limit: int) -> list[Job]:
        return await self._select(
            "SELECT data, version FROM jobs WHERE status = ? AND lease_expires_at < ?"
            " ORDER BY created_at, rowid LIMIT ?",
            (PROCESSING, time.time(), limit),
        )

    async def count_queued(self) -> int:
        rows = await self._call(
            lambda db: db.execute("SELECT COUNT(*) FROM jobs WHERE status = ?", (QUEUED,)).fetchall()
        )
        return int(rows[0][0])

    async def count_active(self, owner: str) -> int:
        rows = await self._call(
            lambda db: db.execute(
                "SELECT COUNT(*) FROM jobs WHERE owner = ? AND status IN (?, ?)", (owner, QUEUED, PROCESSING)
            ).fetchall()
        )
        return int(rows[0][0])

    async def queue_place(self, job: Job) -> QueuePlace | None:
        """Counted on the stored row: None when the stored job is no longer queued."""
        rows = await self._call(
            lambda db: db.execute(
                "SELECT 1 + COUNT(q.id), COALESCE(SUM(q.work), 0) FROM jobs j LEFT JOIN jobs q"
                " ON q.status = ? AND (q.priority > j.priority OR (q.priority = j.priority"
                " AND (q.fair_tag, q.created_at, q.rowid) < (j.fair_tag, j.created_at, j.rowid)))"
                " WHERE j.id = ? AND j.status = ? GROUP BY j.id",
                (QUEUED, job.id, QUEUED),
            ).fetchall()
        )
        return QueuePlace(int(rows[0][0]), float(rows[0][1])) if rows else None

    async def count_queued_by_priority(self) -> dict[int, int]:
        rows = await self._call(
            lambda db: db.execute(
                "SELECT priority, COUNT(*) FROM jobs WHERE status = ? GROUP BY priority", (QUEUED,)
            ).fetchall()
        )
        return {int(priority): int(count) for priority, count in rows}

    async def overdue_in_queue(self, now: float, limit: int) -> list[Job]:
        return await self._select(
            "SELECT data, version FROM jobs WHERE queue_deadline <= ? AND status = ?"
            " ORDER BY created_at, rowid LIMIT ?",
            (now, QUEUED, limit),
        )

    async def find_result(self, owner: str, result_key: str) -> Job | None:
        found = await self._select(
            "SELECT data, version FROM jobs WHERE owner = ? AND result_key = ? AND status = ?"
            " ORDER BY completed_at DESC, rowid DESC LIMIT 1",
            (owner, result_key, COMPLETED),
        )
        return found[0] if found else None

    async def recent_finished(self, since: float, limit: int) -> list[FinishedWork]:
        # completed_at is `now_iso()`'s form, which sorts as the times do: compare with `since` written alike.
        after = datetime.fromtimestamp(since, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        rows = await self._call(
            lambda db: db.execute(
                "SELECT json_extract(data, '$.spec.model'), work, started_at, completed_at FROM jobs"
                " WHERE status = ? AND completed_at >= ? AND started_at IS NOT NULL"
                " ORDER BY completed_at DESC LIMIT ?",
                (COMPLETED, after, limit),
            ).fetchall()
        )
        return [
            FinishedWork(str(model), float(work), float(started), datetime.fromisoformat(completed).timestamp())
            for model, work, started, completed in rows
        ]

    async def acquire_lock(self, name: str, holder: str, until: float, now: float) -> bool:
        def run(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "INSERT INTO locks (name, holder, until) VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE"
                " SET holder = excluded.holder, until = excluded.until WHERE locks.until <= ? OR locks.holder = ?",
                (name, holder, until, now, holder),
            )
            return cursor.rowcount == 1

        return await self._call(run)

    async def _select(self, sql: str, args: tuple[Any, ...] = ()) -> list[Job]:
        rows = await self._call(lambda db: db.execute(sql, args).fetchall())
        return [job for job in map(self._load, rows) if job is not None]

    async def unfinished(self) -> list[Job]:
        return await self._select(
            "SELECT data, version FROM jobs WHERE status IN (?, ?) ORDER BY created_at", (QUEUED, PROCESSING)
        )

    async def undelivered(self) -> list[Job]:
        return await self._select(
            "SELECT data, version FROM jobs WHERE webhook_status = ? AND status IN (?, ?, ?) ORDER BY created_at",
            (WebhookStatus.PENDING, COMPLETED, FAILED, CANCELED),
        )

    async def expired(self, before: str, limit: int) -> list[Job]:
        return await self._select(
            "SELECT data, version FROM jobs WHERE completed_at IS NOT NULL AND completed_at < ?"
            " AND (webhook_status IS NULL OR webhook_status != ?) ORDER BY completed_at, id LIMIT ?",
            (before, WebhookStatus.PENDING, limit),
        )

    async def webhook_secrets(self, owner: str) -> SigningSecrets | None:
        return await self._call(lambda db: _read_secrets(db, owner))

    async def put_webhook_secrets(self, proposed: SigningSecrets) -> SigningSecrets:
        def run(connection: sqlite3.Connection) -> SigningSecrets:
            with _transaction(connection) as db:
                p = proposed
                if p.version == 1:
                    db.execute(
                        "INSERT INTO webhook_secrets (owner, version, current, previous, previous_until)"
                        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (owner) DO NOTHING",
                        (p.owner, p.version, p.current, p.previous, p.previous_until),
                    )
                else:
                    db.execute(
                        "UPDATE webhook_secrets SET version = ?, current = ?, previous = ?, previous_until = ?"
                        " WHERE owner = ? AND version = ?",
                        (p.version, p.current, p.previous, p.previous_until, p.owner, p.version - 1),
                    )
                stored = _read_secrets(db, p.owner)
            if stored is None:  # a rotation of secrets that do not exist: the caller read them from this store
                raise sqlite3.IntegrityError(f"no webhook secrets for owner {p.owner[:12]}")
            return stored

        return await self._call(run)

    async def delete(self, job_id: str) -> None:
        await self._call(lambda db: db.execute("DELETE FROM jobs WHERE id = ?", (job_id,)))

    async def close(self) -> None:
        await self._call(lambda db: db.close())
        self._executor.shutdown(wait=True)
        os.close(self._lock_fd)  # releases the flock
