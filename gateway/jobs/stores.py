"""Which job store and event bus a deployment uses, from `IMAGEN_JOBS_DB`.

A `postgresql://` (or `postgres://`) URL: the shared PostgreSQL store and its LISTEN/NOTIFY bus, for any number
of replicas. Anything else is a file path: the embedded SQLite store and the in-process bus, for one process.
"""

from __future__ import annotations

from pathlib import Path

from gateway.jobs.events import JobEvents, LocalEvents
from gateway.jobs.postgres import POSTGRES_SCHEMES, PostgresEvents, PostgresJobStore, is_postgres_url
from gateway.jobs.sqlite import SqliteJobStore
from gateway.jobs.store import JobStore


async def open_job_store(
    url_or_path: str | Path, *, pool_min_size: int = 1, pool_max_size: int = 10
) -> tuple[JobStore, JobEvents]:
    """Open (and migrate) the store named by `url_or_path`, with its bus; close both when done (bus first).

    A URL must come as a `str`: `Path` folds `postgresql://host` into `postgresql:/host`, so a `Path` that
    looks like a mangled URL is refused rather than opened as a SQLite file named `postgresql:`.
    """
    if isinstance(url_or_path, Path):
        if str(url_or_path).startswith(tuple(scheme.rstrip("/") for scheme in POSTGRES_SCHEMES)):
            raise ValueError(f"a PostgreSQL URL must be passed as a string, not as the path {url_or_path}")
        return SqliteJobStore(url_or_path), LocalEvents()
    if is_postgres_url(url_or_path):
        store = await PostgresJobStore.open(url_or_path, min_size=pool_min_size, max_size=pool_max_size)
        return store, PostgresEvents(url_or_path, store.pool)
    return SqliteJobStore(Path(url_or_path)), LocalEvents()
