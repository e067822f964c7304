"""The `JobStore` contract, run against SqliteJobStore and the in-memory fake; SQLite's own migration and
locking; and the webhook signing helpers."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import random
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from gateway.errors import StoreUnavailable
from gateway.jobs import webhooks
from gateway.jobs.create import request_hash
from gateway.jobs.model import (
    CANCELED,
    COMPLETED,
    PROCESSING,
    QUEUED,
    DeliveryAttempt,
    Job,
    JobStatus,
    Lease,
    OutputImage,
    Size,
    WebhookEvent,
    WebhookStatus,
    job_from_json,
    job_to_json,
    now_iso,
    owner_of,
)
from gateway.jobs.sqlite import SCHEMA_VERSION, SqliteJobStore
from gateway.jobs.store import IdempotencyConflict, JobStore, StaleJob, transition
from tests.unit.fakes import InMemoryJobStore, make_job, make_spec

LEASE = 10_000.0


@pytest.fixture(params=["sqlite", "memory"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobStore]:
    made: JobStore = SqliteJobStore(tmp_path / "jobs.sqlite3") if request.param == "sqlite" else InMemoryJobStore()
    yield made
    await made.close()


def _image(job_id: str) -> OutputImage:
    return OutputImage(name=f"{job_id}_0.png", url="http://x/a.png", width=16, height=16, seed=1)


def _claim(job: Job | None) -> str:
    """The claim id of the lease `job` was claimed under (renew, release and finish name it)."""
    assert job is not None and job.lease is not None and job.lease.claim
    return job.lease.claim


# --- the contract ------------------------------------------------------------------------------------------


async def test_scheduler_and_output_format_round_trip(store: JobStore) -> None:
    """Issue 12's fields of the spec and of each image survive the store (SQLite and PostgreSQL alike)."""
    spec = make_spec(scheduler="euler_ancestral", output_format="webp", output_quality=37)
    created = await store.create(make_job("fmt", spec=spec))
    claimed = await store.claim("fmt", "w", LEASE)
    assert claimed is not None and claimed.spec == spec == created.spec
    image = OutputImage(
        name="fmt_0.webp", url="http://x/fmt_0.webp", width=16, height=16, seed=1, content_type="image/webp",
        sha256="ab" * 32,
    )  # fmt: skip
    done = claimed.finished_by("w", _claim(claimed), COMPLETED, images=(image,))
    assert done is not None
    await store.update(done)
    got = await store.get("fmt")
    assert got is not None and got.spec.scheduler == "euler_ancestral" and got.spec.output_format == "webp"
    assert got.spec.output_quality == 37 and got.images == (image,)


async def test_round_trip_and_queries(store: JobStore) -> None:
    a = await store.create(make_job("a", webhook="http://h/x"))
    await store.create(make_job("b"))
    assert a.version == 1 and await store.get("a") == a
    claimed = await store.claim("a", "w", LEASE)
    assert claimed is not None
    done = await store.update(claimed.finished_by("w", _claim(claimed), COMPLETED, images=(_image("a"),), steps_done=2))  # type: ignore[arg-type]
    got = await store.get("a")
    assert got == done and got is not None
    assert got.status == COMPLETED and got.images == (_image("a"),) and got.lease is None and got.steps_done == 2
    assert got.webhook is not None and got.webhook.url == "http://h/x" and got.webhook.status == WebhookStatus.PENDING
    assert isinstance(got.status, JobStatus) and isinstance(got.spec.processed_size, Size)
    assert [j.id for j in await store.unfinished()] == ["b"]
    assert [j.id for j in await store.undelivered()] == ["a"]  # completed, webhook still pending
    assert await store.expired(now_iso(), 10) == []  # a pending webhook keeps a job alive
    delivered = got.with_delivery(DeliveryAttempt(now_iso(), 204, None), max_attempts=3)
    assert delivered is not None
    await store.update(delivered)
    assert await store.undelivered() == []
    await asyncio.sleep(0.002)
    assert [j.id for j in await store.expired(now_iso(), 10)] == ["a"]
    await store.delete("a")
    assert await store.get("a") is None
    assert await store.get("missing") is None


async def test_unfinished_oldest_first(store: JobStore) -> None:
    for i, job_id in enumerate(["c", "a", "b"]):
        await store.create(make_job(job_id, created_at=f"2024-01-01T00:00:0{3 - i}.000Z"))
    assert [j.id for j in await store.unfinished()] == ["b", "a", "c"]


async def test_idempotency_per_owner(store: JobStore) -> None:
    first = await store.create(make_job("1", key="k", body="same"))
    again = await store.create(make_job("2", key="k", body="same"))
    assert again.id == first.id == "1"  # the retry gets the original job
    with pytest.raises(IdempotencyConflict):
        await store.create(make_job("3", key="k", body="other"))
    other_owner = await store.create(make_job("4", owner="p", key="k", body="other"))
    assert other_owner.id == "4"  # keys are scoped to their owner
    found = await store.get_idempotent("o", "k")
    assert found is not None and found.id == "1"
    assert await store.get_idempotent("o", "nope") is None
    assert await store.get("2") is None and await store.get("3") is None


async def test_concurrent_creates_with_one_key_make_one_job(store: JobStore) -> None:
    created = await asyncio.gather(*(store.create(make_job(f"j{i}", key="k", body="b")) for i in range(20)))
    assert len({job.id for job in created}) == 1
    assert len(await store.unfinished()) == 1


async def test_update_is_compare_and_set(store: JobStore) -> None:
    v1 = await store.create(make_job("a"))
    v2 = await store.update(dataclasses.replace(v1, steps_done=1))
    assert v2.version == 2 and v2.steps_done == 1 and v2.updated_at >= v1.updated_at
    with pytest.raises(StaleJob) as lost:
        await store.update(dataclasses.replace(v1, steps_done=9))  # written from a stale read
    assert lost.value.current == v2  # the loser learns the winner's copy
    assert await store.get("a") == v2
    await store.delete("a")
    with pytest.raises(StaleJob) as gone:
        await store.update(v2)
    assert gone.value.current is None


async def test_claim_only_from_queued_and_once(store: JobStore) -> None:
    await store.create(make_job("a"))
    claimed = await store.claim("a", "w1", LEASE)
    assert claimed is not None and claimed.status == PROCESSING and claimed.run_attempts == 1
    assert claimed.lease is not None and claimed.lease.owner == "w1" and len(claimed.lease.claim) == 16
    assert abs(claimed.lease.expires_at - (time.time() + LEASE)) < 60  # `lease_s` from now, by the store's clock
    assert claimed.version == 2
    assert await store.claim("a", "w2", LEASE) is None  # taken
    assert await store.claim("a", "w1", LEASE) is None  # even by the same worker
    assert await store.get("a") == claimed
    canceled = await store.create(make_job("b"))
    await store.update(canceled.finished_as(CANCELED))
    assert await store.claim("b", "w1", LEASE) is None  # a canceled job is not picked up
    assert await store.claim("missing", "w1", LEASE) is None


async def test_renew_only_by_the_holder(store: JobStore) -> None:
    await store.create(make_job("a"))
    assert await store.renew("a", "w1", "", LEASE) is None  # queued: nobody holds it
    claimed = await store.claim("a", "w1", 1.0)
    assert claimed is not None and claimed.lease is not None
    claim = _claim(claimed)
    assert await store.renew("a", "w2", claim, LEASE) is None
    assert await store.renew("a", "w1", "0" * 16, LEASE) is None  # the worker, but not this claim
    renewed = await store.renew("a", "w1", claim, LEASE)
    assert renewed is not None and renewed.lease is not None and renewed.lease.claim == claim
    assert renewed.lease.expires_at > claimed.lease.expires_at + LEASE / 2  # `lease_s` from now
    assert renewed.version == claimed.version + 1
    asked = await store.update(renewed.cancel_requested_now())  # type: ignore[arg-type]
    again = await store.renew("a", "w1", claim, LEASE + 1)
    assert again is not None and again.cancel_requested  # the renewal tells the worker of the cancel
    finished = await store.update(again.finished_by("w1", claim, CANCELED))  # type: ignore[arg-type]
    assert asked.version < again.version < finished.version
    assert await store.renew("a", "w1", claim, LEASE) is None  # finished
    assert await store.renew("missing", "w1", claim, LEASE) is None


async def test_transition_rereads_a_stale_copy(store: JobStore) -> None:
    await store.create(make_job("a"))
    stale = await store.claim("a", "w", LEASE)
    assert stale is not None
    # Another actor writes meanwhile: a cancel request.
    await store.update(stale.cancel_requested_now())  # type: ignore[arg-type]
    claim = _claim(stale)
    stored, applied = await transition(
        store, stale, lambda j: j.finished_by("w", claim, COMPLETED, images=(_image("a"),))
    )
    assert applied and stored.status == COMPLETED and stored.cancel_requested  # decided on the fresh copy
    assert stored.version == stale.version + 2
    # A verdict "does not apply" on a stale copy is confirmed on a fresh one: here the fresh one applies.
    await store.create(make_job("b"))
    taken = await store.claim("b", "w", LEASE)
    asked = await store.update(taken.cancel_requested_now())  # type: ignore[union-attr,arg-type]
    requeued = await store.update(dataclasses.replace(asked, status=QUEUED, lease=None, cancel_requested=False))
    stored, applied = await transition(store, asked, Job.cancel_requested_now)  # None on `asked`
    assert applied and stored.status == CANCELED and stored.version == requeued.version + 1
    # And when it does not apply to the fresh copy either, the caller gets the fresh copy and False.
    stored_again, applied = await transition(store, asked, Job.cancel_requested_now)
    assert not applied and stored_again == stored
    await store.delete("b")
    with pytest.raises(StaleJob):
        await transition(store, stored, lambda j: dataclasses.replace(j, steps_done=1))


async def test_versions_strictly_increase(store: JobStore) -> None:
    job = await store.create(make_job("a", webhook="http://h"))
    versions = [job.version]
    job = await store.claim("a", "w", LEASE)  # type: ignore[assignment]
    versions.append(job.version)
    job = await store.renew("a", "w", _claim(job), LEASE)  # type: ignore[assignment]
    versions.append(job.version)
    job = await store.update(job.finished_by("w", _claim(job), COMPLETED))  # type: ignore[arg-type]
    versions.append(job.version)
    job = await store.update(job.with_delivery(DeliveryAttempt(now_iso(), 500, None), 2))  # type: ignore[arg-type]
    versions.append(job.version)
    assert versions == sorted(set(versions)) == list(range(1, 6))


async def test_a_stale_claim_of_the_same_worker_is_refused_after_a_takeover_and_reclaim(store: JobStore) -> None:
    """Issue 22: the lease names the claim, not only the worker. A process froze while running a job (its lease
    expired), the job was taken over and the same process claimed it again: the first claim's renew, release and
    finish are refused (a stale run must not renew the live run's lease, requeue it or write its result over it),
    and the live claim's go through."""
    await store.create(make_job("a"))
    first = await store.claim("a", "w", -1.0)  # expired a second ago: its process froze
    stale = _claim(first)
    [orphan] = await store.expired_leases(10)
    await store.update(orphan.requeued())  # type: ignore[arg-type]  (another replica's takeover)
    again = await store.claim("a", "w", LEASE)  # the same worker wins it back: a new claim
    live = _claim(again)
    assert live != stale and again is not None and again.lease is not None and again.lease.owner == "w"
    assert again.run_attempts == 2
    assert await store.renew("a", "w", stale, LEASE) is None
    assert await store.release("a", "w", stale) is None
    assert first is not None
    stored, applied = await transition(store, first, lambda j: j.finished_by("w", stale, COMPLETED))
    assert not applied and stored == again == await store.get("a")  # nothing written
    renewed = await store.renew("a", "w", live, LEASE)
    assert renewed is not None and renewed.lease is not None and renewed.lease.claim == live
    done, applied = await transition(store, first, lambda j: j.finished_by("w", live, COMPLETED))
    assert applied and done.status == COMPLETED and done.finished_claim == live and done.lease is None
    assert await store.release("a", "w", live) is None  # finished


async def test_a_lease_written_before_claim_ids_reads_back_held_by_nobody(store: JobStore) -> None:
    """A row written before issue 22 has a lease without a claim id: it reads back (the claim is ""), nobody can
    renew, release or finish it, and it is taken over once expired, as before."""
    created = await store.create(make_job("old"))
    data = json.loads(job_to_json(dataclasses.replace(created, status=PROCESSING, lease=Lease("w", 1.0))))
    del data["lease"]["claim"]
    assert "finished_claim" in data
    del data["finished_claim"]
    job = job_from_json(json.dumps(data), version=created.version)
    assert job.lease == Lease("w", 1.0, "") and job.finished_claim is None
    stored = await store.update(job)
    assert (await store.get("old")) == stored
    assert await store.renew("old", "w", "", LEASE) is None
    assert await store.release("old", "w", "") is None
    assert stored.finished_by("w", "", COMPLETED) is None
    assert [j.id for j in await store.expired_leases(10)] == ["old"]


# --- SQLite only -----------------------------------------------------------------------------------------


async def test_count_active_counts_one_owners_queued_and_processing_jobs(store: JobStore) -> None:
    for job_id in ("a1", "a2", "a3"):
        await store.create(make_job(job_id, owner="A"))
    await store.create(make_job("b1", owner="B"))
    claimed = await store.claim("a1", "w", LEASE)
    assert claimed is not None and await store.count_active("A") == 3  # one processing, two queued
    await store.update(claimed.finished_by("w", _claim(claimed), COMPLETED, images=(), steps_done=1))  # type: ignore[arg-type]
    assert await store.count_active("A") == 2 and await store.count_active("B") == 1
    assert await store.count_active("nobody") == 0


async def test_claim_next_is_fair_between_owners(store: JobStore) -> None:
    """The owner with the fewest active jobs goes first, oldest first among equals: a key that filled the queue
    does not keep a lighter key's later job behind all of its own."""
    for i in range(4):
        await store.create(make_job(f"a{i}", owner="A", created_at=f"2030-01-01T00:00:0{i}.000000Z"))
    await store.create(make_job("b0", owner="B", created_at="2030-01-01T00:00:05.000000Z"))
    order = []
    while (job := await store.claim_next("w", LEASE, now=time.time())) is not None:
        order.append(job.id)
    assert order == ["b0", "a0", "a1", "a2", "a3"]


async def test_webhook_secrets_round_trip_and_rotate_with_compare_and_set(store: JobStore) -> None:
    assert await store.webhook_secrets("o") is None
    first = webhooks.SigningSecrets("o", webhooks.random_secret())
    assert await store.put_webhook_secrets(first) == first
    assert await store.webhook_secrets("o") == first
    # A second "first need" (another replica) loses and reads the winner's secret.
    assert await store.put_webhook_secrets(webhooks.SigningSecrets("o", webhooks.random_secret())) == first
    rotated = first.rotated(webhooks.random_secret(), now=1000.0, overlap_s=60.0)
    rival = first.rotated(webhooks.random_secret(), now=1000.0, overlap_s=60.0)
    assert await store.put_webhook_secrets(rotated) == rotated
    assert await store.put_webhook_secrets(rival) == rotated, "a rotation from a stale read loses"
    stored = await store.webhook_secrets("o")
    assert stored == rotated and stored is not None and stored.version == 2
    assert stored.previous == first.current and stored.previous_until == 1060.0
    assert stored.signing(1059.0) == (rotated.current, first.current) and stored.signing(1060.0) == (rotated.current,)
    assert await store.webhook_secrets("p") is None  # per owner
    assert first.current not in repr(stored) and rotated.current not in repr(stored)  # never in logs


async def test_concurrent_rotations_each_answer_a_secret_that_was_stored(store: JobStore) -> None:
    """Rotations that overlap make one rotation between them (the losers answer the winner's secret): however
    they interleave, the stored version counts exactly the distinct secrets the callers were given."""
    keeper = webhooks.SecretKeeper(store, seed=None, overlap_s=60.0)
    original = await keeper.current("o")
    results = await asyncio.gather(*(keeper.rotate("o") for _ in range(8)))
    stored = await store.webhook_secrets("o")
    answered = {r.current for r in results}
    assert stored is not None and stored.version == 1 + len(answered) and stored.current in answered
    assert original.current not in answered


async def test_rotations_that_read_the_same_version_make_one() -> None:
    store = InMemoryJobStore(yields=True)  # every call yields: all eight read version 1 before any writes
    keeper = webhooks.SecretKeeper(store, seed=None, overlap_s=60.0)
    original = await keeper.current("o")
    results = await asyncio.gather(*(keeper.rotate("o") for _ in range(8)))
    stored = await store.webhook_secrets("o")
    assert stored is not None and stored.version == 2, "one rotation"
    assert {r.current for r in results} == {stored.current} and stored.previous == original.current


async def test_first_secret_is_derived_from_a_configured_seed(store: JobStore) -> None:
    seeded = webhooks.SecretKeeper(store, seed="server-secret", overlap_s=60.0)
    assert (await seeded.current("o")).current == webhooks.derived_secret("server-secret", "o")
    rotated = await seeded.rotate("o")
    assert rotated.current != webhooks.derived_secret("server-secret", "o")  # rotations are random


async def test_webhook_events_round_trip_and_start_is_due_while_processing(store: JobStore) -> None:
    both = (WebhookEvent.START, WebhookEvent.COMPLETED)
    await store.create(make_job("a", webhook="http://h/x", events=both))
    await store.create(make_job("b", webhook="http://h/y"))
    got = await store.get("a")
    assert got is not None and got.webhook is not None and got.webhook.events == both
    assert await store.claim_delivery("d", LEASE, 100.0) is None  # nothing is due while queued
    claim = _claim(await store.claim("a", "w", LEASE))
    await store.claim("b", "w", LEASE)
    start = await store.claim_delivery("d", LEASE, 100.0)
    assert start is not None and start.id == "a" and start.webhook is not None
    assert start.webhook.event == WebhookEvent.START and start.webhook.lease is not None
    assert await store.claim_delivery("d2", LEASE, 100.0) is None  # leased, and b only wants `completed`
    sent = start.with_delivery(DeliveryAttempt(now_iso(), 200, None, WebhookEvent.START), max_attempts=3)
    assert sent is not None
    done = await store.update(sent)
    assert done.webhook is not None and done.webhook.status == WebhookStatus.DELIVERED
    finished = done.finished_by("w", claim, COMPLETED, images=(_image("a"),))
    assert finished is not None
    final = await store.update(finished)
    assert final.webhook is not None and (final.webhook.event, final.webhook.status) == ("completed", "pending")
    claimed = await store.claim_delivery("d", LEASE, 100.0)
    assert claimed is not None and claimed.id == "a" and claimed.webhook is not None
    assert claimed.webhook.event == WebhookEvent.COMPLETED


async def test_sqlite_survives_reopen(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    await store.create(make_job("x"))
    claimed = await store.claim("x", "w", LEASE)
    await store.close()
    reopened = SqliteJobStore(tmp_path / "jobs.sqlite3")
    try:
        [job] = await reopened.unfinished()
        assert job == claimed and job.status == PROCESSING and job.lease is not None and job.lease.owner == "w"
    finally:
        await reopened.close()


_LEGACY_SCHEMA = """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at TEXT NOT NULL,
    completed_at TEXT,
    idempotency_key TEXT,
    webhook_status TEXT,
    data TEXT NOT NULL
);
CREATE UNIQUE INDEX jobs_idempotency ON jobs (owner, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_status ON jobs (status, created_at);
"""


def _legacy_row(job_id: str, status: str, **extra: object) -> dict[str, object]:
    """A row as `gateway/jobs.py` before schema 2 wrote it (`asdict` of its mutable Job)."""
    return {
        "id": job_id,
        "owner": owner_of("key"),
        "status": status,
        "params": {
            "prompt": "a cat",
            "negative_prompt": None,
            "model": "imagen-v2",
            "strength": 0.8,
            "steps": 10,
            "guidance_scale": 7.5,
            "seed": 1234,
            "style": None,
            "num_images": 2,
            "webhook_url": "http://hook.test/x",
            "processed_size": {"width": 64, "height": 48},
            "effective_steps": 8,
            "asynchronous": True,
        },
        "input": {"url": "http://img.test/a.png", "name": f"{job_id}_input.png", "width": 70, "height": 50},
        "created_at": "2024-05-01T10:00:00.000Z",
        "updated_at": "2024-05-01T10:00:01.000Z",
        "completed_at": None,
        "result": None,
        "error": None,
        "webhook": {"url": "http://hook.test/x", "status": "pending", "attempts": []},
        "idempotency_key": "idem",
        "request_hash": "h",
        "run_attempts": 1,
        "cancel_requested": False,
        "steps_done": 0,
        **extra,
    }


async def test_sqlite_migrates_a_legacy_v1_file(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(_LEGACY_SCHEMA)
    running = _legacy_row("img_transform_old1", "processing")
    done = _legacy_row(
        "img_transform_old2",
        "completed",
        completed_at="2024-05-01T10:00:05.000Z",
        result={"images": [{"url": "http://g/a_0.png", "width": 64, "height": 48, "seed": 1234}]},
        webhook={
            "url": "http://hook.test/x",
            "status": "delivered",
            "attempts": [{"at": "2024-05-01T10:00:06.000Z", "status_code": 200, "error": None}],
        },
        idempotency_key=None,
    )
    for row in (running, done):
        old.execute(
            "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row["id"],
                row["owner"],
                row["status"],
                row["created_at"],
                row["completed_at"],
                row["idempotency_key"],
                row["webhook"]["status"],  # type: ignore[index]
                json.dumps(row),
            ),
        )
    old.commit()
    old.close()

    store = SqliteJobStore(path)
    try:
        job = await store.get("img_transform_old1")
        assert job is not None
        assert job.status == PROCESSING and isinstance(job.status, JobStatus)
        assert job.spec.processed_size == Size(64, 48) and job.spec.seed == 1234 and job.spec.asynchronous
        assert (
            job.spec.effective_steps == 8 and job.spec.num_images == 2 and job.spec.webhook_url == "http://hook.test/x"
        )
        assert job.input.name == "img_transform_old1_input.png" and job.input.width == 70
        assert job.webhook is not None and job.webhook.status == WebhookStatus.PENDING
        assert job.run_attempts == 1 and job.lease is None and job.images == ()
        assert [j.id for j in await store.unfinished()] == ["img_transform_old1"]
        assert await store.get_idempotent(owner_of("key"), "idem") == job
        finished = await store.get("img_transform_old2")
        assert finished is not None and finished.status == COMPLETED
        assert finished.images == (
            OutputImage(name="img_transform_old2_0.png", url="http://g/a_0.png", width=64, height=48, seed=1234),
        )
        assert finished.webhook is not None and finished.webhook.attempts[0].ok
        assert finished.stored_names == ["img_transform_old2_input.png", "img_transform_old2_0.png"]
        # Migrated rows take part in compare-and-set like new ones.
        updated = await store.update(dataclasses.replace(job, steps_done=3))
        assert updated.version == job.version + 1
        with pytest.raises(StaleJob):
            await store.update(job)
    finally:
        await store.close()
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    check.close()
    again = SqliteJobStore(path)  # a second open finds the work done
    try:
        assert (await again.get("img_transform_old1")) is not None
    finally:
        await again.close()


async def test_sqlite_locked_file_is_unavailable_then_recovers(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    store = SqliteJobStore(path, busy_timeout_s=0.05)
    try:
        created = await store.create(make_job("a"))
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(StoreUnavailable):
                await store.create(make_job("b"))
            with pytest.raises(StoreUnavailable):
                await store.claim("a", "w", LEASE)
            with pytest.raises(StoreUnavailable):
                await store.update(dataclasses.replace(created, steps_done=1))
        finally:
            other.execute("ROLLBACK")
            other.close()
        # The failed writes left nothing behind, and the store works again.
        assert await store.get("a") == created and await store.get("b") is None
        assert (await store.claim("a", "w", LEASE)) is not None
        assert (await store.create(make_job("b"))).version == 1
    finally:
        await store.close()


# --- owners and webhooks -----------------------------------------------------------------------------------


def test_owner_is_a_hash_of_the_key() -> None:
    assert owner_of(None) == "anonymous"
    assert owner_of("secret-key") != "secret-key" and len(owner_of("secret-key")) == 64
    assert owner_of("a") == owner_of("a") != owner_of("b")


def test_request_hash_ignores_key_order_and_spacing() -> None:
    assert request_hash({"a": 1, "b": [1, 2]}) == request_hash({"b": [1, 2], "a": 1})
    assert request_hash({"a": 1}) != request_hash({"a": 2})


def test_signatures_verify_with_the_standard_webhooks_library() -> None:
    secret = webhooks.random_secret()
    assert secret.startswith("whsec_") and len(base64.b64decode(secret.removeprefix("whsec_"))) == 32
    body = b'{"id":"img_transform_1","status":"completed"}'
    headers = webhooks.signed_headers([secret], "img_transform_1_completed", body)
    assert headers[webhooks.ID_HEADER] == "img_transform_1_completed"
    assert headers[webhooks.SIGNATURE_HEADER].startswith("v1,")
    assert Webhook(secret).verify(body, headers) == {"id": "img_transform_1", "status": "completed"}
    for tampered, tampered_body in (
        (headers, body[:-1] + b" "),
        ({**headers, webhooks.ID_HEADER: "img_transform_2_completed"}, body),
        ({k: v for k, v in headers.items() if k != webhooks.TIMESTAMP_HEADER}, body),
    ):
        with pytest.raises(WebhookVerificationError):
            Webhook(secret).verify(tampered_body, tampered)
    with pytest.raises(WebhookVerificationError):
        Webhook(webhooks.random_secret()).verify(body, headers)
    stale = webhooks.signed_headers([secret], "img_transform_1_completed", body, now=time.time() - 3600)
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(secret).verify(body, stale)


def test_two_secrets_sign_side_by_side_and_each_verifies() -> None:
    old, new = webhooks.random_secret(), webhooks.random_secret()
    body = b'{"id":"j"}'
    headers = webhooks.signed_headers([new, old], "j_completed", body)
    assert len(headers[webhooks.SIGNATURE_HEADER].split(" ")) == 2
    Webhook(new).verify(body, headers)
    Webhook(old).verify(body, headers)


def test_derived_first_secrets_are_per_owner_and_stable() -> None:
    a = webhooks.derived_secret("server-secret", owner_of("k"))
    assert a == webhooks.derived_secret("server-secret", owner_of("k")) and a.startswith("whsec_")
    assert a != webhooks.derived_secret("server-secret", owner_of("k2"))
    assert a != webhooks.derived_secret("other", owner_of("k"))
    Webhook(a)  # a valid Standard Webhooks secret


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    rng = random.Random(0)
    delays = [webhooks.backoff_s(n, 1.0, rng) for n in range(1, 8)]
    for n, delay in enumerate(delays, start=1):
        assert 0.5 * 2 ** (n - 1) <= delay <= 1.5 * 2 ** (n - 1)
    assert webhooks.backoff_s(30, 1.0, rng) <= webhooks.MAX_BACKOFF_S * 1.5
