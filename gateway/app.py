"""The composition root: `create_app(settings)` builds every part, wires them together, and holds no logic."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response

from gateway.diffusion.img2img import Img2ImgPipeline, TextEmbeddingCache
from gateway.diffusion.lora import LoraRegistry
from gateway.diffusion.manifest import load_manifests
from gateway.errors import ApiError, InternalError, InvalidRequest, MethodNotAllowed, NotFound
from gateway.http.limits import InboundLimitsMiddleware
from gateway.http.middleware import MetricsMiddleware, RequestIdMiddleware
from gateway.http.ratelimit import (
    RateLimitMiddleware,
    api_key_or_address,
    make_limiter,
    make_webhook_control_limiter,
    make_work_limiter,
)
from gateway.http.responses import error_response
from gateway.http.routes import Handlers, Services, routes
from gateway.http.views import job_view
from gateway.jobs.admission import Admission
from gateway.jobs.create import CreateJob
from gateway.jobs.execute import DecodedInputs, JobExecutor
from gateway.jobs.model import Job
from gateway.jobs.runner import JobManager, Progress
from gateway.jobs.stores import open_job_store
from gateway.media import netguard, work
from gateway.media.netguard import OutboundPolicy
from gateway.media.storage import make_storage
from gateway.observability import Metrics, current_request_id, triton_stats_source
from gateway.settings import Settings
from gateway.triton.client import Engine
from gateway.triton.pool import make_triton

log = logging.getLogger("gateway")


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)  # noqa: S101 (Starlette dispatches handlers by exception type)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own HTTPExceptions (routing, form parsing) become errors of our table, keeping their
    headers: a 405 carries `Allow` (RFC 9110)."""
    assert isinstance(exc, HTTPException)  # noqa: S101 (Starlette dispatches handlers by exception type)
    headers = dict(exc.headers or {})
    error: ApiError
    if exc.status_code == 405:
        error = MethodNotAllowed("Method not allowed", f"{request.method} {request.url.path}", headers=headers)
    elif exc.status_code == 404:
        error = NotFound("Not found", f"No route for {request.url.path}", headers=headers)
    elif 400 <= exc.status_code < 500:
        error = InvalidRequest("Bad request", str(exc.detail), headers=headers)
    else:
        error = InternalError("Internal server error", f"Request {current_request_id() or '-'}")
    return error_response(error)


async def _unexpected(request: Request, exc: Exception) -> Response:
    incident = current_request_id() or uuid.uuid4().hex
    log.exception("unhandled error (request %s) on %s %s", incident, request.method, request.url.path)
    return error_response(InternalError("Internal server error", f"Request {incident}"))


# The app type, for entry points that name it without knowing the framework (asgi.py).
App = Starlette


def create_app(settings: Settings, *, engine: Engine | None = None) -> App:
    handlers = Handlers(settings)
    metrics = Metrics(
        triton_stats_source(
            lambda model: handlers.s.engine.statistics(model),
            lambda: [p.manifest.unet.model for p in handlers.s.pipelines.values()],
        )
    )
    limiter = make_limiter(settings, registry=metrics.registry)  # shared through Redis when configured
    work_limiter = make_work_limiter(settings, registry=metrics.registry)  # UNet samples per key, charged by CreateJob
    webhook_control = make_webhook_control_limiter(settings, registry=metrics.registry)  # redeliver, rotate

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # 1. Triton and the pipelines the repository's manifests describe.
        triton = engine or make_triton(settings, metrics=metrics)
        manifests = load_manifests(settings.model_repository)
        if not manifests:
            log.warning("no pipeline manifests in %s", settings.model_repository)
        text_cache = TextEmbeddingCache(settings.text_cache_size, on_lookup=metrics.record_text_cache)
        loras = LoraRegistry(settings.lora_folder)  # the adapter files, read by header as requests name them
        pipelines = {
            name: Img2ImgPipeline(m, triton, text_cache=text_cache, loras=loras) for name, m in manifests.items()
        }
        # 2. Media: storage and the guarded outbound HTTP client (image URLs, webhooks).
        storage = make_storage(settings)  # a folder, or an S3-compatible bucket shared by every replica
        http = netguard.make_client()  # no redirects, no proxies from the environment: netguard decides
        policy = OutboundPolicy.from_settings(settings)
        decoded = DecodedInputs(settings.decoded_cache_bytes)
        work.configure(settings)  # image work's own bounded thread pool, and the decode bound per image

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

        def render(job: Job, progress: Progress) -> bytes:
            return json.dumps(job_view(job, progress), separators=(",", ":")).encode()

        # 3. Jobs: the store and its event bus, the runner, the creation use case.
        store, events = await open_job_store(settings.jobs_db)
        jobs = JobManager(
            store,
            JobExecutor(
                pipelines,
                storage,
                decoded,
                storage_outage_s=settings.storage_outage_s,
                storage_retry_max_s=settings.store_retry_max_s,
            ),
            storage,
            settings,
            poster=post,
            webhook_secret=settings.webhook_secret,  # seeds first per-key secrets (kept in the store)
            render=render,
            events=events,
            on_event=metrics.on_job_event,
            run_elsewhere=decoded.drop,  # another replica claimed the job: its kept input is not needed here
        )
        admission = Admission(
            pipelines=pipelines, http=http, policy=policy, fetch_timeout_s=settings.fetch_timeout_s, loras=loras
        )
        create_job = CreateJob(
            admission=admission,
            store=store,
            jobs=jobs,
            storage=storage,
            decoded=decoded,
            work_limiter=work_limiter,
            max_active_jobs_per_key=settings.max_active_jobs_per_key,
            max_running_jobs=settings.max_running_jobs,
            key_policy=settings.key_policy,
            result_cache=settings.result_cache,
            on_event=metrics.on_job_event,
        )
        handlers.services = Services(
            settings=settings,
            engine=triton,
            pipelines=pipelines,
            loras=loras,
            storage=storage,
            jobs=jobs,
            create_job=create_job,
            webhook_control=webhook_control,
        )
        await jobs.start()
        log.info("serving pipelines: %s", ", ".join(sorted(manifests)) or "none")
        try:
            yield
        finally:
            await jobs.stop()  # closes the event bus first: it publishes through the store's pool
            await store.close()
            await storage.aclose()
            await http.aclose()
            await triton.close()
            await limiter.aclose()
            await work_limiter.aclose()
            await webhook_control.aclose()

    # Outermost first: request ids on every response (429s and 500s included), metrics count 429s too.
    middleware = [
        Middleware(RequestIdMiddleware),
        Middleware(MetricsMiddleware, metrics=metrics),
        Middleware(
            RateLimitMiddleware,
            per_minute=settings.rate_limit_per_minute,
            burst=settings.rate_limit_burst,
            key_fn=api_key_or_address(settings.api_keys),
            limiter=limiter,
        ),
        Middleware(  # request bodies held at once, and the time one may take (gateway/http/limits.py)
            InboundLimitsMiddleware,
            budget_bytes=settings.max_inflight_body_bytes,
            wait_s=settings.body_budget_wait_s,
            max_body_bytes=settings.max_body_bytes,
            body_timeout_s=settings.body_timeout_s,
        ),
    ]
    app = Starlette(
        routes=routes(handlers),
        lifespan=lifespan,
        middleware=middleware,
        exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _unexpected},
    )
    app.state.metrics = metrics
    return app
