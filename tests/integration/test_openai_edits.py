"""Issue 13: the official `openai` SDK, unchanged, against the real gateway and Triton: `POST /v1/images/edits`.

The SDK's images equal the native API's byte for byte: both routes build the same native request and run the same
job (same recipe, seeds `seed + i`, same PNG encoder), and the outputs are PNG files read back from storage, so
there is no re-encoding on either side that could differ.

Issue 25: the SDK's `mask` (an RGBA PNG whose fully transparent pixels are the area to change) is the native
`mask` as uploaded: the same edit as the native request with the equivalent black-and-white mask.
"""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image, ImageDraw

from tests.helpers import data_uri, make_image
from tests.integration.conftest import API_KEY

pytestmark = pytest.mark.integration

PARAMS = {"strength": 0.6, "steps": 8, "seed": 7}
PROMPT = "a watercolor lighthouse"
TIMEOUT_S = 120.0
# The masked edit: the hole (an ellipse's box in the 96x64 input), and a blur other than the default 4 so that a
# `mask_blur` lost on the way would show.
HOLE = (12, 16, 44, 48)
MASKED = {**PARAMS, "mask_blur": 2}
PROCESSED = (128, 80)  # the size imagen-v2 answers for a 96x64 input
FAR_FROM_HOLE = (slice(None), slice(88, None))  # processed columns from 88: the hole ends at 59, blurred by ~10 px


@pytest.fixture(scope="module")
def input_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("openai") / "input.png"
    path.write_bytes(make_image(96, 64, seed=5))
    return path


@pytest.fixture(scope="module")
def client(gateway: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key=API_KEY, max_retries=0, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def native_outputs(gateway: str, auth: dict[str, str], input_png: Path) -> list[bytes]:
    """The native API's two images for the same parameters and seeds."""
    # cache: false, so the SDK's identical request below runs the model instead of reading this one's result.
    body = {"image": data_uri(input_png.read_bytes()), "prompt": PROMPT, "num_images": 2, "cache": False, **PARAMS}
    response = httpx.post(f"{gateway}/v1/image-to-image", json=body, headers=auth, timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text
    images = response.json()["images"]
    assert [image["seed"] for image in images] == [7, 8]
    return [httpx.get(image["url"], timeout=10).content for image in images]


def _jobs_completed(gateway: str) -> float:
    text = httpx.get(f"{gateway}/metrics", timeout=10).text
    found = re.search(r'^imagen_jobs_total\{status="completed"\} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_sdk_b64_json_equals_the_native_output(
    client: openai.OpenAI, gateway: str, input_png: Path, native_outputs: list[bytes]
) -> None:
    completed = _jobs_completed(gateway)
    with input_png.open("rb") as image:
        result = client.images.edit(
            model="imagen-v2", image=image, prompt=PROMPT, n=2, response_format="b64_json", extra_body=PARAMS
        )
    assert result.data is not None and len(result.data) == 2
    got = [base64.b64decode(item.b64_json or "") for item in result.data]
    assert got == native_outputs and got[0] != got[1]  # byte-equal PNGs, one per seed
    assert all(item.url is None and item.revised_prompt is None for item in result.data)
    assert result.size == "128x80" and result.output_format == "png"
    assert result.created > 0
    # The same jobs underneath: the job counter moved by one, and the request is counted under its route.
    assert _jobs_completed(gateway) == completed + 1
    assert 'route="/v1/images/edits"' in httpx.get(f"{gateway}/metrics", timeout=10).text


def test_sdk_urls_serve_the_native_output(client: openai.OpenAI, input_png: Path, native_outputs: list[bytes]) -> None:
    with input_png.open("rb") as image:
        result = client.images.edit(
            model="imagen-v2", image=image, prompt=PROMPT, n=2, response_format="url", size="auto", extra_body=PARAMS
        )
    assert result.data is not None
    urls = [item.url for item in result.data]
    assert all(url is not None and item.b64_json is None for url, item in zip(urls, result.data, strict=True))
    assert [httpx.get(str(url), timeout=10).content for url in urls] == native_outputs


def test_bad_request_raises_the_sdks_bad_request_error_with_our_message(client: openai.OpenAI, input_png: Path) -> None:
    with input_png.open("rb") as image, pytest.raises(openai.BadRequestError) as raised:
        client.images.edit(model="imagen-v2", image=image, prompt=PROMPT, n=5, extra_body=PARAMS)
    error = raised.value
    assert error.status_code == 400 and error.code == "invalid_request" and error.param == "n"
    assert isinstance(error.body, dict)
    assert error.body["message"] == "Invalid field 'n': 'n' must be an integer between 1 and 4"
    assert "Invalid field 'n'" in str(error)
    # A size the model cannot honour, and an unsupported OpenAI field, say so.
    with input_png.open("rb") as image, pytest.raises(openai.BadRequestError) as raised:
        client.images.edit(image=image, prompt=PROMPT, size="1024x1024")
    assert raised.value.param == "size" and "send size=128x80" in str(raised.value)
    with input_png.open("rb") as image, pytest.raises(openai.BadRequestError) as raised:
        client.images.edit(image=image, prompt=PROMPT, input_fidelity="high")
    assert raised.value.param == "input_fidelity" and "Unsupported field 'input_fidelity'" in str(raised.value)


def test_unknown_model_is_the_sdks_not_found_error(client: openai.OpenAI, input_png: Path) -> None:
    with input_png.open("rb") as image, pytest.raises(openai.NotFoundError) as raised:
        client.images.edit(model="gpt-image-1", image=image, prompt=PROMPT)
    assert raised.value.code == "model_not_found" and raised.value.param == "model"


def test_wrong_key_is_the_sdks_authentication_error(gateway: str, input_png: Path) -> None:
    stranger = openai.OpenAI(base_url=f"{gateway}/v1", api_key="not-a-key", max_retries=0)
    with input_png.open("rb") as image, pytest.raises(openai.AuthenticationError) as raised:
        stranger.images.edit(model="imagen-v2", image=image, prompt=PROMPT)
    assert raised.value.code == "unauthorized" and isinstance(raised.value.body, dict)
    assert raised.value.body["message"].startswith("Invalid API key")


def test_sdk_output_format_is_the_native_output_format(
    client: openai.OpenAI, gateway: str, auth: dict[str, str], input_png: Path
) -> None:
    """`output_format` (OpenAI's own parameter) and our `output_quality` reach the native job unchanged."""
    fields = {**PARAMS, "output_quality": 80}
    body = {
        "image": data_uri(input_png.read_bytes()),
        "prompt": PROMPT,
        "output_format": "jpeg",
        "cache": False,
        **fields,
    }
    response = httpx.post(f"{gateway}/v1/image-to-image", json=body, headers=auth, timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text
    (native,) = response.json()["images"]
    assert native["content_type"] == "image/jpeg"
    native_bytes = httpx.get(native["url"], timeout=10).content
    with input_png.open("rb") as image:
        result = client.images.edit(
            model="imagen-v2",
            image=image,
            prompt=PROMPT,
            response_format="b64_json",
            output_format="jpeg",
            extra_body=fields,
        )
    assert result.output_format == "jpeg" and result.data is not None
    assert base64.b64decode(result.data[0].b64_json or "") == native_bytes
    assert native_bytes[:3] == b"\xff\xd8\xff"  # a JPEG


# --- masks (issue 25) -----------------------------------------------------------------------------------


def _png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def _hole_masks(size: tuple[int, int]) -> tuple[bytes, bytes]:
    """OpenAI's mask (RGBA, opaque black, the hole fully transparent) and the native mask it means (L, 255 in
    the hole, 0 elsewhere)."""
    hole = Image.new("L", size, 0)
    ImageDraw.Draw(hole).ellipse(HOLE, fill=255)
    rgba = Image.new("RGBA", size, (0, 0, 0, 255))
    rgba.putalpha(hole.point(lambda v: 255 - v))
    return _png(rgba), _png(hole)


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as img:
        return np.asarray(img.convert("RGB"))


def _size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size


def test_sdk_mask_equals_the_native_mask_it_means(
    client: openai.OpenAI, gateway: str, auth: dict[str, str], input_png: Path, native_outputs: list[bytes]
) -> None:
    """The SDK's RGBA mask with an alpha-0 hole gives the native request's bytes with the L mask (255 in the
    hole): the alpha rule, the pass-through of `mask` and `mask_blur`, and the same job."""
    openai_mask, native_mask = _hole_masks(_size(input_png))
    # `cache: false`: the native image is computed now, never an earlier result of the same key; the SDK's
    # request has other mask bytes, so another key, and cannot be answered with this one either.
    body = {
        "image": data_uri(input_png.read_bytes()),
        "mask": data_uri(native_mask),
        "prompt": PROMPT,
        "cache": False,
        **MASKED,
    }
    response = httpx.post(f"{gateway}/v1/image-to-image", json=body, headers=auth, timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["masked"] is True and job["mask_blur"] == 2 and job["cached"] is False
    native = httpx.get(job["images"][0]["url"], timeout=10).content
    with input_png.open("rb") as image:
        result = client.images.edit(
            model="imagen-v2",
            image=image,
            mask=("mask.png", openai_mask, "image/png"),
            prompt=PROMPT,
            response_format="b64_json",
            extra_body=MASKED,
        )
    assert result.data is not None and len(result.data) == 1
    got = base64.b64decode(result.data[0].b64_json or "")
    assert got == native and result.size == "128x80"
    # The mask did something: not the unmasked edit of the same seed, and, far from the hole, exactly the input
    # at the processed size (the overlay pastes it back), where the unmasked edit changed it.
    assert got != native_outputs[0]
    with Image.open(input_png) as img:
        model_input = np.asarray(img.convert("RGB").resize(PROCESSED, Image.Resampling.LANCZOS))
    served, unmasked = _pixels(got), _pixels(native_outputs[0])
    assert np.array_equal(served[FAR_FROM_HOLE], model_input[FAR_FROM_HOLE])
    assert not np.array_equal(unmasked[FAR_FROM_HOLE], model_input[FAR_FROM_HOLE])
    centre = (slice(35, 45), slice(32, 42))  # the hole's middle, processed
    assert not np.array_equal(served[centre], model_input[centre])


def test_sdk_masks_against_openais_rules_are_bad_request_errors_naming_mask(
    client: openai.OpenAI, input_png: Path
) -> None:
    """OpenAI requires the image's dimensions and an alpha channel, before any work (the native route is laxer:
    a 48x32 mask has the image's aspect ratio, and an RGB mask is read by luminance)."""
    width, height = _size(input_png)
    half, _ = _hole_masks((width // 2, height // 2))
    opaque = _png(Image.new("RGB", (width, height), (255, 255, 255)))
    for mask, fragment in ((half, "The mask is 48x32, the image 96x64"), (opaque, "no alpha channel")):
        with input_png.open("rb") as image, pytest.raises(openai.BadRequestError) as raised:
            client.images.edit(
                model="imagen-v2", image=image, mask=("mask.png", mask, "image/png"), prompt=PROMPT, extra_body=PARAMS
            )
        error = raised.value
        assert error.status_code == 400 and error.param == "mask" and error.code == "invalid_request"
        assert fragment in str(error)
    # The model first, as on the native route: an unknown one is a 404 whatever the mask.
    with input_png.open("rb") as image, pytest.raises(openai.NotFoundError) as missing:
        client.images.edit(model="gpt-image-1", image=image, mask=("mask.png", opaque, "image/png"), prompt=PROMPT)
    assert missing.value.param == "model"
