"""Which job store and event bus a deployment uses, from `IMAGEN_JOBS_DB`.

A `postgresql://` (or `postgres://`) URL: the shared PostgreSQL store and its LISTEN/NOTIFY bus, for any number
of replicas. Anything else is a file path: the embedded SQLite store and the in-process bus, for one process.
"""

from __future__ import annotations

from pathlib import Path

from gateway.jobs.events import JobEvents, LocalEvents
from gateway.jobs.postgres import PostgresEvents, PostgresJobStore
from gateway.jobs.sqlite import SqliteJobStore
from gateway.jobs.store import JobStore
from gateway.settings import POSTGRES_SCHEMES, is_postgres_url


async def open_job_store(
    url_or_path: str | Path, *, pool_min_size: int = 1, pool_max_size: int = 10
) -> tuple[JobStore, JobEvents]:
    """Open (and migrate) the store named by `url_or_path`, with its bus; close both when done (bus first).

    A URL must come as a `str`: `Path` folds `postgresql://host` into `postgresql:/host`, so a `Path` that
    looks like a mangled URL is refused rather than opened as a SQLite file named `postgresql:`.
    """
    location = str(url_or_path)
    if isinstance(url_or_path, Path):
        if location.lower().startswith(tuple(scheme.rstrip("/") for scheme in POSTGRES_SCHEMES)):
            raise ValueError(f"a PostgreSQL URL must be passed as a string, not as the path {location}")
    elif is_postgres_url(location):
        url = location.strip()
        store = await PostgresJobStore.open(url, min_size=pool_min_size, max_size=pool_max_size)
        return store, PostgresEvents(url, store.pool)
    return SqliteJobStore(Path(location)), LocalEvents()
