"""Several JobManagers (replicas) sharing one store (`InMemoryJobStore(exclusive=False)`, as PostgreSQL) and one
event bus (`SharedBus`): work spreads, each job runs once at a time, cancel and progress cross replicas, a dead
replica's jobs are taken over, webhooks are delivered once from the outbox, chores run on one replica at a time,
and admission counts the fleet's queue. Events are hints: with the bus dropping them, everything still ends."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import pytest
from standardwebhooks.webhooks import Webhook

from gateway.errors import Overloaded
from gateway.jobs import runner, webhooks
from gateway.jobs.events import EventKind
from gateway.jobs.model import CANCELED, COMPLETED, PROCESSING, QUEUED, TERMINAL, Job, WebhookStatus
from gateway.jobs.runner import JobManager, JobUpdate
from gateway.settings import Settings
from tests.unit.fakes import (
    FakeExecutor,
    InMemoryJobStore,
    MemoryStorage,
    RecordingPoster,
    SharedBus,
    SharedReceiver,
    SteppedExecutor,
    make_job,
    make_spec,
    render,
)

SECRET = "server-secret"
DEADLINE_S = 3.0


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "STORE_RETRY_FIRST_S", 0.001)
    monkeypatch.setattr(runner, "BACKEND_RETRY_MAX_S", 0.005)


def replica_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "max_running_jobs": 2,
        "job_lease_s": 1.0,
        "store_retry_max_s": 0.01,
        "webhook_backoff_s": 0.0,
        "webhook_max_attempts": 5,
        "retention_s": 1e9,
        "job_retries": 2,
        "max_run_attempts": 3,
        "job_poll_interval_s": 0.01,
        "progress_publish_interval_s": 0.0,
    }
    values.update(overrides)
    return Settings(**values)


@dataclasses.dataclass
class Replica:
    name: str
    manager: JobManager
    executor: FakeExecutor
    poster: Any

    async def submit(self, store: InMemoryJobStore, job: Job) -> Job:
        created = await store.create(job)
        await self.manager.enqueue_new(created)
        return created


@dataclasses.dataclass
class Cluster:
    store: InMemoryJobStore
    bus: SharedBus
    storage: MemoryStorage
    replicas: list[Replica]

    async def final(self, replica: Replica, job_id: str) -> Job:
        job = await asyncio.wait_for(replica.manager.wait(job_id), DEADLINE_S)
        assert job.status in TERMINAL
        return job

    async def settled(self, job_id: str) -> Job:
        def done() -> bool:
            job = self.store.peek(job_id)
            return job is not None and job.finished and job.webhook is not None and job.webhook.status != "pending"

        await eventually(done)
        job = self.store.peek(job_id)
        assert job is not None
        return job

    def claims(self, job_id: str) -> list[str]:
        """Who claimed the job, in order (every claim write, from the store's write log)."""
        return [
            w.job.lease.owner
            for w in self.store.writes
            if w.job.id == job_id and w.method == "claim_next" and w.job.lease is not None
        ]


class MakeCluster(Protocol):
    def __call__(
        self,
        n: int = ...,
        *,
        executors: list[FakeExecutor] | None = ...,
        posters: list[Any] | None = ...,
        **settings: Any,
    ) -> Cluster: ...


async def eventually(check: Callable[[], bool], timeout_s: float = DEADLINE_S) -> None:
    async def poll() -> None:
        while not check():  # noqa: ASYNC110 (polls state no event announces)
            await asyncio.sleep(0.001)

    await asyncio.wait_for(poll(), timeout_s)


@pytest.fixture
async def make_cluster() -> AsyncIterator[MakeCluster]:
    managers: list[JobManager] = []

    def make(
        n: int = 2,
        *,
        executors: list[FakeExecutor] | None = None,
        posters: list[Any] | None = None,
        **settings: Any,
    ) -> Cluster:
        store = InMemoryJobStore(yields=True, exclusive=False)
        bus = SharedBus()
        storage = MemoryStorage()
        replicas = []
        for i in range(n):
            name = "ABC"[i]
            executor = executors[i] if executors else FakeExecutor(yields_per_step=lambda job_id, step: 5)
            executor.storage = storage
            poster = posters[i] if posters else RecordingPoster()
            manager = JobManager(
                store,
                executor,
                storage,
                replica_settings(**settings),
                poster=poster,
                webhook_secret=SECRET,
                render=render,
                events=bus.endpoint(name),
                worker_id=f"gw-{name}",
            )
            managers.append(manager)
            replicas.append(Replica(name, manager, executor, poster))
        return Cluster(store, bus, storage, replicas)

    yield make
    for manager in managers:
        await asyncio.wait_for(manager.stop(), DEADLINE_S)


def posts(replicas: list[Replica], job_id: str) -> list[dict[str, str]]:
    """Every POST for `job_id` across the replicas' posters (their headers)."""
    return [call.headers for r in replicas for call in r.poster.calls if call.payload["id"] == job_id]


# --- the work spreads, each job runs once -------------------------------------------------------------------


async def test_jobs_created_on_one_replica_run_on_both_once_each(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(2)
    a, b = cluster.replicas
    running: Counter[str] = Counter()
    overlap: list[str] = []

    def tracking(executor: FakeExecutor) -> None:
        inner = executor.__call__

        async def call(job: Job, **kw: Any) -> Any:
            running[job.id] += 1
            if running[job.id] > 1:
                overlap.append(job.id)
            try:
                return await inner(job, **kw)
            finally:
                running[job.id] -= 1

        executor.__call__ = call  # type: ignore[method-assign]

    for r in (a, b):
        tracking(r.executor)
        r.manager.workers.execute = r.executor.__call__  # type: ignore[method-assign]
        await r.manager.start()
    ids = [f"j{i:02}" for i in range(20)]
    for job_id in ids:
        await a.submit(cluster.store, make_job(job_id))
    for job_id in ids:
        assert (await cluster.final(a, job_id)).status == COMPLETED
    calls = a.executor.calls + b.executor.calls
    assert sorted(calls) == ids, Counter(calls) - Counter(ids)  # each job ran exactly once
    assert a.executor.calls and b.executor.calls, "one replica did all the work"
    assert overlap == []
    for job_id in ids:
        claims = cluster.claims(job_id)
        assert len(claims) == 1, claims
        runner_of = a if job_id in a.executor.calls else b
        assert claims == [runner_of.manager.worker_id]
        final = cluster.store.peek(job_id)
        assert final is not None and final.run_attempts == 1


# --- cancel, progress and waiting across replicas -------------------------------------------------------------


@pytest.mark.parametrize("bus_drops", [False, True])
async def test_cancel_sent_to_another_replica_stops_the_job_before_its_next_step(
    make_cluster: MakeCluster, bus_drops: bool
) -> None:
    """Over the bus the running replica hears it at once; with the bus dropping everything, at its next lease
    renewal (the store's `cancel_requested`)."""
    held_a = SteppedExecutor(steps=4, hold_at=1)
    cluster = make_cluster(2, executors=[held_a, FakeExecutor()], job_lease_s=0.15)
    a, b = cluster.replicas
    await a.manager.start()
    await a.submit(cluster.store, make_job("x", webhook="http://hook.test/x"))
    await asyncio.wait_for(held_a.held.wait(), DEADLINE_S)
    await b.manager.start()
    cluster.bus.drop = bus_drops
    cancel = asyncio.create_task(b.manager.cancel("x", "o"))
    await eventually(lambda: "x" in a.manager.workers._running and a.manager.workers._running["x"].cancel)
    assert not cancel.done()  # B waits for A's worker
    held_a.release.set()
    answer = await asyncio.wait_for(cancel, DEADLINE_S)
    stored = cluster.store.peek("x")
    assert stored is not None
    assert answer.status == CANCELED and answer.images == ()
    assert (answer.status, answer.images, answer.completed_at) == (stored.status, stored.images, stored.completed_at)
    assert held_a.steps_run["x"] == 2  # held inside its 2nd step (a Triton call): no 3rd step
    assert b.executor.calls == [] and held_a.finished == []
    cluster.bus.drop = False
    final = await cluster.settled("x")
    assert final.webhook is not None and final.webhook.status == WebhookStatus.DELIVERED
    assert len(posts(cluster.replicas, "x")) == 1


async def test_progress_of_a_job_running_elsewhere(make_cluster: MakeCluster) -> None:
    executors = [SteppedExecutor(steps=4, hold_at=2), SteppedExecutor(steps=4, hold_at=2)]
    cluster = make_cluster(2, executors=list(executors))
    for r in cluster.replicas:
        await r.manager.start()
    job = make_job("p", spec=make_spec(effective_steps=4))
    listeners = {r.name: r.manager.subscribe("p") for r in cluster.replicas}
    await cluster.replicas[0].submit(cluster.store, job)
    await eventually(lambda: any(e.held.is_set() for e in executors))
    (owner,) = [r for r, e in zip(cluster.replicas, executors, strict=True) if e.held.is_set()]
    (other,) = [r for r in cluster.replicas if r is not owner]
    held = executors[cluster.replicas.index(owner)]
    stored = cluster.store.peek("p")
    assert stored is not None and stored.status == PROCESSING and stored.lease is not None
    assert stored.lease.owner == owner.manager.worker_id
    progress = await other.manager.progress(stored)
    assert (progress.step, progress.total_steps, progress.queue_position) == (2, 4, None)  # live, from the bus
    updates = listeners[other.name]
    heard: list[JobUpdate] = []
    while not updates.empty():
        heard.append(updates.get_nowait())
    assert [u.progress.step for u in heard if u.job is None and u.progress is not None][-2:] == [1, 2]
    held.release.set()
    final = await cluster.final(other, "p")
    assert final.status == COMPLETED
    await eventually(lambda: not updates.empty())
    last: JobUpdate | None = None
    while not updates.empty():
        last = updates.get_nowait()
    assert last == JobUpdate(None, None)  # the final state elsewhere: read the job again
    assert (await other.manager.progress(final)).step == 4
    other.manager.unsubscribe("p", updates)
    assert other.manager.workers._remote == {} and other.manager.workers._listeners == {}


async def test_waiters_on_another_replica_finish_with_the_bus_dropping_everything(
    make_cluster: MakeCluster,
) -> None:
    held_a = SteppedExecutor(steps=3, hold_at=1)
    cluster = make_cluster(2, executors=[held_a, FakeExecutor()])
    a, b = cluster.replicas
    await a.manager.start()
    await a.submit(cluster.store, make_job("s", spec=make_spec(asynchronous=False)))
    await asyncio.wait_for(held_a.held.wait(), DEADLINE_S)
    await b.manager.start()
    cluster.bus.drop = True
    waiter = asyncio.create_task(b.manager.wait("s"))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    held_a.release.set()
    final = await asyncio.wait_for(waiter, DEADLINE_S)  # the poll fallback: job_poll_interval_s
    assert final.status == COMPLETED and b.executor.calls == []
    assert [e.kind for _, e in cluster.bus.published if e.job_id == "s"][-1] == EventKind.FINAL  # sent, dropped
    assert b.manager.workers._done == {}


async def test_a_synchronous_waiter_on_another_replica_returns_when_the_job_ends(make_cluster: MakeCluster) -> None:
    held_a = SteppedExecutor(steps=2, hold_at=1)
    cluster = make_cluster(2, executors=[held_a, FakeExecutor()], job_poll_interval_s=5.0)
    a, b = cluster.replicas
    await a.manager.start()
    await a.submit(cluster.store, make_job("w", spec=make_spec(asynchronous=False)))
    await asyncio.wait_for(held_a.held.wait(), DEADLINE_S)
    await b.manager.start()
    waiter = asyncio.create_task(b.manager.wait("w"))
    await asyncio.sleep(0.02)
    assert not waiter.done()
    held_a.release.set()
    final = await asyncio.wait_for(waiter, 1.0)  # woken by the bus, long before the 5 s poll
    assert final.status == COMPLETED and held_a.finished == ["w"]


# --- a replica dies ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("asynchronous", [True, False])
async def test_a_dead_replicas_job_is_taken_over_and_its_webhook_sent_once(
    make_cluster: MakeCluster, asynchronous: bool
) -> None:
    held_a = SteppedExecutor(steps=3, hold_at=1)
    cluster = make_cluster(2, executors=[held_a, FakeExecutor()], job_lease_s=0.1)
    a, b = cluster.replicas
    await a.manager.start()
    job = make_job("d", webhook="http://hook.test/d", spec=make_spec(asynchronous=asynchronous))
    await a.submit(cluster.store, job)
    await asyncio.wait_for(held_a.held.wait(), DEADLINE_S)
    # A dies: its tasks are gone without a graceful finish (no write), its lease stays until it expires.
    await asyncio.wait_for(a.manager.stop(), DEADLINE_S)
    orphan = cluster.store.peek("d")
    assert orphan is not None and orphan.status == PROCESSING and orphan.lease is not None
    assert orphan.lease.owner == a.manager.worker_id
    writes_at_death = len(cluster.store.writes)
    await asyncio.sleep(0.15)  # past the lease: nothing of A's writes anything
    assert len(cluster.store.writes) == writes_at_death and cluster.store.peek("d") == orphan
    waiter = asyncio.create_task(b.manager.wait("d"))  # a synchronous caller waiting on B is served
    await b.manager.start()
    final = await asyncio.wait_for(waiter, DEADLINE_S)
    assert final.status == COMPLETED and final.error is None and final.run_attempts == 2
    assert b.executor.calls == ["d"] and held_a.finished == []
    assert cluster.claims("d") == [a.manager.worker_id, b.manager.worker_id]
    settled = await cluster.settled("d")
    assert settled.webhook is not None and settled.webhook.status == WebhookStatus.DELIVERED
    await asyncio.sleep(0.05)
    sent = posts(cluster.replicas, "d")
    assert len(sent) == 1, sent
    assert sent[0][webhooks.ID_HEADER] == webhooks.event_id("d", "completed")


# --- the webhook outbox ----------------------------------------------------------------------------------------


async def test_webhook_retries_move_between_replicas_one_post_at_a_time(make_cluster: MakeCluster) -> None:
    receiver = SharedReceiver([500, OSError("refused"), 200], yields=5)
    cluster = make_cluster(
        3, posters=[receiver.poster(name) for name in "ABC"], webhook_backoff_s=0.01, webhook_max_attempts=5
    )
    for r in cluster.replicas:
        await r.manager.start()
    a = cluster.replicas[0]
    await a.submit(cluster.store, make_job("h", webhook="http://hook.test/h"))
    final = await cluster.settled("h")
    await asyncio.sleep(0.05)  # no late or duplicate POST
    assert final.status == COMPLETED
    assert final.webhook is not None and final.webhook.status == WebhookStatus.DELIVERED
    assert [attempt.status_code for attempt in final.webhook.attempts] == [500, None, 200]
    assert final.webhook.lease is None
    calls = receiver.for_job("h")
    assert len(calls) == 3, [(replica, call.payload) for replica, call in calls]
    assert receiver.max_in_flight["h"] == 1  # never two POSTs of one job at once, whichever replicas sent them
    assert {call.headers[webhooks.ID_HEADER] for _, call in calls} == {"h_completed"}  # one id across retries
    stored = await cluster.store.webhook_secrets(final.owner)  # one secret in the shared store signs on every replica
    assert stored is not None and stored.current == webhooks.derived_secret(SECRET, final.owner)
    for _, call in calls:
        Webhook(stored.current).verify(call.body, dict(call.headers))


async def test_many_webhooks_over_three_replicas_each_posted_once(make_cluster: MakeCluster) -> None:
    receiver = SharedReceiver([200], yields=3)
    cluster = make_cluster(3, posters=[receiver.poster(name) for name in "ABC"])
    for r in cluster.replicas:
        await r.manager.start()
    ids = [f"m{i}" for i in range(12)]
    for i, job_id in enumerate(ids):
        await cluster.replicas[i % 3].submit(cluster.store, make_job(job_id, webhook=f"http://hook.test/{job_id}"))
    for job_id in ids:
        await cluster.settled(job_id)
    await asyncio.sleep(0.05)
    assert Counter(call.payload["id"] for _, call in receiver.calls) == Counter(ids)


async def test_retention_runs_on_one_replica_at_a_time(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(3, retention_s=0.0)
    old = dataclasses.replace(make_job("old").finished_as(COMPLETED), completed_at="2000-01-01T00:00:00.000Z")
    cluster.store.put(old)
    await cluster.storage.put(old.input.name, b"x", "image/png")
    purges: Counter[str] = Counter()
    for r in cluster.replicas:
        inner = r.manager.maintenance.purge_expired

        async def purge(name: str = r.name, inner: Callable[[], Any] = inner) -> int:
            purges[name] += 1
            return await inner()

        r.manager.maintenance.purge_expired = purge  # type: ignore[method-assign]
    await asyncio.gather(*(r.manager.start() for r in cluster.replicas))
    await eventually(lambda: cluster.store.calls["acquire_lock"] == 3)
    await asyncio.sleep(0.05)
    assert sum(purges.values()) == 1, purges  # one holder of the "retention" lock
    assert cluster.store.peek("old") is None and cluster.storage.deleted == [old.input.name]


# --- admission --------------------------------------------------------------------------------------------------


async def test_admission_counts_the_shared_queue(make_cluster: MakeCluster) -> None:
    gate = asyncio.Event()
    cluster = make_cluster(
        2, executors=[FakeExecutor(gate=gate), FakeExecutor(gate=gate)], max_queued_jobs=3, max_running_jobs=1
    )
    a, b = cluster.replicas
    for r in (a, b):
        await r.manager.start()
    for i in range(2):  # one running on each replica
        await a.submit(cluster.store, make_job(f"r{i}"))
    await eventually(lambda: bool(a.executor.calls) and bool(b.executor.calls))
    for i in range(2):
        await a.manager.check_admission()
        await a.submit(cluster.store, make_job(f"q{i}"))
    await b.manager.check_admission()  # two queued fleet-wide
    await a.submit(cluster.store, make_job("q2"))
    assert await cluster.store.count_queued() == 3
    with pytest.raises(Overloaded) as refused:
        await b.manager.check_admission()
    assert refused.value.headers["Retry-After"] == "3"
    with pytest.raises(Overloaded):
        await a.manager.check_admission()
    queued = cluster.store.peek("q2")
    assert queued is not None and queued.status == QUEUED
    assert (await b.manager.progress(queued)).queue_position == 3
    gate.set()
    for job_id in ("r0", "r1", "q0", "q1", "q2"):
        assert (await cluster.final(b, job_id)).status == COMPLETED
    await b.manager.check_admission()


async def test_a_stalled_replicas_dropped_result_leaves_the_new_owners_images(make_cluster: MakeCluster) -> None:
    """A stalls (its renewals fail) past its lease; B takes the job over and completes it. When A's run then ends,
    A must drop its result without touching what B stored: both runs name their outputs after the job id, so
    deleting "its" images deletes the completed job's."""
    held_a = SteppedExecutor(steps=2, hold_at=1)
    cluster = make_cluster(2, executors=[held_a, FakeExecutor()], job_lease_s=0.1)
    a, b = cluster.replicas
    await a.manager.start()
    await a.submit(cluster.store, make_job("z"))
    await asyncio.wait_for(held_a.held.wait(), DEADLINE_S)
    cluster.store.fail_when(lambda m, args: m == "renew" and args[1] == a.manager.worker_id)
    await b.manager.start()
    done = await cluster.final(b, "z")
    assert done.status == COMPLETED and done.run_attempts >= 2  # (A's own reclaim loop may re-queue it too)
    assert done.images and all(image.name in cluster.storage.objects for image in done.images)
    held_a.release.set()  # A's run ends; its finish loses the compare-and-set
    await eventually(lambda: "z" not in a.manager.workers._running)
    assert cluster.store.peek("z") == done
    missing = [image.name for image in done.images if image.name not in cluster.storage.objects]
    assert missing == [], f"the completed job's images were deleted by the replica that lost the job: {missing}"
