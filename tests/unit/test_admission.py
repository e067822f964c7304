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


# --- issue 25: masked edits on the native wire -------------------------------------------------------------


def _png(mode: str, size: tuple[int, int], color: int) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new(mode, size, color).save(out, format="PNG")
    return out.getvalue()


async def _admit_masked(tmp_path: Any, fields: dict[str, Any], *, unet_in_channels: int | None = None) -> Any:
    from gateway.diffusion.img2img import Img2ImgPipeline
    from tests.helpers import make_image
    from tests.unit.fakes import FakeTriton, tiny_manifest

    manifest = tiny_manifest(tmp_path, unet_in_channels=unet_in_channels)
    admission = Admission(
        pipelines={manifest.name: Img2ImgPipeline(manifest, cast(Any, FakeTriton(manifest)))},
        http=cast(Any, None),
        policy=cast(Any, None),
        fetch_timeout_s=1.0,
    )

    async def charge(cost: int) -> None:
        return None

    body = {"image": make_image(40, 32), "prompt": "a cat", "model": manifest.name, **fields}
    return await admission.admit(admission.parse(body), asynchronous=True, charge=charge)


def test_mask_fields_parse_and_their_rules_name_them() -> None:
    admission = _admission()
    assert admission.parse({"image": "aGVsbG8=", "prompt": "p"}).mask is None
    assert admission.parse({"image": "aGVsbG8=", "prompt": "p", "mask": UPLOAD, "mask_blur": 8}).mask == UPLOAD
    cases = [({"mask": ""}, "mask"), ({"mask": 3}, "mask"), ({"mask": "aGk=", "mask_blur": 65}, "mask_blur")]
    cases += [({"mask": "aGk=", "mask_blur": -1}, "mask_blur"), ({"mask_blur": 4}, "mask_blur")]
    for extra, field in cases:
        with pytest.raises(InvalidRequest) as refused:
            admission.parse({"image": "aGVsbG8=", "prompt": "p", **extra})
        assert refused.value.message == f"Invalid field '{field}'", extra


async def test_a_hostile_mask_is_refused_like_a_hostile_image_naming_mask() -> None:
    from gateway.errors import ERROR_TABLE, InvalidImage, UrlNotAllowed

    admission = _admission()
    with pytest.raises(ImageTooLarge) as too_large:
        await admission._mask_bytes(b"\0" * (codecs.MAX_IMAGE_BYTES + 1))
    assert too_large.value.message.startswith("Invalid field 'mask': ")
    with pytest.raises(InvalidImage) as bad:
        await admission._mask_bytes("not base64 !!!")
    assert bad.value.message.startswith("Invalid field 'mask': ")
    assert ERROR_TABLE[InvalidImage] == (400, "invalid_image")
    with pytest.raises((InvalidImage, UrlNotAllowed)) as scheme:
        await admission._mask_bytes("ftp://example.com/mask.png")
    assert scheme.value.message.startswith("Invalid field 'mask': ")


async def test_admission_refuses_bad_masks_with_a_400_naming_mask(tmp_path: Any) -> None:
    from gateway.errors import ERROR_TABLE, ApiError

    refusals = {
        "undecodable": {"mask": b"GIF89a" + bytes(64)},
        "aspect": {"mask": _png("L", (32, 32), 255)},
        "empty": {"mask": _png("L", (40, 32), 0)},
    }
    for case, fields in refusals.items():
        with pytest.raises(ApiError) as refused:
            await _admit_masked(tmp_path, fields)
        assert ERROR_TABLE[type(refused.value)][0] == 400, case
        assert refused.value.message.startswith("Invalid field 'mask'"), case
    with pytest.raises(InvalidRequest) as missing:
        await _admit_masked(tmp_path, {}, unet_in_channels=9)
    assert missing.value.message == "Missing required field 'mask'"


async def test_a_masked_request_is_admitted_with_its_mask_and_blur(tmp_path: Any) -> None:
    mask = _png("L", (20, 16), 255)  # half the image's size: the same aspect ratio
    admitted = await _admit_masked(tmp_path, {"mask": mask, "seed": 1})
    size = admitted.spec.processed_size
    assert admitted.spec.masked and admitted.spec.mask_blur == 4
    assert admitted.model_mask.size == (size.width, size.height) and admitted.mask_size.width == 20
    assert admitted.mask_data is not None
    plain = await _admit_masked(tmp_path, {"seed": 1})
    assert not plain.spec.masked and plain.spec.mask_blur is None and plain.model_mask is None
    blurred = await _admit_masked(tmp_path, {"mask": mask, "mask_blur": 0})
    assert blurred.spec.mask_blur == 0
    view = job_view(make_job("j", spec=admitted.spec), None)
    assert view["masked"] is True and view["mask_blur"] == 4


def test_the_result_key_differs_with_a_mask_or_another_blur() -> None:
    from gateway.jobs.results import result_key

    def key(mask: bytes | None, blur: int | None) -> str:
        parameters: dict[str, object] = {"seed": 1} if mask is None else {"seed": 1, "mask_blur": blur}
        return result_key(
            image=UPLOAD, model="m", version="v", parameters=parameters, loras=(), registry=None, mask=mask
        )

    keys = {key(None, None), key(b"m1", 4), key(b"m2", 4), key(b"m1", 8)}
    assert len(keys) == 4
    unmasked = result_key(image=UPLOAD, model="m", version="v", parameters={"seed": 1}, loras=(), registry=None)
    assert key(None, None) == unmasked


def test_a_masked_job_stores_its_mask_as_an_input_and_retention_owns_it() -> None:
    from gateway.jobs.model import InputImage
    from gateway.jobs.naming import mask_name, parse_name

    name = mask_name("img_transform_abc", "png")
    parsed = parse_name(name)
    assert parsed is not None and parsed.job_id == "img_transform_abc" and parsed.is_input
    job = dataclasses.replace(make_job("j"), mask=InputImage(url="u", name=mask_name("j", "png"), width=4, height=4))
    assert mask_name("j", "png") in job.stored_names
    assert job_from_json(job_to_json(job), version=1).mask == job.mask
    assert make_job("j").mask is None and job_from_json(job_to_json(make_job("j")), version=1).mask is None
