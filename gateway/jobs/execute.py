"""Running one job: read its stored input, run the img2img recipe over Triton, store its encoded outputs."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from PIL import Image

from gateway.diffusion.img2img import Generation, Img2ImgPipeline, sampling_knobs
from gateway.diffusion.sampling import image_seeds
from gateway.diffusion.styles import STYLE_PRESETS, apply_style
from gateway.errors import InternalError, InvalidRequest
from gateway.jobs.admission import resolve_pipeline
from gateway.jobs.model import Job, OutputImage
from gateway.jobs.naming import output_name
from gateway.media import codecs
from gateway.media.storage import CONTENT_TYPES, Storage
from gateway.media.work import run_image_work

DECODED_CACHE_SIZE = 32


def scheduler_config(pipeline: Img2ImgPipeline, name: str | None) -> Mapping[str, Any] | None:
    """The config the named scheduler runs with on `pipeline` (None: the model's own, as exported)."""
    if name is None:
        return None
    config = pipeline.scheduler_choices.get(name)
    if config is None:  # the model was re-exported with another scheduler after the job was accepted
        raise InvalidRequest("Invalid field 'scheduler'", f"Model '{pipeline.manifest.name}' cannot run '{name}'")
    return config


class DecodedInputs:
    """Decoded inputs of just-accepted jobs, so the first run does not decode twice (bounded: misses re-decode)."""

    def __init__(self, size: int = DECODED_CACHE_SIZE) -> None:
        self._size = size
        self._images: OrderedDict[str, Image.Image] = OrderedDict()

    def put(self, job_id: str, image: Image.Image) -> None:
        self._images[job_id] = image
        while len(self._images) > self._size:
            self._images.popitem(last=False)

    def take(self, job_id: str) -> Image.Image | None:
        return self._images.pop(job_id, None)


class JobExecutor:
    """Everything between a claimed job and its stored images; knows nothing of HTTP or of the job store."""

    def __init__(
        self,
        pipelines: Mapping[str, Img2ImgPipeline],
        storage: Storage,
        decoded: DecodedInputs,
    ) -> None:
        self.pipelines = pipelines
        self.storage = storage
        self.decoded = decoded

    async def __call__(
        self, job: Job, *, on_step: Callable[[int, int], None], should_stop: Callable[[], bool]
    ) -> tuple[OutputImage, ...]:
        spec = job.spec
        # 1. The model, and the input as first decoded (or read back from storage after a restart).
        pipeline = resolve_pipeline(self.pipelines, spec.model)
        image = self.decoded.take(job.id)
        if image is None:
            found = await self.storage.get(job.input.name)
            if found is None:
                raise InternalError("Job input is missing", f"Stored input {job.input.name} not found")
            image = await run_image_work(codecs.decode_image, found[0], wait=True)
        # 2. The tensor at the processed size, the styled prompts, one seed per image.
        size = (spec.processed_size.width, spec.processed_size.height)
        tensor = await run_image_work(codecs.image_to_tensor, image, size, wait=True)
        prompt, negative = apply_style(spec.prompt, spec.negative_prompt, STYLE_PRESETS.get(spec.style or ""))
        seeds = image_seeds(spec.seed, spec.num_images)
        # 3. Denoise.
        result = await pipeline(
            Generation(
                **sampling_knobs(spec),
                prompt=prompt,
                negative_prompt=negative,
                image=tensor,
                seeds=seeds,
                scheduler_config=scheduler_config(pipeline, spec.scheduler),
            ),
            on_step=on_step,
            should_stop=should_stop,
        )
        # 4. Encode (the request's format, no metadata) and store each image, with the digest of its bytes.
        images = []
        extension = codecs.OUTPUT_EXTENSIONS[spec.output_format]
        for i, sample in enumerate(result.images):
            name = output_name(job.id, i, job.run_attempts, extension)
            content_type = CONTENT_TYPES[extension]
            data = await run_image_work(
                codecs.encode_output, sample, spec.output_format, spec.output_quality, wait=True
            )
            await self.storage.put(name, data, content_type)
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
