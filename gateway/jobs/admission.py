"""Admission: every rule a request must pass before it becomes a job, in one place, returning the `JobSpec`
everything downstream runs (as TGI's router has one `validate()`).

Both routes only parse their wire format into the request's fields (the native JSON body as it is; the OpenAI
form renamed, its upload as bytes) and hand them to `CreateJob`, which runs admission in two calls around its
own gates, so that a refused request costs the least work:

    parse (fields -> typed request, 400)  ->  the key's priority limit (400), idempotent replay, the fleet's
    queue (503), the key's cap (429)  ->  admit (model, scheduler, LoRA adapters, output, webhook, the image's
    bytes, the exact-result cache, cost -> the key's work budget (429), decoded image, seed, size)

A new request field is declared on the wire model (`jobs/request.py`, and `http/schema.py:JobView` when the
job echoes it), checked and copied here, and read by the recipe (`diffusion/img2img.py`): a knob the recipe
takes as given joins `Sampling`, which `JobSpec` extends, and reaches the recipe with no other change.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
from PIL import Image

from gateway.diffusion.img2img import Img2ImgPipeline, sampling_knobs
from gateway.diffusion.lora import LoraChoice, LoraRegistry
from gateway.diffusion.lora_format import LoraFileError
from gateway.diffusion.sampling import MAX_SEED, do_classifier_free_guidance, img2img_effective_steps
from gateway.diffusion.schedulers import scheduler_class, scheduler_name
from gateway.diffusion.styles import STYLE_PRESETS, StylePreset
from gateway.errors import (
    ImageDimensionsTooLarge,
    ImageTooLarge,
    InvalidImage,
    InvalidRequest,
    ModelNotFound,
    UrlNotAllowed,
)
from gateway.jobs.model import Job, JobSpec, Size
from gateway.jobs.request import DEFAULT_MASK_BLUR, ImageToImageRequest, parse_image_to_image
from gateway.jobs.results import model_version, result_key
from gateway.media import codecs, metadata, netguard
from gateway.media.fetch import fetch_image
from gateway.media.netguard import OutboundPolicy
from gateway.media.work import run_image_work
from gateway.observability import stage


def resolve_pipeline(pipelines: Mapping[str, Img2ImgPipeline], model: str) -> Img2ImgPipeline:
    pipeline = pipelines.get(model)
    if pipeline is None:
        available = ", ".join(sorted(pipelines)) or "none"
        raise ModelNotFound(f"Model '{model}' not found", f"Available models: {available}")
    return pipeline


def resolve_scheduler(pipeline: Img2ImgPipeline, requested: str | None) -> str | None:
    """The short name of the scheduler a request runs on `pipeline` (its own when `requested` is None).

    `requested` is a short name or a diffusers class name; one this model cannot run is a 400 listing those
    it can (the same list `GET /v1/models` shows).
    """
    if requested is None:
        return scheduler_name(str(pipeline.scheduler_config.get("_class_name")))
    choices = pipeline.scheduler_choices
    class_name = scheduler_class(requested)
    name = None if class_name is None else scheduler_name(class_name)
    if name is None or name not in choices:
        raise InvalidRequest(
            "Invalid field 'scheduler'",
            f"'scheduler' must be one of: {', '.join(choices)} (or their diffusers class names) "
            f"for model '{pipeline.manifest.name}'",
        )
    return name


def output_quality(output_format: str, quality: int | None) -> int | None:
    """The quality the outputs are encoded at (the format's default filled in). The wire model already refuses
    bad values; this keeps a request built any other way to a 400 as well."""
    if output_format not in codecs.OUTPUT_FORMATS:
        raise InvalidRequest(
            "Invalid field 'output_format'", f"'output_format' must be one of: {', '.join(codecs.OUTPUT_FORMATS)}"
        )
    try:
        return codecs.output_quality(output_format, quality)
    except ValueError as exc:
        raise InvalidRequest("Invalid field 'output_quality'", str(exc)) from None


def work_cost(num_images: int, steps: int, strength: float, guidance_scale: float) -> int:
    """UNet samples a job asks for: images x effective steps (`int(steps * strength)`), twice with classifier-free
    guidance (guidance_scale > 1 doubles the UNet batch)."""
    per_image = img2img_effective_steps(steps, strength) * (2 if do_classifier_free_guidance(guidance_scale) else 1)
    return max(0, num_images) * per_image


@dataclass(frozen=True)
class Admitted:
    """An admitted request: the spec to run, and its image as received (stored for re-runs) and decoded."""

    spec: JobSpec
    data: bytes
    source_url: str | None  # the caller's URL when the image was fetched
    input_size: Size  # the image as sent (upright)
    model_input: Image.Image  # RGB at `spec.processed_size`: what the recipe reads (the original is not kept)
    cost: int  # UNet samples (`work_cost`), as charged to the key's budget
    result_key: str | None = None  # the exact-result cache's key (None: not cacheable)
    # A masked edit: the mask as received (stored for re-runs), the caller's URL when fetched, its upright size,
    # and the mask at `spec.processed_size` as the recipe and the overlay read it (`codecs.prepare_mask`).
    mask_data: bytes | None = None
    mask_source_url: str | None = None
    mask_size: Size | None = None
    model_mask: Image.Image | None = None


@dataclass(frozen=True)
class Reused:
    """A request the exact-result cache answers: the earlier completed job with the same result key."""

    job: Job
    result_key: str
    source_url: str | None  # the caller's URL when the image was fetched
    mask_source_url: str | None = None  # the caller's URL when the mask was fetched


# The exact-result cache's lookup (`JobStore.find_result` for the caller's key), injected by `CreateJob`.
Reuse = Callable[[str], Awaitable[Job | None]]


Charge = Callable[[int], Awaitable[None]]


class Admission:
    """The request rules of this deployment: its pipelines, styles and outbound policy."""

    def __init__(
        self,
        *,
        pipelines: Mapping[str, Img2ImgPipeline],
        http: httpx.AsyncClient,
        policy: OutboundPolicy,
        fetch_timeout_s: float,
        styles: Mapping[str, StylePreset] = STYLE_PRESETS,
        loras: LoraRegistry | None = None,
    ) -> None:
        self.pipelines = pipelines
        self.loras = loras
        self.http = http
        self.policy = policy
        self.fetch_timeout_s = fetch_timeout_s
        self.styles = styles

    def parse(self, fields: object) -> ImageToImageRequest:
        """Types, ranges, styles and the cross-field rules: a 400 naming the first bad field, before anything."""
        with stage("parse"):
            return parse_image_to_image(fields, styles=self.styles)

    async def admit(
        self, request: ImageToImageRequest, *, asynchronous: bool, charge: Charge, reuse: Reuse | None = None
    ) -> Admitted | Reused:
        """The rules that need the deployment, cheapest first; `charge(cost)` takes the work from the key's
        budget (raising when it is spent) before any image decoding. `reuse(key)`, given for a request the
        exact-result cache may answer, returns the earlier completed job with that result key, if any: then the
        request is answered from it (`Reused`), uncharged and with no image work."""
        # 1. The model (404 before any image work), a mask when it is an inpainting model, and the scheduler it
        # can run (400).
        pipeline = resolve_pipeline(self.pipelines, request.model)
        manifest = pipeline.manifest
        if manifest.inpainting and request.mask is None:
            raise InvalidRequest(
                "Missing required field 'mask'",
                f"'{request.model}' is an inpainting model (9-channel UNet): send a mask",
            )
        scheduler = resolve_scheduler(pipeline, request.scheduler)
        # 2. The LoRA adapters: each a file the model can run (family, layers, rank), read by header; then the
        # output encoding, the format's default quality filled in.
        loras = self._loras(pipeline, request)
        quality = output_quality(request.output_format, request.output_quality)
        # 3. The webhook target, refused now rather than at delivery time.
        if request.webhook_url is not None:
            await netguard.check_url(request.webhook_url, self.policy, timeout_s=self.fetch_timeout_s)
        # 4. The exact-result cache (an explicit seed, and the same image and mask bytes, model and parameters as
        # a completed job): the bytes first, given or fetched, and the work charged only on a miss.
        cost = work_cost(request.num_images, request.steps, request.strength, request.guidance_scale)
        mask_blur = (
            None
            if request.mask is None
            else (request.mask_blur if request.mask_blur is not None else DEFAULT_MASK_BLUR)
        )
        key = None
        mask_data: bytes | None = None
        mask_source_url: str | None = None
        if reuse is not None and request.seed is not None:
            data, source_url = await self._image_bytes(request.image)
            if request.mask is not None:
                mask_data, mask_source_url = await self._mask_bytes(request.mask)
            key = self._result_key(pipeline, request, data, loras, scheduler, quality, mask_data, mask_blur)
            earlier = await reuse(key)
            if earlier is not None:
                return Reused(earlier, key, source_url, mask_source_url)
            await charge(cost)
        else:
            # 5. The work, charged to the key's budget once the request is known to be valid (before any fetch).
            await charge(cost)
            data, source_url = await self._image_bytes(request.image)
            if request.mask is not None:
                mask_data, mask_source_url = await self._mask_bytes(request.mask)
        # 6. The image decoded, checked, sized to the model's grid and resized to it.
        image = await run_image_work(codecs.decode_image, data)
        width, height = codecs.fit_to_grid(image.width, image.height, manifest.native_resolution, manifest.grid)
        input_size = Size(image.width, image.height)
        data = await run_image_work(metadata.strip_metadata, data)  # the stored copy keeps no EXIF, GPS, comments
        model_input = await run_image_work(codecs.resize_for_model, image, (width, height))
        # The mask, when given: the image's checks, the image's aspect ratio, something to change once at the
        # processed size and blurred.
        mask_size = model_mask = None
        if mask_data is not None:
            with _mask_errors():
                mask = await run_image_work(codecs.decode_mask, mask_data)
            if not codecs.mask_fits((image.width, image.height), (mask.width, mask.height)):
                raise InvalidRequest(
                    "Invalid field 'mask'",
                    f"The mask is {mask.width}x{mask.height}, the image {image.width}x{image.height}: "
                    "the same aspect ratio is required",
                )
            mask_size = Size(mask.width, mask.height)
            with _mask_errors():
                mask_data = await run_image_work(metadata.strip_metadata, mask_data)
            model_mask = await run_image_work(codecs.prepare_mask, mask, (width, height), mask_blur)
            del mask
            if codecs.mask_is_empty(model_mask):
                raise InvalidRequest(
                    "Invalid field 'mask'",
                    f"The mask marks nothing to change: no white (or fully transparent) pixel after resizing to "
                    f"{width}x{height} and mask_blur {mask_blur}",
                )
        del image  # a 2048 px original is 12 MiB; only the resized input is kept for the first run
        # 7. The spec: the seed drawn when absent (a re-run must give the same pixels), the steps diffusers runs.
        spec = JobSpec(
            **{**sampling_knobs(request), "loras": loras},
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            model=request.model,
            seed=request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1),
            style=request.style,
            num_images=request.num_images,
            webhook_url=request.webhook_url,
            asynchronous=asynchronous or request.webhook_url is not None,
            processed_size=Size(width, height),
            effective_steps=img2img_effective_steps(request.steps, request.strength),
            scheduler=scheduler,
            output_format=request.output_format,
            output_quality=quality,
            priority=request.priority,
            max_queue_s=request.max_queue_s,
            masked=mask_data is not None,
            mask_blur=mask_blur,
        )
        return Admitted(
            spec=spec,
            data=data,
            source_url=source_url,
            input_size=input_size,
            model_input=model_input,
            cost=cost,
            result_key=key,
            mask_data=mask_data,
            mask_source_url=mask_source_url,
            mask_size=mask_size,
            model_mask=model_mask,
        )

    def _result_key(
        self,
        pipeline: Img2ImgPipeline,
        request: ImageToImageRequest,
        data: bytes,
        loras: tuple[LoraChoice, ...],
        scheduler: str | None,
        quality: int | None,
        mask: bytes | None = None,
        mask_blur: int | None = None,
    ) -> str:
        """Every input that decides the output's bytes (`results.result_key`): the resolved scheduler and
        quality, so a default spelled out and one left implicit are the same request."""
        parameters: dict[str, object] = {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "strength": request.strength,
            "steps": request.steps,
            "guidance_scale": request.guidance_scale,
            "seed": request.seed,
            "num_images": request.num_images,
            "style": request.style,
            "scheduler": scheduler,
            "output_format": request.output_format,
            "output_quality": quality,
        }
        if mask is not None:  # only masked requests name it: unmasked keys stay what they were
            parameters["mask_blur"] = mask_blur
        with self._adapters_readable():
            return result_key(
                image=data,
                model=request.model,
                version=model_version(pipeline.manifest.path),
                parameters=parameters,
                loras=loras,
                registry=self.loras,
                mask=mask,
            )

    @staticmethod
    @contextmanager
    def _adapters_readable() -> Iterator[None]:
        """An adapter file removed between its check and the key: the request's 400, as at the check."""
        try:
            yield
        except (FileNotFoundError, LoraFileError) as exc:
            raise InvalidRequest("Invalid field 'loras'", f"A LoRA adapter changed while admitted: {exc}") from None

    def _loras(self, pipeline: Img2ImgPipeline, request: ImageToImageRequest) -> tuple[LoraChoice, ...]:
        choices = tuple(LoraChoice(lora.name, lora.scale) for lora in request.loras)
        if not choices:
            return ()
        if self.loras is None:
            raise InvalidRequest("Invalid field 'loras'", "This deployment serves no LoRA adapters")
        with stage("loras"):
            return self.loras.admit(pipeline.manifest, choices)

    async def _mask_bytes(self, field: str | bytes) -> tuple[bytes, str | None]:
        """The mask's bytes, obtained exactly as the image's (the same parser, fetch, outbound policy and caps)."""
        with _mask_errors():
            return await self._image_bytes(field)

    async def _image_bytes(self, field: str | bytes) -> tuple[bytes, str | None]:
        if isinstance(field, bytes):  # an upload: already read, within the body cap
            if len(field) > codecs.MAX_IMAGE_BYTES:
                raise codecs.image_too_large(codecs.MAX_IMAGE_BYTES)
            return field, None
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


@contextmanager
def _mask_errors() -> Iterator[None]:
    """The image's refusals (bytes, fetch, decoding) for the mask: the same status and code, the message naming
    the field."""
    try:
        yield
    except (InvalidImage, ImageTooLarge, ImageDimensionsTooLarge, UrlNotAllowed) as exc:
        raise type(exc)(f"Invalid field 'mask': {exc.message}", exc.details, headers=exc.headers) from None
