"""`create_app(settings)`: the Starlette application. Routes are thin; the recipe lives in `diffusion`."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway import codecs
from gateway.auth import check_bearer
from gateway.diffusion import Generation, Img2ImgPipeline
from gateway.engine import TritonEngine
from gateway.errors import (
    ApiError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
    error_response,
)
from gateway.fetch import fetch_image
from gateway.manifest import load_manifests
from gateway.protocol import MAX_SEED, PARAMETER_LIMITS, ImageToImageRequest, parse_image_to_image
from gateway.settings import Settings
from gateway.storage import LocalStorage, Storage
from gateway.styles import STYLE_PRESETS, apply_style

log = logging.getLogger("gateway")


@dataclass
class Services:
    """What the lifespan owns: one Triton client, the pipelines, storage, and an HTTP client for image URLs."""

    settings: Settings
    engine: TritonEngine
    pipelines: dict[str, Img2ImgPipeline]
    storage: Storage
    http: httpx.AsyncClient


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


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

    async def _load_image(self, req: ImageToImageRequest) -> tuple[bytes, str | None]:
        source = await asyncio.to_thread(codecs.parse_image_field, req.image)  # ~30 ms of base64 for 10 MB
        if source.url is not None:
            data = await fetch_image(
                source.url,
                client=self.s.http,
                max_bytes=codecs.MAX_IMAGE_BYTES,
                timeout_s=self.settings.fetch_timeout_s,
            )
            return data, source.url
        assert source.data is not None
        return source.data, None

    async def image_to_image(self, request: Request) -> Response:
        created_at = _now()
        self._auth(request)
        req = parse_image_to_image(await _read_json(request, self.settings.max_body_bytes), styles=STYLE_PRESETS)
        pipeline = self.s.pipelines.get(req.model)
        if pipeline is None:
            available = ", ".join(sorted(self.s.pipelines)) or "none"
            raise ModelNotFound(f"Model '{req.model}' not found", f"Available models: {available}")
        manifest = pipeline.manifest

        data, source_url = await self._load_image(req)
        image = await asyncio.to_thread(codecs.decode_image, data)
        width, height = codecs.fit_to_grid(image.width, image.height, manifest.native_resolution, manifest.grid)
        tensor = await asyncio.to_thread(codecs.image_to_tensor, image, (width, height))

        prompt, negative = apply_style(req.prompt, req.negative_prompt, STYLE_PRESETS.get(req.style or ""))
        seed = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED + 1)
        seeds = [(seed + i) % (MAX_SEED + 1) for i in range(req.num_images)]
        job_id = f"img_transform_{uuid.uuid4().hex[:24]}"
        result = await pipeline(
            Generation(
                prompt=prompt,
                negative_prompt=negative,
                image=tensor,
                strength=req.strength,
                steps=req.steps,
                guidance_scale=req.guidance_scale,
                seeds=seeds,
            )
        )

        images = []
        for i, sample in enumerate(result.images):
            png = await asyncio.to_thread(codecs.tensor_to_png, sample)
            name = f"{job_id}_{i}.png"
            await self.s.storage.put(name, png, "image/png")
            images.append(
                {
                    "url": self._url(name),
                    "width": width,
                    "height": height,
                    "seed": seeds[i],
                }
            )
        if source_url is None:
            name = f"{job_id}_input.png"
            await self.s.storage.put(name, await asyncio.to_thread(codecs.image_to_png, image), "image/png")
            source_url = self._url(name)
        body = {
            "id": job_id,
            "status": "completed",
            "prompt": req.prompt,
            "negative_prompt": req.negative_prompt,
            "model": req.model,
            "strength": req.strength,
            "steps": req.steps,
            "guidance_scale": req.guidance_scale,
            "seed": seed,
            "style": req.style,
            "num_images": req.num_images,
            "webhook_url": req.webhook_url,
            "created_at": created_at,
            "completed_at": _now(),
            "original_image": {"url": source_url, "width": image.width, "height": image.height},
            "processed_size": {"width": width, "height": height},
            "effective_steps": result.effective_steps,
            "images": images,
        }
        return JSONResponse(body)

    def _url(self, name: str) -> str:
        return f"{self.settings.base_url}/v1/images/{name}"

    async def get_image(self, request: Request) -> Response:
        name = request.path_params["name"]
        try:
            found = await self.s.storage.get(name)
        except ValueError:  # a name outside the storage's alphabet
            found = None
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
    incident = uuid.uuid4().hex[:12]
    log.exception("unhandled error (incident %s) on %s %s", incident, request.method, request.url.path)
    return error_response(InternalError("Internal server error", f"Incident {incident}"))


def create_app(settings: Settings, *, engine: TritonEngine | None = None) -> Starlette:
    gateway = Gateway(settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        triton = engine or TritonEngine(
            settings.triton_url or f"127.0.0.1:{settings.triton_grpc_port}", timeout_s=settings.triton_timeout_s
        )
        manifests = load_manifests(settings.model_repository)
        if not manifests:
            log.warning("no pipeline manifests in %s", settings.model_repository)
        gateway.services = Services(
            settings=settings,
            engine=triton,
            pipelines={name: Img2ImgPipeline(m, triton) for name, m in manifests.items()},
            storage=LocalStorage(settings.storage_dir),
            http=httpx.AsyncClient(follow_redirects=False),
        )
        log.info("serving pipelines: %s", ", ".join(sorted(manifests)) or "none")
        try:
            yield
        finally:
            await gateway.services.http.aclose()
            await triton.close()

    routes = [
        Route("/v1/image-to-image", gateway.image_to_image, methods=["POST"]),
        Route("/v1/images/{name}", gateway.get_image, methods=["GET"]),
        Route("/v1/models", gateway.list_models, methods=["GET"]),
        Route("/v1/styles", gateway.list_styles, methods=["GET"]),
        Route("/healthz", gateway.healthz, methods=["GET"]),
        Route("/readyz", gateway.readyz, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _unexpected},
    )
