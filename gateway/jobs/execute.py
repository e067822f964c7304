"""Running one job: read its stored input, run the img2img recipe over Triton, store its encoded outputs."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from gateway.diffusion.img2img import Generation, Img2ImgPipeline, sampling_knobs
from gateway.diffusion.sampling import image_seeds
from gateway.diffusion.styles import STYLE_PRESETS, apply_style
from gateway.errors import InternalError, InvalidRequest, StoreUnavailable
from gateway.jobs.admission import resolve_pipeline
from gateway.jobs.model import Job, OutputImage
from gateway.jobs.naming import new_output_token, output_name
from gateway.media import codecs
from gateway.media.storage import CONTENT_TYPES, Storage
from gateway.media.work import run_image_work
from gateway.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

# Model inputs kept for the first run (RGB at the processed size: 3 MiB at 1024 px), `IMAGEN_DECODED_CACHE_BYTES`.
DEFAULT_DECODED_CACHE_BYTES = Settings.decoded_cache_bytes
# A stored object read or written while the storage is down: retried from this delay, doubled up to the settings'
# `store_retry_max_s`, for at most `storage_outage_s` before the job fails `store_unavailable`.
STORAGE_RETRY_FIRST_S = 0.1


def scheduler_config(pipeline: Img2ImgPipeline, name: str | None) -> Mapping[str, Any] | None:
    """The config the named scheduler runs with on `pipeline` (None: the model's own, as exported)."""
    if name is None:
        return None
    config = pipeline.scheduler_choices.get(name)
    if config is None:  # the model was re-exported with another scheduler after the job was accepted
        raise InvalidRequest("Invalid field 'scheduler'", f"Model '{pipeline.manifest.name}' cannot run '{name}'")
    return config


class DecodedInputs:
    """Model inputs of just-accepted jobs (RGB at the processed size, what the recipe reads, and a masked edit's
    prepared mask), so the first run neither reads the stored input back nor decodes and resizes it again.

    Bounded in bytes, least recently put evicted first (a miss only costs a re-read), and an entry leaves as soon
    as any replica runs its job: `take` here, `drop` when another replica reports the job's progress. Without the
    byte bound, 32 decoded 2048 px originals held 540 MiB.
    """

    def __init__(self, max_bytes: int = DEFAULT_DECODED_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._images: OrderedDict[str, tuple[Image.Image, Image.Image | None]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._images)

    @staticmethod
    def _size(entry: tuple[Image.Image, Image.Image | None]) -> int:
        return sum(image.width * image.height * len(image.getbands()) for image in entry if image is not None)

    def put(self, job_id: str, image: Image.Image, mask: Image.Image | None = None) -> None:
        self.drop(job_id)
        entry = (image, mask)
        size = self._size(entry)
        if size > self.max_bytes:
            return  # larger than the whole budget: read back from storage when the job runs
        self._images[job_id] = entry
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, evicted = self._images.popitem(last=False)
            self.bytes -= self._size(evicted)

    def take_inputs(self, job_id: str) -> tuple[Image.Image, Image.Image | None] | None:
        """The job's model input and prepared mask (None: unmasked), removed; None when not held."""
        entry = self._images.pop(job_id, None)
        if entry is not None:
            self.bytes -= self._size(entry)
        return entry

    def take(self, job_id: str) -> Image.Image | None:
        entry = self.take_inputs(job_id)
        return None if entry is None else entry[0]

    def drop(self, job_id: str) -> None:
        self.take(job_id)


def encode_masked_output(
    sample: np.ndarray, mask: Image.Image | None, original: Image.Image | None, output_format: str, quality: int | None
) -> bytes:
    """One output encoded; a masked edit's with `original` pasted back outside `mask` first."""
    if mask is None or original is None:
        return codecs.encode_output(sample, output_format, quality)
    generated = codecs.apply_overlay(mask, original, codecs.tensor_to_image(sample))
    return codecs.encode_image(generated, output_format, quality)


class JobExecutor:
    """Everything between a claimed job and its stored images; knows nothing of HTTP or of the job store."""

    def __init__(
        self,
        pipelines: Mapping[str, Img2ImgPipeline],
        storage: Storage,
        decoded: DecodedInputs,
        *,
        storage_outage_s: float = Settings.storage_outage_s,
        storage_retry_max_s: float = Settings.store_retry_max_s,
    ) -> None:
        self.pipelines = pipelines
        self.storage = storage
        self.decoded = decoded
        self.storage_outage_s = storage_outage_s
        self.storage_retry_max_s = storage_retry_max_s

    async def _stored(self, what: str, job_id: str, op: Callable[[], Awaitable[T]]) -> T:
        """`op` on the image storage, retried with backoff while the storage is unavailable, for at most
        `storage_outage_s`: an outage of a few seconds delays the job instead of failing it (its images are
        already computed), a longer one fails it `store_unavailable`."""
        deadline = time.monotonic() + self.storage_outage_s
        delay = STORAGE_RETRY_FIRST_S
        while True:
            try:
                return await op()
            except StoreUnavailable:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("job %s: storage unavailable (%s); retrying in %.1f s", job_id, what, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, self.storage_retry_max_s)

    async def _read(self, job_id: str, name: str) -> bytes:
        found = await self._stored("read input", job_id, lambda: self.storage.get(name))
        if found is None:
            raise InternalError("Job input is missing", f"Stored input {name} not found")
        return found[0]

    async def __call__(
        self,
        job: Job,
        *,
        on_step: Callable[[int, int], None],
        should_stop: Callable[[], bool],
        before_step: Callable[[], Awaitable[None]] | None = None,
    ) -> tuple[OutputImage, ...]:
        spec = job.spec

        async def boundary() -> None:  # the job's image work waits too while a higher priority denoises here
            if before_step is not None:
                await before_step()

        # 1. The model, and the input (and a masked edit's mask) as first decoded, or read back from storage after
        # a restart.
        pipeline = resolve_pipeline(self.pipelines, spec.model)
        await boundary()
        size = (spec.processed_size.width, spec.processed_size.height)
        held = self.decoded.take_inputs(job.id)
        image, mask = held if held is not None else (None, None)
        if image is None:
            image = await run_image_work(codecs.decode_image, await self._read(job.id, job.input.name), wait=True)
        if job.mask is not None and mask is None:
            decoded_mask = await run_image_work(codecs.decode_mask, await self._read(job.id, job.mask.name), wait=True)
            mask = await run_image_work(codecs.prepare_mask, decoded_mask, size, spec.mask_blur, wait=True)
        # 2. The tensor at the processed size (a cached input is already resized), the mask as the recipe reads it,
        # the styled prompts, one seed per image. A masked edit keeps the resized input for the overlay, so it is
        # resized once, first (image_to_tensor leaves an image at `size` as it is).
        original = mask_tensor = None
        if mask is not None:
            image = original = await run_image_work(codecs.resize_for_model, image, size, wait=True)
            mask_tensor = await run_image_work(codecs.mask_to_tensor, mask, wait=True)
        tensor = await run_image_work(codecs.image_to_tensor, image, size, wait=True)
        del image
        prompt, negative = apply_style(spec.prompt, spec.negative_prompt, STYLE_PRESETS.get(spec.style or ""))
        seeds = image_seeds(spec.seed, spec.num_images)
        # 3. Denoise, every Triton call at the job's priority; at each step boundary the job may pause for a
        # higher-priority one (`before_step`).
        result = await pipeline(
            Generation(
                **sampling_knobs(spec),
                prompt=prompt,
                negative_prompt=negative,
                image=tensor,
                seeds=seeds,
                scheduler_config=scheduler_config(pipeline, spec.scheduler),
                mask=mask_tensor,
            ),
            on_step=on_step,
            should_stop=should_stop,
            priority=spec.priority,
            before_step=before_step,
        )
        # 4. Encode (the request's format, no metadata) and store each image, with the digest of its bytes; a masked
        # edit's output first gets the input pasted back outside the (blurred) mask, as diffusers' apply_overlay.
        await boundary()
        images = []
        extension = codecs.OUTPUT_EXTENSIONS[spec.output_format]
        token = new_output_token()  # the outputs' names are capabilities: not derivable from the job id
        for i, sample in enumerate(result.images):
            name = output_name(job.id, i, extension=extension, token=token)
            content_type = CONTENT_TYPES[extension]
            data = await run_image_work(
                encode_masked_output, sample, mask, original, spec.output_format, spec.output_quality, wait=True
            )
            await self._stored("store output", job.id, functools.partial(self.storage.put, name, data, content_type))
            images.append(
                OutputImage(
                    name=name,
                    url=self.storage.url_for(name),
                    width=size[0],
                    height=size[1],
                    seed=seeds[i],
                    content_type=content_type,
                    sha256=hashlib.sha256(data).hexdigest(),
                )
            )
        return tuple(images)
