"""`output_format` / `output_quality` and `scheduler` through the real gateway, Triton and storage.

One request per format with the same seed: the JPEG and WebP bytes decode to the PNG result's pixels within the
lossy codec's error at the quality used (tolerances below), carry the right content type and extension where
stored and where served, `sha256` is the digest of the served bytes (sync response, job view and webhook
body alike), and bad values are 400 in the spec's error shape.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from gateway.diffusion.schedulers import SCHEDULER_NAMES
from tests.helpers import data_uri, make_image, serving_http
from tests.unit.test_output_encoding import _jpeg_markers, _png_chunks, _webp_chunks

pytestmark = pytest.mark.integration

# Against the PNG of the same request (exact pixels), compared in YCbCr, the space both codecs work in: luma at
# full resolution, chroma averaged over 2x2 blocks, since both store chroma at half resolution (4:2:0; lossy
# WebP has no other mode). Per (format, quality): (luma mean levels of 255, luma PSNR dB, chroma mean, chroma
# PSNR). The tiny random model's 128x128 outputs are noisy down to single pixels, about the hardest content
# for a lossy codec; observed: JPEG q90 luma 2.8 / 37.1 dB, chroma 4.5 / 32.4 dB; WebP q75 luma 3.8 / 34.5 dB,
# chroma 5.0 / 31.5 dB (RGB per pixel: mean 12-13 levels, all of it chroma subsampling: at q100 it is 12 too).
TOLERANCE: dict[tuple[str, int], tuple[float, float, float, float]] = {
    ("jpeg", 90): (4.0, 34.0, 6.5, 30.0),
    ("webp", 75): (5.0, 32.0, 7.0, 29.0),
}
SIGNATURES = {"image/png": b"\x89PNG\r\n\x1a\n", "image/jpeg": b"\xff\xd8\xff", "image/webp": b"RIFF"}
EXTENSIONS = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}


def _body(**extra: Any) -> dict[str, Any]:
    return {
        "image": data_uri(make_image(64, 64, seed=3, fmt="PNG")),
        "prompt": "a lighthouse at dusk",
        "model": "imagen-v2",
        "strength": 0.5,
        "steps": 4,
        "seed": 77,
        **extra,
    }


def _served(image: dict[str, Any]) -> bytes:
    """GET the image; check its content type, extension, signature, digest and that it has no metadata."""
    response = httpx.get(image["url"], timeout=30)
    assert response.status_code == 200
    content_type = image["content_type"]
    assert response.headers["content-type"] == content_type
    assert image["url"].endswith(EXTENSIONS[content_type])
    data = response.content
    assert data.startswith(SIGNATURES[content_type])
    assert image["sha256"] == hashlib.sha256(data).hexdigest()
    if content_type == "image/png":
        assert _png_chunks(data) == [b"IHDR", b"IDAT", b"IEND"]
    elif content_type == "image/jpeg":
        assert set(_jpeg_markers(data)) <= {0xE0, 0xDB, 0xC0, 0xC4, 0xDA}
    else:
        assert _webp_chunks(data) == [b"VP8 "]
    return data


def _ycbcr(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(luma [H, W], chroma averaged over 2x2 blocks [H/2, W/2, 2]) as float64."""
    ycc = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").convert("YCbCr"), dtype=np.float64)
    height, width = ycc.shape[:2]
    chroma = ycc[..., 1:].reshape(height // 2, 2, width // 2, 2, 2).mean(axis=(1, 3))
    return ycc[..., 0], chroma


def _error(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean absolute difference and PSNR (dB, peak 255)."""
    diff = np.abs(a - b)
    return float(diff.mean()), float(10 * np.log10(255**2 / np.mean(diff**2)))


def _generate(gateway: str, auth: dict[str, str], **extra: Any) -> dict[str, Any]:
    response = httpx.post(f"{gateway}/v1/image-to-image", json=_body(**extra), headers=auth, timeout=120)
    assert response.status_code == 200, response.text
    payload: dict[str, Any] = response.json()
    return payload


def test_formats_decode_to_the_png_pixels(gateway: str, auth: dict[str, str]) -> None:
    png = _generate(gateway, auth)
    assert (png["output_format"], png["output_quality"]) == ("png", None)
    assert png["images"][0]["content_type"] == "image/png"
    luma, chroma = _ycbcr(_served(png["images"][0]))
    assert luma.std() > 1.0 and chroma.std() > 1.0  # not a flat image: the comparison means something
    for (fmt, quality), (luma_mean, luma_psnr, chroma_mean, chroma_psnr) in TOLERANCE.items():
        extra: dict[str, Any] = {"output_format": fmt}
        if quality != 90:  # 90 is the default: the first case checks it is filled in
            extra["output_quality"] = quality
        job = _generate(gateway, auth, **extra)
        assert (job["output_format"], job["output_quality"]) == (fmt, quality)
        image = job["images"][0]
        assert image["content_type"] == f"image/{fmt}" and image["seed"] == png["images"][0]["seed"]
        lossy_luma, lossy_chroma = _ycbcr(_served(image))
        (y_mean, y_psnr), (c_mean, c_psnr) = _error(lossy_luma, luma), _error(lossy_chroma, chroma)
        assert y_mean <= luma_mean and y_psnr >= luma_psnr, (fmt, quality, y_mean, y_psnr)
        assert c_mean <= chroma_mean and c_psnr >= chroma_psnr, (fmt, quality, c_mean, c_psnr)
        # The job view says the same as the synchronous response.
        view = httpx.get(f"{gateway}/v1/image-to-image/{job['id']}", headers=auth, timeout=30).json()
        assert view["images"] == job["images"] and view["output_format"] == fmt


@pytest.fixture
def webhook_receiver() -> Iterator[tuple[str, list[bytes], threading.Event]]:
    calls: list[bytes] = []
    got = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            calls.append(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
            self.send_response(204)
            self.end_headers()
            got.set()

        def log_message(self, *args: object) -> None:
            pass

    with serving_http(Handler, "127.0.0.2") as base:
        yield f"{base}/hook", calls, got


def test_webhook_body_carries_content_type_and_digest(
    gateway: str, auth: dict[str, str], webhook_receiver: tuple[str, list[bytes], threading.Event]
) -> None:
    url, calls, got = webhook_receiver
    response = httpx.post(
        f"{gateway}/v1/image-to-image",
        json=_body(output_format="webp", output_quality=60, scheduler="EulerDiscreteScheduler", webhook_url=url),
        headers=auth,
        timeout=30,
    )
    assert response.status_code == 202, response.text
    assert response.json()["scheduler"] == "euler"  # the class name is stored as its short name
    assert got.wait(120), "no webhook delivery"
    delivered = json.loads(calls[0])
    assert delivered["status"] == "completed" and delivered["output_quality"] == 60
    _served(delivered["images"][0])
    assert delivered["images"][0]["content_type"] == "image/webp"


@pytest.mark.parametrize(
    ("extra", "field", "details"),
    [
        ({"output_quality": 0}, "output_quality", "between 1 and 100"),
        ({"output_format": "jpeg", "output_quality": 101}, "output_quality", "between 1 and 100"),
        ({"output_format": "webp", "output_quality": 50.5}, "output_quality", "between 1 and 100"),
        ({"output_quality": 80}, "output_quality", "jpeg and webp only"),
        ({"output_format": "png", "output_quality": 80}, "output_quality", "jpeg and webp only"),
        ({"output_format": "gif"}, "output_format", "png, jpeg, webp"),
        ({"output_format": "JPG"}, "output_format", "png, jpeg, webp"),
        ({"scheduler": "lms"}, "scheduler", ", ".join(SCHEDULER_NAMES)),
        ({"scheduler": ""}, "scheduler", "non-empty string"),
        # PNDM swapped onto an Euler config would run PRK steps, which the port lacks: not offered for v3.
        ({"model": "imagen-v3", "scheduler": "pndm"}, "scheduler", "euler, euler_ancestral, dpmpp_2m, ddim "),
    ],
)
def test_bad_values_are_400(
    gateway: str, auth: dict[str, str], extra: dict[str, Any], field: str, details: str
) -> None:
    response = httpx.post(f"{gateway}/v1/image-to-image", json=_body(**extra), headers=auth, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(response.json()) == {"error"} and set(error) == {"code", "message", "details"}
    assert error["code"] == "invalid_request" and error["message"] == f"Invalid field '{field}'"
    assert details in error["details"], error["details"]


def test_models_list_schedulers_and_formats(gateway: str, auth: dict[str, str]) -> None:
    models = httpx.get(f"{gateway}/v1/models", headers=auth, timeout=30).json()
    by_id = {m["id"]: m for m in models["data"]}
    assert by_id["imagen-v2"]["default_scheduler"] == "pndm"
    assert by_id["imagen-v2"]["schedulers"] == list(SCHEDULER_NAMES)
    assert by_id["imagen-v3"]["default_scheduler"] == "euler"
    assert by_id["imagen-v3"]["schedulers"] == ["euler", "euler_ancestral", "dpmpp_2m", "ddim"]
    assert models["limits"]["output_format"] == {"type": "string", "enum": ["png", "jpeg", "webp"], "default": "png"}
    assert models["limits"]["output_quality"]["default_by_format"] == {"jpeg": 90, "webp": 90}
