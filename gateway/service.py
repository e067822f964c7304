"""The image-to-image service: accept a request into a job (inputs checked and stored), run a job, show a job."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import httpx
from PIL import Image

from gateway import codecs
from gateway.diffusion import Generation, Img2ImgPipeline
from gateway.errors import InternalError, ModelNotFound
from gateway.fetch import fetch_image
from gateway.jobs import Job
from gateway.netguard import OutboundPolicy
from gateway.pipeline import img2img_effective_steps
from gateway.protocol import MAX_SEED, ImageToImageRequest
from gateway.settings import Settings
from gateway.storage import Storage
from gateway.styles import STYLE_PRESETS, apply_style

DECODED_CACHE_SIZE = 32
_STORED_FORMATS = {"JPEG": ("jpg", "image/jpeg"), "PNG": ("png", "image/png"), "WEBP": ("webp", "image/webp")}


def new_job_id() -> str:
    return f"img_transform_{uuid.uuid4().hex[:24]}"


class ImageService:
    """Everything between a validated request and stored PNGs; no HTTP request/response objects here."""

    def __init__(
        self,
        settings: Settings,
        pipelines: Mapping[str, Img2ImgPipeline],
        storage: Storage,
        http: httpx.AsyncClient,
        policy: OutboundPolicy,
    ) -> None:
        self.settings = settings
        self.pipelines = dict(pipelines)
        self.storage = storage
        self.http = http
        self.policy = policy
        # Decoded inputs of accepted jobs, so the first run does not decode twice (bounded: misses re-decode).
        self._decoded: OrderedDict[str, Image.Image] = OrderedDict()

    def url_for(self, name: str) -> str:
        return f"{self.settings.base_url}/v1/images/{name}"

    def pipeline(self, model: str) -> Img2ImgPipeline:
        pipeline = self.pipelines.get(model)
        if pipeline is None:
            available = ", ".join(sorted(self.pipelines)) or "none"
            raise ModelNotFound(f"Model '{model}' not found", f"Available models: {available}")
        return pipeline

    async def _image_bytes(self, field: str) -> tuple[bytes, str | None]:
        source = await asyncio.to_thread(codecs.parse_image_field, field)  # ~30 ms of base64 for 10 MB
        if source.url is not None:
            data = await fetch_image(
                source.url,
                client=self.http,
                max_bytes=codecs.MAX_IMAGE_BYTES,
                timeout_s=self.settings.fetch_timeout_s,
                policy=self.policy,
            )
            return data, source.url
        assert source.data is not None
        return source.data, None

    async def accept(self, req: ImageToImageRequest, job_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Check the model and the image now (errors are the client's, before any work is queued), store the
        decoded input (a re-run after a restart reads it back), and fix the seed: returns (params, input)."""
        manifest = self.pipeline(req.model).manifest
        data, source_url = await self._image_bytes(req.image)
        image = await asyncio.to_thread(codecs.decode_image, data)
        width, height = codecs.fit_to_grid(image.width, image.height, manifest.native_resolution, manifest.grid)
        # The bytes as received (decoding validated them): no re-encode on the request path, and a re-run after
        # a restart decodes exactly what the first run did.
        extension, content_type = _STORED_FORMATS[codecs.sniff_format(data) or "PNG"]
        stored = f"{job_id}_input.{extension}"
        await self.storage.put(stored, data, content_type)
        self._decoded[job_id] = image
        while len(self._decoded) > DECODED_CACHE_SIZE:
            self._decoded.popitem(last=False)
        seed = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED + 1)
        params = {
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
            "processed_size": {"width": width, "height": height},
            "effective_steps": img2img_effective_steps(req.steps, req.strength),
        }
        original = {
            "url": source_url or self.url_for(stored),
            "name": stored,
            "width": image.width,
            "height": image.height,
        }
        return params, original

    async def run(
        self, job: Job, *, on_step: Callable[[int, int], None], should_stop: Callable[[], bool]
    ) -> dict[str, Any]:
        """Denoise a job's stored input and store its PNGs; returns the job's result."""
        p = job.params
        pipeline = self.pipeline(p["model"])
        image = self._decoded.pop(job.id, None)
        if image is None:  # recovered after a restart, or evicted: decode the stored input again
            found = await self.storage.get(job.input["name"])
            if found is None:
                raise InternalError("Job input is missing", f"Stored input {job.input['name']} not found")
            image = await asyncio.to_thread(codecs.decode_image, found[0])
        size = (p["processed_size"]["width"], p["processed_size"]["height"])
        tensor = await asyncio.to_thread(codecs.image_to_tensor, image, size)
        prompt, negative = apply_style(p["prompt"], p["negative_prompt"], STYLE_PRESETS.get(p["style"] or ""))
        seeds = [(p["seed"] + i) % (MAX_SEED + 1) for i in range(p["num_images"])]
        result = await pipeline(
            Generation(
                prompt=prompt,
                negative_prompt=negative,
                image=tensor,
                strength=p["strength"],
                steps=p["steps"],
                guidance_scale=p["guidance_scale"],
                seeds=seeds,
            ),
            on_step=on_step,
            should_stop=should_stop,
        )
        images = []
        for i, sample in enumerate(result.images):
            name = f"{job.id}_{i}.png"
            await self.storage.put(name, await asyncio.to_thread(codecs.tensor_to_png, sample), "image/png")
            images.append({"url": self.url_for(name), "width": size[0], "height": size[1], "seed": seeds[i]})
        return {"images": images}

    @staticmethod
    def stored_names(job: Job) -> list[str]:
        return [job.input["name"]] + [f"{job.id}_{i}.png" for i in range(job.params["num_images"])]

    @staticmethod
    def view(job: Job, progress: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The public JSON of a job: the spec's response fields, plus status details."""
        p = job.params
        return {
            "id": job.id,
            "status": job.status,
            "prompt": p["prompt"],
            "negative_prompt": p["negative_prompt"],
            "model": p["model"],
            "strength": p["strength"],
            "steps": p["steps"],
            "guidance_scale": p["guidance_scale"],
            "seed": p["seed"],
            "style": p["style"],
            "num_images": p["num_images"],
            "webhook_url": p["webhook_url"],
            "created_at": job.created_at,
            "completed_at": job.completed_at,
            "original_image": {k: job.input[k] for k in ("url", "width", "height")},
            "processed_size": p["processed_size"],
            "effective_steps": p["effective_steps"],
            "images": (job.result or {}).get("images", []),
            "progress": dict(progress) if progress is not None else None,
            "error": job.error,
            "webhook": None
            if job.webhook is None
            else {"url": job.webhook.url, "status": job.webhook.status, "attempts": list(job.webhook.attempts)},
        }
