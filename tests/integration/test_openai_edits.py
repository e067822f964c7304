"""Issue 13: the official `openai` SDK, unchanged, against the real gateway and Triton: `POST /v1/images/edits`.

The SDK's images equal the native API's byte for byte: both routes build the same native request and run the same
job (same recipe, seeds `seed + i`, same PNG encoder), and the outputs are PNG files read back from storage, so
there is no re-encoding on either side that could differ.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers import data_uri, make_image
from tests.integration.conftest import API_KEY

pytestmark = pytest.mark.integration

PARAMS = {"strength": 0.6, "steps": 8, "seed": 7}
PROMPT = "a watercolor lighthouse"
TIMEOUT_S = 120.0


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
    body = {"image": data_uri(input_png.read_bytes()), "prompt": PROMPT, "num_images": 2, **PARAMS}
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
    with input_png.open("rb") as image, input_png.open("rb") as mask, pytest.raises(openai.BadRequestError) as raised:
        client.images.edit(image=image, mask=mask, prompt=PROMPT)
    assert raised.value.param == "mask" and "Unsupported field 'mask'" in str(raised.value)


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
    body = {"image": data_uri(input_png.read_bytes()), "prompt": PROMPT, "output_format": "jpeg", **fields}
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
