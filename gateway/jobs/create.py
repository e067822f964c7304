"""Creating a job: the use case behind `POST /v1/image-to-image`, from a validated request to a queued job.

Admission, in order, all before any image work: the fleet's queue (`JobManager.check_admission`, 503
`overloaded`); the key's cap on queued + running jobs (`max_active_jobs_per_key`, 429 `too_many_jobs`), so one
key cannot fill the shared queue; and, once the request is known to be valid (model, webhook), the key's work
budget (`WorkLimiter`, 429 `rate_limited`): a job costs `work_cost` UNet samples, so 4 images x 150 steps with
guidance weighs 1,200 times a 1-step single image. The cap counts the store's active jobs of the owner plus
this process's creations in flight for it, so concurrent requests of one key cannot all pass the same count
(with several replicas each adds its own in-flight ones: the cap may be exceeded by the creations in flight
on other replicas at that moment).
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import httpx

from gateway.diffusion.img2img import Img2ImgPipeline
from gateway.diffusion.sampling import MAX_SEED, do_classifier_free_guidance, img2img_effective_steps
from gateway.errors import IdempotencyKeyReused, InvalidRequest, RateLimited, TooManyJobs
from gateway.jobs.execute import DecodedInputs, resolve_pipeline, resolve_scheduler
from gateway.jobs.model import QUEUED, InputImage, Job, JobSpec, Size, WebhookEvent, WebhookState, now_iso
from gateway.jobs.naming import input_name
from gateway.jobs.runner import JobManager
from gateway.jobs.store import IdempotencyConflict, JobStore
from gateway.media import codecs, netguard
from gateway.media.fetch import fetch_image
from gateway.media.netguard import OutboundPolicy
from gateway.media.storage import Storage
from gateway.media.work import run_image_work

_STORED_FORMATS = {"JPEG": ("jpg", "image/jpeg"), "PNG": ("png", "image/png"), "WEBP": ("webp", "image/webp")}


class ImageToImageParams(Protocol):
    """What the use case reads of a validated request (the HTTP layer's wire model has these fields)."""

    @property
    def image(self) -> str: ...
    @property
    def prompt(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def strength(self) -> float: ...
    @property
    def steps(self) -> int: ...
    @property
    def guidance_scale(self) -> float: ...
    @property
    def negative_prompt(self) -> str | None: ...
    @property
    def seed(self) -> int | None: ...
    @property
    def num_images(self) -> int: ...
    @property
    def style(self) -> str | None: ...
    @property
    def webhook_url(self) -> str | None: ...
    @property
    def webhook_events(self) -> Sequence[str]: ...
    @property
    def scheduler(self) -> str | None: ...
    @property
    def output_format(self) -> str: ...
    @property
    def output_quality(self) -> int | None: ...


class WorkLimiter(Protocol):
    """A per-key token bucket charged with a cost (gateway/http/ratelimit.py's limiters have this shape; app.py
    injects one): `take` answers 0.0 when granted, else the seconds until the cost can be taken."""

    per_minute: float
    burst: int

    @property
    def enabled(self) -> bool: ...

    async def take(self, key: str, cost: float = 1.0) -> float: ...


def work_cost(num_images: int, steps: int, strength: float, guidance_scale: float) -> int:
    """UNet samples a job asks for: images x effective steps (`int(steps * strength)`), twice with classifier-free
    guidance (guidance_scale > 1 doubles the UNet batch)."""
    per_image = img2img_effective_steps(steps, strength) * (2 if do_classifier_free_guidance(guidance_scale) else 1)
    return max(0, num_images) * per_image


def _retry_after(seconds: float) -> int:
    return max(1, math.ceil(seconds - 1e-9))


@dataclass(frozen=True)
class Caller:
    """Who asks, and how: the job's owner (a key hash), its idempotency key, sync or async, for the logs."""

    owner: str
    request_hash: str
    idempotency_key: str | None = None
    asynchronous: bool = False
    request_id: str | None = None


def new_job_id() -> str:
    return f"img_transform_{uuid.uuid4().hex[:24]}"


_REQUEST_HASH_DOMAIN = b"imagen-request-v2\0"  # no JSON text starts so: never equal to a whole-body hash input


def request_hash(body: object) -> str:
    """A stable hash of a decoded request body (key order and spacing do not matter), to tell an idempotent
    retry from a key reused for another request.

    The `image` string (up to ~27 MB of base64 text) is not re-serialized as JSON: its UTF-8 bytes are hashed
    in one pass and that digest stands for it, next to the canonical JSON of every other field. A body without
    a string `image` (never one that passed validation) is hashed whole, as before.
    """
    if isinstance(body, Mapping) and isinstance(body.get("image"), str):
        image: str = body["image"]
        rest = {key: value for key, value in body.items() if key != "image"}
        digest = hashlib.sha256(_REQUEST_HASH_DOMAIN)
        # surrogatepass: JSON may carry lone surrogates ("\\ud800"); the encoding stays one-to-one.
        digest.update(hashlib.sha256(image.encode("utf-8", "surrogatepass")).digest())
        digest.update(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode())
        return digest.hexdigest()
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _output_quality(output_format: str, quality: int | None) -> int | None:
    """The quality the outputs are encoded at (the format's default filled in). The wire schema already refuses
    bad values; this keeps any other caller of the use case (another wire format) to a 400 as well."""
    if output_format not in codecs.OUTPUT_FORMATS:
        raise InvalidRequest(
            "Invalid field 'output_format'", f"'output_format' must be one of: {', '.join(codecs.OUTPUT_FORMATS)}"
        )
    try:
        return codecs.output_quality(output_format, quality)
    except ValueError as exc:
        raise InvalidRequest("Invalid field 'output_quality'", str(exc)) from None


def webhook_state(request: ImageToImageParams) -> WebhookState | None:
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
        pipelines: Mapping[str, Img2ImgPipeline],
        store: JobStore,
        jobs: JobManager,
        storage: Storage,
        decoded: DecodedInputs,
        http: httpx.AsyncClient,
        policy: OutboundPolicy,
        fetch_timeout_s: float,
        work_limiter: WorkLimiter | None = None,
        max_active_jobs_per_key: int = 0,
        max_running_jobs: int = 1,
    ) -> None:
        self.pipelines = pipelines
        self.store = store
        self.jobs = jobs
        self.storage = storage
        self.decoded = decoded
        self.http = http
        self.policy = policy
        self.fetch_timeout_s = fetch_timeout_s
        self.work_limiter = work_limiter
        self.max_active_jobs_per_key = max_active_jobs_per_key  # 0: no cap
        self.max_running_jobs = max(1, max_running_jobs)
        self._in_flight: dict[str, int] = {}  # owner -> creations past the cap check, not yet in the store

    async def __call__(self, request: ImageToImageParams, caller: Caller) -> Job:
        # 1. An idempotent retry gets the job it created (a key reused for another body is a conflict).
        if caller.idempotency_key is not None:
            previous = await self.store.get_idempotent(caller.owner, caller.idempotency_key)
            if previous is not None:
                return self._replayed(previous, caller)
        # 2. Admission: refuse fast when the fleet's queue is full, before any image work.
        await self.jobs.check_admission()
        # 2b. Fairness: the key's cap on queued + running jobs (its creations in flight here count too).
        owner = caller.owner
        self._in_flight[owner] = self._in_flight.get(owner, 0) + 1
        try:
            await self._check_active(owner)
            return await self._accept(request, caller)
        finally:
            left = self._in_flight[owner] - 1
            if left:
                self._in_flight[owner] = left
            else:
                del self._in_flight[owner]

    async def _check_active(self, owner: str) -> None:
        cap = self.max_active_jobs_per_key
        if cap <= 0:
            return
        active = await self.store.count_active(owner) + self._in_flight.get(owner, 1) - 1
        if active >= cap:
            # One of the key's jobs must finish first: about one job time (taken as 1 s) per round of workers.
            retry = _retry_after(active / self.max_running_jobs)
            raise TooManyJobs(
                "Too many jobs for this API key",
                f"At most {cap} queued and running jobs per API key; {active} are; retry in about {retry} s",
                headers={"Retry-After": str(retry)},
            )

    async def _charge_work(self, request: ImageToImageParams, owner: str) -> None:
        limiter = self.work_limiter
        if limiter is None or not limiter.enabled:
            return
        cost = work_cost(request.num_images, request.steps, request.strength, request.guidance_scale)
        wait_s = await limiter.take(owner, cost)
        if wait_s > 0:
            seconds = _retry_after(wait_s)
            raise RateLimited(
                "Work budget exceeded",
                f"This request costs {cost} UNet samples (images x effective steps, x2 with guidance); at most "
                f"{limiter.per_minute:g} a minute per API key (bursts of {limiter.burst}); retry in {seconds} s",
                headers={"Retry-After": str(seconds)},
            )

    async def _accept(self, request: ImageToImageParams, caller: Caller) -> Job:
        # 3. The model (404 before any image work), the scheduler it can run (400), and the webhook target
        # (refused now, not at delivery time).
        pipeline = resolve_pipeline(self.pipelines, request.model)
        manifest = pipeline.manifest
        scheduler = resolve_scheduler(pipeline, request.scheduler)
        quality = _output_quality(request.output_format, request.output_quality)
        if request.webhook_url is not None:
            await netguard.check_url(request.webhook_url, self.policy, timeout_s=self.fetch_timeout_s)
        # 3b. The key's work budget, charged with this job's cost once the request is known valid.
        await self._charge_work(request, caller.owner)
        # 4. The image: fetched or decoded from base64, checked, stored as received (a re-run reads it back).
        job_id = new_job_id()
        data, source_url = await self._image_bytes(request.image)
        image = await run_image_work(codecs.decode_image, data)
        width, height = codecs.fit_to_grid(image.width, image.height, manifest.native_resolution, manifest.grid)
        extension, content_type = _STORED_FORMATS[codecs.sniff_format(data) or "PNG"]
        stored = input_name(job_id, extension)
        await self.storage.put(stored, data, content_type)
        self.decoded.put(job_id, image)
        # 5. The job record, seed resolved, written before any work starts.
        created_at = now_iso()
        job = Job(
            id=job_id,
            owner=caller.owner,
            status=QUEUED,
            spec=self._spec(request, caller, Size(width, height), scheduler, quality),
            input=InputImage(
                url=source_url or self.storage.url_for(stored), name=stored, width=image.width, height=image.height
            ),
            created_at=created_at,
            updated_at=created_at,
            webhook=webhook_state(request),
            idempotency_key=caller.idempotency_key,
            request_hash=caller.request_hash,
            request_id=caller.request_id,
        )
        try:
            created = await self.store.create(job)
        except IdempotencyConflict as exc:
            await self.storage.delete(stored)
            raise _key_reused() from exc
        except BaseException:
            await self.storage.delete(stored)
            raise
        if created.id != job_id:  # a concurrent retry with the same key won the race
            await self.storage.delete(stored)
            self.decoded.take(job_id)
            return self._replayed(created, caller)
        # 6. Queue it.
        await self.jobs.enqueue_new(created)
        return created

    @staticmethod
    def _replayed(job: Job, caller: Caller) -> Job:
        if job.request_hash != caller.request_hash:
            raise _key_reused()
        return job

    @staticmethod
    def _spec(
        request: ImageToImageParams, caller: Caller, size: Size, scheduler: str | None, quality: int | None
    ) -> JobSpec:
        return JobSpec(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            model=request.model,
            strength=request.strength,
            steps=request.steps,
            guidance_scale=request.guidance_scale,
            seed=request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1),
            style=request.style,
            num_images=request.num_images,
            webhook_url=request.webhook_url,
            asynchronous=caller.asynchronous,
            processed_size=size,
            effective_steps=img2img_effective_steps(request.steps, request.strength),
            scheduler=scheduler,
            output_format=request.output_format,
            output_quality=quality,
        )

    async def _image_bytes(self, field: str) -> tuple[bytes, str | None]:
        source = await run_image_work(codecs.parse_image_field, field)  # ~30 ms of base64 for 10 MB
        if source.url is not None:
            data = await fetch_image(
                source.url,
                client=self.http,
                max_bytes=codecs.MAX_IMAGE_BYTES,
                timeout_s=self.fetch_timeout_s,
                policy=self.policy,
            )
            return data, source.url
        return source.data or b"", None  # parse_image_field gives a URL or non-empty bytes
