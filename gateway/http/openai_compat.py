"""OpenAI-compatible `POST /v1/images/edits`: OpenAI's multipart form in, OpenAI's response and error shapes out.

Only a translation: the form becomes the native request's fields (the upload as bytes), which go through the
same admission and `CreateJob` as `POST /v1/image-to-image`'s body, so jobs, keys, the body
budget, rate and work limits and metrics are the native route's. Native errors are rewritten into OpenAI's shape
in one place (`openai_error_response`): OpenAI's names (`n` for `num_images`) and a `param` naming the field.

Parsing is bounded: at most `MAX_FORM_FILES` file parts and `MAX_FORM_FIELDS` text parts, each text part at most
`MAX_FIELD_BYTES`, the whole body at most `max_body_bytes` (413), and the files are held in memory (as a JSON
body is, and counted by the same body budget), never spooled to disk.

A `mask` file is the native `mask` as uploaded: the native alpha rule (fully transparent pixels mark the area to
change) is OpenAI's. OpenAI's own requirements on it, the image's dimensions and an alpha channel, are checked
here from the headers alone (`check_mask`); everything else about it is admission's.
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, cast

from PIL import ExifTags, Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.config import JsonDict
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.diffusion.img2img import Img2ImgPipeline
from gateway.errors import (
    ApiError,
    ImageDimensionsTooLarge,
    ImageTooLarge,
    InvalidImage,
    InvalidRequest,
    JobFinished,
    ModelNotFound,
    NotFound,
    UnsupportedMediaType,
    code_status,
    response_headers,
    status_and_code,
)
from gateway.http.body import capped_stream
from gateway.jobs.model import COMPLETED, FAILED, Job
from gateway.jobs.request import DEFAULT_MODEL, MAX_NEGATIVE_PROMPT_CHARS, MAX_PROMPT_CHARS
from gateway.media import codecs
from gateway.media.storage import Storage
from gateway.media.work import run_image_work

EDITS_PATH = "/v1/images/edits"
MULTIPART = "multipart/form-data"
# Parts a form may have: the image, the mask and OpenAI's other file fields (refused by name, with a clear message,
# rather than by Starlette's "too many files"); text fields: OpenAI's ~20, ours, and slack for ignored ones.
MAX_FORM_FILES = 4
MAX_FORM_FIELDS = 64
# A text part: the longest field is a prompt, counted in characters (4 UTF-8 bytes at most each).
MAX_FIELD_BYTES = 4 * max(MAX_PROMPT_CHARS, MAX_NEGATIVE_PROMPT_CHARS) + 1024
IMAGE_FIELDS = ("image", "image[]")  # the SDK sends `image[]` for a list of images
MASK_FIELD = "mask"  # a file part, as the SDK sends it
SIZE = re.compile(r"(?P<width>[1-9][0-9]{0,4})x(?P<height>[1-9][0-9]{0,4})")
AUTO = "auto"
TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width and height

# OpenAI fields this service does not implement: any value is a 400 naming the field and why.
UNSUPPORTED: Mapping[str, str] = {
    "markup": "markup images are not supported",
    "input_fidelity": "input fidelity is not adjustable: use 'strength' (lower keeps more of the input)",
    "output_compression": "use 'output_quality' for the encoder's quality",
    "partial_images": "partial images are not streamed",
    "svg": "SVG output is not supported",
    "complexity": "not supported",
    "frame_count": "animated output is not supported",
    "frame_duration_ms": "animated output is not supported",
}
# OpenAI fields accepted only with the value that asks for what this service does anyway.
ONLY_VALUE: Mapping[str, str] = {"quality": AUTO, "background": AUTO, "stream": "false"}
# Accepted and ignored: end-user identifiers for OpenAI's abuse monitoring.
IGNORED = ("user", "safety_identifier")
# Native field -> OpenAI's name for it, for parameters and messages.
OPENAI_NAMES: Mapping[str, str] = {"num_images": "n"}
# Errors about one field whatever their message.
ERROR_PARAMS: Mapping[type[ApiError], str] = {
    InvalidImage: "image",
    ImageTooLarge: "image",
    ImageDimensionsTooLarge: "image",
    ModelNotFound: "model",
}
ResponseFormat = Literal["url", "b64_json"]
# A native message naming its field ("Invalid field 'mask': ..."): that field is the param, whatever the class.
_FIELD_IN_MESSAGE = re.compile(r"field(?:\(s\))? '(?P<field>[a-z_][a-z0-9_\[\].]*)'")


class OpenAIFieldError(InvalidRequest):
    """A 400 of the OpenAI form itself (before the native request exists), naming the form field."""

    def __init__(self, message: str, details: str | None, *, param: str) -> None:
        super().__init__(message, details)
        self.param = param


def _form_schema(schema: JsonDict) -> None:
    """A form field is sent or omitted, never null: the document drops the `null` the optional types add."""
    for prop in cast(JsonDict, schema["properties"]).values():
        prop = cast(JsonDict, prop)
        types = prop.get("type")
        if isinstance(types, list) and "null" in types:
            prop["type"] = next(t for t in types if t != "null")
        if prop.get("default", ...) is None:
            del prop["default"]


class ImageEditForm(BaseModel):
    """OpenAI's `POST /v1/images/edits` form as this service reads it, plus the native extras (`strength`, \
`steps`, `guidance_scale`, `negative_prompt`, `seed`, `style`, `output_format`, `output_quality`, `mask_blur`, \
`loras` as JSON text). Text fields \
are parsed as numbers where the native request has numbers; ranges are the native request's (`GET /v1/models`).

One image per request (`image`, or a one-element `image[]`); at most one `mask` file, the native `mask` as \
uploaded (its fully transparent pixels are the area to change), which must have the image's dimensions and an \
alpha channel, as OpenAI requires; `n` is the native `num_images`; `size` is \
`auto` or the size the model answers for this image (its native resolution on the longer side, aspect ratio \
kept); `quality` and `background` only `auto`; `user` is ignored. Unsupported OpenAI fields (`markup`, \
`input_fidelity`, `output_compression`, ...) and unknown ones are a 400 naming the field."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, json_schema_extra=_form_schema)

    image: bytes = Field(description="The image file (JPEG, PNG or WebP).")
    prompt: str = Field(description="The native `prompt`.")
    mask: bytes | None = Field(
        default=None,
        description="A masked edit: a PNG (or WebP) with an alpha channel and the image's dimensions, whose fully "
        "transparent pixels are the area to change (OpenAI's rule); elsewhere the output keeps the input's pixels. "
        "The native `mask`, as uploaded.",
    )
    model: str | None = Field(default=None, description=f"A served pipeline; default `{DEFAULT_MODEL}`.")
    n: int | None = Field(default=None, description="Number of images (the native `num_images`).")
    size: str | None = Field(
        default=None,
        description="`auto`, or `WIDTHxHEIGHT` equal to the size the model answers for this image.",
        json_schema_extra={"pattern": r"^(auto|[1-9][0-9]{0,4}x[1-9][0-9]{0,4})$"},
    )
    response_format: ResponseFormat = Field(
        default="url", description="`url`: stored image URLs; `b64_json`: the image bytes in base64."
    )
    output_format: str | None = Field(default=None, description="The native `output_format`.")
    output_quality: int | None = Field(default=None, description="The native `output_quality`.")
    quality: Literal["auto"] | None = None
    background: Literal["auto"] | None = None
    stream: Literal["false"] | None = None
    user: str | None = Field(default=None, description="Ignored.")
    safety_identifier: str | None = Field(default=None, description="Ignored.")
    strength: float | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    style: str | None = None
    mask_blur: int | None = Field(default=None, description="The native `mask_blur` (only with a `mask`).")
    loras: str | None = Field(
        default=None,
        description='The native `loras` as JSON text, e.g. `[{"name": "ink", "scale": 0.8}]` (`GET /v1/loras`).',
    )


# Form fields copied into the native request under the same name (`n` is renamed, the rest are ours only).
PASSED_THROUGH = (
    "prompt", "model", "strength", "steps", "guidance_scale", "negative_prompt", "seed", "style", "output_format",
    "output_quality", "mask_blur",
)  # fmt: skip
FORM_FIELDS = tuple(ImageEditForm.model_fields)


class ImageData(BaseModel):
    """One image of OpenAI's `ImagesResponse.data`: `url` or `b64_json`, as asked (no `revised_prompt`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str | None = Field(default=None, json_schema_extra={"format": "uri"})
    b64_json: str | None = None


class ImagesResponse(BaseModel):
    """OpenAI's response shape; `size` and `output_format` as OpenAI's newer models report them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    created: int = Field(description="The job's creation time, Unix seconds.")
    data: list[ImageData]
    size: str | None = Field(default=None, description="`WIDTHxHEIGHT` of the images.")
    output_format: str | None = Field(default=None, description="`png`, `jpeg` or `webp`.")


class OpenAIErrorObject(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    message: str = Field(description="Our message, then our details (what to fix).")
    type: Literal["invalid_request_error", "server_error"]
    param: str | None = Field(description="The form field at fault, when one is.")
    code: str = Field(description="The native error code (`invalid_request`, `model_not_found`, ...).")


class OpenAIErrorBody(BaseModel):
    """OpenAI's error shape, on this route; `error.code` is the native code of the same failure."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    error: OpenAIErrorObject


# --- errors: the one place native errors become OpenAI's -------------------------------------------------


def _openai_text(text: str) -> str:
    for native, openai in OPENAI_NAMES.items():
        text = text.replace(f"'{native}'", f"'{openai}'")
    return text


def _param(exc: ApiError) -> str | None:
    """The form field at fault: the one the message names (an invalid image about the mask is `mask`'s), else
    the one the error's class is always about, else none."""
    if isinstance(exc, OpenAIFieldError):
        return exc.param
    found = _FIELD_IN_MESSAGE.search(exc.message)
    if found is not None:
        field = found.group("field")
        return OPENAI_NAMES.get(field, field)
    for cls in type(exc).__mro__:
        if cls in ERROR_PARAMS:
            return ERROR_PARAMS[cls]
    return None


def openai_error(
    status: int,
    code: str,
    message: str,
    details: str | None,
    *,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """OpenAI's error shape: our message and details in `message`, OpenAI's field names, our code in `code`."""
    text = _openai_text(f"{message}: {details}" if details else message)
    error = OpenAIErrorObject(
        message=text, type="server_error" if status >= 500 else "invalid_request_error", param=param, code=code
    )
    body = OpenAIErrorBody(error=error).model_dump(mode="json")
    return JSONResponse(body, status_code=status, headers=response_headers(status, headers or {}))


def openai_error_response(exc: ApiError) -> JSONResponse:
    """Any of our errors on this route, in OpenAI's shape, with the status and headers of the error table."""
    status, code = status_and_code(exc)
    return openai_error(status, code, exc.message, exc.details, param=_param(exc), headers=exc.headers)


class OpenAIErrors:
    """OpenAI's error shape, registered for the OpenAI-compatible route in the route table."""

    def render(self, exc: ApiError) -> Response:
        return openai_error_response(exc)

    def render_stored(self, code: str, message: str, details: str | None, headers: Mapping[str, str]) -> Response:
        return openai_error(code_status(code), code, message, details, headers=headers)


OPENAI_ERRORS = OpenAIErrors()


# --- the form ------------------------------------------------------------------------------------------


async def _parse_multipart(request: Request, max_bytes: int) -> list[tuple[str, str | UploadFile]]:
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != MULTIPART:
        raise UnsupportedMediaType("Request body must be multipart/form-data", "Send OpenAI's image edit form")
    parser = MultiPartParser(
        request.headers,
        capped_stream(request, max_bytes),
        max_files=MAX_FORM_FILES,
        max_fields=MAX_FORM_FIELDS,
        max_part_size=MAX_FIELD_BYTES,
    )
    parser.spool_max_size = max_bytes  # in memory, as a JSON body: bounded by the cap and the body budget
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise InvalidRequest("Malformed multipart form", exc.message) from None
    except ValueError as exc:  # python-multipart refuses some boundaries outright
        raise InvalidRequest("Malformed multipart form", str(exc)) from None
    return list(form.multi_items())


async def _form_values(items: list[tuple[str, str | UploadFile]]) -> dict[str, Any]:
    """Form parts -> the model's input: one image's bytes, one mask's, one value per text field; closes every
    upload."""
    values: dict[str, Any] = {}
    images: list[UploadFile] = []
    mask: UploadFile | None = None
    try:
        for name, value in items:
            if name in IMAGE_FIELDS:
                if not isinstance(value, UploadFile):
                    raise OpenAIFieldError(
                        "Invalid field 'image'", "'image' must be a file part (JPEG, PNG or WebP)", param="image"
                    )
                images.append(value)
                continue
            if name == MASK_FIELD:
                if not isinstance(value, UploadFile):
                    raise OpenAIFieldError(
                        "Invalid field 'mask'", "'mask' must be a file part (a PNG with an alpha channel)", param="mask"
                    )
                if mask is not None:
                    raise OpenAIFieldError("Invalid field 'mask'", "One mask per request", param="mask")
                mask = value
                continue
            if name in UNSUPPORTED:
                raise OpenAIFieldError(f"Unsupported field '{name}'", UNSUPPORTED[name], param=name)
            if name not in FORM_FIELDS:
                raise OpenAIFieldError(
                    f"Unknown field '{name}'", f"Allowed fields: {', '.join(FORM_FIELDS)}", param=name
                )
            if isinstance(value, UploadFile):
                raise OpenAIFieldError(f"Invalid field '{name}'", f"'{name}' must be a text value", param=name)
            if name in values:
                raise OpenAIFieldError(f"Invalid field '{name}'", f"'{name}' is given more than once", param=name)
            values[name] = value
        if len(images) > 1:
            raise OpenAIFieldError("Too many images", f"One image per request; {len(images)} were sent", param="image")
        if images:
            values["image"] = await images[0].read()
        if mask is not None:
            values["mask"] = await mask.read()
        return values
    finally:
        for _, value in items:
            if isinstance(value, UploadFile):
                await value.close()


def _form_error(error: ValidationError) -> OpenAIFieldError:
    problem = error.errors(include_url=False, include_input=False)[0]
    field = str(problem["loc"][0]) if problem["loc"] else "form"
    if problem["type"] == "missing":
        return OpenAIFieldError(f"Missing required field '{field}'", f"'{field}' is required", param=field)
    if field in ONLY_VALUE:
        rule = f"'{field}' must be '{ONLY_VALUE[field]}' (or omitted): other values are not supported"
    else:
        rule = f"'{field}': {problem['msg']}"
    return OpenAIFieldError(f"Invalid field '{field}'", rule, param=field)


async def read_edit_form(request: Request, max_bytes: int) -> ImageEditForm:
    """The request's form, bounded and typed; every problem is a 4xx naming the field."""
    values = await _form_values(await _parse_multipart(request, max_bytes))
    try:
        return ImageEditForm.model_validate(values)
    except ValidationError as error:
        raise _form_error(error) from None


# --- the native request ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    """What an upload's header says: its upright size, and whether it has an alpha channel."""

    size: tuple[int, int]
    alpha: bool


def _header(data: bytes) -> Header | None:
    """Upright width and height (EXIF orientation applied, as `codecs.decode_image` does) and whether there is
    alpha (an alpha band or a transparency entry, as `codecs` reads it) from the header alone; None when
    unreadable (CreateJob decodes the image and reports it)."""
    try:
        with Image.open(io.BytesIO(data), formats=codecs.SUPPORTED_FORMATS) as img:
            width, height = img.size
            transposed = img.getexif().get(ExifTags.Base.Orientation) in TRANSPOSING_ORIENTATIONS
            alpha = "A" in img.getbands() or "transparency" in img.info
    except Exception:  # any decoder complaint: the native path answers it properly
        return None
    return Header((height, width) if transposed else (width, height), alpha)


def _header_size(data: bytes) -> tuple[int, int] | None:
    header = _header(data)
    return None if header is None else header.size


async def check_size(form: ImageEditForm, pipelines: Mapping[str, Img2ImgPipeline]) -> None:
    """`size` must be `auto` or what the model answers: it is not a knob here (the native API has none)."""
    if form.size is None or form.size == AUTO:
        return
    wanted = SIZE.fullmatch(form.size)
    if wanted is None:
        raise OpenAIFieldError("Invalid field 'size'", "'size' must be 'auto' or WIDTHxHEIGHT", param="size")
    pipeline = pipelines.get(form.model or DEFAULT_MODEL)
    dims = None if pipeline is None else await run_image_work(_header_size, form.image)
    if pipeline is None or dims is None:
        return  # an unknown model or an unreadable image: CreateJob answers with the native error
    manifest = pipeline.manifest
    width, height = codecs.fit_to_grid(*dims, manifest.native_resolution, manifest.grid)
    if (int(wanted.group("width")), int(wanted.group("height"))) != (width, height):
        raise OpenAIFieldError(
            f"Unsupported size '{form.size}'",
            f"'{manifest.name}' answers {width}x{height} for this {dims[0]}x{dims[1]} image (its native "
            f"{manifest.native_resolution} px on the longer side, aspect ratio kept): send size={width}x{height} "
            "or 'auto', or omit it",
            param="size",
        )


def mask_problem(image: bytes, mask: bytes) -> OpenAIFieldError | None:
    """OpenAI's rules for the mask, from the headers: the image's upright dimensions, and an alpha channel. None
    when they hold, or when either header is unreadable (admission decodes both and names the field)."""
    mask_header = _header(mask)
    if mask_header is None:
        return None
    image_header = _header(image)
    if image_header is not None and mask_header.size != image_header.size:
        (mw, mh), (iw, ih) = mask_header.size, image_header.size
        return OpenAIFieldError(
            "Invalid field 'mask'",
            f"The mask is {mw}x{mh}, the image {iw}x{ih}: the mask must have the image's dimensions",
            param="mask",
        )
    if not mask_header.alpha:
        return OpenAIFieldError(
            "Invalid field 'mask'",
            "The mask has no alpha channel: send a PNG whose fully transparent pixels mark the area to change",
            param="mask",
        )
    return None


async def check_mask(form: ImageEditForm, pipelines: Mapping[str, Img2ImgPipeline]) -> None:
    """A mask must have the image's dimensions and an alpha channel (OpenAI's rules; the native route is laxer).
    An unknown model is CreateJob's 404 first, as on the native route."""
    if form.mask is None or (form.model or DEFAULT_MODEL) not in pipelines:
        return
    problem = await run_image_work(mask_problem, form.image, form.mask)
    if problem is not None:
        raise problem


def native_fields(form: ImageEditForm) -> dict[str, Any]:
    """The native request's fields of this form, the upload as bytes: what admission parses for either route."""
    fields: dict[str, Any] = {"image": form.image}
    if form.mask is not None:  # as uploaded: the native alpha rule is OpenAI's
        fields["mask"] = form.mask
    for name in PASSED_THROUGH:
        value = getattr(form, name)
        if value is not None:
            fields[name] = value
    if form.n is not None:
        fields["num_images"] = form.n
    if form.loras is not None:  # a form field is text: the adapters come as JSON, checked as the native field
        try:
            fields["loras"] = json.loads(form.loras)
        except ValueError:
            raise OpenAIFieldError(
                "Invalid field 'loras'", '\'loras\' must be JSON: a list of {"name", "scale"} objects', param="loras"
            ) from None
    return fields


@dataclass(frozen=True)
class ImageEdit:
    """A read edit request: the form (for the answer) and the native request's fields (for admission)."""

    form: ImageEditForm
    fields: dict[str, Any]


async def read_edit(request: Request, max_bytes: int, pipelines: Mapping[str, Img2ImgPipeline]) -> ImageEdit:
    """The form, checked, as the native request's fields."""
    form = await read_edit_form(request, max_bytes)
    await check_size(form, pipelines)
    await check_mask(form, pipelines)
    return ImageEdit(form, native_fields(form))


# --- the response ---------------------------------------------------------------------------------------


async def _read_all(storage: Storage, name: str) -> bytes:
    found = await storage.open(name)
    if found is None:
        raise NotFound("Image not found", f"No stored image named '{name}'")
    return b"".join([chunk async for chunk in found.chunks])


async def render_edit(job: Job, response_format: ResponseFormat, storage: Storage) -> Response:
    """A finished job in OpenAI's shape: its images as URLs or base64, or its error in OpenAI's error shape."""
    headers = {"Location": f"/v1/image-to-image/{job.id}"}
    if job.status == FAILED and job.error is not None:
        return OPENAI_ERRORS.render_stored(job.error.code, job.error.message, job.error.details, headers)
    if job.status != COMPLETED:
        raise JobFinished(f"Job {job.status}", f"Job {job.id} ended {job.status}")
    data = [
        ImageData(b64_json=base64.b64encode(await _read_all(storage, image.name)).decode("ascii"))
        if response_format == "b64_json"
        else ImageData(url=image.url)
        for image in job.images
    ]
    size = job.spec.processed_size
    body = ImagesResponse(
        created=int(datetime.fromisoformat(job.created_at).timestamp()),
        data=data,
        size=f"{size.width}x{size.height}",
        output_format=job.spec.output_format,
    )
    return JSONResponse(body.model_dump(mode="json", exclude_none=True), headers=headers)
