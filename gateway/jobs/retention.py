"""The storage sweep: stored objects no job owns, and temp files of interrupted writes, are removed.

Objects become orphans when the job insert fails after the input was stored and the clean-up delete fails
too, when the process dies between storing an input and inserting its job, when a run fails after writing
some of its outputs, or when retention's own delete of a purged job's files fails. The sweep runs at start
and every `storage_sweep_interval_s` (from the retention loop, so one replica at a time, under its lock), and
only looks at objects older than `storage_orphan_grace_s`: a creation in progress (input stored, job not yet
inserted) or a run writing its outputs is far younger than that.

An object is removed when its name is one of ours (`gateway.jobs.naming`: inputs and outputs in every stored
format) and its job does not exist, or its job is finished and does not list it among its stored objects (a
failed run's partial outputs). Names of any other shape are left alone. Cost: one listing of
the storage and one store read per job with old objects, per sweep.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from gateway.jobs.model import Job
from gateway.jobs.naming import parse_name
from gateway.jobs.store import JobStore
from gateway.media.storage import Storage

# Jobs the sweep remembers while it walks the storage (bounded: a bucket may hold millions of objects).
SWEEP_JOBS_KEPT = 1024

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepResult:
    orphans: int
    temp_files: int


async def sweep_storage(store: JobStore, storage: Storage, *, older_than: float) -> SweepResult:
    """Remove what no job owns among objects last modified before `older_than` (a Unix time)."""
    temp_files = await storage.remove_temp_older_than(older_than)
    jobs: OrderedDict[str, Job | None] = OrderedDict()  # the last jobs looked up: a job's objects come together
    orphans = 0
    async for name in storage.iter_older_than(older_than):
        stored = parse_name(name)
        if stored is None:
            continue
        job_id = stored.job_id
        if job_id not in jobs:
            jobs[job_id] = await store.get(job_id)
            if len(jobs) > SWEEP_JOBS_KEPT:
                jobs.popitem(last=False)
        job = jobs[job_id]
        if job is None or (job.finished and name not in job.stored_names):
            await storage.delete(name)
            orphans += 1
    return SweepResult(orphans, temp_files)


class StorageSweeper:
    """Runs `sweep_storage` when due: at the first call (start), then every `interval_s`."""

    def __init__(self, store: JobStore, storage: Storage, *, grace_s: float, interval_s: float) -> None:
        self.store = store
        self.storage = storage
        self.grace_s = max(0.0, grace_s)
        self.interval_s = max(1.0, interval_s)
        self._next_at = 0.0  # monotonic: due at once

    async def run_if_due(self) -> SweepResult | None:
        now = time.monotonic()
        if now < self._next_at:
            return None
        result = await sweep_storage(self.store, self.storage, older_than=time.time() - self.grace_s)
        self._next_at = now + self.interval_s  # a failed sweep is tried again at the next retention pass
        if result.orphans or result.temp_files:
            log.info(
                "storage sweep: removed %d objects no job owns and %d temp files of interrupted writes",
                result.orphans,
                result.temp_files,
            )
        return result
