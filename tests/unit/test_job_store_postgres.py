"""PostgresJobStore and PostgresEvents on a real PostgreSQL (tests/fixtures_postgres.py).

The `JobStore` contract tests of test_job_store.py run here too (every `test_*` there that takes the `store`
fixture, so contract tests added there are picked up), against a fresh database each. Then what only a shared
store has: two pools standing for two replicas racing on claims, idempotent creates, deliveries, locks and
migrations; the LISTEN/NOTIFY bus across instances and its reconnection; and an unavailable server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import psycopg
import pytest

from gateway.errors import StoreUnavailable
from gateway.jobs.events import EventKind, JobEvent, LocalEvents
from gateway.jobs.model import COMPLETED, PROCESSING, QUEUED, DeliveryAttempt, Job, WebhookStatus, now_iso
from gateway.jobs.postgres import MIGRATIONS, SCHEMA_VERSION, PostgresEvents, PostgresJobStore, migrate
from gateway.jobs.sqlite import SqliteJobStore
from gateway.jobs.store import IdempotencyConflict, QueuePlace, StaleJob
from gateway.jobs.stores import open_job_store
from gateway.jobs.webhooks import SigningSecrets, random_secret
from tests import fixtures_postgres
from tests.fixtures_postgres import private_cluster
from tests.unit import test_job_store as contract
from tests.unit.fakes import make_job, make_spec

pg_server = fixtures_postgres.pg_server
pg_url = fixtures_postgres.pg_url

LEASE = 10_000.0

# --- the contract, as test_job_store.py states it ----------------------------------------------------------

CONTRACT_TESTS = [
    name
    for name, fn in vars(contract).items()
    if name.startswith("test_") and inspect.iscoroutinefunction(fn) and "store" in inspect.signature(fn).parameters
]
globals().update({name: getattr(contract, name) for name in CONTRACT_TESTS})


@pytest.fixture
async def store(pg_url: str) -> AsyncIterator[PostgresJobStore]:
    made = await PostgresJobStore.open(pg_url)
    yield made
    await made.close()


@pytest.fixture
async def replicas(pg_url: str) -> AsyncIterator[tuple[PostgresJobStore, PostgresJobStore]]:
    """Two stores with two pools on one database: two gateway replicas."""
    a = await PostgresJobStore.open(pg_url, max_size=4)
    b = await PostgresJobStore.open(pg_url, max_size=4)
    yield a, b
    await a.close()
    await b.close()


def test_contract_tests_are_collected() -> None:
    assert {"test_round_trip_and_queries", "test_update_is_compare_and_set"} <= set(CONTRACT_TESTS)


def _ts(second: int) -> str:
    return f"2024-01-01T00:00:{second:02d}.000Z"


# --- the queue across replicas -------------------------------------------------------------------------------


async def test_claim_next_from_two_replicas_claims_every_job_once(
    replicas: tuple[PostgresJobStore, PostgresJobStore],
) -> None:
    a, b = replicas
    ids = [f"j{i:02d}" for i in range(50)]
    for i, job_id in enumerate(ids):
        await a.create(make_job(job_id, created_at=f"2024-01-01T00:{i // 60:02d}:{i % 60:02d}.000Z"))
    claimed: list[tuple[str, str]] = []

    async def worker(store: PostgresJobStore, name: str) -> None:
        while (job := await store.claim_next(name, LEASE, now=time.time())) is not None:
            assert job.status == PROCESSING and job.lease is not None and job.lease.owner == name
            claimed.append((job.id, name))

    await asyncio.gather(*(worker(store, f"{tag}{n}") for tag, store in (("a", a), ("b", b)) for n in range(4)))
    assert sorted(job_id for job_id, _ in claimed) == ids  # each exactly once
    assert {name[0] for _, name in claimed} == {"a", "b"}  # both replicas took work
    assert await a.count_queued() == 0
    for job in await b.unfinished():
        assert job.status == PROCESSING and job.run_attempts == 1 and job.version == 2


async def test_claim_next_oldest_due_first_and_skips_locked_rows(store: PostgresJobStore, pg_url: str) -> None:
    await store.create(make_job("late", created_at=_ts(1), not_before=500.0))  # a retry, not due before 500
    await store.create(make_job("old", created_at=_ts(2)))
    await store.create(make_job("new", created_at=_ts(3)))
    assert await store.count_queued() == 3
    # Another replica's transaction holds the oldest due row: claim_next neither waits for it nor returns it.
    async with await psycopg.AsyncConnection.connect(pg_url) as other:
        await other.execute("SELECT id FROM jobs WHERE id = 'old' FOR UPDATE")
        started = time.monotonic()
        job = await store.claim_next("w", LEASE, now=100.0)
        assert job is not None and job.id == "new" and time.monotonic() - started < 1.0
        await other.rollback()
    job = await store.claim_next("w", LEASE, now=100.0)
    assert job is not None and job.id == "old"
    assert await store.claim_next("w", LEASE, now=100.0) is None  # "late" is not due
    job = await store.claim_next("w", LEASE, now=500.0)
    assert job is not None and job.id == "late" and job.run_attempts == 1


async def test_release_requeues_not_before_and_queue_place(store: PostgresJobStore) -> None:
    for second, job_id in enumerate(["a", "b", "c"], start=1):
        await store.create(make_job(job_id, created_at=_ts(second)))
    job_c = await store.get("c")
    assert job_c is not None and await store.queue_place(job_c) == QueuePlace(3, 8.0)
    taken = await store.claim_next("w", LEASE, now=0.0)
    assert taken is not None and taken.id == "a" and await store.queue_place(taken) is None
    assert await store.queue_place(job_c) == QueuePlace(2, 4.0)
    claim = taken.lease.claim  # type: ignore[union-attr]
    assert await store.release("a", "other", claim) is None  # not the holder
    assert await store.release("a", "w", "0" * 16) is None  # the worker, but not this claim
    released = await store.release("a", "w", claim, not_before=50.0)
    assert released is not None and released.status == QUEUED and released.lease is None
    assert released.not_before == 50.0 and await store.queue_place(released) == QueuePlace(1, 0.0)
    assert (await store.claim_next("w", LEASE, now=49.0)).id == "b"  # type: ignore[union-attr]
    assert (await store.claim_next("w", LEASE, now=50.0)).id == "a"  # type: ignore[union-attr]


async def test_concurrent_creates_of_one_owner_take_distinct_tags(
    replicas: tuple[PostgresJobStore, PostgresJobStore],
) -> None:
    """Issue 24: the owner's share row serialises its creates (on any replica), so each takes its own tag; an
    idempotent duplicate that lost the race gives its share back (rolled back to its savepoint)."""
    a, b = replicas
    racers = [(f"{tag}{i}", store) for i in range(10) for tag, store in (("a", a), ("b", b))]
    created = await asyncio.gather(*(store.create(make_job(job_id, owner="A"), share=2.0) for job_id, store in racers))
    assert sorted(job.fair_tag for job in created) == [2.0 * i for i in range(20)]
    assert [await a.get(job.id) for job in created] == list(created)  # the tag is stored (column and JSON)
    dupes = await asyncio.gather(
        *(s.create(make_job(f"k{i}", owner="A", key="k"), share=2.0) for i, s in enumerate([a, b] * 4))
    )
    assert len({job.id for job in dupes}) == 1 and dupes[0].fair_tag == 40.0
    after = await b.create(make_job("after", owner="A"), share=2.0)
    assert after.fair_tag == 42.0  # one share for the eight racing duplicates
    other = await a.create(make_job("other", owner="B"), share=2.0)
    assert other.fair_tag == 0.0  # B's share is its own
    # Claims on both replicas move the clock to the largest tag claimed; an idle owner starts there.
    claims = await asyncio.gather(*(s.claim_next(f"w{i}", LEASE, now=time.time()) for i, s in enumerate([a, b] * 3)))
    tags = sorted(job.fair_tag for job in claims if job is not None)
    assert tags == [0.0, 0.0, 2.0, 4.0, 6.0, 8.0]
    assert (await b.create(make_job("idle", owner="C"), share=1.0)).fair_tag == 8.0


async def test_idempotent_create_raced_from_two_replicas_makes_one_job(
    replicas: tuple[PostgresJobStore, PostgresJobStore],
) -> None:
    a, b = replicas
    racers = [(f"{tag}{i}", store) for i in range(10) for tag, store in (("a", a), ("b", b))]
    created = await asyncio.gather(*(store.create(make_job(job_id, key="k", body="same")) for job_id, store in racers))
    assert len({job.id for job in created}) == 1
    assert all(job.version == 1 for job in created)
    assert len(await a.unfinished()) == 1
    results = await asyncio.gather(
        a.create(make_job("x1", key="k", body="other")),
        b.create(make_job("x2", key="k", body="other")),
        return_exceptions=True,
    )
    assert all(isinstance(result, IdempotencyConflict) for result in results)


async def test_create_retried_after_a_lost_commit_returns_the_job(store: PostgresJobStore) -> None:
    job = make_job("a")
    first = await store.create(job)
    assert await store.create(job) == first  # the same create again (its first answer was lost): no error
    with pytest.raises(StoreUnavailable):
        await store.create(make_job("a", owner="someone-else"))  # a genuine id collision is loud


async def test_expired_leases(store: PostgresJobStore) -> None:
    # Lease durations: negative ones expired that long ago (by the database's clock, as every lease time).
    for second, (job_id, lease_s) in enumerate([("dead1", -5.0), ("alive", 50.0), ("dead2", -3.0)], start=1):
        await store.create(make_job(job_id, created_at=_ts(second)))
        await store.claim(job_id, "w", lease_s)
    await store.create(make_job("queued", created_at=_ts(9)))
    done = await store.create(make_job("done", created_at=_ts(0)))
    await store.update(done.finished_as(COMPLETED))
    assert [j.id for j in await store.expired_leases(limit=10)] == ["dead1", "dead2"]
    assert [j.id for j in await store.expired_leases(limit=1)] == ["dead1"]
    # Taking an orphan over is a compare-and-set like any write: one replica wins.
    [orphan] = await store.expired_leases(limit=1)
    requeued = await store.update(orphan.requeued())  # type: ignore[arg-type]
    with pytest.raises(StaleJob):
        await store.update(orphan.requeued())  # type: ignore[arg-type]
    assert requeued.status == QUEUED and [j.id for j in await store.expired_leases(limit=10)] == ["dead2"]


async def test_lease_times_are_the_database_clock(
    replicas: tuple[PostgresJobStore, PostgresJobStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 22: a replica whose clock runs 20 s ahead must not see a live lease as expired (it would take running
    jobs over until they fail `run_attempts_exhausted`), nor lease by its own clock: the store computes
    `expires_at` and the expiry from the database's clock."""
    a, b = replicas
    await a.create(make_job("live"))
    claimed = await a.claim("live", "w-a", 10.0)  # A's clock is right: a live 10 s lease
    assert claimed is not None and claimed.lease is not None
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 20.0)  # B's clock, from here on, is 20 s ahead
    assert await b.expired_leases(limit=10) == []  # B sees A's lease as live
    await b.create(make_job("b-job"))
    taken = await b.claim_next("w-b", 10.0, now=time.time())
    assert taken is not None and taken.id == "b-job" and taken.lease is not None
    assert abs(taken.lease.expires_at - (real() + 10.0)) < 5.0  # 10 s from the database's now, not B's
    renewed = await b.renew("live", "w-a", claimed.lease.claim, 10.0)
    assert renewed is not None and renewed.lease is not None and renewed.lease.expires_at < real() + 15.0
    assert await a.expired_leases(limit=10) == await b.expired_leases(limit=10) == []
    # Both agree a lease expired once it did by the database's clock.
    await b.renew("live", "w-a", claimed.lease.claim, -1.0)
    assert (
        [j.id for j in await a.expired_leases(limit=10)] == [j.id for j in await b.expired_leases(limit=10)] == ["live"]
    )


async def _finished_with_webhook(store: PostgresJobStore, job_id: str, *, second: int = 1) -> Job:
    await store.create(make_job(job_id, webhook="http://hook.test/x", created_at=_ts(second)))
    claimed = await store.claim(job_id, "w", LEASE)
    claim = claimed.lease.claim  # type: ignore[union-attr]
    return await store.update(claimed.finished_by("w", claim, COMPLETED))  # type: ignore[union-attr,arg-type]


async def test_claim_delivery_is_exclusive(replicas: tuple[PostgresJobStore, PostgresJobStore]) -> None:
    a, b = replicas
    await a.create(make_job("no-hook"))
    await a.create(make_job("running", webhook="http://hook.test/x"))  # not final: not delivered yet
    await _finished_with_webhook(a, "j")
    results = await asyncio.gather(*(s.claim_delivery(f"d{i}", 100.0, now=10.0) for i, s in enumerate([a, b] * 4)))
    winners = [job for job in results if job is not None]
    assert len(winners) == 1
    [winner] = winners
    assert winner.webhook is not None and winner.webhook.lease is not None
    holder = winner.webhook.lease.owner
    assert await b.claim_delivery("other", 200.0, now=50.0) is None  # its lease is live
    # Not even its holder gets a live lease again: a delivery in flight is never handed out twice.
    assert await a.claim_delivery(holder, 120.0, now=50.0) is None
    # The attempt failed: recorded through update (releasing the lease), due again at 300.
    again = winner
    retry = again.with_delivery(DeliveryAttempt(now_iso(), 500, None), max_attempts=3, next_attempt_at=300.0)
    await a.update(retry)  # type: ignore[arg-type]
    assert await b.claim_delivery("other", 400.0, now=299.0) is None  # not due
    taken = await b.claim_delivery("other", 400.0, now=300.0)
    assert taken is not None and taken.webhook.lease.owner == "other"  # type: ignore[union-attr]
    # Its replica died: once the lease expired another takes it over.
    over = await a.claim_delivery("third", 600.0, now=401.0)
    assert over is not None and over.webhook.lease.owner == "third"  # type: ignore[union-attr]
    delivered = over.with_delivery(DeliveryAttempt(now_iso(), 204, None), max_attempts=3)
    stored = await a.update(delivered)  # type: ignore[arg-type]
    assert stored.webhook.status == WebhookStatus.DELIVERED  # type: ignore[union-attr]
    assert await b.claim_delivery("other", 10_000.0, now=9_000.0) is None
    assert await a.undelivered() == []


async def test_claim_delivery_oldest_due_first(store: PostgresJobStore) -> None:
    first = await _finished_with_webhook(store, "first", second=1)
    await _finished_with_webhook(store, "second", second=2)
    retry = first.with_delivery(DeliveryAttempt(now_iso(), 500, None), max_attempts=3, next_attempt_at=20.0)
    await store.update(retry)  # type: ignore[arg-type]
    assert [j.id for j in await store.undelivered()] == ["first", "second"]
    got = await store.claim_delivery("d", 100.0, now=30.0)
    assert got is not None and got.id == "second"  # due since 0, before "first" (due at 20)
    got = await store.claim_delivery("d2", 100.0, now=30.0)
    assert got is not None and got.id == "first"
    assert await store.claim_delivery("d3", 100.0, now=30.0) is None


async def test_webhook_secrets_raced_from_two_replicas(replicas: tuple[PostgresJobStore, PostgresJobStore]) -> None:
    """First needs on two replicas store one secret; rotations from one read make one rotation, both answer it."""
    a, b = replicas
    firsts = await asyncio.gather(*(s.put_webhook_secrets(SigningSecrets("o", random_secret())) for s in [a, b] * 4))
    assert len({f.current for f in firsts}) == 1 and firsts[0].version == 1
    base = firsts[0]
    rotations = [base.rotated(random_secret(), now=10.0, overlap_s=5.0) for _ in range(8)]
    answers = await asyncio.gather(*(s.put_webhook_secrets(r) for s, r in zip([a, b] * 4, rotations, strict=True)))
    assert len({x.current for x in answers}) == 1 and answers[0].version == 2
    assert await b.webhook_secrets("o") == answers[0] and answers[0].previous == base.current


async def test_acquire_lock_exclusive_and_expiring(replicas: tuple[PostgresJobStore, PostgresJobStore]) -> None:
    a, b = replicas
    results = await asyncio.gather(
        *(s.acquire_lock("retention", f"h{i}", 100.0, now=0.0) for i, s in enumerate([a, b] * 5))
    )
    assert results.count(True) == 1  # fmt: skip
    holder = f"h{results.index(True)}"
    assert not await a.acquire_lock("retention", "intruder", 200.0, now=99.0)  # live
    assert await b.acquire_lock("retention", holder, 200.0, now=99.0)  # its holder renews it
    assert not await a.acquire_lock("retention", "intruder", 300.0, now=199.0)
    assert await a.acquire_lock("retention", "intruder", 300.0, now=200.0)  # expired: taken over
    assert not await b.acquire_lock("retention", holder, 400.0, now=250.0)  # the old holder lost it
    assert await b.acquire_lock("other-chore", holder, 400.0, now=250.0)  # names are independent


# --- migrations -------------------------------------------------------------------------------------------


async def test_concurrent_opens_migrate_once(pg_url: str) -> None:
    stores = await asyncio.gather(*(PostgresJobStore.open(pg_url, min_size=1, max_size=2) for _ in range(4)))
    try:
        await stores[0].create(make_job("a"))
        assert all([await s.get("a") is not None for s in stores])
    finally:
        for s in stores:
            await s.close()
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
    assert rows == [(v,) for v in range(1, SCHEMA_VERSION + 1)]


async def test_concurrent_migrations_apply_each_version_once(pg_url: str) -> None:
    connections = [await psycopg.AsyncConnection.connect(pg_url) for _ in range(4)]
    try:
        applied = await asyncio.gather(*(migrate(conn) for conn in connections))
        assert sorted(applied, key=len) == [[], [], [], list(range(1, SCHEMA_VERSION + 1))]  # one did the work
        assert await migrate(connections[0]) == []  # and a later start finds it done
    finally:
        for conn in connections:
            await conn.close()


async def test_migration_to_the_fair_queue_keeps_old_rows(pg_url: str) -> None:
    """Schema 3 (before issue 24) to the latest: old rows read back with the model's defaults, queued ones get
    their work (images x steps, x2 with guidance) and are claimed in the fair order beside new ones."""
    old_jobs = [
        make_job("old-a", owner="A", created_at=_ts(1), spec=make_spec(num_images=2)),
        make_job("old-b", owner="A", created_at=_ts(2), spec=make_spec(guidance_scale=1.0)),
        make_job("old-done", owner="A", created_at=_ts(0), status=COMPLETED, completed_at=now_iso()),
    ]
    async with await psycopg.AsyncConnection.connect(pg_url) as conn:
        await conn.execute(
            "CREATE TABLE schema_migrations"
            " (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for version, script in enumerate(MIGRATIONS[:3], start=1):
            await conn.execute(script.encode())
            await conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
        for job in old_jobs:
            await conn.execute(
                "INSERT INTO jobs (id, owner, created_at, status, completed_at, version, data)"
                " VALUES (%s, %s, %s, %s, %s, 1, %s::jsonb)",
                (job.id, job.owner, job.created_at, job.status, job.completed_at, contract._before_issue_24(job)),
            )
        await conn.commit()
        assert await migrate(conn) == list(range(4, SCHEMA_VERSION + 1))
    store = await PostgresJobStore.open(pg_url)
    try:
        got = await store.get("old-a")
        assert got is not None and got.spec.priority == 1 and got.fair_tag == 0.0 and got.queue_deadline is None
        assert await store.count_queued_by_priority() == {1: 2}
        old_b = await store.get("old-b")
        assert old_b is not None and await store.queue_place(old_b) == QueuePlace(2, 8.0)
        new = await store.create(make_job("new", owner="B", created_at=_ts(3)))
        assert new.fair_tag == 0.0
        order = [(await store.claim_next("w", LEASE, now=time.time())) for _ in range(4)]
        assert [job.id if job else None for job in order] == ["old-a", "old-b", "new", None]
        assert await store.recent_finished(0.0, 10) == []  # the old completed job has no start time
    finally:
        await store.close()


# --- events -----------------------------------------------------------------------------------------------


class Collector:
    def __init__(self) -> None:
        self.events: list[JobEvent] = []
        self._changed = asyncio.Event()

    def __call__(self, event: JobEvent) -> None:
        self.events.append(event)
        self._changed.set()

    async def wait_for(self, keep: Callable[[JobEvent], bool], within_s: float = 5.0) -> JobEvent:
        async with asyncio.timeout(within_s):
            while True:
                found = next((event for event in self.events if keep(event)), None)
                if found is not None:
                    return found
                self._changed.clear()
                await self._changed.wait()


async def _listeners(pg_url: str, store: PostgresJobStore) -> tuple[int, int]:
    async with await psycopg.AsyncConnection.connect(pg_url) as conn:
        cur = await conn.execute(
            "SELECT count(*) FILTER (WHERE application_name = 'events-a'),"
            " count(*) FILTER (WHERE application_name = 'events-b')"
            " FROM pg_stat_activity WHERE datname = current_database()"
        )
        row = await cur.fetchone()
    assert row is not None
    return row[0], row[1]


@pytest.fixture
async def buses(
    pg_url: str, replicas: tuple[PostgresJobStore, PostgresJobStore]
) -> AsyncIterator[tuple[PostgresEvents, PostgresEvents]]:
    a, b = replicas
    bus_a = PostgresEvents(pg_url, a.pool, application_name="events-a", reconnect_min_s=0.05)
    bus_b = PostgresEvents(pg_url, b.pool, application_name="events-b", reconnect_min_s=0.05, ping_s=0.5)
    yield bus_a, bus_b
    await bus_a.close()
    await bus_b.close()


async def test_events_round_trip_between_replicas(
    pg_url: str, buses: tuple[PostgresEvents, PostgresEvents], replicas: tuple[PostgresJobStore, PostgresJobStore]
) -> None:
    bus_a, bus_b = buses
    got_a, got_b = Collector(), Collector()
    await bus_a.start(got_a)
    await bus_b.start(got_b)
    await bus_b.start(got_b)  # idempotent: still one listening connection
    assert bus_a.listening and bus_b.listening and await _listeners(pg_url, replicas[0]) == (1, 1)
    sent = JobEvent("img_1", EventKind.PROGRESS, 3, 10)
    await bus_a.publish(sent)
    assert await got_b.wait_for(lambda e: e.job_id == "img_1") == sent  # the other replica
    assert await got_a.wait_for(lambda e: e.job_id == "img_1") == sent  # and the publisher's own
    # A foreign or malformed payload on the channel is ignored; the listener goes on.
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        await conn.execute("SELECT pg_notify('imagen_jobs', 'not an event'), pg_notify('imagen_jobs', 'a:b:c:d')")
    await bus_b.publish(JobEvent("img_2", EventKind.CANCEL))
    assert (await got_a.wait_for(lambda e: e.job_id == "img_2")).kind == EventKind.CANCEL
    assert [e.job_id for e in got_a.events] == ["img_1", "img_2"]
    await asyncio.sleep(0.7)  # past bus_b's ping interval: the silent connection is checked and kept
    assert bus_b.connects == 1


async def test_events_reconnect_after_the_listen_connection_is_killed(
    pg_url: str, buses: tuple[PostgresEvents, PostgresEvents], replicas: tuple[PostgresJobStore, PostgresJobStore]
) -> None:
    bus_a, bus_b = buses
    got_b = Collector()
    await bus_a.start(Collector())
    await bus_b.start(got_b)
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as admin:
        cur = await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'events-b' AND datname = current_database()"
        )
        assert await cur.fetchall() == [(True,)]
    async with asyncio.timeout(10):
        while bus_b.connects < 2 or not bus_b.listening:  # noqa: ASYNC110 (polling the bus from outside)
            await asyncio.sleep(0.02)
    await bus_a.publish(JobEvent("after", EventKind.FINAL))
    assert (await got_b.wait_for(lambda e: e.job_id == "after")).kind == EventKind.FINAL
    assert await _listeners(pg_url, replicas[0]) == (1, 1)


async def test_handler_errors_do_not_stop_the_listener(buses: tuple[PostgresEvents, PostgresEvents]) -> None:
    bus_a, _ = buses
    got = Collector()

    def handler(event: JobEvent) -> None:
        if event.job_id == "boom":
            raise RuntimeError("handler bug")
        got(event)

    await bus_a.start(handler)
    await bus_a.publish(JobEvent("boom", EventKind.CREATED))
    await bus_a.publish(JobEvent("fine", EventKind.CREATED))
    await got.wait_for(lambda e: e.job_id == "fine")
    assert bus_a.connects == 1


# --- an unavailable server ------------------------------------------------------------------------------


async def test_stopped_server_is_unavailable_then_recovers() -> None:
    with private_cluster() as cluster:
        url = cluster.url()
        store = await PostgresJobStore.open(url, pool_timeout_s=0.25, connect_timeout_s=1.0)
        bus = PostgresEvents(url, store.pool, reconnect_min_s=0.05, reconnect_max_s=0.2)
        got = Collector()
        try:
            await bus.start(got)
            created = await store.create(make_job("a"))
            await asyncio.to_thread(cluster.stop)
            calls: list[Callable[[], object]] = [
                lambda: store.create(make_job("b")),
                lambda: store.get("a"),
                lambda: store.claim_next("w", LEASE, now=0.0),
                lambda: store.update(dataclasses.replace(created, steps_done=1)),
                lambda: store.acquire_lock("retention", "h", 10.0, now=0.0),
            ]
            for call in calls:
                with pytest.raises(StoreUnavailable):
                    await call()  # type: ignore[misc]
            await bus.publish(JobEvent("lost", EventKind.CREATED))  # best effort: logged, not raised
            with pytest.raises(StoreUnavailable):
                await PostgresJobStore.open(url, connect_timeout_s=0.5)
            await asyncio.to_thread(cluster.start)
            # The pool replaces its dead connections; the failed writes left nothing behind.
            async with asyncio.timeout(15):
                while True:
                    try:
                        assert await store.get("a") == created
                        break
                    except StoreUnavailable:
                        await asyncio.sleep(0.1)
            assert await store.get("b") is None
            assert (await store.claim_next("w", LEASE, now=0.0)).id == "a"  # type: ignore[union-attr]
            # The bus reconnects too.
            async with asyncio.timeout(15):
                while not bus.listening:  # noqa: ASYNC110 (polling the bus from outside)
                    await asyncio.sleep(0.05)
            await bus.publish(JobEvent("back", EventKind.CREATED))
            await got.wait_for(lambda e: e.job_id == "back")
        finally:
            await bus.close()
            await store.close()


# --- the factory ----------------------------------------------------------------------------------------


async def test_open_job_store_picks_the_engine(pg_url: str, tmp_path: Path) -> None:
    store, events = await open_job_store(pg_url)
    try:
        assert isinstance(store, PostgresJobStore) and isinstance(events, PostgresEvents) and not store.exclusive
        assert (await store.create(make_job("a"))).version == 1
    finally:
        await events.close()
        await store.close()
    for where in (tmp_path / "a" / "jobs.sqlite3", str(tmp_path / "b.sqlite3")):
        local, bus = await open_job_store(where)
        assert isinstance(local, SqliteJobStore) and isinstance(bus, LocalEvents)
        await local.close()
    with pytest.raises(ValueError, match="string"):
        await open_job_store(Path("postgresql://user@host/db"))


async def test_created_at_ties_go_in_insertion_order(store: PostgresJobStore) -> None:
    for job_id in ["z", "m", "a"]:
        await store.create(make_job(job_id, created_at=_ts(1)))
    places = [await store.queue_place(await store.get(job_id)) for job_id in ["z", "m", "a"]]  # type: ignore[arg-type]
    assert [place.position for place in places if place is not None] == [1, 2, 3]
    assert [j.id for j in await store.unfinished()] == ["z", "m", "a"]
    assert (await store.claim_next("w", LEASE, now=0.0)).id == "z"  # type: ignore[union-attr]
