"""Issue 13: OpenAI's image edit form -> the native request, and our errors -> OpenAI's error shape (issue 25:
the `mask` file and OpenAI's rules for it).

The form is parsed by the real `read_edit` behind a one-route Starlette app over httpx's ASGI transport (real
multipart bodies, as httpx and so the OpenAI SDK encode them); the seam is the pipelines mapping (a manifest's
native resolution and grid, for `size`) and the app, which answers the native body instead of creating a job.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest
from PIL import ExifTags, Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.app import create_app
from gateway.diffusion.img2img import Img2ImgPipeline
from gateway.diffusion.styles import STYLE_PRESETS
from gateway.errors import (
    ApiError,
    BackendUnavailable,
    ImageDimensionsTooLarge,
    ImageTooLarge,
    InvalidImage,
    InvalidRequest,
    ModelNotFound,
    Unauthorized,
    UrlNotAllowed,
)
from gateway.http.openai_compat import (
    MAX_FIELD_BYTES,
    ImageEditForm,
    mask_problem,
    openai_error_response,
    read_edit,
)
from gateway.http.ratelimit import RateLimitMiddleware
from gateway.jobs.request import MAX_NUM_IMAGES, parse_image_to_image
from gateway.media.codecs import decode_image, fit_to_grid
from gateway.settings import Settings
from tests.helpers import make_image

MAX_BODY = 256 * 1024
PNG = make_image(200, 100, seed=3)


def _mask(width: int, height: int, mode: str = "RGBA", fmt: str = "PNG", **save: Any) -> bytes:
    """A `mode` mask, opaque black but for its left half: fully transparent with alpha, else white."""
    img = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    img.paste((0, 0, 0, 0) if "A" in mode else (255, 255, 255, 255), (0, 0, width // 2, height))
    buffer = io.BytesIO()
    img.convert(mode).save(buffer, format=fmt, **save)
    return buffer.getvalue()


RGBA_MASK = _mask(200, 100)
# The size check reads the manifest's native resolution and grid only.
PIPELINES = cast(
    Mapping[str, Img2ImgPipeline],
    {"imagen-v2": SimpleNamespace(manifest=SimpleNamespace(name="imagen-v2", native_resolution=128, grid=16))},
)


async def _endpoint(request: Request) -> Response:
    try:
        edit = await read_edit(request, MAX_BODY, PIPELINES)
        parse_image_to_image(edit.fields, styles=STYLE_PRESETS)  # admission's first step, as CreateJob runs it
    except ApiError as exc:
        return openai_error_response(exc)
    body = dict(edit.fields)
    assert body.pop("image") == edit.form.image  # the upload's bytes, as they came
    mask = body.pop("mask", None)
    assert mask == edit.form.mask  # the mask's too
    if mask is not None:
        body["mask_bytes"] = len(mask)
    return JSONResponse({"native": body, "response_format": edit.form.response_format})


APP = Starlette(routes=[Route("/v1/images/edits", _endpoint, methods=["POST"])])


async def _post(
    data: dict[str, Any] | None = None,
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None,
    **kwargs: Any,
) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(APP), base_url="http://t") as http:
        if files is None and "content" not in kwargs:
            files = [("image", ("input.png", PNG, "image/png"))]
        return await http.post("/v1/images/edits", data=data, files=files, **kwargs)


def _error(response: httpx.Response, status: int, param: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    return error


async def test_the_form_becomes_the_native_body_with_numbers_parsed() -> None:
    form = {
        "prompt": "a fox",
        "model": "imagen-v2",
        "n": "2",
        "size": "128x64",
        "response_format": "b64_json",
        "user": "end-user-1",
        "quality": "auto",
        "strength": "0.6",
        "steps": "8",
        "seed": "7",
        "guidance_scale": "1",
        "negative_prompt": "blur",
        "style": "anime",
    }
    response = await _post(form)
    assert response.status_code == 200, response.text
    native = response.json()["native"]
    assert native == {
        "prompt": "a fox",
        "model": "imagen-v2",
        "num_images": 2,
        "strength": 0.6,
        "steps": 8,
        "seed": 7,
        "guidance_scale": 1.0,
        "negative_prompt": "blur",
        "style": "anime",
    }
    assert response.json()["response_format"] == "b64_json"
    # Exactly what the native route would validate: same request, types included.
    request = parse_image_to_image({**native, "image": "AAAA"}, styles=STYLE_PRESETS)
    assert (request.num_images, request.steps, request.strength) == (2, 8, 0.6)


async def test_the_sdks_image_array_of_one_is_the_image_and_defaults_are_left_to_the_native_request() -> None:
    response = await _post({"prompt": "a fox"}, files=[("image[]", ("a.png", PNG, "image/png"))])
    assert response.status_code == 200, response.text
    assert response.json() == {"native": {"prompt": "a fox"}, "response_format": "url"}


async def test_n_over_the_limit_is_the_native_rule_under_openais_name() -> None:
    error = _error(await _post({"prompt": "a fox", "n": str(MAX_NUM_IMAGES + 1)}), 400, "n")
    assert error["code"] == "invalid_request" and error["type"] == "invalid_request_error"
    assert error["message"] == f"Invalid field 'n': 'n' must be an integer between 1 and {MAX_NUM_IMAGES}"


@pytest.mark.parametrize(
    ("data", "files", "param", "fragment"),
    [
        ({"prompt": "x"}, [("image[]", ("a.png", PNG, "image/png"))] * 2, "image", "One image per request"),
        ({"prompt": "x", "markup": "x"}, None, "markup", "Unsupported field 'markup'"),
        ({"prompt": "x", "input_fidelity": "high"}, None, "input_fidelity", "Unsupported field"),
        ({"prompt": "x", "quality": "high"}, None, "quality", "'quality' must be 'auto'"),
        ({"prompt": "x", "background": "transparent"}, None, "background", "'background' must be 'auto'"),
        ({"prompt": "x", "webhook_url": "https://a.example/"}, None, "webhook_url", "Unknown field 'webhook_url'"),
        ({"prompt": "x", "steps": "8.5"}, None, "steps", "Invalid field 'steps'"),
        ({"prompt": "x", "strength": "nan"}, None, "strength", "Invalid field 'strength'"),
        ({"prompt": "x", "response_format": "jpeg"}, None, "response_format", "Invalid field 'response_format'"),
        ({"prompt": "x", "size": "1024x1024"}, None, "size", "answers 128x64 for this 200x100 image"),
        ({"prompt": "x", "size": "big"}, None, "size", "'size' must be 'auto' or WIDTHxHEIGHT"),
        ({"prompt": "x"}, [("prompt", ("p.txt", b"x", "text/plain"))], "prompt", "must be a text value"),
        ({"prompt": " "}, None, "prompt", "Invalid field 'prompt'"),
        ({"prompt": "x", "steps": "1", "strength": "0.5"}, None, "steps", "'steps' x 'strength'"),
        ({"n": "1"}, None, "prompt", "Missing required field 'prompt'"),
        ({"prompt": "x"}, [("n", (None, b"1"))], "image", "Missing required field 'image'"),  # multipart, no file
        ({"prompt": "x"}, [("image", ("a.png", b"x" * MAX_BODY, "image/png"))], None, "Request body too large"),
        ({"prompt": "x" * (MAX_FIELD_BYTES + 1)}, None, None, "Part exceeded maximum size"),
    ],
)
async def test_bad_forms_get_a_400_naming_the_field(
    data: dict[str, Any], files: list[Any] | None, param: str | None, fragment: str
) -> None:
    response = await _post(data, files=files)
    status = 413 if "too large" in fragment else 400
    assert fragment in _error(response, status, param)["message"]


async def test_a_json_body_is_refused_with_415() -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(APP), base_url="http://t") as http:
        response = await http.post("/v1/images/edits", json={"prompt": "x"})
    assert "multipart/form-data" in _error(response, 415, None)["message"]


@pytest.mark.parametrize(
    ("exc", "status", "param", "kind"),
    [
        (InvalidImage("Unable to process the provided image", "corrupt"), 400, "image", "invalid_request_error"),
        (ModelNotFound("Model 'gpt-image-1' not found", "Available models: imagen-v2"), 404, "model", None),
        (InvalidRequest("Invalid field 'seed'", "'seed' must be an integer"), 400, "seed", None),
        (BackendUnavailable("Inference backend unavailable", None), 503, None, "server_error"),
        # The field a message names comes first: admission's mask errors keep the image's classes.
        (InvalidImage("Invalid field 'mask': Unable to process the provided image", "corrupt"), 400, "mask", None),
        (ImageTooLarge("Invalid field 'mask': Image exceeds the maximum size", "10 MB"), 413, "mask", None),
        (ImageDimensionsTooLarge("Invalid field 'mask': Image dimensions exceed", "2048x2048"), 400, "mask", None),
        (UrlNotAllowed("Invalid field 'mask': URL not allowed", "private address"), 400, "mask", None),
        (InvalidRequest("Invalid field 'num_images'", "'num_images' must be an integer"), 400, "n", None),
        (ImageTooLarge("Image exceeds the maximum size", "10 MB"), 413, "image", None),
    ],
)
def test_native_errors_in_openais_shape(exc: ApiError, status: int, param: str | None, kind: str | None) -> None:
    response = openai_error_response(exc)
    body = response.body.decode()
    assert response.status_code == status
    error = httpx.Response(status, content=body).json()["error"]
    assert error["param"] == param
    expected = f"{exc.message}: {exc.details}" if exc.details else exc.message
    assert error["message"] == expected.replace("'num_images'", "'n'")  # OpenAI's names in the text too
    assert error["type"] == (kind or "invalid_request_error")


def test_unauthorized_keeps_its_challenge_header() -> None:
    response = openai_error_response(Unauthorized("Invalid API key", "Send 'Authorization: Bearer <API key>'"))
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"


def test_form_schema_has_no_nulls() -> None:
    """Multipart fields are sent or omitted: the document never says a form field may be null."""
    schema = ImageEditForm.model_json_schema()
    for name, prop in schema["properties"].items():
        assert prop.get("type") != "null" and not isinstance(prop.get("type"), list), name
        assert "default" not in prop or prop["default"] is not None, name
    assert schema["required"] == ["image", "prompt"]


async def test_the_request_rate_limit_counts_edits_with_native_creations() -> None:
    """One bucket per key for both ways of creating a job: a native creation uses up what an edit would get."""
    limited = RateLimitMiddleware(APP, per_minute=1, burst=1, key_fn=lambda scope: "one-key")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(limited), base_url="http://t") as http:
        first = await http.post("/v1/image-to-image", json={})  # no such route here: 404, but the token is taken
        second = await http.post(
            "/v1/images/edits", data={"prompt": "x"}, files=[("image", ("a.png", PNG, "image/png"))]
        )
    assert first.status_code == 404
    assert second.status_code == 429 and "Retry-After" in second.headers


def _rotated_jpeg() -> bytes:
    """200x100 pixels stored, EXIF orientation 6 (rotate 90 degrees): 100x200 upright."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    buffer = io.BytesIO()
    Image.open(io.BytesIO(make_image(200, 100, seed=4))).save(buffer, format="JPEG", exif=exif)
    return buffer.getvalue()


@pytest.mark.parametrize(("size", "status"), [("64x128", 200), ("128x64", 400)])
async def test_size_follows_the_upright_image(size: str, status: int) -> None:
    """The size the job runs at is the upright image's (EXIF orientation applied), and so is the check."""
    jpeg = _rotated_jpeg()
    response = await _post({"prompt": "x", "size": size}, files=[("image", ("r.jpg", jpeg, "image/jpeg"))])
    assert response.status_code == status, response.text
    upright = decode_image(jpeg)
    assert fit_to_grid(upright.width, upright.height, 128, 16) == (64, 128)


async def test_the_edits_path_is_its_own_route_for_every_method(tmp_path: Path) -> None:
    """`GET /v1/images/edits` is the edits route's 405 (`Allow: POST`), not an image named `edits`."""
    app = create_app(Settings(model_repository=tmp_path, storage_dir=tmp_path, jobs_db=tmp_path / "jobs.sqlite3"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as http:
        for method in ("GET", "DELETE"):
            response = await http.request(method, "/v1/images/edits")
            assert response.status_code == 405 and response.headers["allow"] == "POST", method
        allow = (await http.post("/v1/images/a.png")).headers["allow"]
        assert set(allow.split(", ")) == {"GET", "HEAD"}  # Starlette builds the header from a set: any order


# --- the mask (issue 25) --------------------------------------------------------------------------------


async def test_a_mask_file_is_the_native_mask_as_uploaded_with_mask_blur_passed_through() -> None:
    files = [("image", ("input.png", PNG, "image/png")), ("mask", ("mask.png", RGBA_MASK, "image/png"))]
    response = await _post({"prompt": "a fox", "mask_blur": "8"}, files=files)
    assert response.status_code == 200, response.text
    # The endpoint checked the bytes are the upload's; the native request validated them (a bytes mask).
    assert response.json()["native"] == {"prompt": "a fox", "mask_blur": 8, "mask_bytes": len(RGBA_MASK)}


@pytest.mark.parametrize(
    "mask",
    [
        _mask(200, 100, "LA"),
        _mask(200, 100, "P", transparency=0),  # a palette PNG with a transparent entry (tRNS)
        _mask(200, 100, "RGBA", "WEBP", lossless=True),
        b"not an image",  # an unreadable header is admission's (`Invalid field 'mask': ...`), not this check's
    ],
    ids=["LA", "P-tRNS", "WebP-RGBA", "unreadable"],
)
async def test_masks_with_alpha_of_the_images_size_pass_the_openai_checks(mask: bytes) -> None:
    files = [("image", ("input.png", PNG, "image/png")), ("mask", ("m", mask, "application/octet-stream"))]
    response = await _post({"prompt": "x"}, files=files)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("data", "files", "param", "fragment"),
    [
        ({}, [("mask", ("m.png", _mask(100, 50), "image/png"))], "mask", "The mask is 100x50, the image 200x100"),
        ({}, [("mask", ("m.png", _mask(201, 100), "image/png"))], "mask", "must have the image's dimensions"),
        ({}, [("mask", ("m.png", _mask(200, 100, "RGB"), "image/png"))], "mask", "The mask has no alpha channel"),
        ({}, [("mask", ("m.png", _mask(200, 100, "L"), "image/png"))], "mask", "no alpha channel"),
        ({}, [("mask", ("m.jpg", _mask(200, 100, "RGB", "JPEG"), "image/jpeg"))], "mask", "no alpha channel"),
        ({"mask": "aGVsbG8="}, [], "mask", "'mask' must be a file part"),
        ({}, [("mask", ("m.png", RGBA_MASK, "image/png"))] * 2, "mask", "One mask per request"),
        ({"mask_blur": "4"}, [], "mask_blur", "'mask_blur' applies only with a 'mask'"),
        ({"mask_blur": "65"}, [("mask", ("m.png", RGBA_MASK, "image/png"))], "mask_blur", "Invalid field 'mask_blur'"),
        ({}, [("mask", ("m.png", b"", "image/png"))], "mask", "Invalid field 'mask'"),
    ],
)
async def test_bad_masks_get_a_400_naming_the_field(
    data: dict[str, Any], files: list[Any], param: str, fragment: str
) -> None:
    response = await _post({"prompt": "x", **data}, files=[("image", ("input.png", PNG, "image/png")), *files])
    assert fragment in _error(response, 400, param)["message"]


@pytest.mark.parametrize(("size", "status"), [((100, 200), 200), ((200, 100), 400)])
async def test_the_mask_must_have_the_upright_images_size(size: tuple[int, int], status: int) -> None:
    """The image is 200x100 stored, 100x200 upright (EXIF orientation 6): the mask is compared upright."""
    files = [("image", ("r.jpg", _rotated_jpeg(), "image/jpeg")), ("mask", ("m.png", _mask(*size), "image/png"))]
    response = await _post({"prompt": "x"}, files=files)
    assert response.status_code == status, response.text


async def test_with_an_unknown_model_the_mask_is_left_to_create_job() -> None:
    """As on the native route (and as `size`): CreateJob's 404 for the model comes before any look at the mask
    (this app stops before CreateJob, so the form goes through)."""
    files = [("image", ("input.png", PNG, "image/png")), ("mask", ("m.png", _mask(10, 10, "RGB"), "image/png"))]
    response = await _post({"prompt": "x", "model": "gpt-image-1"}, files=files)
    assert response.status_code == 200, response.text


def test_mask_problem_reads_headers_only_and_leaves_unreadable_ones_to_admission() -> None:
    assert mask_problem(PNG, RGBA_MASK) is None
    assert mask_problem(b"not an image", RGBA_MASK) is None  # the image's error is admission's; alpha was fine
    problem = mask_problem(b"not an image", _mask(10, 10, "RGB"))
    assert problem is not None and problem.param == "mask" and "no alpha channel" in str(problem.details)
    assert mask_problem(PNG, RGBA_MASK[:20]) is None  # no complete header: admission's `Invalid field 'mask'`
    problem = mask_problem(PNG, _mask(100, 50))
    assert problem is not None and problem.param == "mask" and problem.details is not None
    assert "100x50" in problem.details and "200x100" in problem.details
