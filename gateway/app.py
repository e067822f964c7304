"""`create_app(settings)`: the Starlette application. Routes are thin; the recipe lives in `diffusion`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway import netguard
from gateway.auth import check_bearer
from gateway.diffusion import Img2ImgPipeline
from gateway.engine import TritonEngine
from gateway.errors import (
    ERROR_TABLE,
    ApiError,
    IdempotencyKeyReused,
    InternalError,
    InvalidRequest,
    JobFinished,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
    error_response,
)
from gateway.jobrunner import JobManager
from gateway.jobs import (
    FAILED,
    QUEUED,
    TERMINAL,
    IdempotencyConflict,
    Job,
    JobStore,
    SqliteJobStore,
    WebhookState,
    now_iso,
    owner_of,
    request_hash,
)
from gateway.manifest import load_manifests
from gateway.netguard import OutboundPolicy
from gateway.observability import (
    Metrics,
    MetricsMiddleware,
    RequestIdMiddleware,
    current_request_id,
    metrics_endpoint,
    triton_stats_source,
)
from gateway.openapi import openapi_endpoint
from gateway.protocol import PARAMETER_LIMITS, ImageToImageRequest, parse_image_to_image
from gateway.ratelimit import RateLimitMiddleware, api_key_or_address
from gateway.service import ImageService, new_job_id
from gateway.settings import Settings
from gateway.storage import LocalStorage, Storage
from gateway.styles import STYLE_PRESETS
from gateway.webhooks import key_secret, load_or_create_secret

log = logging.getLogger("gateway")

IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")
DISCONNECT_POLL_S = 0.25
SSE_HEARTBEAT_S = 15.0


@dataclass
class Services:
    """What the lifespan owns: one Triton client, the pipelines, storage, the job system, an HTTP client."""

    settings: Settings
    engine: TritonEngine
    pipelines: dict[str, Img2ImgPipeline]
    storage: Storage
    http: httpx.AsyncClient
    service: ImageService
    jobs: JobManager
    store: JobStore
    webhook_secret: str
    policy: OutboundPolicy


async def _read_json(request: Request, max_bytes: int) -> Any:
    """The body, capped before parsing; wrong content types and malformed JSON are 4xx, never 500."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise UnsupportedMediaType("Request body must be JSON", "Send Content-Type: application/json")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge("Request body too large", f"Maximum request body is {max_bytes // 2**20} MB")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge("Request body too large", f"Maximum request body is {max_bytes // 2**20} MB")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks).decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InvalidRequest("Request body is not valid UTF-8", str(exc)) from exc
    except json.JSONDecodeError as exc:
        raise InvalidRequest("Request body is not valid JSON", str(exc)) from exc
    except (ValueError, RecursionError) as exc:  # >4300-digit integers; nesting past the recursion limit
        raise InvalidRequest("Request body is not valid JSON", "Too deeply nested, or a number too long") from exc


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not IDEMPOTENCY_KEY.fullmatch(key):
        raise InvalidRequest(
            "Invalid Idempotency-Key header", "Use 1-255 printable ASCII characters (a UUID is a good choice)"
        )
    return key


def _wants_async(request: Request, req: ImageToImageRequest) -> bool:
    """Asynchronous when a webhook is given, or when asked with `Prefer: respond-async` (RFC 7240)."""
    return req.webhook_url is not None or "respond-async" in request.headers.get("prefer", "").lower()


_CODE_STATUS = {code: status for status, code in ERROR_TABLE.values()}


def _key_reused() -> IdempotencyKeyReused:
    return IdempotencyKeyReused("Idempotency-Key already used", "This key was used with a different request body")


class Gateway:
    """The route handlers, bound to the lifespan's services."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.services: Services | None = None

    @property
    def s(self) -> Services:
        assert self.services is not None, "lifespan not started"
        return self.services

    def _auth(self, request: Request) -> str | None:
        return check_bearer(request.headers.get("authorization"), self.settings.api_keys, self.settings.allow_anonymous)

    def _owner(self, request: Request) -> str:
        return owner_of(self._auth(request))

    async def image_to_image(self, request: Request) -> Response:
        created_at = now_iso()
        owner = self._owner(request)
        raw = await _read_json(request, self.settings.max_body_bytes)
        req = parse_image_to_image(raw, styles=STYLE_PRESETS)
        idempotency_key = _idempotency_key(request)
        body_hash = request_hash(raw)
        asynchronous = _wants_async(request, req)
        if idempotency_key is not None:
            previous = await self.s.store.get_idempotent(owner, idempotency_key)
            if previous is not None:
                return await self._respond(request, self._check_replay(previous, body_hash), asynchronous)
        self.s.jobs.check_admission()
        self.s.service.pipeline(req.model)  # 404 before any image work
        if req.webhook_url is not None:  # refuse private/loopback/metadata targets now, not at delivery time
            await netguard.check_url(req.webhook_url, self.s.policy, timeout_s=self.settings.fetch_timeout_s)
        job_id = new_job_id()
        params, original = await self.s.service.accept(req, job_id)
        params["asynchronous"] = asynchronous
        job = Job(
            id=job_id,
            owner=owner,
            status=QUEUED,
            params=params,
            input=original,
            created_at=created_at,
            updated_at=created_at,
            webhook=WebhookState(req.webhook_url) if req.webhook_url else None,
            idempotency_key=idempotency_key,
            request_hash=body_hash,
        )
        try:
            stored = await self.s.jobs.submit(job)
        except IdempotencyConflict as exc:
            raise _key_reused() from exc
        if stored is not job:  # a concurrent retry with the same key won the race
            await self.s.storage.delete(original["name"])
        return await self._respond(request, self._check_replay(stored, body_hash), asynchronous)

    @staticmethod
    def _check_replay(job: Job, body_hash: str) -> Job:
        if job.request_hash != body_hash:
            raise _key_reused()
        return job

    async def _respond(self, request: Request, job: Job, asynchronous: bool) -> Response:
        location = {"Location": f"/v1/image-to-image/{job.id}"}
        if asynchronous and not job.finished:
            return JSONResponse(self.s.jobs.view(job), status_code=202, headers=location)
        if not job.finished:
            job = await self._wait_or_cancel(request, job)
        if job.status == FAILED and job.error is not None:
            error = job.error
            status = _CODE_STATUS.get(error["code"], 500)
            return JSONResponse({"error": error}, status_code=status, headers=location)
        return JSONResponse(self.s.jobs.view(job), headers=location)

    async def _wait_or_cancel(self, request: Request, job: Job) -> Job:
        """Wait for a synchronous job; a client that disconnects cancels it (no more UNet steps are sent)."""
        waiter = asyncio.ensure_future(self.s.jobs.wait(job.id))
        try:
            while True:
                done, _ = await asyncio.wait({waiter}, timeout=DISCONNECT_POLL_S)
                if done:
                    return waiter.result()
                if await request.is_disconnected():
                    log.info("client gone: canceling job %s", job.id)
                    with contextlib.suppress(JobFinished):
                        await self.s.jobs.cancel(job.id, job.owner)
                    return await waiter
        finally:
            if not waiter.done():
                waiter.cancel()

    async def get_job(self, request: Request) -> Response:
        job = await self.s.jobs.get(request.path_params["job_id"], self._owner(request))
        return JSONResponse(self.s.jobs.view(job))

    async def cancel_job(self, request: Request) -> Response:
        job = await self.s.jobs.cancel(request.path_params["job_id"], self._owner(request))
        return JSONResponse(self.s.jobs.view(job))

    async def job_events(self, request: Request) -> Response:
        """Server-sent events: the job view on every change (progress steps, status), until it finishes."""
        job = await self.s.jobs.get(request.path_params["job_id"], self._owner(request))
        queue = self.s.jobs.subscribe(job.id)

        async def stream() -> AsyncIterator[bytes]:
            try:
                view = self.s.jobs.view(await self.s.jobs.get(job.id, job.owner))
                while True:
                    yield f"event: job\ndata: {json.dumps(view, separators=(',', ':'))}\n\n".encode()
                    if view["status"] in TERMINAL:
                        return
                    try:
                        view = await asyncio.wait_for(queue.get(), timeout=SSE_HEARTBEAT_S)
                    except TimeoutError:
                        yield b": keep-alive\n\n"
                        view = self.s.jobs.view(await self.s.jobs.get(job.id, job.owner))
            finally:
                self.s.jobs.unsubscribe(job.id, queue)

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    async def webhook_secret(self, request: Request) -> Response:
        return JSONResponse({"secret": key_secret(self.s.webhook_secret, self._owner(request))})

    async def get_image(self, request: Request) -> Response:
        name = request.path_params["name"]
        found = await self.s.storage.get(name)  # None for unknown names and names outside its alphabet
        if found is None:
            raise NotFound("Image not found", f"No stored image named '{name}'")
        data, content_type = found
        return Response(data, media_type=content_type, headers={"Cache-Control": "public, max-age=31536000"})

    async def list_models(self, request: Request) -> Response:
        self._auth(request)
        return JSONResponse(
            {
                "object": "list",
                "default": "imagen-v2",
                "limits": {k: dict(v) for k, v in PARAMETER_LIMITS.items()},
                "data": [p.manifest.describe() for _, p in sorted(self.s.pipelines.items())],
            }
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

    async def readyz(self, request: Request) -> Response:
        models = [m for p in self.s.pipelines.values() for m in p.manifest.models]
        ready = bool(models) and await self.s.engine.models_ready(models)
        return JSONResponse({"status": "ready" if ready else "not_ready"}, status_code=200 if ready else 503)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        return error_response(MethodNotAllowed("Method not allowed", f"{request.method} {request.url.path}"))
    if exc.status_code == 404:
        return error_response(NotFound("Not found", f"No route for {request.url.path}"))
    return JSONResponse(
        {"error": {"code": "http_error", "message": str(exc.detail), "details": None}}, status_code=exc.status_code
    )


async def _unexpected(request: Request, exc: Exception) -> Response:
    incident = current_request_id() or uuid.uuid4().hex
    log.exception("unhandled error (request %s) on %s %s", incident, request.method, request.url.path)
    return error_response(InternalError("Internal server error", f"Request {incident}"))


def create_app(settings: Settings, *, engine: TritonEngine | None = None) -> Starlette:
    gateway = Gateway(settings)
    metrics = Metrics(
        triton_stats_source(
            lambda model: gateway.s.engine.statistics(model),
            lambda: [p.manifest.unet.model for p in gateway.s.pipelines.values()],
        )
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        triton = engine or TritonEngine(
            settings.triton_url or f"127.0.0.1:{settings.triton_grpc_port}", timeout_s=settings.triton_timeout_s
        )
        manifests = load_manifests(settings.model_repository)
        if not manifests:
            log.warning("no pipeline manifests in %s", settings.model_repository)
        pipelines = {name: Img2ImgPipeline(m, triton) for name, m in manifests.items()}
        storage = LocalStorage(settings.storage_dir)
        http = netguard.make_client()  # no redirects, no proxies from the environment: netguard decides
        policy = OutboundPolicy.from_settings(settings)
        service = ImageService(settings, pipelines, storage, http, policy)
        store = SqliteJobStore(settings.jobs_db)
        secret = load_or_create_secret(settings.webhook_secret, settings.jobs_db.with_suffix(".webhook-secret"))

        async def post(url: str, body: bytes, headers: Mapping[str, str]) -> int:
            # No redirects: a 307/308 would resend the signature to another origin.
            response = await netguard.send(
                "POST",
                url,
                policy=policy,
                client=http,
                headers=headers,
                content=body,
                timeout_s=settings.webhook_timeout_s,
                max_redirects=0,
                read_body=False,
            )
            return response.status_code

        jobs = JobManager(store, service, settings, poster=post, webhook_secret=secret, on_event=metrics.on_job_event)
        gateway.services = Services(
            settings=settings,
            engine=triton,
            pipelines=pipelines,
            storage=storage,
            http=http,
            service=service,
            jobs=jobs,
            store=store,
            webhook_secret=secret,
            policy=policy,
        )
        await jobs.start()
        log.info("serving pipelines: %s", ", ".join(sorted(manifests)) or "none")
        try:
            yield
        finally:
            await jobs.stop()
            await store.close()
            await http.aclose()
            await triton.close()

    routes = [
        Route("/v1/image-to-image", gateway.image_to_image, methods=["POST"]),
        Route("/v1/image-to-image/{job_id}", gateway.get_job, methods=["GET"]),
        Route("/v1/image-to-image/{job_id}/cancel", gateway.cancel_job, methods=["POST"]),
        Route("/v1/image-to-image/{job_id}/events", gateway.job_events, methods=["GET"]),
        Route("/v1/webhook-secret", gateway.webhook_secret, methods=["GET"]),
        Route("/v1/images/{name}", gateway.get_image, methods=["GET"]),
        Route("/v1/models", gateway.list_models, methods=["GET"]),
        Route("/v1/styles", gateway.list_styles, methods=["GET"]),
        Route("/healthz", gateway.healthz, methods=["GET"]),
        Route("/readyz", gateway.readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/openapi.json", openapi_endpoint, methods=["GET"]),
    ]
    # Outermost first: request ids on every response (429s and 500s included), metrics count 429s too.
    middleware = [
        Middleware(RequestIdMiddleware),
        Middleware(MetricsMiddleware, metrics=metrics),
        Middleware(
            RateLimitMiddleware,
            per_minute=settings.rate_limit_per_minute,
            burst=settings.rate_limit_burst,
            key_fn=api_key_or_address(settings.api_keys),
        ),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=middleware,
        exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _unexpected},
    )
    app.state.metrics = metrics
    return app
