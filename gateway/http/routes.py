"""The routes: each handler parses the request, calls one use case, and renders the answer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import numpy as np
import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Match, Route
from starlette.types import Scope

from gateway.diffusion.img2img import Img2ImgPipeline
from gateway.diffusion.lora import LoraRegistry
from gateway.diffusion.styles import STYLE_PRESETS
from gateway.errors import (
    InvalidRequest,
    NotFound,
    RateLimited,
    Unauthorized,
    UnsupportedMediaType,
    response_headers,
)
from gateway.http import openai_compat
from gateway.http.auth import AUTH_DETAILS, check_bearer
from gateway.http.body import read_capped
from gateway.http.limits import release_body_budget
from gateway.http.middleware import metrics_endpoint
from gateway.http.openapi import ENDPOINTS, openapi_endpoint
from gateway.http.playground import Playground
from gateway.http.ratelimit import Limiter, charge_webhook_control
from gateway.http.responses import NATIVE_ERRORS, rendering_errors
from gateway.http.views import job_view, lora_view, secret_view
from gateway.jobs.admission import resolve_pipeline
from gateway.jobs.create import Caller, CreateJob
from gateway.jobs.follow import follow, wait_or_cancel
from gateway.jobs.model import FAILED, Job, owner_of
from gateway.jobs.naming import parse_name
from gateway.jobs.request import DEFAULT_MODEL, PARAMETER_LIMITS
from gateway.jobs.runner import JobManager
from gateway.media.storage import Storage
from gateway.observability import Coalesced, current_request_id, stage
from gateway.settings import Settings
from gateway.triton.client import Engine

log = logging.getLogger("gateway")

IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")
SSE_HEARTBEAT_S = 15.0
SSE_HEARTBEAT_S_INT = int(SSE_HEARTBEAT_S)  # a refused stream's Retry-After: streams end or beat that often
# JSON structure bytes (`{`, `[`, `,`) a body may hold: parsing costs Python objects per value (an empty `{}` is
# 64 bytes for 2 bytes of body), so past this a body is refused before it is parsed. A valid request has a few
# dozen values; prompts with commas count too and stay far below.
MAX_JSON_STRUCTURE = 100_000
_STRUCTURE_BYTES = np.frombuffer(b"{[,", dtype=np.uint8)


def _structure_count(body: bytes) -> int:
    """How many `{`, `[` and `,` bytes `body` holds: numpy compares a 1 MB body in ~0.1 ms, three
    `bytes.count` scans take ~1.5 ms."""
    data = np.frombuffer(body, dtype=np.uint8)
    return sum(int(np.count_nonzero(data == byte)) for byte in _STRUCTURE_BYTES)


@dataclass
class Services:
    """What the handlers use, built by the composition root (`app.py`) in the lifespan."""

    settings: Settings
    engine: Engine
    pipelines: Mapping[str, Img2ImgPipeline]
    loras: LoraRegistry  # the adapter folder: `GET /v1/loras`
    storage: Storage
    jobs: JobManager
    create_job: CreateJob
    webhook_control: Limiter  # per-key budget of redeliveries and rotations


async def read_json(request: Request, max_bytes: int) -> Any:
    """The body, capped before parsing; wrong content types and malformed JSON are 4xx, never 500."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise UnsupportedMediaType("Request body must be JSON", "Send Content-Type: application/json")
    body = await read_capped(request, max_bytes)
    if len(body) > MAX_JSON_STRUCTURE and _structure_count(body) > MAX_JSON_STRUCTURE:
        raise InvalidRequest(
            "Request body has too many JSON values", f"At most {MAX_JSON_STRUCTURE} objects, arrays and separators"
        )
    try:
        with stage("parse"):
            return orjson.loads(body.decode("utf-8"))  # 4x json's speed on a 1 MB body; errors subclass json's
    except UnicodeDecodeError as exc:
        raise InvalidRequest("Request body is not valid UTF-8", str(exc)) from exc
    except json.JSONDecodeError as exc:
        raise InvalidRequest("Request body is not valid JSON", str(exc)) from exc
    except (ValueError, RecursionError) as exc:  # >4300-digit integers; nesting past the recursion limit
        raise InvalidRequest("Request body is not valid JSON", "Too deeply nested, or a number too long") from exc


def idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not IDEMPOTENCY_KEY.fullmatch(key):
        raise InvalidRequest(
            "Invalid Idempotency-Key header", "Use 1-255 printable ASCII characters (a UUID is a good choice)"
        )
    return key


class Handlers:
    """The route handlers, bound to the lifespan's services once they exist."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.services: Services | None = None
        self._readiness = Coalesced(self._ready)
        self._streams: dict[str, int] = {}  # owner -> open event streams

    @property
    def s(self) -> Services:
        if self.services is None:
            raise RuntimeError("the app's lifespan has not started")
        return self.services

    def _auth(self, request: Request) -> str | None:
        return check_bearer(request.headers.get("authorization"), self.settings.api_keys, self.settings.allow_anonymous)

    def _owner(self, request: Request) -> str:
        return owner_of(self._auth(request))

    async def _view(self, job: Job) -> dict[str, Any]:
        return job_view(job, await self.s.jobs.progress(job))

    async def image_to_image(self, request: Request) -> Response:
        owner = self._owner(request)
        try:
            job, asynchronous = await self._create(request, owner)
        finally:
            release_body_budget(request)  # the body is a job now (its parse is gone): a synchronous wait holds none
        return await self._respond(request, job, asynchronous)

    async def _create(self, request: Request, owner: str) -> tuple[Job, bool]:
        fields = await read_json(request, self.settings.max_body_bytes)
        prefers_async = "respond-async" in request.headers.get("prefer", "").lower()  # RFC 7240
        caller = Caller(owner, idempotency_key(request), asynchronous=prefers_async, request_id=current_request_id())
        job = await self.s.create_job(fields, caller)
        return job, prefers_async or job.spec.webhook_url is not None  # a webhook makes any request asynchronous

    async def _respond(self, request: Request, job: Job, asynchronous: bool) -> Response:
        location = {"Location": f"/v1/image-to-image/{job.id}"}
        if asynchronous and not job.finished:
            return JSONResponse(await self._view(job), status_code=HTTPStatus.ACCEPTED, headers=location)
        if not job.finished:
            job = await self._wait_or_cancel(request, job)
        if job.status == FAILED and job.error is not None:
            return NATIVE_ERRORS.render_stored(job.error.code, job.error.message, job.error.details, location)
        return JSONResponse(await self._view(job), headers=location)

    async def _wait_or_cancel(self, request: Request, job: Job) -> Job:
        """Wait for a synchronous job; a client that disconnects cancels it (jobs.follow)."""
        return await wait_or_cancel(self.s.jobs, job, request.is_disconnected)

    async def openai_image_edits(self, request: Request) -> Response:
        """OpenAI's image edits (gateway/http/openai_compat.py) around the native synchronous route's use case;
        its errors are in OpenAI's shape (the route table registers `openai_compat.OPENAI_ERRORS` for it)."""
        owner = self._owner(request)
        try:
            job, response_format = await self._create_edit(request, owner)
        finally:
            release_body_budget(request)  # as the native route: the wait holds neither body nor image
        if not job.finished:
            job = await self._wait_or_cancel(request, job)
        return await openai_compat.render_edit(job, response_format, self.s.storage)

    async def _create_edit(self, request: Request, owner: str) -> tuple[Job, openai_compat.ResponseFormat]:
        edit = await openai_compat.read_edit(request, self.settings.max_body_bytes, self.s.pipelines)
        caller = Caller(owner, idempotency_key(request), request_id=current_request_id())
        return await self.s.create_job(edit.fields, caller), edit.form.response_format

    async def get_job(self, request: Request) -> Response:
        owner = self._owner(request)  # the key first: an unknown one is 401 before any lookup
        job = await self.s.jobs.get(request.path_params["job_id"], owner)
        return JSONResponse(await self._view(job))

    async def cancel_job(self, request: Request) -> Response:
        owner = self._owner(request)
        job = await self.s.jobs.cancel(request.path_params["job_id"], owner)
        return JSONResponse(await self._view(job))

    async def job_events(self, request: Request) -> Response:
        """Server-sent events: the job view on every change (progress steps, status), until it finishes."""
        owner = self._owner(request)
        job = await self.s.jobs.get(request.path_params["job_id"], owner)
        self._check_streams(owner)

        async def stream() -> AsyncIterator[bytes]:
            self._streams[owner] = self._streams.get(owner, 0) + 1
            try:
                async with contextlib.aclosing(follow(self.s.jobs, job, heartbeat_s=SSE_HEARTBEAT_S)) as updates:
                    async for update in updates:
                        if update.heartbeat:
                            yield b": keep-alive\n\n"
                        else:
                            view = json.dumps(job_view(update.job, update.progress), separators=(",", ":"))
                            yield f"event: job\ndata: {view}\n\n".encode()
            finally:
                left = self._streams[owner] - 1
                if left:
                    self._streams[owner] = left
                else:
                    del self._streams[owner]

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    def _check_streams(self, owner: str) -> None:
        """One key may hold at most `max_event_streams_per_key` event streams in this process, so it cannot take
        every connection slot (a stream counts from its first byte to its end)."""
        cap = self.settings.max_event_streams_per_key
        if cap > 0 and self._streams.get(owner, 0) >= cap:
            raise RateLimited(
                "Too many event streams",
                f"At most {cap} open event streams per API key; close one, or poll the job instead",
                headers={"Retry-After": str(SSE_HEARTBEAT_S_INT)},
            )

    def _keyed_owner(self, request: Request) -> str:
        """The owner of a request that must come with an API key: the anonymous callers share one owner, so a
        secret of theirs would be every anonymous caller's to read and rotate."""
        key = self._auth(request)
        if key is None:
            raise Unauthorized("An API key is required", f"Webhook secrets belong to an API key; {AUTH_DETAILS}")
        return owner_of(key)

    async def webhook_secret(self, request: Request) -> Response:
        owner = self._keyed_owner(request)
        secrets = await self.s.jobs.secrets.current(owner)
        return JSONResponse(secret_view(secrets, time.time()))

    async def rotate_webhook_secret(self, request: Request) -> Response:
        owner = self._keyed_owner(request)
        await charge_webhook_control(self.s.webhook_control, owner)
        secrets = await self.s.jobs.secrets.rotate(owner)
        return JSONResponse(secret_view(secrets, time.time()))

    async def redeliver_webhook(self, request: Request) -> Response:
        owner = self._owner(request)
        await charge_webhook_control(self.s.webhook_control, owner)
        job = await self.s.jobs.redeliver(request.path_params["job_id"], owner)
        return JSONResponse(await self._view(job), status_code=HTTPStatus.ACCEPTED)

    async def get_image(self, request: Request) -> Response:
        """Streamed, never whole in memory. Outputs are capability URLs (unguessable names, any holder may fetch
        them); an input (`{job_id}_input.*`, the raw upload with its metadata) only by the key that created the
        job: 404 for any other, as for a missing one. Cached at most for the retention (files are deleted then)."""
        name = request.path_params["name"]
        missing = NotFound("Image not found", f"No stored image named '{name}'")
        stored = parse_name(name)
        is_input = stored is not None and stored.is_input
        if stored is not None and stored.is_input:
            owner = self._owner(request)
            try:
                await self.s.jobs.get(stored.job_id, owner)
            except NotFound:
                raise missing from None
        found = await self.s.storage.open(name)  # None for unknown names and names outside its alphabet
        if found is None:
            raise missing
        max_age = max(0, int(self.settings.retention_s))
        headers = {
            # Private for outputs too: their URLs are capabilities, which a shared cache must not hand to others.
            "Cache-Control": f"private, max-age={max_age}",
            "X-Content-Type-Options": "nosniff",
        }
        if is_input:
            headers["Vary"] = "Authorization"
        if found.size is not None:
            headers["Content-Length"] = str(found.size)
        return StreamingResponse(found.chunks, media_type=found.content_type, headers=headers)

    async def list_models(self, request: Request) -> Response:
        self._auth(request)
        return JSONResponse(
            {
                "object": "list",
                "default": DEFAULT_MODEL,
                "limits": {k: dict(v) for k, v in PARAMETER_LIMITS.items()},
                "data": [p.manifest.describe() for _, p in sorted(self.s.pipelines.items())],
            }
        )

    async def list_loras(self, request: Request) -> Response:
        self._auth(request)
        model = request.query_params.get("model")
        manifests = {name: p.manifest for name, p in self.s.pipelines.items()}
        if model is not None:
            manifests = {model: resolve_pipeline(self.s.pipelines, model).manifest}
        listed = await asyncio.to_thread(self.s.loras.listing, manifests)  # headers: file reads
        return JSONResponse(
            {"object": "list", "data": [lora_view(a, fits) for a, fits in listed if model is None or fits]}
        )

    async def list_styles(self, request: Request) -> Response:
        self._auth(request)
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"id": s.name, "prompt_template": s.prompt_template, "negative_prompt": s.negative_prompt}
                    for s in STYLE_PRESETS.values()
                ],
            }
        )

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _ready(self) -> bool:
        models = [m for p in self.s.pipelines.values() for m in p.manifest.models]
        return bool(models) and await self.s.engine.models_ready(models)

    async def readyz(self, request: Request) -> Response:
        ready = await self._readiness()  # one Triton round per interval, however many probes arrive
        # A probe's answer, not an error: Kubernetes reads the status alone (the body is the `Status` schema).
        status = HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
        headers = response_headers(status, {})  # a 503 says when to look again, as every 503 here does
        return JSONResponse({"status": "ready" if ready else "not_ready"}, status_code=status, headers=headers)


class OwnPathRoute(Route):
    """A route that owns its path for every method: `GET /v1/images/edits` is its 405 (with `Allow: POST`),
    not an image named `edits` for the `GET /v1/images/{name}` pattern listed after it."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        return (Match.FULL if match == Match.PARTIAL else match), child_scope


# Static paths that a wider pattern of another method would also match.
OWN_PATHS = frozenset({openai_compat.EDITS_PATH})


@dataclass(frozen=True)
class HandlerSources:
    """Everything a route-table entry (`openapi.ENDPOINTS`) picks its endpoint from."""

    handlers: Handlers
    playground: Playground
    metrics: Callable[[Request], Any]
    openapi: Callable[[Request], Any]


def routes(handlers: Handlers) -> list[BaseRoute]:
    """The Starlette routes of the route table, in its order; the OpenAPI document's paths come from the same table."""
    sources = HandlerSources(handlers, Playground(), metrics=metrics_endpoint, openapi=openapi_endpoint)
    return [
        (OwnPathRoute if e.path in OWN_PATHS else Route)(
            e.path,
            e.handler(sources) if e.errors is None else rendering_errors(e.handler(sources), e.errors),
            methods=[e.method],
            include_in_schema=e.include_in_schema,
        )
        for e in ENDPOINTS
    ]
