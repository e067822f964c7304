"""Disk hardening against the real gateway (`python -m gateway` subprocesses on the session's Triton, real HTTP
on loopback): a full disk or a used-up quota answers 507 `insufficient_storage` in the error shape and never
loses an accepted job; inputs orphaned at creation are removed at once, and the sweep at start removes stored
objects no job owns and the temp files of interrupted writes.

"Full" is simulated with the settings themselves (no tmpfs or loop device here): a free-space floor larger
than any disk (`IMAGEN_STORAGE_MIN_FREE_BYTES=2**62`), or a quota just above what the inputs need
(`IMAGEN_STORAGE_QUOTA_BYTES`). Every wait is bounded by a deadline (liveness bounds, not performance claims).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.triton.server import TritonServer
from tests.helpers import data_uri, make_image
from tests.integration import gateways
from tests.integration.conftest import Repository
from tests.integration.gateways import SubprocessGateway

pytestmark = pytest.mark.integration

PNG = make_image(128, 128, seed=31)
IMAGE = data_uri(PNG)
API_KEY = "disk-key-0000-0123456789abcdefghijk"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ASYNC = {**AUTH, "Prefer": "respond-async"}
FINAL = {"completed", "failed", "canceled"}
JOB_BOUND_S = 60.0  # a tiny job reaches a final state within this (liveness bound)
SWEEP_BOUND_S = 30.0  # the sweep at start has removed the orphans within this after /healthz answers
AGED_S = 2 * 3600.0  # older than the default grace (IMAGEN_STORAGE_ORPHAN_GRACE_S = 3600 s)


def body(**overrides: Any) -> dict[str, Any]:
    return {"image": IMAGE, "prompt": "a harbour at dawn", "steps": 4, "seed": 3, **overrides}


def disk_gateway(
    triton: TritonServer, repository: Repository, folder: Path, **env: str
) -> AbstractContextManager[SubprocessGateway]:
    settings = {"IMAGEN_API_KEYS": API_KEY, "IMAGEN_RATE_LIMIT_PER_MINUTE": "0", "IMAGEN_LOG_LEVEL": "warning"}
    return gateways.subprocess_gateway(triton, repository, folder, **{**settings, **env})


def create_url(gw: SubprocessGateway) -> str:
    return f"{gw.url}/v1/image-to-image"


def wait_final(gw: SubprocessGateway, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + JOB_BOUND_S
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = httpx.get(f"{create_url(gw)}/{job_id}", headers=AUTH, timeout=30).json()
        if job.get("status") in FINAL:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {job.get('status')!r} after {JOB_BOUND_S} s\n{gw.log_tail()}")


def assert_insufficient_storage(response: httpx.Response) -> None:
    assert response.status_code == 507, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"code", "message", "details"}
    assert error["code"] == "insufficient_storage" and error["message"] and error["details"]


def job_count(gw: SubprocessGateway) -> int:
    with sqlite3.connect(str(gw.jobs_db)) as db:
        (count,) = db.execute("SELECT count(*) FROM jobs").fetchone()
    return int(count)


def stored(folder: Path) -> set[str]:
    images = folder / "images"
    return set(os.listdir(images)) if images.exists() else set()


def inputs(folder: Path) -> set[str]:
    return {name for name in stored(folder) if "_input." in name}


def age(path: Path, seconds: float = AGED_S) -> None:
    when = time.time() - seconds
    os.utime(path, (when, when))


# --- a full disk: 507 at creation, nothing written, no job -------------------------------------------------


def test_a_full_disk_refuses_new_jobs_with_507_and_writes_nothing(
    triton: TritonServer, repository: Repository, tmp_path: Path
) -> None:
    with disk_gateway(triton, repository, tmp_path, IMAGEN_STORAGE_MIN_FREE_BYTES=str(2**62)) as gw:
        for headers in (AUTH, ASYNC):
            assert_insufficient_storage(httpx.post(create_url(gw), json=body(), headers=headers, timeout=60))
        assert job_count(gw) == 0
        assert stored(tmp_path) == set()
        assert httpx.get(f"{gw.url}/healthz", timeout=5).status_code == 200


# --- an accepted job whose output cannot be written: failed with a code, never lost --------------------------


def test_an_accepted_job_whose_output_write_fails_ends_failed_and_is_kept(
    triton: TritonServer, repository: Repository, tmp_path: Path
) -> None:
    # Room for two inputs exactly (they are stored as received), not for any output PNG beside them.
    quota = 2 * len(PNG) + 16
    with disk_gateway(triton, repository, tmp_path, IMAGEN_STORAGE_QUOTA_BYTES=str(quota)) as gw:
        sync = httpx.post(create_url(gw), json=body(), headers=AUTH, timeout=JOB_BOUND_S)
        assert_insufficient_storage(sync)  # the synchronous caller gets the failed job's code
        sync_job = httpx.get(f"{gw.url}{sync.headers['location']}", headers=AUTH, timeout=30).json()
        assert sync_job["status"] == "failed" and sync_job["error"]["code"] == "insufficient_storage", sync_job

        accepted = httpx.post(create_url(gw), json=body(seed=4), headers=ASYNC, timeout=60)
        assert accepted.status_code == 202, accepted.text
        async_id = accepted.json()["id"]
        failed = wait_final(gw, async_id)
        assert failed["status"] == "failed" and failed["error"]["code"] == "insufficient_storage", failed
        assert failed["images"] == []

        # The quota is used up by the two inputs: the next job is refused before it is accepted.
        assert_insufficient_storage(httpx.post(create_url(gw), json=body(seed=5), headers=ASYNC, timeout=60))
        assert job_count(gw) == 2
        assert len(inputs(tmp_path)) == 2 and stored(tmp_path) == inputs(tmp_path)  # no partial output left
        assert httpx.get(f"{gw.url}/healthz", timeout=5).status_code == 200

    # Space returns (no quota): both jobs are still there as they ended, and the workers run new jobs.
    with disk_gateway(triton, repository, tmp_path) as gw:
        for job_id in (sync_job["id"], async_id):
            again = httpx.get(f"{create_url(gw)}/{job_id}", headers=AUTH, timeout=30).json()
            assert again["status"] == "failed" and again["error"]["code"] == "insufficient_storage", again
        done = httpx.post(create_url(gw), json=body(seed=6), headers=AUTH, timeout=JOB_BOUND_S)
        assert done.status_code == 200 and done.json()["status"] == "completed", done.text


# --- inputs orphaned at creation: an Idempotency-Key conflict, a failed job insert ---------------------------


def test_inputs_of_jobs_that_were_not_created_are_removed(
    triton: TritonServer, repository: Repository, tmp_path: Path
) -> None:
    with disk_gateway(triton, repository, tmp_path) as gw:
        # Six different bodies race for one Idempotency-Key: one job; the losers' stored inputs are removed
        # (whether they lost at the first lookup or at the insert).
        key = f"disk-{uuid.uuid4().hex}"
        answers: list[httpx.Response] = []
        lock = threading.Lock()

        def post(seed: int) -> None:
            response = httpx.post(
                create_url(gw), json=body(seed=seed), headers={**ASYNC, "Idempotency-Key": key}, timeout=60
            )
            with lock:
                answers.append(response)

        threads = [threading.Thread(target=post, args=(seed,)) for seed in range(10, 16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=90)
        codes = sorted(response.status_code for response in answers)
        assert codes == [202, 409, 409, 409, 409, 409], [r.text for r in answers]
        winner = next(r.json()["id"] for r in answers if r.status_code == 202)
        wait_final(gw, winner)
        assert {name.split("_input.")[0] for name in inputs(tmp_path)} == {winner}

        # The job insert fails (the store is locked past its busy timeout): 503, and the stored input is removed.
        before = inputs(tmp_path)
        locker = sqlite3.connect(str(gw.jobs_db), timeout=30, isolation_level=None)
        try:
            locker.execute("BEGIN IMMEDIATE")
            refused = httpx.post(create_url(gw), json=body(seed=20), headers=ASYNC, timeout=60)
        finally:
            if locker.in_transaction:
                locker.execute("ROLLBACK")
            locker.close()
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "store_unavailable", refused.text
        assert inputs(tmp_path) == before
        assert not any(name.startswith(".tmp-") for name in stored(tmp_path))


# --- the sweep at start: orphans and temp files of interrupted writes -----------------------------------------


@pytest.fixture
def finished_job(triton: TritonServer, repository: Repository, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A completed job in `tmp_path`'s store (its gateway stopped): (job id, output name)."""
    with disk_gateway(triton, repository, tmp_path) as gw:
        done = httpx.post(create_url(gw), json=body(), headers=AUTH, timeout=JOB_BOUND_S)
        assert done.status_code == 200, done.text
        job = done.json()
    yield job["id"], job["images"][0]["url"].rsplit("/", 1)[1]


def test_the_sweep_at_start_removes_orphans_and_temp_files(
    triton: TritonServer, repository: Repository, tmp_path: Path, finished_job: tuple[str, str]
) -> None:
    job_id, output = finished_job
    images = tmp_path / "images"
    for name in os.listdir(images):
        age(images / name)  # the live job's files are old too: its job exists, so they stay
    orphan = f"img_transform_{uuid.uuid4().hex[:24]}"  # a process died between storing an input and its insert
    removed = {f"{orphan}_input.png", f"{orphan}_0.png", ".tmp-interrupted1", ".tmp-interrupted2"}
    for name in removed:
        (images / name).write_bytes(b"left behind")
        age(images / name)
    young = f"img_transform_{uuid.uuid4().hex[:24]}_input.png"  # within the grace period: a creation in progress
    (images / young).write_bytes(b"being created")
    (images / "operator-notes.png").write_bytes(b"not a name the jobs write")
    age(images / "operator-notes.png")
    kept = stored(tmp_path) - removed

    with disk_gateway(triton, repository, tmp_path) as gw:
        deadline = time.monotonic() + SWEEP_BOUND_S
        while stored(tmp_path) & removed and time.monotonic() < deadline:
            time.sleep(0.1)
        assert stored(tmp_path) == kept, gw.log_tail()
        assert {young, "operator-notes.png", output} <= kept
        job = httpx.get(f"{create_url(gw)}/{job_id}", headers=AUTH, timeout=30).json()
        assert job["status"] == "completed", job
        assert httpx.get(f"{gw.url}/v1/images/{output}", timeout=30).status_code == 200
