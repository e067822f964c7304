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
from gateway.jobs import sqlite as sqlite_store
from gateway.jobs import webhooks
from gateway.jobs.create import request_hash
from gateway.jobs.model import (
    CANCELED,
    COMPLETED,
    FAILED,
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
from gateway.jobs.store import FinishedWork, IdempotencyConflict, JobStore, QueuePlace, StaleJob, transition
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


async def _claim_all(store: JobStore, *, now: float | None = None, min_priority: int = 0) -> list[str]:
    order = []
    while (
        job := await store.claim_next("w", LEASE, now=time.time() if now is None else now, min_priority=min_priority)
    ) is not None:
        order.append(job.id)
    return order


def _at(second: int) -> str:
    return f"2030-01-01T00:{second // 60:02d}:{second % 60:02d}.000Z"


async def test_claim_next_is_fair_between_owners(store: JobStore) -> None:
    """Issue 24 (start-time fair queuing): a key that filled the queue does not keep another key's later job
    behind all of its own. With A's 100 jobs queued, B's one is claimed within one claim of the next one: next
    when A's first job was claimed already; right after it when B's tag ties A's first (the older goes first).
    One owner's jobs go in creation order."""
    for i in range(100):
        await store.create(make_job(f"a{i:02d}", owner="A", created_at=_at(i)))
    first = await store.claim_next("w", LEASE, now=time.time())
    assert first is not None and first.id == "a00"
    b = await store.create(make_job("b0", owner="B", created_at=_at(200)))
    assert b.fair_tag == 0.0 == first.fair_tag  # the clock is at A's claimed job; B was idle
    assert await _claim_all(store) == ["b0", *(f"a{i:02d}" for i in range(1, 100))]


async def test_claim_next_ties_of_tags_go_to_the_older_job(store: JobStore) -> None:
    for i in range(3):
        await store.create(make_job(f"a{i}", owner="A", created_at=_at(i)))
    await store.create(make_job("b0", owner="B", created_at=_at(10)))  # before any claim: tag 0, as a0's
    await store.create(make_job("c0", owner="C", created_at=_at(5)))  # tag 0 too, older than b0
    assert [(await store.get(j)).fair_tag for j in ("a0", "a1", "a2", "b0", "c0")] == [0, 1, 2, 0, 0]  # type: ignore[union-attr]
    assert await _claim_all(store) == ["a0", "c0", "b0", "a1", "a2"]


async def test_claim_next_higher_priority_first(store: JobStore) -> None:
    """A higher priority is always claimed first, whatever its tag and age; `min_priority` leaves lower ones."""
    for i in range(3):
        await store.create(make_job(f"n{i}", owner="A", created_at=_at(i)))
    await store.create(make_job("bulk", owner="B", created_at=_at(3), spec=make_spec(priority=0)))
    for i in range(3):  # A's interactive jobs: their own fair queue, tags from 0 again
        await store.create(make_job(f"i{i}", owner="A", created_at=_at(10 + i), spec=make_spec(priority=2)))
    assert await store.count_queued_by_priority() == {0: 1, 1: 3, 2: 3}
    assert await _claim_all(store, min_priority=2) == ["i0", "i1", "i2"]
    assert await _claim_all(store, min_priority=1) == ["n0", "n1", "n2"]
    await store.create(make_job("late", owner="C", created_at=_at(30), spec=make_spec(priority=2)))
    assert await _claim_all(store) == ["late", "bulk"]
    assert await store.count_queued_by_priority() == {}


async def test_claim_next_weights_owners_by_share(store: JobStore) -> None:
    """An owner whose jobs each take a share of 2.0 (half the weight) gets half the claims of one whose jobs take
    1.0, while both have jobs queued."""
    for i in range(10):
        await store.create(make_job(f"x{i}", owner="X", created_at=_at(2 * i)), share=2.0)
        await store.create(make_job(f"y{i}", owner="Y", created_at=_at(2 * i + 1)), share=1.0)
    order = await _claim_all(store)
    first = order[:12]
    assert sum(j.startswith("x") for j in first) == 4 and sum(j.startswith("y") for j in first) == 8, order
    assert [j for j in order if j.startswith("x")] == [f"x{i}" for i in range(10)]  # creation order per owner
    assert [j for j in order if j.startswith("y")] == [f"y{i}" for i in range(10)]


async def test_only_a_new_queued_job_takes_a_share(store: JobStore) -> None:
    """An idempotent duplicate and a job created already finished (a completed cache hit) leave the owner's
    virtual finish as it was; the tag is stored with the job."""
    first = await store.create(make_job("a", key="k", body="same"), share=3.0)
    assert first.fair_tag == 0.0
    assert (await store.create(make_job("dup", key="k", body="same"), share=3.0)).id == "a"
    hit = make_job("hit", status=COMPLETED, completed_at=now_iso(), cached_from="a")
    created_hit = await store.create(hit, share=3.0)
    assert created_hit.status == COMPLETED and created_hit.fair_tag == 0.0 and created_hit.cached_from == "a"
    second = await store.create(make_job("b"), share=3.0)
    assert second.fair_tag == 3.0  # after "a" only
    got = await store.get("b")
    assert got is not None and got.fair_tag == 3.0


async def test_a_job_past_its_queue_deadline_is_not_claimed_and_is_overdue(store: JobStore) -> None:
    now = 1_000.0
    limited = make_spec(max_queue_s=30.0)
    await store.create(make_job("late", created_at=_at(1), queue_deadline=now - 1.0, spec=limited))
    await store.create(make_job("edge", created_at=_at(2), queue_deadline=now, spec=limited))  # at `now`: overdue
    await store.create(make_job("fresh", created_at=_at(3), queue_deadline=now + 60.0, spec=limited))
    await store.create(make_job("free", created_at=_at(4)))
    assert [j.id for j in await store.overdue_in_queue(now, 10)] == ["late", "edge"]
    assert [j.id for j in await store.overdue_in_queue(now, 1)] == ["late"]
    claimed = await store.claim_next("w", LEASE, now=now)
    assert claimed is not None and claimed.id == "fresh" and claimed.queue_deadline is None  # started: no limit
    # Once started, its deadline no longer applies: later sweeps do not list it.
    assert [j.id for j in await store.overdue_in_queue(now + 3_600.0, 10)] == ["late", "edge"]
    assert await _claim_all(store, now=now) == ["free"]
    late = (await store.overdue_in_queue(now, 10))[0]
    timed_out, applied = await transition(store, late, lambda j: j.queue_timed_out(now))
    assert applied and timed_out.status == FAILED and timed_out.error is not None
    assert timed_out.error.code == "queue_timeout"
    assert [j.id for j in await store.overdue_in_queue(now, 10)] == ["edge"]  # a failed job is not overdue
    edge = await store.claim_next("w", LEASE, now=now - 10.0)  # asked before its deadline, "edge" runs
    assert edge is not None and edge.id == "edge"


async def test_queue_place_counts_what_claim_next_takes_first(store: JobStore) -> None:
    """Position and work ahead (UNet samples: images x steps x 2 with guidance) across priorities."""
    await store.create(make_job("n1", owner="A", created_at=_at(1), spec=make_spec(num_images=2)))  # work 8
    await store.create(make_job("n2", owner="A", created_at=_at(2), spec=make_spec(num_images=1)))  # work 4
    await store.create(make_job("b1", owner="B", created_at=_at(3), spec=make_spec(priority=0)))  # work 4
    await store.create(
        make_job("i1", owner="C", created_at=_at(4), spec=make_spec(priority=2, guidance_scale=1.0))
    )  # work 2
    await store.create(make_job("m1", owner="D", created_at=_at(5), spec=make_spec(num_images=3)))  # tag 0: work 12
    places = {}
    for job_id in ("i1", "n1", "m1", "n2", "b1"):
        job = await store.get(job_id)
        assert job is not None
        places[job_id] = await store.queue_place(job)
    assert places == {
        "i1": QueuePlace(1, 0.0),
        "n1": QueuePlace(2, 2.0),
        "m1": QueuePlace(3, 10.0),  # A's n2 has tag 1: D's first job (tag 0) goes before it
        "n2": QueuePlace(4, 22.0),
        "b1": QueuePlace(5, 26.0),
    }
    claimed = await store.claim_next("w", LEASE, now=time.time())
    assert claimed is not None and claimed.id == "i1"
    assert await store.queue_place(claimed) is None  # not queued any more
    b1 = await store.get("b1")
    assert b1 is not None and await store.queue_place(b1) == QueuePlace(4, 24.0)
    assert await store.queue_place(make_job("missing")) is None


async def test_find_result_is_the_owners_newest_completed_job_with_the_key(store: JobStore) -> None:
    async def finished(job_id: str, *, owner: str = "o", key: str | None = "r1", status: JobStatus = COMPLETED) -> Job:
        await store.create(make_job(job_id, owner=owner, result_key=key))
        claimed = await store.claim(job_id, "w", LEASE)
        assert claimed is not None
        done = claimed.finished_by(
            "w", _claim(claimed), status, images=(_image(job_id),) if status == COMPLETED else ()
        )
        assert done is not None
        return await store.update(done)

    assert await store.find_result("o", "r1") is None
    await store.create(make_job("queued", result_key="r1"))
    assert await store.find_result("o", "r1") is None  # not completed
    await finished("old")
    await asyncio.sleep(0.002)
    newest = await finished("new")
    await asyncio.sleep(0.002)
    await finished("failed", status=FAILED)
    await finished("other-owner", owner="p")
    await finished("other-key", key="r2")
    await finished("no-key", key=None)
    found = await store.find_result("o", "r1")
    assert found == newest and found is not None and found.images == (_image("new"),) and found.result_key == "r1"
    assert (await store.find_result("p", "r1")).id == "other-owner"  # type: ignore[union-attr]
    assert await store.find_result("q", "r1") is None


async def test_recent_finished_are_the_completed_runs_newest_first(store: JobStore) -> None:
    before = time.time() - 1.0
    ids = []
    for job_id, status in (("a", COMPLETED), ("failed", FAILED), ("b", COMPLETED), ("c", COMPLETED)):
        await store.create(make_job(job_id, spec=make_spec(model="m", num_images=2)))
        claimed = await store.claim(job_id, "w", LEASE)
        assert claimed is not None and claimed.started_at is not None
        done = claimed.finished_by("w", _claim(claimed), status)
        assert done is not None
        await store.update(done)
        ids.append(job_id)
        await asyncio.sleep(0.002)
    hit = make_job("hit", status=COMPLETED, completed_at=now_iso(), cached_from="a")  # never ran: no service time
    await store.create(hit)
    await store.create(make_job("waiting"))
    runs = await store.recent_finished(before, 10)
    assert len(runs) == 3 and all(isinstance(run, FinishedWork) for run in runs)
    assert [run.model for run in runs] == ["m"] * 3 and all(run.work == 8.0 for run in runs)
    # `completed_at` (hence `finished_at`) has millisecond resolution; `started_at` is the claim's float clock.
    assert all(before <= run.started_at <= run.finished_at + 0.001 <= time.time() + 1.0 for run in runs)
    finished_at = [run.finished_at for run in runs]
    assert finished_at == sorted(finished_at, reverse=True)  # newest first
    c = await store.get("c")
    assert c is not None and abs(runs[0].started_at - c.started_at) < 1e-6  # type: ignore[operator]
    assert len(await store.recent_finished(before, 2)) == 2
    assert await store.recent_finished(time.time() + 60.0, 10) == []


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


def _before_issue_24(job: Job) -> str:
    """The job's JSON as a gateway before issue 24 wrote it: none of that issue's keys."""
    data = json.loads(job_to_json(job))
    for key in ("fair_tag", "queue_deadline", "started_at", "result_key", "cached_from"):
        del data[key]
    for key in ("priority", "max_queue_s"):
        del data["spec"][key]
    return json.dumps(data)


async def test_sqlite_migrates_a_v5_file_to_the_fair_queue(tmp_path: Path) -> None:
    """A schema-5 file (before issue 24): its rows read back with the model's defaults (priority 1, tag 0, no
    deadline), its queued jobs get their work for `queue_place`, and they are claimed in the fair order beside
    new ones (tag 0, oldest first, so ahead of a new owner's job created after them)."""
    path = tmp_path / "v5.sqlite3"
    old = sqlite3.connect(path, isolation_level=None)
    for script in (sqlite_store._CREATE_V1, *(getattr(sqlite_store, f"_MIGRATE_V{v}") for v in range(2, 6))):
        old.executescript(script)
    old.execute("PRAGMA user_version = 5")
    rows = [
        make_job("old-a", owner="A", created_at=_at(1), spec=make_spec(num_images=2)),
        make_job("old-b", owner="A", created_at=_at(2)),
        make_job("old-done", owner="A", created_at=_at(0), status=COMPLETED, completed_at=now_iso()),
    ]
    for job in rows:
        old.execute(
            "INSERT INTO jobs (id, owner, created_at, idempotency_key, status, completed_at, webhook_status, data,"
            " version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1)",
            (job.id, job.owner, job.created_at, None, job.status, job.completed_at, None, _before_issue_24(job)),
        )
    old.close()

    store = SqliteJobStore(path)
    try:
        got = await store.get("old-a")
        assert got is not None and got.spec.priority == 1 and got.spec.max_queue_s is None
        assert (got.fair_tag, got.queue_deadline, got.started_at, got.result_key) == (0.0, None, None, None)
        assert await store.count_queued_by_priority() == {1: 2}
        old_b = await store.get("old-b")
        assert old_b is not None and await store.queue_place(old_b) == QueuePlace(2, 8.0)  # old-a's work: 8
        new = await store.create(make_job("new", owner="B", created_at=_at(3)))
        assert new.fair_tag == 0.0
        assert await _claim_all(store) == ["old-a", "old-b", "new"]
        done = await store.get("old-done")
        assert done is not None and done.status == COMPLETED and await store.recent_finished(0.0, 10) == []
    finally:
        await store.close()
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,) == (6,)
    check.close()


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
