"""JobManager over the in-memory store and a fake executor: completion, webhooks, store faults at every call
site, failures, retries, cancellation, and restart recovery (no Triton, no HTTP). One replica here; several
sharing a store are test_job_replicas.py's."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import pytest
from standardwebhooks.webhooks import Webhook

from gateway.diffusion.img2img import GenerationCanceled, Img2ImgPipeline
from gateway.errors import (
    ERROR_TABLE,
    BackendError,
    BackendUnavailable,
    InvalidImage,
    JobFinished,
    NotFound,
    Overloaded,
    StoreUnavailable,
)
from gateway.jobs import runner, webhooks
from gateway.jobs.execute import DecodedInputs, JobExecutor
from gateway.jobs.model import (
    CANCELED,
    COMPLETED,
    FAILED,
    PROCESSING,
    QUEUED,
    TERMINAL,
    DeliveryAttempt,
    Job,
    Lease,
    OutputImage,
    WebhookState,
    WebhookStatus,
    now_iso,
)
from gateway.jobs.naming import output_name
from gateway.jobs.runner import JobManager
from gateway.jobs.store import transition
from gateway.settings import Settings
from tests.helpers import make_image
from tests.unit.fakes import (
    FakeExecutor,
    FakeTriton,
    InMemoryJobStore,
    MemoryStorage,
    RecordingPoster,
    make_job,
    make_spec,
    render,
    tiny_manifest,
)

CODES = frozenset(code for _, code in ERROR_TABLE.values())
SECRET = "server-secret"
DEADLINE_S = 3.0


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "STORE_RETRY_FIRST_S", 0.001)
    monkeypatch.setattr(runner, "BACKEND_RETRY_MAX_S", 0.005)


def small_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "max_running_jobs": 1,
        "job_lease_s": 1.0,
        "store_retry_max_s": 0.01,
        "webhook_backoff_s": 0.0,
        "webhook_max_attempts": 3,
        "retention_s": 1e9,
        "job_retries": 2,
        "max_run_attempts": 3,
        "job_poll_interval_s": 0.01,
        "progress_publish_interval_s": 0.0,
    }
    values.update(overrides)
    return Settings(**values)


@dataclasses.dataclass
class Rig:
    manager: JobManager
    store: InMemoryJobStore
    executor: FakeExecutor
    poster: RecordingPoster
    storage: MemoryStorage

    async def submit(self, job: Job) -> Job:
        created = await self.store.create(job)
        await self.manager.enqueue_new(created)
        return created

    async def final(self, job_id: str) -> Job:
        job = await asyncio.wait_for(self.manager.wait(job_id), DEADLINE_S)
        assert job.status in TERMINAL
        return job

    async def settled(self, job_id: str) -> Job:
        """The final job once its webhook (if any) is settled."""
        await self.final(job_id)

        def done() -> bool:
            job = self.store.peek(job_id)
            return job is not None and (job.webhook is None or job.webhook.status != WebhookStatus.PENDING)

        await eventually(done)
        job = self.store.peek(job_id)
        assert job is not None
        return job

    def posts_for(self, job_id: str) -> list[dict[str, Any]]:
        return [call.payload for call in self.poster.calls if call.payload["id"] == job_id]

    async def idle(self) -> None:
        """Nothing running in memory, nothing unfinished in the store (the store is the queue)."""
        await eventually(lambda: not self.manager.workers._running and all(j.finished for j in self.store.all()))
        assert [j.id for j in self.store.all() if not j.finished] == []

    async def more_jobs_complete(self, n: int = 3) -> None:
        """The worker pool is intact: n further jobs complete one after another."""
        jobs = [await self.submit(make_job(f"after_{i}_{len(self.store.all())}")) for i in range(n)]
        for job in jobs:
            assert (await self.final(job.id)).status == COMPLETED
        await self.idle()


class MakeRig(Protocol):
    def __call__(
        self,
        *,
        store: InMemoryJobStore | None = ...,
        executor: FakeExecutor | None = ...,
        poster: RecordingPoster | None = ...,
        **settings: Any,
    ) -> Rig: ...


async def eventually(check: Callable[[], bool], timeout_s: float = DEADLINE_S) -> None:
    async def poll() -> None:
        while not check():  # noqa: ASYNC110 (polls state no event announces)
            await asyncio.sleep(0.001)

    await asyncio.wait_for(poll(), timeout_s)


@pytest.fixture
async def make_rig() -> AsyncIterator[MakeRig]:
    managers: list[JobManager] = []

    def make(
        *,
        store: InMemoryJobStore | None = None,
        executor: FakeExecutor | None = None,
        poster: RecordingPoster | None = None,
        **settings: Any,
    ) -> Rig:
        storage = MemoryStorage()
        store = store or InMemoryJobStore()
        executor = executor or FakeExecutor(storage)
        if executor.storage is None:
            executor.storage = storage
        poster = poster or RecordingPoster()
        manager = JobManager(
            store,
            executor,
            storage,
            small_settings(**settings),
            poster=poster,
            webhook_secret=SECRET,
            render=render,
            worker_id="w-test",
        )
        managers.append(manager)
        return Rig(manager, store, executor, poster, storage)

    yield make
    for manager in managers:
        await asyncio.wait_for(manager.stop(), DEADLINE_S)


def first(n: int, rule: Callable[[str, tuple[Any, ...]], bool]) -> Callable[[str, tuple[Any, ...]], bool]:
    """A fault rule that fires on the first n calls matching `rule`."""
    left = [n]

    def fire(method: str, args: tuple[Any, ...]) -> bool:
        if left[0] > 0 and rule(method, args):
            left[0] -= 1
            return True
        return False

    return fire


def outcome(job: Job | None) -> tuple[Any, ...]:
    """What a job ended as (its webhook record may move on after the final write)."""
    assert job is not None
    return job.status, job.images, job.error, job.completed_at, job.cancel_requested


def assert_codes(jobs: Iterable[Job]) -> None:
    for job in jobs:
        if job.error is not None:
            assert job.error.code in CODES, job.error


# --- the happy path ----------------------------------------------------------------------------------------


async def test_job_completes_and_its_webhook_is_delivered_once(make_rig: MakeRig) -> None:
    rig = make_rig()
    await rig.manager.start()
    job = await rig.submit(make_job("a", webhook="http://hook.test/a", spec=make_spec(num_images=2)))
    final = await rig.settled("a")
    assert final.status == COMPLETED and final.run_attempts == 1 and final.lease is None and final.error is None
    assert [image.name for image in final.images] == [output_name("a", 0), output_name("a", 1)]
    assert final.steps_done == rig.executor.steps and final.completed_at is not None
    assert set(rig.storage.objects) == {output_name("a", 0), output_name("a", 1)}
    [call] = rig.poster.calls
    assert call.url == "http://hook.test/a"
    assert call.payload["status"] == "completed" and call.payload["images"] == [i.name for i in final.images]
    Webhook(webhooks.derived_secret(SECRET, job.owner)).verify(call.body, dict(call.headers))
    assert call.headers[webhooks.ID_HEADER] == webhooks.event_id(job.id, "completed")
    assert final.webhook is not None and final.webhook.status == WebhookStatus.DELIVERED
    assert len(final.webhook.attempts) == 1 and final.webhook.attempts[0].status_code == 200
    assert (await rig.manager.progress(final)).step == final.spec.effective_steps
    await rig.idle()


async def test_webhook_retries_then_gives_up(make_rig: MakeRig) -> None:
    rig = make_rig(poster=RecordingPoster([500, OSError("refused"), 503]), webhook_max_attempts=3)
    await rig.manager.start()
    await rig.submit(make_job("a", webhook="http://hook.test/a"))
    final = await rig.settled("a")
    assert final.webhook is not None and final.webhook.status == WebhookStatus.FAILED
    assert [a.status_code for a in final.webhook.attempts] == [500, None, 503]
    assert final.webhook.attempts[1].error is not None and "OSError" in final.webhook.attempts[1].error
    assert len(rig.poster.calls) == 3


async def test_waiting_leaves_no_per_job_state_behind(make_rig: MakeRig) -> None:
    rig = make_rig()
    await rig.manager.start()
    await rig.submit(make_job("a"))
    assert (await rig.final("a")).status == COMPLETED
    assert (await rig.final("a")).status == COMPLETED  # waiting on a finished job answers at once
    await rig.idle()
    # A finished job must not keep a waiter's Event in the manager (one leaked entry per job otherwise).
    assert rig.manager.workers._done == {}
    workers = rig.manager.workers
    assert rig.manager.outbox._delivering == set() and workers._listeners == {} and workers._remote == {}


# --- store faults at every call site ------------------------------------------------------------------------


def _is_finish(method: str, args: tuple[Any, ...]) -> bool:
    job = args[0] if args else None
    return (
        method == "update"
        and isinstance(job, Job)
        and job.finished
        and (job.webhook is None or not job.webhook.attempts)
    )


def _is_webhook_record(method: str, args: tuple[Any, ...]) -> bool:
    job = args[0] if args else None
    return method == "update" and isinstance(job, Job) and job.webhook is not None and bool(job.webhook.attempts)


def _queued_exists(store: InMemoryJobStore) -> bool:
    return any(j.status == QUEUED for j in store.all())


def _delivery_due(store: InMemoryJobStore) -> bool:
    return any(j.finished and j.webhook is not None and j.webhook.status == WebhookStatus.PENDING for j in store.all())


Rule = Callable[[str, tuple[Any, ...]], bool]
# Each site: the rule (given the store, so it can fire only while the call has work to find) and how many of the
# three injected faults it takes (the retention loop calls its store methods once at start, then every minute).
WORKER_SITES: dict[str, tuple[Callable[[InMemoryJobStore], Rule], int]] = {
    "claim_next": (lambda store: lambda m, a: m == "claim_next" and _queued_exists(store), 3),
    "finish": (lambda store: _is_finish, 3),
    "claim_delivery": (lambda store: lambda m, a: m == "claim_delivery" and _delivery_due(store), 3),
    "webhook_record": (lambda store: _is_webhook_record, 3),
    "release": (lambda store: lambda m, a: m == "release", 3),
    # Renewals failing for two whole leases: with an exclusive store this live process is the only lease holder, so
    # nobody may take its job over (it must run once, not be re-queued under its running worker).
    "renew": (lambda store: lambda m, a: m == "renew", 6),
    "expired_leases": (lambda store: lambda m, a: m == "expired_leases", 3),
    "retention_lock": (lambda store: lambda m, a: m == "acquire_lock", 1),
    "retention": (lambda store: lambda m, a: m == "expired", 1),
}


@pytest.mark.parametrize("site", list(WORKER_SITES))
async def test_store_faults_at_worker_call_sites(make_rig: MakeRig, site: str) -> None:
    # expired_leases: a shared store, where a dead replica's job is found by its expired lease (the reclaim loop).
    store = InMemoryJobStore(yields=True, exclusive=site != "expired_leases")
    rule, expected = WORKER_SITES[site]
    store.fail_when(first(max(3, expected), rule(store)))  # three in a row (or more): the backoff doubles
    gate = asyncio.Event()
    executor = FakeExecutor(
        fail_with=[BackendUnavailable("Triton down")] if site == "release" else [],
        gate=gate if site == "renew" else None,
    )
    lease_s = {"renew": 0.03, "expired_leases": 0.05}.get(site, 1.0)
    rig = make_rig(store=store, executor=executor, job_lease_s=lease_s)
    if site == "expired_leases":
        store.put(
            make_job("a", webhook="http://hook.test/a", status=PROCESSING, run_attempts=1, lease=Lease("dead", 1.0))
        )
        await rig.manager.start()
    else:
        await rig.manager.start()
        await rig.submit(make_job("a", webhook="http://hook.test/a"))
    if site == "renew":
        await eventually(lambda: store.failures["renew"] >= expected)
        gate.set()
    final = await rig.settled("a")
    assert final.status == COMPLETED, final
    assert final.run_attempts == {"release": 2, "expired_leases": 2}.get(site, 1), final
    assert sum(store.failures.values()) == expected, store.failures  # the faults did hit that call site
    assert len(rig.posts_for("a")) == 1 and rig.posts_for("a")[0]["status"] == "completed"
    assert final.webhook is not None and final.webhook.status == WebhookStatus.DELIVERED
    assert rig.executor.calls.count("a") == final.run_attempts - (site == "expired_leases")
    await rig.idle()
    await rig.more_jobs_complete()
    assert_codes(store.all())


async def test_store_fault_in_admission_surfaces_and_the_next_check_counts(make_rig: MakeRig) -> None:
    """Admission reads the store's queue length: a store that does not answer is the caller's 503 (nothing was
    created yet, so nothing is lost), and the next request is admitted or refused on a fresh count."""
    store = InMemoryJobStore()
    gate = asyncio.Event()
    rig = make_rig(store=store, executor=FakeExecutor(gate=gate), max_queued_jobs=2)
    await rig.manager.start()
    await rig.submit(make_job("a"))
    await asyncio.wait_for(rig.executor.started.wait(), DEADLINE_S)
    store.fail_when(first(1, lambda m, a: m == "count_queued_by_priority"))
    with pytest.raises(StoreUnavailable):
        await rig.manager.check_admission()
    await rig.manager.check_admission()  # running jobs do not count, none queued
    await rig.submit(make_job("b"))
    await rig.manager.check_admission()
    await rig.submit(make_job("c"))
    with pytest.raises(Overloaded) as refused:
        await rig.manager.check_admission()
    assert refused.value.headers["Retry-After"] == "2"
    gate.set()
    for job_id in "abc":
        assert (await rig.final(job_id)).status == COMPLETED
    await rig.manager.check_admission()
    await rig.idle()


RECOVERY_SITES: dict[str, Callable[[str, tuple[Any, ...]], bool]] = {
    "unfinished": lambda m, a: m == "unfinished",
    "recover_update": lambda m, a: m == "update",  # the first writes are recovery's
    "claim_delivery": lambda m, a: m == "claim_delivery",  # the outbox resumes the pending webhook
}


@pytest.mark.parametrize("site", list(RECOVERY_SITES))
async def test_store_faults_during_recovery(make_rig: MakeRig, site: str) -> None:
    """A store that does not answer at start-up (locked for a moment) is retried like anywhere else."""
    store = InMemoryJobStore(yields=True)
    orphan = store.put(
        make_job("orphan", webhook="http://hook.test/o", status=PROCESSING, run_attempts=1, lease=Lease("dead", 1.0))
    )
    done = make_job("done", webhook="http://hook.test/d").finished_as(COMPLETED)
    store.put(done)
    store.fail_when(first(2, RECOVERY_SITES[site]))
    rig = make_rig(store=store)
    await asyncio.wait_for(rig.manager.start(), DEADLINE_S)
    assert (await rig.settled(orphan.id)).status == COMPLETED
    assert (await rig.settled("done")).webhook.status == WebhookStatus.DELIVERED  # type: ignore[union-attr]
    assert len(rig.posts_for("orphan")) == 1 and len(rig.posts_for("done")) == 1
    await rig.more_jobs_complete()


async def test_store_fault_in_renewal_after_a_lost_lease(make_rig: MakeRig) -> None:
    """The renewer finds the lease gone (another replica took the job) and its check read fails once: the
    worker must still drop its result (delete its images, write nothing) and go on."""
    store = InMemoryJobStore()
    gate = asyncio.Event()
    rig = make_rig(store=store, executor=FakeExecutor(gate=gate), job_lease_s=0.03)
    await rig.manager.start()
    await rig.submit(make_job("a"))
    await asyncio.wait_for(rig.executor.started.wait(), DEADLINE_S)
    current = store.peek("a")
    assert current is not None and current.status == PROCESSING
    stolen = store.put(dataclasses.replace(current, lease=Lease("other-replica", 1e12), version=current.version + 1))
    store.fail_when(first(1, lambda m, a: m == "get"))
    await eventually(lambda: store.failures["get"] == 1)
    gate.set()
    await eventually(lambda: "a" not in rig.manager.workers._running)
    assert store.peek("a") == stolen  # nothing written over the other replica's job
    assert rig.storage.objects == {}, "the dropped result's images were left in storage"
    # The other replica ends it.
    store.put(dataclasses.replace(stolen.finished_as(COMPLETED), version=stolen.version + 1))
    rig.executor.gate = None
    await rig.more_jobs_complete()


async def test_a_finish_whose_answer_was_lost_keeps_the_jobs_images(make_rig: MakeRig) -> None:
    """Issue 22, point 8: the final write commits but its answer is lost (StoreUnavailable to the worker, once).
    The retry finds the job already completed, by this very claim: the write it retried did commit, so the
    images are the job's and stay; the final state's effects (waiters, the webhook) still run once."""
    store = InMemoryJobStore(yields=True)
    store.lose_reply_when(lambda m, args: m == "update" and args[0].finished)
    rig = make_rig(store=store)
    await rig.manager.start()
    await rig.submit(make_job("a", webhook="http://hook.test/a", spec=make_spec(num_images=2)))
    final = await rig.settled("a")
    assert store.failures["update"] == 1  # the commit's answer was lost once
    assert final.status == COMPLETED and [image.name for image in final.images] == [
        output_name("a", 0),
        output_name("a", 1),
    ]
    missing = [image.name for image in final.images if image.name not in rig.storage.objects]
    assert missing == [] and rig.storage.deleted == [], f"the completed job's own images were deleted: {missing}"
    assert len(rig.posts_for("a")) == 1 and rig.posts_for("a")[0]["images"] == [i.name for i in final.images]
    await rig.more_jobs_complete()


class PerRunExecutor(FakeExecutor):
    """Run n of any job (1-based, in call order) waits for `gates[n]` when there is one, then stops if asked to,
    else stores one image named after the job's run (`output_name(..., run)`): each run its own names."""

    def __init__(self, gates: dict[int, asyncio.Event]) -> None:
        super().__init__()
        self.gates = gates
        self.ended: list[int] = []

    async def __call__(
        self,
        job: Job,
        *,
        on_step: Callable[[int, int], None],
        should_stop: Callable[[], bool],
        before_step: Callable[[], Awaitable[None]] | None = None,
    ) -> tuple[OutputImage, ...]:
        self.calls.append(job.id)
        n = len(self.calls)
        try:
            on_step(0, 2)
            gate = self.gates.get(n)
            if gate is not None:
                await gate.wait()
            if should_stop():
                raise GenerationCanceled()
            on_step(2, 2)
            name = output_name(job.id, 0, job.run_attempts)
            assert self.storage is not None
            await self.storage.put(name, b"png", "image/png")
            return (OutputImage(name=name, url=f"http://example.test/{name}", width=16, height=16, seed=0),)
        finally:
            self.ended.append(n)


@pytest.mark.parametrize("frozen", ["running", "finishing"])
async def test_a_frozen_run_cannot_overwrite_the_live_run_of_the_same_worker(make_rig: MakeRig, frozen: str) -> None:
    """Issue 22, point 3: a process froze while running a job (mid-run, or in its final write); its lease expired,
    another replica took the job over and this same process claimed it again. The lease names the claim, not
    only the process: the stale first run can neither renew nor finish, so it stops without writing and without
    touching the live run's images, and the live run keeps its place here (progress, cancel) and its result."""
    store = InMemoryJobStore(yields=True, exclusive=False)  # a shared store: the takeover is another replica's
    gate_1, gate_2 = asyncio.Event(), asyncio.Event()
    executor = PerRunExecutor({1: gate_1, 2: gate_2} if frozen == "running" else {2: gate_2})
    rig = make_rig(store=store, executor=executor, max_running_jobs=2)
    frozen_write = [True]
    if frozen == "finishing":  # run 1's final write does not get through while its process is frozen
        store.fail_when(lambda m, a: m == "update" and frozen_write[0] and a[0].finished)
    await rig.manager.start()
    await rig.submit(make_job("z"))
    if frozen == "running":
        await eventually(lambda: executor.calls == ["z"])
    else:
        await eventually(lambda: store.failures["update"] >= 1)
    # Another replica found the lease expired (this process was frozen past it) and took the job over.
    current = store.peek("z")
    assert current is not None and current.status == PROCESSING
    _, applied = await transition(store, current, Job.requeued)
    assert applied
    await eventually(lambda: len(executor.calls) == 2)  # this same process claimed it again: the live run
    live = store.peek("z")
    assert live is not None and live.status == PROCESSING and live.run_attempts == 2
    # The process thaws: the stale run goes on from where it froze.
    gate_1.set()
    frozen_write[0] = False

    def stale_run_ended() -> bool:  # it wrote over the live run, or it dropped its own images
        dropped = output_name("z", 0, 1) not in rig.storage.objects
        return 1 in executor.ended and (store.peek("z") != live or dropped)

    await eventually(stale_run_ended)
    for _ in range(20):  # the stale run's last steps (its store calls yield)
        await asyncio.sleep(0)
    assert store.peek("z") == live, "the stale run wrote over the live run's job"
    assert rig.manager.workers.running_here("z"), "the live run lost its place here (its progress and cancel)"
    gate_2.set()
    final = await rig.final("z")
    assert final.status == COMPLETED and final.run_attempts == 2
    assert [image.name for image in final.images] == [output_name("z", 0, 2)], "the stale run's result won"
    assert all(image.name in rig.storage.objects for image in final.images), "the live run's images were deleted"
    assert set(rig.storage.objects) == {output_name("z", 0, 2)}  # the stale run's images are gone
    await rig.idle()


async def test_cancel_surfaces_store_errors_and_can_be_retried(make_rig: MakeRig) -> None:
    store = InMemoryJobStore()
    gate = asyncio.Event()
    rig = make_rig(store=store, executor=FakeExecutor(gate=gate))
    await rig.manager.start()
    await rig.submit(make_job("a"))
    await rig.submit(make_job("b"))
    await asyncio.wait_for(rig.executor.started.wait(), DEADLINE_S)
    store.fail_when(first(1, lambda m, a: m == "update"))
    with pytest.raises(StoreUnavailable):
        await rig.manager.cancel("b", "o")
    assert (store.peek("b") or make_job("x")).status == QUEUED
    canceled = await asyncio.wait_for(rig.manager.cancel("b", "o"), DEADLINE_S)
    assert canceled.status == CANCELED
    gate.set()
    assert (await rig.final("a")).status == COMPLETED
    assert rig.executor.calls == ["a"]
    await rig.idle()


# --- failures and retries ----------------------------------------------------------------------------------


async def test_unexpected_executor_error_fails_the_job_and_the_worker_lives(make_rig: MakeRig) -> None:
    rig = make_rig(executor=FakeExecutor(fail_with=[RuntimeError("bug"), InvalidImage("bad", "pixels")]))
    await rig.manager.start()
    await rig.submit(make_job("a", webhook="http://hook.test/a"))
    await rig.submit(make_job("b"))
    a = await rig.settled("a")
    assert a.status == FAILED and a.error is not None and a.error.code == "internal_error"
    assert a.error.message == "Internal server error" and a.images == ()
    assert rig.posts_for("a")[0]["error"] == "internal_error"
    b = await rig.final("b")
    assert b.status == FAILED and b.error is not None and b.error.code == "invalid_image"
    await rig.more_jobs_complete()
    assert_codes(rig.store.all())


async def test_backend_unavailable_on_an_async_job_is_retried(make_rig: MakeRig) -> None:
    rig = make_rig(executor=FakeExecutor(fail_with=[BackendUnavailable("down"), BackendUnavailable("down")]))
    await rig.manager.start()
    await rig.submit(make_job("a", webhook="http://hook.test/a"))
    final = await rig.settled("a")
    assert final.status == COMPLETED and final.run_attempts == 3
    assert rig.executor.calls == ["a", "a", "a"]
    assert [p["status"] for p in rig.posts_for("a")] == ["completed"]  # no webhook for the retried runs
    await rig.idle()


async def test_backend_unavailable_beyond_job_retries_fails(make_rig: MakeRig) -> None:
    rig = make_rig(executor=FakeExecutor(fail_with=[BackendUnavailable("down")] * 3), job_retries=1)
    await rig.manager.start()
    await rig.submit(make_job("a"))
    final = await rig.final("a")
    assert final.status == FAILED and final.error is not None and final.error.code == "backend_unavailable"
    assert final.run_attempts == 2 and rig.executor.calls == ["a", "a"]
    await rig.idle()


async def test_backend_unavailable_on_a_sync_job_fails_at_once(make_rig: MakeRig) -> None:
    rig = make_rig(executor=FakeExecutor(fail_with=[BackendUnavailable("down", "Triton is starting")]))
    await rig.manager.start()
    await rig.submit(make_job("a", spec=make_spec(asynchronous=False)))
    final = await rig.final("a")
    assert final.status == FAILED and final.error is not None
    assert final.error.code == "backend_unavailable" and final.error.details == "Triton is starting"
    assert final.run_attempts == 1 and rig.executor.calls == ["a"]
    await rig.more_jobs_complete()


async def test_cancel_while_waiting_for_a_backend_retry(make_rig: MakeRig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "BACKEND_RETRY_MAX_S", 0.2)
    rig = make_rig(executor=FakeExecutor(fail_with=[BackendUnavailable("down")]))
    await rig.manager.start()
    await rig.submit(make_job("a", webhook="http://hook.test/a"))
    await eventually(lambda: (j := rig.store.peek("a")) is not None and j.status == QUEUED and j.run_attempts == 1)
    canceled = await asyncio.wait_for(rig.manager.cancel("a", "o"), DEADLINE_S)
    assert canceled.status == CANCELED
    await asyncio.sleep(0.3)  # the re-queue fires, and finds the job canceled
    assert rig.executor.calls == ["a"]
    final = await rig.settled("a")
    assert final.status == CANCELED and [p["status"] for p in rig.posts_for("a")] == ["canceled"]
    await rig.idle()


# --- cancellation ------------------------------------------------------------------------------------------


async def test_cancel_a_queued_job(make_rig: MakeRig) -> None:
    gate = asyncio.Event()
    rig = make_rig(executor=FakeExecutor(gate=gate))
    await rig.manager.start()
    await rig.submit(make_job("a"))
    await rig.submit(make_job("b", webhook="http://hook.test/b"))
    await asyncio.wait_for(rig.executor.started.wait(), DEADLINE_S)
    assert (await rig.manager.progress(rig.store.peek("b"))).queue_position == 1  # type: ignore[arg-type]
    canceled = await asyncio.wait_for(rig.manager.cancel("b", "o"), DEADLINE_S)
    assert canceled.status == CANCELED and canceled.images == ()
    assert outcome(canceled) == outcome(rig.store.peek("b"))
    assert await rig.store.queue_place(rig.store.peek("b")) is None  # type: ignore[arg-type]
    assert await rig.store.count_queued() == 0
    gate.set()
    assert (await rig.final("a")).status == COMPLETED
    await rig.idle()
    assert rig.executor.calls == ["a"]  # the worker never ran it
    assert (await rig.settled("b")).status == CANCELED and [p["status"] for p in rig.posts_for("b")] == ["canceled"]


async def test_cancel_a_running_job_stops_it_before_the_next_step(make_rig: MakeRig) -> None:
    gate = asyncio.Event()
    rig = make_rig(executor=FakeExecutor(gate=gate, steps=3))
    await rig.manager.start()
    await rig.submit(make_job("a", webhook="http://hook.test/a"))
    await asyncio.wait_for(rig.executor.started.wait(), DEADLINE_S)
    cancel = asyncio.create_task(rig.manager.cancel("a", "o"))
    await eventually(lambda: (rig.store.peek("a") or make_job("x")).cancel_requested)
    assert not cancel.done()  # it waits for the worker
    gate.set()
    answer = await asyncio.wait_for(cancel, DEADLINE_S)
    assert answer.status == CANCELED and answer.images == ()
    assert outcome(answer) == outcome(rig.store.peek("a"))  # the answer is the final stored job
    assert rig.executor.steps_run["a"] == 1  # stopped before its second step
    assert rig.storage.objects == {}
    assert [p["status"] for p in (await rig.settled("a"), *rig.posts_for("a"))[1:]] == ["canceled"]
    await rig.more_jobs_complete()


async def test_cancel_landing_while_the_claim_returns_is_not_lost(make_rig: MakeRig) -> None:
    """The claim is written, then a cancel writes `cancel_requested` before the worker resumes: the worker must
    still stop before its first step. (With a store on a thread, the claim's result reaches the worker some
    loop iterations after its commit, so a cancel can land exactly there.)"""
    store = InMemoryJobStore()
    pause = store.pause_after("claim_next")
    rig = make_rig(store=store, executor=FakeExecutor(steps=3))
    await rig.manager.start()
    await rig.submit(make_job("a"))
    await asyncio.wait_for(pause.reached.wait(), DEADLINE_S)
    assert (store.peek("a") or make_job("x")).status == PROCESSING
    cancel = asyncio.create_task(rig.manager.cancel("a", "o"))
    await eventually(lambda: (store.peek("a") or make_job("x")).cancel_requested)
    pause.release.set()
    answer = await asyncio.wait_for(cancel, DEADLINE_S)
    assert outcome(answer) == outcome(store.peek("a"))
    assert answer.status == CANCELED, f"cancel was accepted before the first step, yet the job ended {answer.status}"
    assert rig.executor.steps_run["a"] == 0


async def test_cancel_after_completion_and_of_another_owners_job(make_rig: MakeRig) -> None:
    rig = make_rig()
    await rig.manager.start()
    await rig.submit(make_job("a"))
    assert (await rig.final("a")).status == COMPLETED
    with pytest.raises(JobFinished):
        await rig.manager.cancel("a", "o")
    with pytest.raises(NotFound):
        await rig.manager.cancel("a", "someone-else")
    with pytest.raises(NotFound):
        await rig.manager.cancel("missing", "o")
    assert (rig.store.peek("a") or make_job("x")).status == COMPLETED


async def test_cancel_racing_completion_answers_the_final_state(make_rig: MakeRig) -> None:
    """Cancel reads the job processing, the worker finishes before cancel writes: JobFinished."""
    store = InMemoryJobStore()
    rig = make_rig(store=store)
    await rig.manager.start()
    await rig.submit(make_job("a"))
    await rig.final("a")
    completed = store.peek("a")
    assert completed is not None
    # Replay the race on a stale read: the transition re-reads, finds the job finished, and does not apply.
    stale = dataclasses.replace(completed, status=PROCESSING, version=completed.version - 1)
    original_get = store.get
    reads = [stale]

    async def get_once_stale(job_id: str) -> Job | None:
        return reads.pop() if reads else await original_get(job_id)

    store.get = get_once_stale  # type: ignore[method-assign]
    with pytest.raises(JobFinished):
        await rig.manager.cancel("a", "o")
    assert store.peek("a") == completed


# --- recovery at start -------------------------------------------------------------------------------------


def _orphan(job_id: str, *, status: str = PROCESSING, asynchronous: bool = True, **kw: Any) -> Job:
    job = make_job(job_id, spec=make_spec(asynchronous=asynchronous), webhook=kw.pop("webhook", None))
    lease = kw.pop("lease", Lease("dead-process", 1.0) if status == PROCESSING else None)
    return dataclasses.replace(job, status=status, lease=lease, **kw)


async def test_recovery_at_start(make_rig: MakeRig) -> None:
    store = InMemoryJobStore()
    store.put(_orphan("cancel_me", cancel_requested=True, run_attempts=1, webhook="http://hook.test/c"))
    store.put(_orphan("sync_running", asynchronous=False, run_attempts=1))
    store.put(_orphan("sync_queued", status=QUEUED, asynchronous=False))
    store.put(_orphan("exhausted", run_attempts=3))
    store.put(_orphan("async_running", run_attempts=2))
    store.put(_orphan("async_queued", status=QUEUED))
    delivered = make_job("old", webhook="http://hook.test/old").finished_as(COMPLETED)
    store.put(dataclasses.replace(delivered, webhook=WebhookState("http://hook.test/old", WebhookStatus.PENDING)))
    rig = make_rig(store=store, max_run_attempts=3)
    await asyncio.wait_for(rig.manager.start(), DEADLINE_S)
    jobs = {job_id: await rig.final(job_id) for job_id in (j.id for j in store.all())}
    assert jobs["cancel_me"].status == CANCELED and jobs["cancel_me"].images == ()
    assert jobs["sync_running"].status == FAILED and jobs["sync_running"].error.code == "interrupted"  # type: ignore[union-attr]
    assert jobs["sync_queued"].status == FAILED and jobs["sync_queued"].error.code == "interrupted"  # type: ignore[union-attr]
    assert jobs["exhausted"].status == FAILED
    assert jobs["exhausted"].error.code == "run_attempts_exhausted"  # type: ignore[union-attr]
    assert jobs["async_running"].status == COMPLETED and jobs["async_running"].run_attempts == 3
    assert jobs["async_queued"].status == COMPLETED and jobs["async_queued"].run_attempts == 1
    assert sorted(rig.executor.calls) == ["async_queued", "async_running"]  # the rest are not run
    await rig.settled("cancel_me")
    await rig.settled("old")
    # (how many POSTs recovery sends is test_recovery_delivers_a_webhook_once's concern)
    assert {p["status"] for p in rig.posts_for("cancel_me")} == {"canceled"}
    assert [p["status"] for p in rig.posts_for("old")] == ["completed"]
    assert_codes(store.all())
    await rig.idle()
    await rig.more_jobs_complete()


@pytest.mark.parametrize("store_yields", [False, True])
@pytest.mark.parametrize("poster_yields", [0, 1, 3, 8])
async def test_recovery_delivers_a_webhook_once(make_rig: MakeRig, poster_yields: int, store_yields: bool) -> None:
    """A job recovery finishes (canceled) is also among the store's undelivered jobs: one POST, not two."""

    class SlowPoster(RecordingPoster):
        async def __call__(self, url: str, body: bytes, headers: Any) -> int:
            for _ in range(poster_yields):
                await asyncio.sleep(0)
            return await super().__call__(url, body, headers)

    store = InMemoryJobStore(yields=store_yields)
    store.put(_orphan("c", cancel_requested=True, run_attempts=1, webhook="http://hook.test/c"))
    rig = make_rig(store=store, poster=SlowPoster())
    await asyncio.wait_for(rig.manager.start(), DEADLINE_S)
    final = await rig.settled("c")
    await asyncio.sleep(0.01)
    assert final.status == CANCELED
    assert len(rig.poster.calls) == 1, [c.payload for c in rig.poster.calls]


async def test_no_recovery_at_start_with_a_shared_store(make_rig: MakeRig) -> None:
    """With a shared store, unfinished jobs at start belong to live replicas: a running one with a live lease is
    left to its worker, a synchronous one is not failed `interrupted` (its caller waits elsewhere); only an expired
    lease is taken over, and then a synchronous job runs again."""
    store = InMemoryJobStore(exclusive=False)
    live = store.put(_orphan("live", asynchronous=False, run_attempts=1, lease=Lease("other", 1e12)))
    store.put(_orphan("queued_sync", status=QUEUED, asynchronous=False))
    store.put(_orphan("expired_sync", asynchronous=False, run_attempts=1))
    rig = make_rig(store=store, job_lease_s=0.05)
    await asyncio.wait_for(rig.manager.start(), DEADLINE_S)
    assert store.calls["unfinished"] == 0
    queued = await rig.final("queued_sync")
    assert queued.status == COMPLETED and queued.run_attempts == 1
    expired = await rig.final("expired_sync")
    assert expired.status == COMPLETED and expired.run_attempts == 2 and expired.error is None
    await asyncio.sleep(0.1)  # two reclaim passes
    assert store.peek("live") == live
    assert sorted(rig.executor.calls) == ["expired_sync", "queued_sync"]


async def test_recovery_resumes_pending_webhook_attempts(make_rig: MakeRig) -> None:
    store = InMemoryJobStore()
    job = make_job("a", webhook="http://hook.test/a").finished_as(FAILED)
    attempts = (DeliveryAttempt(now_iso(), 500, None), DeliveryAttempt(now_iso(), 502, None))
    hook = WebhookState("http://hook.test/a", WebhookStatus.PENDING, attempts, tries=2)
    store.put(dataclasses.replace(job, webhook=hook))
    rig = make_rig(store=store, poster=RecordingPoster([500]), webhook_max_attempts=3)
    await rig.manager.start()
    final = await rig.settled("a")
    assert final.webhook is not None and final.webhook.status == WebhookStatus.FAILED
    assert len(final.webhook.attempts) == 3 and len(rig.poster.calls) == 1  # only the one attempt left


async def test_retention_purges_finished_jobs_and_their_images(make_rig: MakeRig) -> None:
    rig = make_rig(retention_s=0.0)
    await rig.manager.start()
    await rig.submit(make_job("a"))
    await rig.final("a")
    await rig.storage.put("a_input.png", b"x", "image/png")
    await asyncio.sleep(0.002)
    assert await asyncio.wait_for(rig.manager.purge_expired(), DEADLINE_S) == 1
    assert rig.store.peek("a") is None and rig.storage.objects == {}


# --- the executor over a fake Triton -----------------------------------------------------------------------


def _pipeline_rig(tmp_path: Path, triton_fail: Any = None, gate: asyncio.Event | None = None) -> tuple[Any, ...]:
    manifest = tiny_manifest(tmp_path)
    triton = FakeTriton(manifest, fail=triton_fail, gate=gate)
    pipeline = Img2ImgPipeline(manifest, triton)  # type: ignore[arg-type]
    storage = MemoryStorage()
    executor = JobExecutor({manifest.name: pipeline}, storage, DecodedInputs())
    return manifest, triton, storage, executor


async def _stored_input(storage: MemoryStorage, job: Job) -> None:
    await storage.put(job.input.name, make_image(20, 18), "image/png")


async def test_job_executor_runs_the_pipeline_over_triton(tmp_path: Path) -> None:
    manifest, triton, storage, executor = _pipeline_rig(tmp_path)
    job = make_job("a", spec=make_spec(num_images=2, steps=4, strength=0.5, effective_steps=2))
    await _stored_input(storage, job)
    steps: list[tuple[int, int]] = []
    images = await executor(job, on_step=lambda d, t: steps.append((d, t)), should_stop=lambda: False)
    token = images[0].name.removeprefix("a_0_").removesuffix(".png")  # one random token per run (naming.py)
    assert [i.name for i in images] == [output_name("a", i, token=token) for i in (0, 1)] and len(token) == 32
    assert [i.seed for i in images] == [42, 43] and images[0].url == storage.url_for(images[0].name)
    assert all(storage.objects[i.name][0].startswith(b"\x89PNG") for i in images)
    assert triton.unet_calls == 2 and steps == [(0, 2), (1, 2), (2, 2)]
    models = [model for model, _ in triton.calls]
    assert models == [manifest.text_encoder.model, manifest.vae_encoder.model, *[manifest.unet.model] * 2,
                      manifest.vae_decoder.model]  # fmt: skip
    _, unet_shapes = triton.calls[2]
    assert unet_shapes["sample_in"] == (4, 4, 2, 2)  # 2 images x (uncond, cond), 4 latent channels, 16 px / 8


async def test_job_executor_stops_between_unet_calls(tmp_path: Path) -> None:
    _, triton, storage, executor = _pipeline_rig(tmp_path)
    job = make_job("a", spec=make_spec(steps=8, strength=1.0, effective_steps=8))
    await _stored_input(storage, job)
    with pytest.raises(GenerationCanceled):
        await executor(job, on_step=lambda d, t: None, should_stop=lambda: triton.unet_calls >= 3)
    assert triton.unet_calls == 3 and not any(name.startswith("a_0") for name in storage.objects)


async def test_manager_over_the_pipeline_backend_errors_and_cancel(tmp_path: Path, make_rig: MakeRig) -> None:
    def fail(model: str, n: int) -> BaseException | None:
        if model.endswith("unet") and failures:
            return failures.pop(0)
        return None

    failures: list[BaseException] = [BackendUnavailable("Triton down"), BackendError("bad output")]
    gate = asyncio.Event()
    _, triton, storage, executor = _pipeline_rig(tmp_path, fail, gate)
    calls_before = 1 << 30
    triton.gate_if = lambda model, n: model.endswith("unet") and triton.unet_calls - calls_before == 3
    rig = make_rig(executor=FakeExecutor(), job_retries=0)
    rig.manager.workers.execute = executor
    rig.manager.workers.storage = storage
    await rig.manager.start()
    sync = make_job("sync", spec=make_spec(asynchronous=False))
    broken = make_job("broken")
    slow = make_job("slow", spec=make_spec(steps=10, strength=1.0, effective_steps=10))
    for job in (sync, broken, slow):
        await _stored_input(storage, job)
    await rig.submit(sync)
    final = await rig.final("sync")
    assert final.status == FAILED and final.error is not None and final.error.code == "backend_unavailable"
    await rig.submit(broken)
    final = await rig.final("broken")
    assert final.status == FAILED and final.error is not None and final.error.code == "backend_error"
    # Hold the slow job inside its 3rd UNet call, cancel it: no 4th call, no image.
    calls_before = triton.unet_calls
    await rig.submit(slow)
    await eventually(lambda: triton.unet_calls - calls_before == 3)
    cancel = asyncio.create_task(rig.manager.cancel("slow", "o"))
    await eventually(lambda: (rig.store.peek("slow") or make_job("x")).cancel_requested)
    gate.set()
    answer = await asyncio.wait_for(cancel, DEADLINE_S)
    assert answer.status == CANCELED and answer.images == ()
    assert triton.unet_calls - calls_before == 3
    assert not any(name.startswith("slow_") and not name.endswith("input.png") for name in storage.objects)
    assert_codes(rig.store.all())
    await rig.idle()
