"""Jobs: the durable record of every accepted request, and the store that keeps them (SQLite by default).

Every accepted request, synchronous or not, is a job written to the store before any work starts, with its
seed resolved and its input image stored: a gateway killed mid-job re-runs it after a restart and gets the
same pixels. The store is an interface (`JobStore`) so a shared database can replace SQLite.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

QUEUED, PROCESSING, COMPLETED, FAILED, CANCELED = "queued", "processing", "completed", "failed", "canceled"
TERMINAL = frozenset({COMPLETED, FAILED, CANCELED})
UNFINISHED = (QUEUED, PROCESSING)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def owner_of(api_key: str | None) -> str:
    """Jobs are owned by a key's hash (never the key itself); anonymous callers share one owner."""
    return "anonymous" if api_key is None else hashlib.sha256(api_key.encode()).hexdigest()


@dataclass
class WebhookState:
    url: str
    status: str = "pending"  # pending -> delivered | failed
    attempts: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Job:
    id: str
    owner: str
    status: str
    params: dict[str, Any]  # the validated request (without the image), seed resolved
    input: dict[str, Any]  # {"url", "name" (stored copy), "width", "height"}
    created_at: str
    updated_at: str
    completed_at: str | None = None
    result: dict[str, Any] | None = None  # {"images": [{url, width, height, seed}]}
    error: dict[str, Any] | None = None  # the spec's error object
    webhook: WebhookState | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None
    run_attempts: int = 0
    cancel_requested: bool = False
    steps_done: int = 0

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str) -> Job:
        data = json.loads(raw)
        webhook = data.pop("webhook", None)
        return cls(**data, webhook=WebhookState(**webhook) if webhook else None)


class IdempotencyConflict(Exception):
    """The key was used before with another request body."""


class JobStore(Protocol):
    async def create(self, job: Job) -> Job:
        """Insert `job`; with an idempotency key already used by this owner, return that job instead
        (raise IdempotencyConflict when its request hash differs)."""
        ...

    async def get(self, job_id: str) -> Job | None: ...

    async def get_idempotent(self, owner: str, key: str) -> Job | None: ...

    async def save(self, job: Job) -> None: ...

    async def unfinished(self) -> list[Job]:
        """Queued or processing jobs, oldest first (restart recovery)."""
        ...

    async def undelivered(self) -> list[Job]:
        """Finished jobs whose webhook is still pending (restart recovery)."""
        ...

    async def expired(self, before: str) -> list[Job]:
        """Finished jobs completed before `before` (retention)."""
        ...

    async def delete(self, job_id: str) -> None: ...

    async def close(self) -> None: ...


_SCHEMA = """
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


class SqliteJobStore:
    """One SQLite file, WAL mode; calls run in a worker thread behind one lock (SQLite serialises writes)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    async def _run(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        def run() -> list[tuple[Any, ...]]:
            with self._lock:
                return self._db.execute(sql, args).fetchall()

        return await asyncio.to_thread(run)

    @staticmethod
    def _row(job: Job) -> tuple[Any, ...]:
        webhook_status = job.webhook.status if job.webhook else None
        return (
            job.id,
            job.owner,
            job.status,
            job.created_at,
            job.completed_at,
            job.idempotency_key,
            webhook_status,
            job.to_json(),
        )

    async def create(self, job: Job) -> Job:
        def run() -> Job:
            with self._lock:
                if job.idempotency_key is not None:
                    row = self._db.execute(
                        "SELECT data FROM jobs WHERE owner = ? AND idempotency_key = ?",
                        (job.owner, job.idempotency_key),
                    ).fetchone()
                    if row is not None:
                        existing = Job.from_json(row[0])
                        if existing.request_hash != job.request_hash:
                            raise IdempotencyConflict(job.idempotency_key)
                        return existing
                self._db.execute("INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?)", self._row(job))
                return job

        return await asyncio.to_thread(run)

    async def get(self, job_id: str) -> Job | None:
        rows = await self._run("SELECT data FROM jobs WHERE id = ?", (job_id,))
        return Job.from_json(rows[0][0]) if rows else None

    async def get_idempotent(self, owner: str, key: str) -> Job | None:
        rows = await self._run("SELECT data FROM jobs WHERE owner = ? AND idempotency_key = ?", (owner, key))
        return Job.from_json(rows[0][0]) if rows else None

    async def save(self, job: Job) -> None:
        job.updated_at = now_iso()
        row = self._row(job)
        await self._run(
            "UPDATE jobs SET status = ?, completed_at = ?, webhook_status = ?, data = ? WHERE id = ?",
            (row[2], row[4], row[6], row[7], job.id),
        )

    async def unfinished(self) -> list[Job]:
        rows = await self._run("SELECT data FROM jobs WHERE status IN (?, ?) ORDER BY created_at", (QUEUED, PROCESSING))
        return [Job.from_json(r[0]) for r in rows]

    async def undelivered(self) -> list[Job]:
        rows = await self._run(
            "SELECT data FROM jobs WHERE webhook_status = 'pending' AND status IN (?, ?, ?) ORDER BY created_at",
            (COMPLETED, FAILED, CANCELED),
        )
        return [Job.from_json(r[0]) for r in rows]

    async def expired(self, before: str) -> list[Job]:
        rows = await self._run(
            "SELECT data FROM jobs WHERE completed_at IS NOT NULL AND completed_at < ? "
            "AND (webhook_status IS NULL OR webhook_status != 'pending')",
            (before,),
        )
        return [Job.from_json(r[0]) for r in rows]

    async def delete(self, job_id: str) -> None:
        await self._run("DELETE FROM jobs WHERE id = ?", (job_id,))

    async def close(self) -> None:
        with self._lock:
            self._db.close()


def request_hash(body: Mapping[str, Any]) -> str:
    """A stable hash of a request body, to tell an idempotent retry from a key reused for another request."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
