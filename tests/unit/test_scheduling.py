"""Priorities inside one process (`StepGate`, the dispatcher's preempting claims, `max_queue_s`), the wait
estimates' measurements, and the key file's per-key policies (no Triton, no HTTP: the in-memory store and a
fake executor)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.jobs.model import COMPLETED, FAILED, Job
from gateway.jobs.runner import JobManager
from gateway.jobs.scheduling import StepGate, WaitEstimator, measure
from gateway.jobs.store import FinishedWork, QueuePlace
from gateway.settings import KeyPolicy, Settings, SettingsError, key_owner, load_api_keys, load_key_policies
from tests.unit.fakes import FakeExecutor, InMemoryJobStore, MemoryStorage, RecordingPoster, make_job, make_spec, render

DEADLINE_S = 10.0


async def eventually(check: Callable[[], bool], timeout_s: float = DEADLINE_S) -> None:
    async def poll() -> None:
        while not check():  # noqa: ASYNC110 (polls state no event announces)
            await asyncio.sleep(0.001)

    await asyncio.wait_for(poll(), timeout_s)


# --- StepGate ------------------------------------------------------------------------------------------------


async def test_a_step_waits_while_a_higher_priority_job_denoises_and_goes_on_when_it_leaves() -> None:
    paused: list[tuple[int, float]] = []
    gate = StepGate(on_preempted=lambda priority, waited: paused.append((priority, waited)))
    gate.enter("bulk", 0)
    await asyncio.wait_for(gate.turn(0), 1.0)  # alone (or with its equals): at once, nothing counted
    gate.enter("normal", 1)
    await asyncio.wait_for(gate.turn(1), 1.0)  # a lower one running does not hold a higher one
    waiting = asyncio.ensure_future(gate.turn(0))
    await asyncio.sleep(0.02)
    assert not waiting.done()  # the bulk job pauses at its step boundary
    assert gate.lowest() == 0
    gate.leave("normal")
    await asyncio.wait_for(waiting, 1.0)
    assert len(paused) == 1 and paused[0][0] == 0 and paused[0][1] >= 0.01
    assert paused and not gate.outranked(0)


# --- measurements ------------------------------------------------------------------------------------------


def test_measure_gives_service_time_per_work_per_model_and_throughput_while_busy() -> None:
    finished = [
        FinishedWork("a", 10.0, 100.0, 102.0),  # 2 s for 10 work
        FinishedWork("a", 10.0, 101.0, 103.0),  # overlapping: run together
        FinishedWork("b", 5.0, 200.0, 205.0),  # after an idle gap of 97 s, which must not count
        FinishedWork("b", 0.0, 200.0, 201.0),  # no work: ignored
    ]
    rates = measure(finished)
    assert rates is not None
    assert rates.seconds_per_work == pytest.approx({"a": 0.2, "b": 1.0})
    assert rates.overall_seconds_per_work == pytest.approx(9.0 / 25.0)
    assert rates.throughput == pytest.approx(25.0 / (3.0 + 5.0))  # busy 100-103 and 200-205
    assert rates.mean_work == pytest.approx(25.0 / 3)
    assert measure([]) is None


class _Finished:
    def __init__(self, finished: list[FinishedWork]) -> None:
        self.finished = finished
        self.reads = 0

    async def recent_finished(self, since: float, limit: int) -> list[FinishedWork]:
        self.reads += 1
        return [f for f in self.finished if f.finished_at >= since][:limit]


async def test_estimates_come_from_measurements_and_are_null_before_any() -> None:
    now = 1000.0
    source = _Finished([])
    estimator = WaitEstimator(source, 600.0, clock=lambda: now)  # type: ignore[arg-type]
    job = make_job("q", spec=make_spec(num_images=1, effective_steps=10, guidance_scale=7.5))  # work 20
    assert await estimator.queued(job, QueuePlace(3, 40.0)) == (await estimator.queued(job, QueuePlace(1, 0.0)))
    assert (await estimator.queued(job, QueuePlace(3, 40.0))).start_at is None

    source.finished = [FinishedWork("tiny", 20.0, 900.0 + 10 * i, 910.0 + 10 * i) for i in range(5)]
    source.reads = 0
    estimator = WaitEstimator(source, 600.0, clock=lambda: now)  # type: ignore[arg-type]
    queued = await estimator.queued(job, QueuePlace(3, 40.0))
    # 2 work per second while busy; 40 work ahead and half a 20-work job: 25 s; then 20 work at 0.5 s each.
    assert queued.start_at == pytest.approx(now + 25.0) and queued.finish_at == pytest.approx(now + 35.0)
    free = await estimator.queued(job, QueuePlace(1, 0.0), slot_free=True)  # nothing ahead, a slot free: now
    assert free.start_at == pytest.approx(now) and free.finish_at == pytest.approx(now + 10.0)
    running = dataclasses.replace(job, started_at=now - 4.0)
    assert (await estimator.running(running, 2, 10)).finish_at == pytest.approx(now + 16.0)  # its own pace
    assert (await estimator.running(running, 0, 10)).finish_at == pytest.approx(now + 6.0)  # measured time left
    assert source.reads == 1  # re-read every few seconds, not per view


# --- the dispatcher: priority order, preemption at step boundaries, max_queue_s -----------------------------


@pytest.fixture
async def manager_of() -> AsyncIterator[Callable[..., tuple[JobManager, InMemoryJobStore, FakeExecutor]]]:
    managers: list[JobManager] = []

    def make(executor: FakeExecutor, **settings: Any) -> tuple[JobManager, InMemoryJobStore, FakeExecutor]:
        storage = MemoryStorage()
        executor.storage = storage
        store = InMemoryJobStore()
        values: dict[str, Any] = {"max_running_jobs": 1, "job_poll_interval_s": 0.01, "job_lease_s": 5.0}
        values.update(settings)
        manager = JobManager(
            store, executor, storage, Settings(**values), poster=RecordingPoster(), render=render, worker_id="w"
        )
        managers.append(manager)
        return manager, store, executor

    yield make
    for manager in managers:
        await asyncio.wait_for(manager.stop(), DEADLINE_S)


def _job(job_id: str, priority: int, owner: str = "o") -> Job:
    return make_job(job_id, owner=owner, spec=make_spec(priority=priority))


async def test_a_higher_priority_job_starts_beyond_the_slots_and_the_running_job_pauses_for_it(
    manager_of: Callable[..., tuple[JobManager, InMemoryJobStore, FakeExecutor]],
) -> None:
    events: list[tuple[str, Any]] = []
    executor = FakeExecutor(steps=60, yields_per_step=lambda job_id, step: 20)
    manager, store, _ = manager_of(executor, preempt_slots=1)
    manager.workers.on_event = lambda event, value: events.append((event, value))
    await manager.start()
    bulk = await store.create(_job("bulk", 0))
    queued_bulk = await store.create(_job("bulk-2", 0))
    await manager.enqueue_new(bulk)
    await manager.enqueue_new(queued_bulk)
    await eventually(lambda: executor.steps_run["bulk"] >= 5)
    urgent = await store.create(_job("urgent", 2))
    await manager.enqueue_new(urgent)
    await eventually(lambda: executor.steps_run["urgent"] >= 1)  # started though the one slot is taken
    paused_at = executor.steps_run["bulk"]
    await eventually(lambda: executor.steps_run["urgent"] >= 30)
    assert executor.steps_run["bulk"] <= paused_at + 1  # at most the step in flight when it came
    assert executor.steps_run["bulk-2"] == 0  # a queued bulk job does not take the preempting slot
    done = await asyncio.wait_for(manager.wait("urgent"), DEADLINE_S)
    assert done.status == COMPLETED
    bulk_done = await asyncio.wait_for(manager.wait("bulk"), DEADLINE_S)
    assert bulk_done.status == COMPLETED and executor.steps_run["bulk"] == 60  # no step lost or repeated
    assert executor.finished.index("urgent") < executor.finished.index("bulk")
    assert any(event == "preempted" and value[0] == 0 for event, value in events)
    assert any(event == "queue_time" and value[0] == 2 for event, value in events)


async def test_a_job_not_started_within_max_queue_s_fails_queue_timeout(
    manager_of: Callable[..., tuple[JobManager, InMemoryJobStore, FakeExecutor]],
) -> None:
    hold = asyncio.Event()  # the one slot stays taken until the waiting job has timed out
    executor = FakeExecutor(steps=4, gate=hold)
    manager, store, _ = manager_of(executor, preempt_slots=0)
    await manager.start()
    running = await store.create(_job("running", 1))
    await manager.enqueue_new(running)
    await eventually(lambda: "running" in executor.calls)
    waiting = make_job("waiting", spec=make_spec(max_queue_s=1.0), queue_deadline=time.time() + 0.2)
    created = await store.create(waiting)
    await manager.enqueue_new(created)
    failed = await asyncio.wait_for(manager.wait("waiting"), DEADLINE_S)
    assert failed.status == FAILED and failed.error is not None and failed.error.code == "queue_timeout"
    assert "waiting" not in executor.calls  # never started
    hold.set()
    assert (await asyncio.wait_for(manager.wait("running"), DEADLINE_S)).status == COMPLETED


# --- per-key policies from the key file ------------------------------------------------------------------


def test_the_key_file_gives_keys_a_maximum_priority_a_weight_and_a_class(tmp_path: Path) -> None:
    bulk, heavy, plain = "k-bulk-" + "0" * 32, "k-heavy-" + "1" * 32, "k-plain-" + "2" * 32
    keys = tmp_path / "keys"
    keys.write_text(f"# keys\n{bulk} max_priority=0 class=batch\n{heavy}  weight=2.5\n{plain}\n")
    assert load_api_keys(None, keys) == frozenset({bulk, heavy, plain})
    policies = load_key_policies(keys)
    assert policies == {
        key_owner(bulk): KeyPolicy(max_priority=0, key_class="batch"),
        key_owner(heavy): KeyPolicy(weight=2.5),
    }
    settings = Settings(key_policies=policies, default_max_priority=1)
    assert settings.key_policy(key_owner(bulk)).max_priority == 0
    assert settings.key_policy(key_owner(plain)) == KeyPolicy(max_priority=1)
    assert settings.key_policy("anonymous") == KeyPolicy(max_priority=1)
    assert "k-bulk" not in repr(settings)
    env = {"IMAGEN_API_KEYS_FILE": str(keys), "IMAGEN_DEFAULT_MAX_PRIORITY": "2"}
    assert Settings.from_env(env).key_policy(key_owner(heavy)).weight == 2.5


@pytest.mark.parametrize("option", ["max_priority=3", "weight=0", "weight=x", "class=Bad", "tier=1"])
def test_a_bad_key_option_stops_the_start_naming_the_line_not_the_key(tmp_path: Path, option: str) -> None:
    key = "k-" + "3" * 40
    keys = tmp_path / "keys"
    keys.write_text(f"{key} {option}\n")
    with pytest.raises(SettingsError) as raised:
        load_key_policies(keys)
    assert f"{keys}:1" in str(raised.value) and key not in str(raised.value)


def test_the_metrics_know_every_priority_the_request_takes() -> None:
    from gateway.jobs.request import MAX_PRIORITY, MIN_PRIORITY
    from gateway.observability import PRIORITIES

    assert list(PRIORITIES) == list(range(MIN_PRIORITY, MAX_PRIORITY + 1))
