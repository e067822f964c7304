"""Issue 21: the admission step's contracts: a recipe knob travels from the wire model to the recipe by name, the
job view echoes the spec by name, and an upload's bytes are admitted as bytes (bounded, hashed as bytes)."""

from __future__ import annotations

import base64
import dataclasses
from typing import Any, cast

import pytest

from gateway.diffusion.img2img import Generation, Sampling, sampling_knobs
from gateway.diffusion.lora import LoraChoice
from gateway.diffusion.styles import STYLE_PRESETS
from gateway.errors import ImageTooLarge, InvalidRequest
from gateway.http.schema import JobView
from gateway.http.views import job_view
from gateway.jobs.admission import Admission
from gateway.jobs.create import request_hash
from gateway.jobs.model import JobSpec, job_from_json, job_to_json
from gateway.jobs.request import ImageToImageRequest, parse_image_to_image
from gateway.media import codecs
from tests.unit.fakes import make_job, make_spec

KNOBS = tuple(field.name for field in dataclasses.fields(Sampling))
UPLOAD = b"\x89PNG\r\n\x1a\n" + bytes(range(256))


def _admission() -> Admission:
    return Admission(pipelines={}, http=cast(Any, None), policy=cast(Any, None), fetch_timeout_s=1.0)


def test_every_recipe_knob_is_a_request_field_echoed_by_the_job_view() -> None:
    assert KNOBS and set(KNOBS) <= set(ImageToImageRequest.model_fields) & set(JobView.model_fields)
    assert issubclass(JobSpec, Sampling) and issubclass(Generation, Sampling)


def test_a_knob_reaches_the_recipe_through_the_spec_and_the_store_unchanged() -> None:
    request = parse_image_to_image(
        {
            "image": "aGVsbG8=",
            "prompt": "a cat",
            "strength": 0.55,
            "steps": 9,
            "guidance_scale": 3.5,
            "loras": [{"name": "ink", "scale": 0.5}],
        },
        styles=STYLE_PRESETS,
    )
    # Admission turns the wire's adapters into the recipe's choices once it has checked them against the model.
    ink = (LoraChoice("ink", 0.5),)
    spec = make_spec(**{**sampling_knobs(request), "loras": ink})
    stored = job_from_json(job_to_json(make_job("j", spec=spec)), version=1).spec
    assert sampling_knobs(stored) == {"strength": 0.55, "steps": 9, "guidance_scale": 3.5, "loras": ink}


def test_the_job_view_echoes_every_spec_field_it_declares() -> None:
    spec = make_spec(
        strength=0.35,
        steps=11,
        seed=1234,
        style="anime",
        scheduler="euler",
        output_format="webp",
        loras=(LoraChoice("ink", 0.5), LoraChoice("fox", -1.0)),
    )
    view = job_view(make_job("j", spec=spec), None)
    echoed = set(JobView.model_fields) & {field.name for field in dataclasses.fields(JobSpec)}
    assert {"strength", "steps", "seed", "processed_size", "effective_steps", "output_format", "loras"} <= echoed

    def wire(value: object) -> object:
        if isinstance(value, tuple):
            return [wire(item) for item in value]
        return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value  # type: ignore[arg-type]

    for name in echoed:
        assert view[name] == wire(getattr(spec, name)), name


def test_an_upload_is_admitted_as_bytes_and_an_empty_one_is_refused_like_an_empty_string() -> None:
    admission = _admission()
    assert admission.parse({"image": UPLOAD, "prompt": "a cat"}).image == UPLOAD
    for empty in (b"", ""):
        with pytest.raises(InvalidRequest) as refused:
            admission.parse({"image": empty, "prompt": "a cat"})
        assert refused.value.message == "Invalid field 'image'"


async def test_an_upload_over_the_image_cap_is_413_before_any_decoding() -> None:
    with pytest.raises(ImageTooLarge):
        await _admission()._image_bytes(b"\0" * (codecs.MAX_IMAGE_BYTES + 1))
    assert await _admission()._image_bytes(UPLOAD) == (UPLOAD, None)


def test_an_upload_hashes_as_bytes_stable_and_unlike_its_base64() -> None:
    fields = {"image": UPLOAD, "prompt": "a cat", "num_images": 2}
    assert request_hash(fields) == request_hash(dict(reversed(list(fields.items()))))
    assert request_hash(fields) != request_hash({**fields, "image": base64.b64encode(UPLOAD).decode()})
    assert request_hash(fields) != request_hash({**fields, "image": UPLOAD + b"\0"})
