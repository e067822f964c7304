"""Creating a job: the use case behind both create routes, from the request's fields to a queued job.

In order, all before any image work: the request's fields (`Admission.parse`, 400) and the priority the key may
use (its `KeyPolicy`, 400); an idempotent retry (the job it created); the fleet's queue
(`JobManager.check_admission`, 503 `overloaded`); the key's cap on queued + running jobs
(`max_active_jobs_per_key`, 429 `too_many_jobs`), so one key cannot fill the shared queue; then the deployment's
rules (`Admission.admit`), which charge the key's work budget (`WorkLimiter`, 429
`rate_limited`) once the request is known valid: a job costs `work_cost` UNet samples, so 4 images x 150 steps
with guidance weighs 1,200 times a 1-step single image. The cap counts the store's active jobs of the owner
plus this process's creations in flight for it, so concurrent requests of one key cannot all pass the same
count (with several replicas each adds its own in-flight ones: the cap may be exceeded by the creations in
flight on other replicas at that moment). A seeded request may be answered from the exact-result cache
(`results.py`): admission finds the earlier job, and the answer is a completed job with copies of its stored
objects, uncharged. A queued job's place in the fair queue is its work over the key's weight (`JobStore.create`'s
`share`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from gateway.errors import IdempotencyKeyReused, InvalidRequest, TooManyJobs, rate_limited, retry_after_s
from gateway.jobs.admission import Admission, Admitted, Reused
from gateway.jobs.execute import DecodedInputs
from gateway.jobs.model import COMPLETED, QUEUED, InputImage, Job, WebhookEvent, WebhookState, now_iso
from gateway.jobs.naming import input_name, mask_name, new_output_token, output_name
from gateway.jobs.request import ImageToImageRequest
from gateway.jobs.runner import JobManager
from gateway.jobs.store import IdempotencyConflict, JobStore
from gateway.media import codecs
from gateway.media.storage import Storage
from gateway.observability import stage
from gateway.settings import KeyPolicy

_STORED_FORMATS = {"JPEG": ("jpg", "image/jpeg"), "PNG": ("png", "image/png"), "WEBP": ("webp", "image/webp")}


class WorkLimiter(Protocol):
    """A per-key token bucket charged with a cost (gateway/http/ratelimit.py's limiters have this shape; app.py
    injects one): `take` answers 0.0 when granted, else the seconds until the cost can be taken."""

    per_minute: float
    burst: int

    @property
    def enabled(self) -> bool: ...

    async def take(self, key: str, cost: float = 1.0) -> float: ...


@dataclass(frozen=True)
class Caller:
    """Who asks, and how: the job's owner (a key hash), its idempotency key, sync or async, the request id."""

    owner: str
    idempotency_key: str | None = None
    asynchronous: bool = False  # asked to be answered at once (`Prefer: respond-async`); a webhook implies it
    request_id: str | None = None


def new_job_id() -> str:
    return f"img_transform_{uuid.uuid4().hex[:24]}"


_REQUEST_HASH_DOMAIN = b"imagen-request-v2\0"  # no JSON text starts so: never equal to a whole-body hash input
_UPLOAD_HASH_DOMAIN = b"imagen-upload-v1\0"  # an uploaded image's bytes, never equal to a base64 string's


_MASK_HASH_DOMAIN = b"imagen-mask-v1\0"  # a mask's digest follows: a masked body never hashes as an unmasked one
_MASK_UPLOAD_HASH_DOMAIN = b"imagen-mask-upload-v1\0"


def _field_digest(value: str | bytes) -> bytes:
    # surrogatepass: JSON may carry lone surrogates ("\\ud800"); the encoding stays one-to-one.
    raw = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
    return hashlib.sha256(raw).digest()


def request_hash(body: object) -> str:
    """A stable hash of a request's fields (key order and spacing do not matter), to tell an idempotent retry
    from a key reused for another request.

    The `image` (up to ~27 MB of base64 text, or an upload's bytes) is not re-serialized as JSON: it is hashed
    in one pass and that digest stands for it, next to the canonical JSON of every other field. A string or
    bytes `mask` is hashed the same way, after the image, only when present (so unmasked hashes are unchanged,
    and an uploaded mask's bytes never reach `json.dumps`). Fields without a string or bytes `image` (never ones
    that passed validation) are hashed whole, as before.
    """
    if isinstance(body, Mapping) and isinstance(image := body.get("image"), str | bytes):
        mask = body.get("mask")
        hashed = ("image", "mask") if isinstance(mask, str | bytes) else ("image",)
        rest = {key: value for key, value in body.items() if key not in hashed}
        digest = hashlib.sha256(_REQUEST_HASH_DOMAIN if isinstance(image, str) else _UPLOAD_HASH_DOMAIN)
        digest.update(_field_digest(image))
        if isinstance(mask, str | bytes):
            digest.update(_MASK_HASH_DOMAIN if isinstance(mask, str) else _MASK_UPLOAD_HASH_DOMAIN)
            digest.update(_field_digest(mask))
        digest.update(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode())
        return digest.hexdigest()
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def webhook_state(request: ImageToImageRequest) -> WebhookState | None:
    """The job's outbox entry, with the events the request asked for."""
    if request.webhook_url is None:
        return None
    return WebhookState(request.webhook_url, events=tuple(WebhookEvent(e) for e in request.webhook_events))


def _key_reused() -> IdempotencyKeyReused:
    return IdempotencyKeyReused("Idempotency-Key already used", "This key was used with a different request body")


class CreateJob:
    """Accept a request into a queued job: every client error is found here, before any work is queued."""

    def __init__(
        self,
        *,
        admission: Admission,
        store: JobStore,
        jobs: JobManager,
        storage: Storage,
        decoded: DecodedInputs,
        work_limiter: WorkLimiter | None = None,
        max_active_jobs_per_key: int = 0,
        max_running_jobs: int = 1,
        key_policy: Callable[[str], KeyPolicy] = lambda owner: KeyPolicy(),
        result_cache: bool = True,
        on_event: Callable[[str, object], None] = lambda event, value: None,
    ) -> None:
        self.admission = admission
        self.store = store
        self.jobs = jobs
        self.storage = storage
        self.decoded = decoded
        self.work_limiter = work_limiter
        self.max_active_jobs_per_key = max_active_jobs_per_key  # 0: no cap
        self.max_running_jobs = max(1, max_running_jobs)
        self._in_flight: dict[str, int] = {}  # owner -> creations past the cap check, not yet in the store
        self.key_policy = key_policy  # the caller's priority limit and fair-share weight
        self.result_cache = result_cache
        self.on_event = on_event  # metrics: ("result_cache", "hit" | "miss")

    async def __call__(self, fields: object, caller: Caller) -> Job:
        """`fields`: the request as its route parsed it (the JSON body's object; the OpenAI form's, renamed)."""
        # 1. The request's fields: types, ranges and cross-field rules (400), before anything else; the priority
        # within what the key may use (400).
        request = self.admission.parse(fields)
        policy = self.key_policy(caller.owner)
        if request.priority > policy.max_priority:
            raise InvalidRequest(
                "Invalid field 'priority'", f"This API key may use priorities up to {policy.max_priority}"
            )
        with stage("hash"):
            digest = request_hash(fields)
        # 2. An idempotent retry gets the job it created (a key reused for another request is a conflict).
        if caller.idempotency_key is not None:
            previous = await self.store.get_idempotent(caller.owner, caller.idempotency_key)
            if previous is not None:
                return self._replayed(previous, digest)
        # 3. The fleet's queue: refuse fast when it is full, before any image work.
        await self.jobs.check_admission()
        # 4. Fairness: the key's cap on queued + running jobs (its creations in flight here count too).
        owner = caller.owner
        self._in_flight[owner] = self._in_flight.get(owner, 0) + 1
        try:
            await self._check_active(owner)
            # 5. The deployment's rules, the work charged to the key's budget before any image work; a request
            # the exact-result cache answers is a completed copy of the earlier job.
            cacheable = self.result_cache and request.cache and request.seed is not None
            charge = functools.partial(self._charge_work, owner=owner)
            admitted = await self.admission.admit(
                request,
                asynchronous=caller.asynchronous,
                charge=charge,
                reuse=functools.partial(self._find_result, owner) if cacheable else None,
            )
            while isinstance(admitted, Reused):
                reused = await self._accept_reused(admitted, request, caller, digest)
                if reused is not None:
                    return reused
                # its stored objects were purged meanwhile: run it after all (no reuse offered: an Admitted)
                admitted = await self.admission.admit(request, asynchronous=caller.asynchronous, charge=charge)
            return await self._accept(admitted, webhook_state(request), caller, digest, policy)
        finally:
            left = self._in_flight[owner] - 1
            if left:
                self._in_flight[owner] = left
            else:
                del self._in_flight[owner]

    async def _find_result(self, owner: str, key: str) -> Job | None:
        found = await self.store.find_result(owner, key)
        self.on_event("result_cache", "miss" if found is None else "hit")
        return found

    async def _check_active(self, owner: str) -> None:
        cap = self.max_active_jobs_per_key
        if cap <= 0:
            return
        active = await self.store.count_active(owner) + self._in_flight.get(owner, 1) - 1
        if active >= cap:
            # One of the key's jobs must finish first: about one job time (taken as 1 s) per round of workers.
            retry = retry_after_s(active / self.max_running_jobs)
            raise TooManyJobs(
                "Too many jobs for this API key",
                f"At most {cap} queued and running jobs per API key; {active} are; retry in about {retry} s",
                headers={"Retry-After": str(retry)},
            )

    async def _charge_work(self, cost: int, *, owner: str) -> None:
        limiter = self.work_limiter
        if limiter is None or not limiter.enabled:
            return
        wait_s = await limiter.take(owner, cost)
        if wait_s > 0:
            raise rate_limited(
                "Work budget exceeded",
                f"This request costs {cost} UNet samples (images x effective steps, x2 with guidance); at most "
                f"{limiter.per_minute:g} a minute per API key (bursts of {limiter.burst})",
                wait_s,
            )

    async def _accept(
        self, admitted: Admitted, webhook: WebhookState | None, caller: Caller, digest: str, policy: KeyPolicy
    ) -> Job:
        # 6. The image (and a masked edit's mask), stored as received (a re-run reads them back) and kept decoded
        # for the first run.
        job_id = new_job_id()
        extension, content_type = _STORED_FORMATS[codecs.sniff_format(admitted.data) or "PNG"]
        stored = input_name(job_id, extension)
        await self.storage.put(stored, admitted.data, content_type)
        mask = None
        names = [stored]
        if admitted.mask_data is not None and admitted.mask_size is not None:
            mask_extension, mask_type = _STORED_FORMATS[codecs.sniff_format(admitted.mask_data) or "PNG"]
            stored_mask = mask_name(job_id, mask_extension)
            try:
                await self.storage.put(stored_mask, admitted.mask_data, mask_type)
            except BaseException:
                await self._delete(names)
                raise
            names.append(stored_mask)
            mask = InputImage(
                url=admitted.mask_source_url or self.storage.url_for(stored_mask),
                name=stored_mask,
                width=admitted.mask_size.width,
                height=admitted.mask_size.height,
            )
        self.decoded.put(job_id, admitted.model_input, admitted.model_mask)
        # 7. The job record, written before any work starts.
        created_at = now_iso()
        job = Job(
            id=job_id,
            owner=caller.owner,
            status=QUEUED,
            spec=admitted.spec,
            input=InputImage(
                url=admitted.source_url or self.storage.url_for(stored),
                name=stored,
                width=admitted.input_size.width,
                height=admitted.input_size.height,
            ),
            created_at=created_at,
            updated_at=created_at,
            webhook=webhook,
            idempotency_key=caller.idempotency_key,
            request_hash=digest,
            request_id=caller.request_id,
            queue_deadline=None if admitted.spec.max_queue_s is None else time.time() + admitted.spec.max_queue_s,
            result_key=admitted.result_key,
            mask=mask,
        )
        try:
            # Its place in the fair queue: the key's share of work at its priority, by the key's weight.
            created = await self.store.create(job, share=admitted.spec.work / policy.weight)
        except IdempotencyConflict as exc:
            await self._delete_all(names)
            raise _key_reused() from exc
        except BaseException:
            await self._delete_all(names)
            raise
        if created.id != job_id:  # a concurrent retry with the same key won the race
            await self._delete_all(names)
            self.decoded.take(job_id)
            return self._replayed(created, digest)
        # 8. Queue it.
        await self.jobs.enqueue_new(created)
        return created

    async def _accept_reused(
        self, reused: Reused, request: ImageToImageRequest, caller: Caller, digest: str
    ) -> Job | None:
        """A completed job answering the request from the earlier job's result: its own copies of the stored
        input and outputs (retention purges each job's objects with it); None when they are gone (purged)."""
        earlier = reused.job
        job_id = new_job_id()
        copies: list[str] = []
        try:
            stored = input_name(job_id, earlier.input.name.rsplit(".", 1)[-1])
            if not await self._copy(earlier.input.name, stored, copies):
                return None
            mask = None
            if earlier.mask is not None:
                stored_mask = mask_name(job_id, earlier.mask.name.rsplit(".", 1)[-1])
                if not await self._copy(earlier.mask.name, stored_mask, copies):
                    return None
                mask = dataclasses.replace(
                    earlier.mask, url=reused.mask_source_url or self.storage.url_for(stored_mask), name=stored_mask
                )
            token = new_output_token()
            images = []
            for i, image in enumerate(earlier.images):
                name = output_name(job_id, i, extension=image.name.rsplit(".", 1)[-1], token=token)
                if not await self._copy(image.name, name, copies):
                    return None
                images.append(dataclasses.replace(image, name=name, url=self.storage.url_for(name)))
            now = now_iso()
            webhook = webhook_state(request)
            job = Job(
                id=job_id,
                owner=caller.owner,
                status=COMPLETED,
                spec=dataclasses.replace(
                    earlier.spec,
                    webhook_url=request.webhook_url,
                    asynchronous=caller.asynchronous or request.webhook_url is not None,
                    priority=request.priority,
                    max_queue_s=request.max_queue_s,
                ),
                input=dataclasses.replace(
                    earlier.input, url=reused.source_url or self.storage.url_for(stored), name=stored
                ),
                created_at=now,
                updated_at=now,
                completed_at=now,
                images=tuple(images),
                webhook=webhook.ended() if webhook is not None else None,
                idempotency_key=caller.idempotency_key,
                request_hash=digest,
                request_id=caller.request_id,
                steps_done=earlier.steps_done,
                result_key=reused.result_key,
                cached_from=earlier.id,
                mask=mask,
            )
            created = await self.store.create(job)
        except IdempotencyConflict as exc:
            await self._delete(copies)
            raise _key_reused() from exc
        except BaseException:
            await self._delete(copies)
            raise
        if created.id != job_id:  # a concurrent retry with the same key won the race
            await self._delete(copies)
            return self._replayed(created, digest)
        await self.jobs.finished_new(created)
        return created

    async def _copy(self, source: str, target: str, copies: list[str]) -> bool:
        found = await self.storage.get(source)
        if found is None:
            await self._delete(copies)
            return False
        data, content_type = found
        await self.storage.put(target, data, content_type)
        copies.append(target)
        return True

    async def _delete_all(self, names: list[str]) -> None:
        """The objects of a job not created, each deleted (the first failure raised, as a single delete did)."""
        for name in names:
            await self.storage.delete(name)

    async def _delete(self, names: list[str]) -> None:
        for name in names:
            with contextlib.suppress(Exception):
                await self.storage.delete(name)

    @staticmethod
    def _replayed(job: Job, digest: str) -> Job:
        if job.request_hash != digest:
            raise _key_reused()
        return job
