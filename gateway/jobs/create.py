"""Creating a job: the use case behind `POST /v1/image-to-image`, from a validated request to a queued job."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import httpx

from gateway.diffusion.img2img import Img2ImgPipeline
from gateway.diffusion.sampling import MAX_SEED, img2img_effective_steps
from gateway.errors import IdempotencyKeyReused
from gateway.jobs.execute import DecodedInputs, resolve_pipeline
from gateway.jobs.model import QUEUED, InputImage, Job, JobSpec, Size, WebhookState, input_name, now_iso
from gateway.jobs.runner import JobManager
from gateway.jobs.store import IdempotencyConflict, JobStore
from gateway.media import codecs, netguard
from gateway.media.fetch import fetch_image
from gateway.media.netguard import OutboundPolicy
from gateway.media.storage import Storage

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


def request_hash(body: object) -> str:
    """A stable hash of a decoded request body (key order and spacing do not matter), to tell an idempotent
    retry from a key reused for another request."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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
    ) -> None:
        self.pipelines = pipelines
        self.store = store
        self.jobs = jobs
        self.storage = storage
        self.decoded = decoded
        self.http = http
        self.policy = policy
        self.fetch_timeout_s = fetch_timeout_s

    async def __call__(self, request: ImageToImageParams, caller: Caller) -> Job:
        # 1. An idempotent retry gets the job it created (a key reused for another body is a conflict).
        if caller.idempotency_key is not None:
            previous = await self.store.get_idempotent(caller.owner, caller.idempotency_key)
            if previous is not None:
                return self._replayed(previous, caller)
        # 2. Admission: refuse fast when the fleet's queue is full, before any image work.
        await self.jobs.check_admission()
        # 3. The model (404 before any image work) and the webhook target (refused now, not at delivery time).
        manifest = resolve_pipeline(self.pipelines, request.model).manifest
        if request.webhook_url is not None:
            await netguard.check_url(request.webhook_url, self.policy, timeout_s=self.fetch_timeout_s)
        # 4. The image: fetched or decoded from base64, checked, stored as received (a re-run reads it back).
        job_id = new_job_id()
        data, source_url = await self._image_bytes(request.image)
        image = await asyncio.to_thread(codecs.decode_image, data)
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
            spec=self._spec(request, caller, Size(width, height)),
            input=InputImage(
                url=source_url or self.storage.url_for(stored), name=stored, width=image.width, height=image.height
            ),
            created_at=created_at,
            updated_at=created_at,
            webhook=WebhookState(request.webhook_url) if request.webhook_url else None,
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
    def _spec(request: ImageToImageParams, caller: Caller, size: Size) -> JobSpec:
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
        )

    async def _image_bytes(self, field: str) -> tuple[bytes, str | None]:
        source = await asyncio.to_thread(codecs.parse_image_field, field)  # ~30 ms of base64 for 10 MB
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
