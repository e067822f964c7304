"""Fakes at the job core's client seams: an in-memory `JobStore`, a Triton client, an executor, a poster.

They are faithful to the contracts the real objects keep (compare-and-set on `version`, claim/renew leases,
`infer(model, inputs, outputs)` shapes), and add what the tests need to provoke races and failures: injected
`StoreUnavailable` on chosen calls (before their effect, or after it: a lost reply), a yield to the event loop
inside every store call, pauses that hold a call at a chosen point, and per-call gates in the Triton client and
the executor.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette

from gateway.app import _api_error
from gateway.diffusion.img2img import GenerationCanceled
from gateway.diffusion.manifest import Component, PipelineManifest
from gateway.errors import ApiError, StoreUnavailable
from gateway.http.routes import Handlers, Services, routes
from gateway.jobs.events import EventHandler, EventKind, JobEvent
from gateway.jobs.model import (
    COMPLETED,
    DEFAULT_WEBHOOK_EVENTS,
    PROCESSING,
    QUEUED,
    UNFINISHED,
    InputImage,
    Job,
    JobSpec,
    OutputImage,
    Size,
    WebhookEvent,
    WebhookState,
    WebhookStatus,
    now_iso,
)
from gateway.jobs.naming import input_name, output_name
from gateway.jobs.store import FinishedWork, IdempotencyConflict, QueuePlace, StaleJob
from gateway.jobs.webhooks import SigningSecrets
from gateway.media.storage import StoredStream
from gateway.settings import Settings
from gateway.triton.client import DEFAULT_PRIORITY

# --- the job store --------------------------------------------------------------------------------------

FaultRule = Callable[[str, tuple[Any, ...]], bool]  # (method, args) -> raise StoreUnavailable now?


@dataclass
class Pause:
    """Holds one store call after its effect is applied, before it returns to its caller."""

    reached: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True)
class Write:
    """One successful store write, for invariants over a job's history."""

    method: str
    job: Job


class InMemoryJobStore:
    """`JobStore` in a dict, with the semantics of `SqliteJobStore` (see gateway/jobs/store.py).

    Every method is atomic between its awaits: the read-modify-write of `update`, `claim` and `renew` happens
    without yielding, as SQLite's transaction on the store's thread does. With `yields=True` each call yields
    to the event loop before and after its effect (a thread round trip does), so other tasks interleave.
    Faults: `fail_nth("claim", 2)` makes the 2nd call of `claim` raise; `fail_when(rule)` raises while
    `rule(method, args)` is true; `lose_reply_when(rule)` lets an `update` commit, then raises (a lost answer).
    `calls` counts calls (failed ones included), `writes` logs every write. Lease times are `clock()`'s
    (`time.time`, the process's clock, as SQLite's). The fair queue is the stores' (start-time fair queuing:
    `fair_clock` per priority, `fair_shares` per (owner, priority)); insertion order breaks ties as a row id does.
    """

    METHODS = (
        "create",
        "get",
        "get_idempotent",
        "update",
        "claim",
        "renew",
        "release",
        "claim_next",
        "expired_leases",
        "count_queued",
        "count_active",
        "count_queued_by_priority",
        "queue_place",
        "overdue_in_queue",
        "find_result",
        "recent_finished",
        "claim_delivery",
        "acquire_lock",
        "unfinished",
        "undelivered",
        "expired",
        "webhook_secrets",
        "put_webhook_secrets",
        "delete",
        "close",
    )

    def __init__(self, *, yields: bool = False, exclusive: bool = True) -> None:
        self.yields = yields
        self.exclusive = exclusive  # True: as SQLite (one process); False: as a shared store (several replicas)
        self._jobs: dict[str, Job] = {}
        self._locks: dict[str, tuple[str, float]] = {}
        self._secrets: dict[str, SigningSecrets] = {}
        self._seq: dict[str, int] = {}  # insertion order (a row id): the last tie-break of the queue's order
        self.fair_clock: dict[int, float] = {}  # priority -> V, the largest tag claimed
        self.fair_shares: dict[tuple[str, int], float] = {}  # (owner, priority) -> virtual finish of its last job
        self.calls: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.writes: list[Write] = []
        self._nth: dict[str, set[int]] = {}
        self._rules: list[FaultRule] = []
        self._pauses: dict[str, Pause] = {}
        self._lost_replies: list[FaultRule] = []
        self.clock: Callable[[], float] = time.time  # the store's clock: lease times (as SQLite's, the process's)
        self.closed = False

    # -- fault injection --

    def fail_nth(self, method: str, *ns: int) -> None:
        """The ns-th calls (1-based, counted from now on all calls so far) of `method` raise StoreUnavailable."""
        assert method in self.METHODS, method
        self._nth.setdefault(method, set()).update(n + self.calls[method] for n in ns)

    def fail_when(self, rule: FaultRule) -> None:
        self._rules.append(rule)

    def lose_reply_when(self, rule: FaultRule) -> None:
        """A write (`update`) for which `rule(method, (job,))` is true commits, then raises StoreUnavailable to
        its caller, as a commit whose answer the network lost (once per rule: the rule is dropped once it fires)."""
        self._lost_replies.append(rule)

    def clear_faults(self) -> None:
        self._nth.clear()
        self._rules.clear()
        self._lost_replies.clear()

    def pause_after(self, method: str) -> Pause:
        """The next call of `method` applies its effect, then waits for `release` (once)."""
        pause = self._pauses[method] = Pause()
        return pause

    async def _enter(self, method: str, *args: Any) -> None:
        self.calls[method] += 1
        if self.yields:
            await asyncio.sleep(0)
        if self.calls[method] in self._nth.get(method, ()) or any(rule(method, args) for rule in self._rules):
            self.failures[method] += 1
            raise StoreUnavailable("The job store is unavailable", f"injected fault in {method}")

    async def _leave(self, method: str) -> None:
        pause = self._pauses.pop(method, None)
        if pause is not None:
            pause.reached.set()
            await pause.release.wait()
        if self.yields:
            await asyncio.sleep(0)

    def _store(self, method: str, job: Job) -> Job:
        stored = dataclasses.replace(job, version=job.version + 1, updated_at=now_iso())
        self._jobs[job.id] = stored
        self.writes.append(Write(method, stored))
        return stored

    # -- the protocol --

    async def create(self, job: Job, *, share: float = 1.0) -> Job:
        await self._enter("create", job)
        if job.idempotency_key is not None:
            for existing in self._jobs.values():
                if existing.owner == job.owner and existing.idempotency_key == job.idempotency_key:
                    if existing.request_hash != job.request_hash:
                        raise IdempotencyConflict(job.idempotency_key)
                    await self._leave("create")
                    return existing
        if job.id in self._jobs:  # SQLite: a primary key violation, an sqlite3.Error
            raise StoreUnavailable("The job store is unavailable", f"duplicate id {job.id}")
        stored = dataclasses.replace(job, version=1)
        if job.status == QUEUED:  # its place in the fair queue (a job created finished takes no share)
            at = (job.owner, job.spec.priority)
            tag = max(self.fair_clock.get(job.spec.priority, 0.0), self.fair_shares.get(at, 0.0))
            self.fair_shares[at] = tag + share
            stored = dataclasses.replace(stored, fair_tag=tag)
        self._jobs[job.id] = stored
        self._seq[job.id] = len(self._seq)
        self.writes.append(Write("create", stored))
        await self._leave("create")
        return stored

    async def get(self, job_id: str) -> Job | None:
        await self._enter("get", job_id)
        job = self._jobs.get(job_id)
        await self._leave("get")
        return job

    async def get_idempotent(self, owner: str, key: str) -> Job | None:
        await self._enter("get_idempotent", owner, key)
        found = next((j for j in self._jobs.values() if j.owner == owner and j.idempotency_key == key), None)
        await self._leave("get_idempotent")
        return found

    async def update(self, job: Job) -> Job:
        await self._enter("update", job)
        current = self._jobs.get(job.id)
        if current is None or current.version != job.version:
            raise StaleJob(current)
        stored = self._store("update", job)
        await self._leave("update")
        for rule in list(self._lost_replies):
            if rule("update", (job,)):
                self._lost_replies.remove(rule)
                self.failures["update"] += 1
                raise StoreUnavailable("The job store is unavailable", "injected: the commit's answer was lost")
        return stored

    async def _conditional(self, method: str, job_id: str, change: Callable[[Job], Job | None]) -> Job | None:
        current = self._jobs.get(job_id)
        proposed = None if current is None else change(current)
        stored = None if proposed is None else self._store(method, proposed)
        await self._leave(method)
        return stored

    async def claim(self, job_id: str, worker: str, lease_s: float) -> Job | None:
        await self._enter("claim", job_id, worker)
        return await self._conditional("claim", job_id, lambda job: job.claimed(worker, self.clock() + lease_s))

    async def renew(self, job_id: str, worker: str, claim: str, lease_s: float) -> Job | None:
        await self._enter("renew", job_id, worker, claim)
        return await self._conditional("renew", job_id, lambda job: job.renewed(worker, claim, self.clock() + lease_s))

    async def release(self, job_id: str, worker: str, claim: str, not_before: float = 0.0) -> Job | None:
        await self._enter("release", job_id, worker, claim)
        return await self._conditional("release", job_id, lambda job: job.released(worker, claim, not_before))

    def _oldest(self, keep: Callable[[Job], bool], key: Callable[[Job], str]) -> Job | None:
        return min((j for j in self._jobs.values() if keep(j)), key=key, default=None)

    def _queue_order(self, job: Job) -> tuple[int, float, str, int]:
        """`claim_next`'s order: the highest priority, then the smallest tag, the oldest, the first inserted."""
        return (-job.spec.priority, job.fair_tag, job.created_at, self._seq.get(job.id, -1))

    async def claim_next(self, worker: str, lease_s: float, now: float, *, min_priority: int = 0) -> Job | None:
        await self._enter("claim_next", worker)
        first = min(
            (
                j
                for j in self._jobs.values()
                if j.status == QUEUED
                and j.not_before <= now
                and j.spec.priority >= min_priority
                and (j.queue_deadline is None or j.queue_deadline > now)
            ),
            key=self._queue_order,
            default=None,
        )
        if first is not None:
            priority = first.spec.priority
            self.fair_clock[priority] = max(self.fair_clock.get(priority, 0.0), first.fair_tag)
        return await self._conditional(
            "claim_next", first.id if first else "", lambda job: job.claimed(worker, self.clock() + lease_s)
        )

    async def claim_delivery(self, worker: str, lease_until: float, now: float) -> Job | None:
        await self._enter("claim_delivery", worker)
        first = self._oldest(
            lambda j: j.delivery_claimed(worker, lease_until, now) is not None, lambda j: j.completed_at or ""
        )
        return await self._conditional(
            "claim_delivery", first.id if first else "", lambda job: job.delivery_claimed(worker, lease_until, now)
        )

    async def expired_leases(self, limit: int) -> list[Job]:
        now = self.clock()
        found = await self._select(
            "expired_leases", lambda j: j.status == PROCESSING and j.lease is not None and j.lease.expires_at < now
        )
        return found[:limit]

    async def count_queued(self) -> int:
        return len(await self._select("count_queued", lambda j: j.status == QUEUED))

    async def count_active(self, owner: str) -> int:
        return len(await self._select("count_active", lambda j: j.owner == owner and j.status in UNFINISHED))

    async def queue_place(self, job: Job) -> QueuePlace | None:
        await self._enter("queue_place", job.id)
        stored = self._jobs.get(job.id)
        place = None
        if stored is not None and stored.status == QUEUED:
            mine = self._queue_order(stored)
            ahead = [j for j in self._jobs.values() if j.status == QUEUED and self._queue_order(j) < mine]
            place = QueuePlace(len(ahead) + 1, float(sum(j.spec.work for j in ahead)))
        await self._leave("queue_place")
        return place

    async def count_queued_by_priority(self) -> dict[int, int]:
        queued = await self._select("count_queued_by_priority", lambda j: j.status == QUEUED)
        return dict(Counter(j.spec.priority for j in queued))

    async def overdue_in_queue(self, now: float, limit: int) -> list[Job]:
        found = await self._select(
            "overdue_in_queue",
            lambda j: j.status == QUEUED and j.queue_deadline is not None and j.queue_deadline <= now,
        )
        return found[:limit]

    async def find_result(self, owner: str, result_key: str) -> Job | None:
        found = await self._select(
            "find_result", lambda j: j.owner == owner and j.result_key == result_key and j.status == COMPLETED
        )
        return max(found, key=lambda j: (j.completed_at or "", self._seq.get(j.id, -1)), default=None)

    async def recent_finished(self, since: float, limit: int) -> list[FinishedWork]:
        def finished_at(job: Job) -> float:
            return datetime.fromisoformat(job.completed_at or "").timestamp()

        ran = await self._select(
            "recent_finished", lambda j: j.status == COMPLETED and j.started_at is not None and finished_at(j) >= since
        )
        ran.sort(key=lambda j: j.completed_at or "", reverse=True)
        return [
            FinishedWork(j.spec.model, float(j.spec.work), j.started_at or 0.0, finished_at(j)) for j in ran[:limit]
        ]

    async def acquire_lock(self, name: str, holder: str, until: float, now: float) -> bool:
        await self._enter("acquire_lock", name, holder)
        current = self._locks.get(name)
        acquired = current is None or current[1] <= now or current[0] == holder
        if acquired:
            self._locks[name] = (holder, until)
        await self._leave("acquire_lock")
        return acquired

    async def _select(self, method: str, keep: Callable[[Job], bool]) -> list[Job]:
        await self._enter(method)
        found = sorted((j for j in self._jobs.values() if keep(j)), key=lambda j: j.created_at)
        await self._leave(method)
        return found

    async def unfinished(self) -> list[Job]:
        return await self._select("unfinished", lambda j: j.status in UNFINISHED)

    async def undelivered(self) -> list[Job]:
        return await self._select(
            "undelivered", lambda j: j.finished and j.webhook is not None and j.webhook.status == WebhookStatus.PENDING
        )

    async def expired(self, before: str, limit: int) -> list[Job]:
        def keep(j: Job) -> bool:
            settled = j.webhook is None or j.webhook.status != WebhookStatus.PENDING
            return j.completed_at is not None and j.completed_at < before and settled

        found = await self._select("expired", keep)
        return sorted(found, key=lambda j: (j.completed_at or "", j.id))[:limit]

    async def webhook_secrets(self, owner: str) -> SigningSecrets | None:
        await self._enter("webhook_secrets", owner)
        found = self._secrets.get(owner)
        await self._leave("webhook_secrets")
        return found

    async def put_webhook_secrets(self, proposed: SigningSecrets) -> SigningSecrets:
        await self._enter("put_webhook_secrets", proposed.owner)
        stored = self._secrets.get(proposed.owner)
        if (stored is None and proposed.version == 1) or (
            stored is not None and stored.version == proposed.version - 1
        ):
            self._secrets[proposed.owner] = stored = proposed
        await self._leave("put_webhook_secrets")
        if stored is None:
            raise StoreUnavailable("The job store is unavailable", "rotation of secrets that do not exist")
        return stored

    async def delete(self, job_id: str) -> None:
        await self._enter("delete", job_id)
        self._jobs.pop(job_id, None)
        await self._leave("delete")

    async def close(self) -> None:
        await self._enter("close")
        self.closed = True

    # -- for assertions (no fault, no yield) --

    def peek(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def put(self, job: Job) -> Job:
        """Seed a job as a previous process left it (version as given, or 1)."""
        stored = job if job.version else dataclasses.replace(job, version=1)
        self._jobs[job.id] = stored
        self._seq.setdefault(job.id, len(self._seq))
        return stored

    def all(self) -> list[Job]:
        return list(self._jobs.values())


# --- jobs -----------------------------------------------------------------------------------------------


def make_spec(**overrides: Any) -> JobSpec:
    values: dict[str, Any] = {
        "prompt": "a cat",
        "negative_prompt": None,
        "model": "tiny",
        "strength": 0.5,
        "steps": 4,
        "guidance_scale": 7.5,
        "seed": 42,
        "style": None,
        "num_images": 1,
        "webhook_url": None,
        "asynchronous": True,
        "processed_size": Size(16, 16),
        "effective_steps": 2,
    }
    values.update(overrides)
    return JobSpec(**values)


def make_job(
    job_id: str,
    *,
    owner: str = "o",
    key: str | None = None,
    body: str = "a",
    webhook: str | None = None,
    spec: JobSpec | None = None,
    events: tuple[WebhookEvent, ...] = DEFAULT_WEBHOOK_EVENTS,
    **kw: Any,
) -> Job:
    """A freshly created job (`version` 0, as `CreateJob` hands it to `store.create`); `events`: its webhook's."""
    now = now_iso()
    spec = spec or make_spec(webhook_url=webhook)
    return Job(
        id=job_id,
        owner=owner,
        status=kw.pop("status", QUEUED),
        spec=spec,
        input=InputImage(url="http://example.test/in.png", name=input_name(job_id, "png"), width=16, height=16),
        created_at=kw.pop("created_at", now),
        updated_at=now,
        webhook=WebhookState(webhook, events=events) if webhook else None,
        idempotency_key=key,
        request_hash=json.dumps({"b": body}),
        **kw,
    )


# --- storage, webhooks ------------------------------------------------------------------------------------


class MemoryStorage:
    def __init__(self, base_url: str = "http://gw.test") -> None:
        self.base_url = base_url
        self.objects: dict[str, tuple[bytes, str]] = {}
        self.deleted: list[str] = []
        self.modified: dict[str, float] = {}  # name -> Unix time of its last put

    def url_for(self, name: str) -> str:
        return f"{self.base_url}/v1/images/{name}"

    async def put(self, name: str, data: bytes, content_type: str) -> None:
        self.objects[name] = (data, content_type)
        self.modified[name] = time.time()

    async def get(self, name: str) -> tuple[bytes, str] | None:
        return self.objects.get(name)

    async def open(self, name: str) -> StoredStream | None:
        found = self.objects.get(name)
        if found is None:
            return None

        async def chunks() -> AsyncIterator[bytes]:
            yield found[0]

        return StoredStream(found[1], len(found[0]), chunks())

    async def delete(self, name: str) -> None:
        self.deleted.append(name)
        self.objects.pop(name, None)

    async def iter_older_than(self, cutoff: float) -> AsyncIterator[str]:
        for name in [n for n, when in self.modified.items() if when < cutoff and n in self.objects]:
            yield name

    async def remove_temp_older_than(self, cutoff: float) -> int:
        return 0


@dataclass(frozen=True)
class PostCall:
    url: str
    body: bytes
    headers: Mapping[str, str]

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.body)


class RecordingPoster:
    """The webhook `Poster`: records each POST and answers `codes` in turn (then the last one forever)."""

    def __init__(self, codes: Sequence[int | Exception] = (200,)) -> None:
        self.codes = list(codes)
        self.calls: list[PostCall] = []
        self.posted = asyncio.Event()

    async def __call__(self, url: str, body: bytes, headers: Mapping[str, str]) -> int:
        self.calls.append(PostCall(url, body, dict(headers)))
        self.posted.set()
        answer = self.codes.pop(0) if len(self.codes) > 1 else self.codes[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def render(job: Job, progress: Any) -> bytes:
    """A webhook body with what the tests check: the job's id, status, images and error code."""
    return json.dumps(
        {
            "id": job.id,
            "status": str(job.status),
            "images": [image.name for image in job.images],
            "error": job.error.code if job.error else None,
            "step": progress.step,
        }
    ).encode()


# --- the executor seam ------------------------------------------------------------------------------------


class FakeExecutor:
    """The `Executor` the JobManager calls: `steps` steps, each checking `should_stop` first.

    `fail_with`: exceptions raised by successive calls (an `Exception` instance, or None for a normal run).
    `gate`: when set, every step waits for it (holds a job mid-run). `yields_per_step(job_id, step)` says how
    many times a step yields to the event loop. Stores its images in `storage` like `JobExecutor`.
    """

    def __init__(
        self,
        storage: MemoryStorage | None = None,
        *,
        steps: int = 2,
        fail_with: Sequence[BaseException | None] = (),
        gate: asyncio.Event | None = None,
        yields_per_step: Callable[[str, int], int] | None = None,
    ) -> None:
        self.storage = storage
        self.steps = steps
        self.fail_with = list(fail_with)
        self.gate = gate
        self.yields_per_step = yields_per_step or (lambda job_id, step: 0)
        self.calls: list[str] = []
        self.steps_run: Counter[str] = Counter()
        self.started = asyncio.Event()
        self.finished: list[str] = []

    async def __call__(
        self,
        job: Job,
        *,
        on_step: Callable[[int, int], None],
        should_stop: Callable[[], bool],
        before_step: Callable[[], Awaitable[None]] | None = None,
    ) -> tuple[OutputImage, ...]:
        self.calls.append(job.id)
        self.started.set()
        failure = self.fail_with.pop(0) if self.fail_with else None
        if failure is not None:
            raise failure
        on_step(0, self.steps)
        for step in range(self.steps):
            if before_step is not None:
                await before_step()
            if should_stop():
                raise GenerationCanceled()
            if self.gate is not None:
                await self.gate.wait()
            for _ in range(self.yields_per_step(job.id, step)):
                await asyncio.sleep(0)
            self.steps_run[job.id] += 1
            on_step(step + 1, self.steps)
        if should_stop():
            raise GenerationCanceled()
        images = []
        for i in range(job.spec.num_images):
            name = output_name(job.id, i, job.run_attempts)
            if self.storage is not None:
                await self.storage.put(name, b"png", "image/png")
            images.append(OutputImage(name=name, url=f"http://example.test/{name}", width=16, height=16, seed=i))
        self.finished.append(job.id)
        return tuple(images)


# --- the Triton client seam -------------------------------------------------------------------------------

HIDDEN = 8  # text-encoder width of the fake pipeline


def write_word_tokenizer(path: Path, max_length: int) -> Path:
    """A tiny `tokenizers` JSON with CLIP's fixed-length padding/truncation (enough for the pipeline code)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {
        "<pad>": 0,
        "<unk>": 1,
        **{w: i + 2 for i, w in enumerate(["a", "cat", "dog", "in", "the", "style", "of", "neon"])},
    }
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(length=max_length, pad_id=0, pad_token="<pad>")
    tokenizer.save(str(path))
    return path


def tiny_manifest(
    tmp_path: Path, *, name: str = "tiny", scheduler: str = "DDIMScheduler", unet_in_channels: int | None = None
) -> PipelineManifest:
    """A 16-px pipeline with a latent grid of 2 (vae factor 8), as the export writes it; `unet_in_channels` 9
    makes it an inpainting one."""
    max_length = 8
    tokenizer = write_word_tokenizer(tmp_path / f"{name}.tokenizer.json", max_length)

    def component(suffix: str, inputs: Sequence[str], output: str) -> Component:
        return Component(model=f"{name}_{suffix}", inputs={r: f"{r}_in" for r in inputs}, outputs={"out": output})

    return PipelineManifest(
        name=name,
        path=tmp_path / f"{name}.pipeline.json",
        native_resolution=16,
        vae_scale_factor=8,
        grid=8,
        latent_channels=4,
        scaling_factor=0.18215,
        shift_factor=None,
        max_length=max_length,
        tokenizer_path=tokenizer,
        text_encoder=component("text_encoder", ["input_ids"], "last_hidden_state"),
        vae_encoder=component("vae_encoder", ["sample"], "latent_parameters"),
        unet=component("unet", ["sample", "timestep", "encoder_hidden_states"], "out_sample"),
        vae_decoder=component("vae_decoder", ["latent_sample"], "sample"),
        scheduler={"_class_name": scheduler, "num_train_timesteps": 1000},
        defaults={},
        dtype="float32",
        backend="python",
        unet_in_channels=unet_in_channels,
    )


class FakeTriton:
    """`infer(model, inputs, outputs, priority=...)` of `TritonEngine`, with correctly shaped float32 outputs per
    component.

    `fail`: a callable (model, call index) -> exception to raise or None. `gate`: when set, the calls for which
    `gate_if(model, call index)` is true (all by default) await it first. `unet_calls` counts UNet calls;
    `calls` logs (model, {input name: shape}); `priorities` the priority of each call, in the same order; `feeds`
    (model -> a copy of each call's inputs, by name) what was sent. `encoder_sees_pixels`: the VAE encoder's
    mean is each latent cell's top-left pixel of channel 0 (else zeros), so what was encoded shows in its latents.
    """

    def __init__(
        self,
        manifest: PipelineManifest,
        *,
        fail: Callable[[str, int], BaseException | None] | None = None,
        gate: asyncio.Event | None = None,
        gate_if: Callable[[str, int], bool] | None = None,
        encoder_sees_pixels: bool = False,
    ) -> None:
        self.manifest = manifest
        self.fail = fail or (lambda model, n: None)
        self.gate = gate
        self.gate_if = gate_if or (lambda model, n: True)
        self.calls: list[tuple[str, dict[str, tuple[int, ...]]]] = []
        self.priorities: list[int] = []
        self.feeds: dict[str, list[dict[str, np.ndarray]]] = {}
        self.encoder_sees_pixels = encoder_sees_pixels
        self.entered = asyncio.Event()

    @property
    def unet_calls(self) -> int:
        return sum(1 for model, _ in self.calls if model == self.manifest.unet.model)

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        *,
        priority: int = DEFAULT_PRIORITY,
    ) -> dict[str, np.ndarray]:
        m = self.manifest
        self.calls.append((model, {k: tuple(v.shape) for k, v in inputs.items()}))
        self.feeds.setdefault(model, []).append({k: np.array(v) for k, v in inputs.items()})
        self.priorities.append(priority)
        self.entered.set()
        if self.gate is not None and self.gate_if(model, len(self.calls)):
            await self.gate.wait()
        failure = self.fail(model, len(self.calls))
        if failure is not None:
            raise failure
        by_model = {c.model: c for c in (m.text_encoder, m.vae_encoder, m.unet, m.vae_decoder)}
        component = by_model[model]
        feeds = {role: inputs[name] for role, name in component.inputs.items()}
        if component is m.text_encoder:
            ids = feeds["input_ids"]
            assert ids.dtype == np.int64 and ids.shape[1] == m.max_length, ids.shape
            result = np.tanh(ids[..., None].astype(np.float32) * 0.01 + np.zeros((1, 1, HIDDEN), np.float32))
        elif component is m.vae_encoder:
            sample = feeds["sample"]
            n, _, h, w = sample.shape
            f = m.vae_scale_factor
            result = np.zeros((n, 2 * m.latent_channels, h // f, w // f), np.float32)
            if self.encoder_sees_pixels:
                result[:, : m.latent_channels] = sample[:, :1, ::f, ::f]
        elif component is m.unet:
            sample, timestep, hidden = feeds["sample"], feeds["timestep"], feeds["encoder_hidden_states"]
            assert sample.shape[0] == timestep.shape[0] == hidden.shape[0], (sample.shape, hidden.shape)
            assert sample.shape[1] == m.sample_channels and hidden.shape[2] == HIDDEN
            result = (0.1 * sample[:, : m.latent_channels]).astype(np.float32)  # an inpainting UNet's too
        else:
            latents = feeds["latent_sample"]
            n, _, h, w = latents.shape
            f = m.vae_scale_factor
            result = np.full((n, 3, h * f, w * f), 0.25, np.float32)
        await asyncio.sleep(0)
        (name,) = outputs
        assert name == next(iter(component.outputs.values()))
        return {name: result.astype(np.float32)}


# --- several replicas ---------------------------------------------------------------------------------------


class SharedBus:
    """One event bus shared by several replicas (as PostgreSQL LISTEN/NOTIFY is): `endpoint(name)` gives each
    replica its own `JobEvents`; a publish on any endpoint reaches every started endpoint's handler, the
    publisher's included. Switches to prove events are only hints: `drop` (every event is lost, or only the
    kinds in `drop_kinds`) and `delay_s` (delivered that much later). `published` logs (endpoint, event)."""

    def __init__(self, *, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.drop = False
        self.drop_kinds: set[EventKind] = set()
        self.endpoints: list[BusEndpoint] = []
        self.published: list[tuple[str, JobEvent]] = []
        self.delivered: list[tuple[str, JobEvent]] = []

    def endpoint(self, name: str) -> BusEndpoint:
        endpoint = BusEndpoint(self, name)
        self.endpoints.append(endpoint)
        return endpoint

    def _dropped(self, event: JobEvent) -> bool:
        return self.drop or event.kind in self.drop_kinds

    def _deliver(self, event: JobEvent) -> None:
        for endpoint in list(self.endpoints):
            if endpoint.handler is not None:
                self.delivered.append((endpoint.name, event))
                endpoint.handler(event)

    async def publish(self, source: str, event: JobEvent) -> None:
        self.published.append((source, event))
        if self._dropped(event):
            return
        if self.delay_s > 0:
            asyncio.get_running_loop().call_later(self.delay_s, self._deliver, event)
        else:
            self._deliver(event)


class BusEndpoint:
    """One replica's `JobEvents` on a `SharedBus`."""

    def __init__(self, bus: SharedBus, name: str) -> None:
        self.bus = bus
        self.name = name
        self.handler: EventHandler | None = None

    async def start(self, handler: EventHandler) -> None:
        self.handler = handler

    async def publish(self, event: JobEvent) -> None:
        await self.bus.publish(self.name, event)

    async def close(self) -> None:
        self.handler = None


class SteppedExecutor(FakeExecutor):
    """A `FakeExecutor` that holds its (one) job before step `hold_at` (0-based) until `release` is set: the job
    stays mid-run with `hold_at` steps reported. `held` is set when the job reaches the hold."""

    def __init__(self, storage: MemoryStorage | None = None, *, steps: int = 4, hold_at: int = 2) -> None:
        super().__init__(storage, steps=steps)
        self.hold_at = hold_at
        self.held = asyncio.Event()
        self.release = asyncio.Event()
        self.gate = _StepGate(self)  # type: ignore[assignment]


class _StepGate:
    """Quacks like the `asyncio.Event` FakeExecutor awaits before each step; waits only before step `hold_at`."""

    def __init__(self, executor: SteppedExecutor) -> None:
        self.executor = executor

    async def wait(self) -> None:
        ex = self.executor
        if ex.calls and ex.steps_run[ex.calls[-1]] == ex.hold_at:
            ex.held.set()
            await ex.release.wait()


class SharedReceiver:
    """A webhook receiver several replicas post to: answers `codes` in turn (then the last one forever), each
    POST taking `yields` loop turns; records who posted, and the most POSTs in flight at once per job id."""

    def __init__(self, codes: Sequence[int | Exception] = (200,), *, yields: int = 3) -> None:
        self.codes = list(codes)
        self.yields = yields
        self.calls: list[tuple[str, PostCall]] = []
        self._in_flight: Counter[str] = Counter()
        self.max_in_flight: Counter[str] = Counter()

    def poster(self, replica: str) -> Callable[[str, bytes, Mapping[str, str]], Any]:
        async def post(url: str, body: bytes, headers: Mapping[str, str]) -> int:
            call = PostCall(url, body, dict(headers))
            job_id = call.payload["id"]
            self.calls.append((replica, call))
            self._in_flight[job_id] += 1
            self.max_in_flight[job_id] = max(self.max_in_flight[job_id], self._in_flight[job_id])
            try:
                for _ in range(self.yields):
                    await asyncio.sleep(0)
                answer = self.codes.pop(0) if len(self.codes) > 1 else self.codes[0]
            finally:
                self._in_flight[job_id] -= 1
            if isinstance(answer, Exception):
                raise answer
            return answer

        return post

    def for_job(self, job_id: str) -> list[tuple[str, PostCall]]:
        return [(replica, call) for replica, call in self.calls if call.payload["id"] == job_id]


# --- the routes over a few services ---------------------------------------------------------------------------


def routes_app(settings: Settings, **parts: Any) -> tuple[Handlers, Starlette]:
    """The real routes and error handlers, over the handlers' services given in `parts` (the others None, no
    pipelines): for route tests whose handlers reach only those parts."""
    handlers = Handlers(settings)
    unset: dict[str, Any] = {f.name: None for f in dataclasses.fields(Services)} | {"pipelines": {}}
    handlers.services = Services(**{**unset, "settings": settings, **parts})
    return handlers, Starlette(routes=routes(handlers), exception_handlers={ApiError: _api_error})


def sdxl_answers(
    model: str, inputs: Mapping[str, np.ndarray], *, widths: tuple[int, int], pooled: int
) -> dict[str, np.ndarray]:
    """Correctly shaped answers of a fake SDXL pipeline's models (`xl_<component>`, 8 pixels a latent), by output
    role: each encoder's hidden states (`widths` wide; the ids + 1 in every channel) and the second's pooled
    embeddings, the VAE encoder's zero parameters, a tenth of the UNet's sample, the decoder's zero pixels. A fake
    names its outputs `<role>` or `<role>.<anything>`; `{name: answers[name.split(".")[0]]}` serves them."""
    if model.startswith("xl_text_encoder"):
        ids = inputs["input_ids"].astype(np.float32) + 1
        return {
            "hidden_states": np.repeat(ids[..., None], widths[model.endswith("_2")], axis=2),
            "text_embeds": np.repeat(ids[:, :1], pooled, axis=1),
        }
    if model == "xl_vae_encoder":
        n, _, h, w = inputs["sample"].shape
        return {"latent_parameters": np.zeros((n, 8, h // 8, w // 8), np.float32)}
    if model == "xl_unet":
        return {"out_sample": (0.1 * inputs["sample"]).astype(np.float32)}
    n, _, h, w = inputs["latent_sample"].shape
    return {"sample": np.zeros((n, 3, h * 8, w * 8), np.float32)}
