"""Issue 3: the API contract end to end — real gateway, real Triton, real HTTP on loopback."""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import threading
from collections.abc import Iterator
from typing import Any, ClassVar

import httpx
import numpy as np
import pytest
from PIL import Image

from gateway.triton.server import TritonServer
from tests.helpers import SPEC_EXAMPLE, data_uri, make_image, model_counts

pytestmark = pytest.mark.integration

SPEC_FIELDS = {
    "id", "status", "prompt", "negative_prompt", "model", "strength", "steps", "guidance_scale", "seed", "style",
    "created_at", "completed_at", "original_image", "images",
}  # fmt: skip


class _Files(http.server.BaseHTTPRequestHandler):
    files: ClassVar[dict[str, tuple[bytes, str]]] = {}

    def do_GET(self) -> None:
        found = self.files.get(self.path)
        if found is None:
            self.send_error(404)
            return
        body, content_type = found
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # the gateway hangs up on purpose on oversized bodies


@pytest.fixture(scope="module")
def file_server() -> Iterator[str]:
    """A local image host on loopback: the 'https://example.com/input-image.jpg' of the spec."""
    _Files.files = {
        "/input-image.jpg": (make_image(1024, 1024, seed=2, fmt="JPEG"), "image/jpeg"),
        "/not-an-image.jpg": (b"<html>hello</html>", "image/jpeg"),
        "/huge.png": (b"\x89PNG\r\n\x1a\n" + b"\0" * (10 * 1024 * 1024 + 10), "image/png"),
    }
    # 127.0.0.2: the one loopback host the test gateways allow for outbound calls (everything private is refused).
    server = _QuietServer(("127.0.0.2", 0), _Files)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.2:{server.server_address[1]}"
    server.shutdown()


def spec_example(image: str, **overrides: Any) -> dict[str, Any]:
    """The spec's example request body, verbatim but for the image."""
    body = {
        "image": image,
        **SPEC_EXAMPLE,
    }
    body.update(overrides)
    return body


def post(gateway: str, body: Any, headers: dict[str, str], **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{gateway}/v1/image-to-image", json=body, headers=headers, timeout=120, **kwargs)


def fetch_png(url: str) -> tuple[bytes, Image.Image]:
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "PNG"
    return response.content, image


def check_spec_response(payload: dict[str, Any], body: dict[str, Any]) -> None:
    assert set(payload) >= SPEC_FIELDS, SPEC_FIELDS - set(payload)
    assert payload["status"] == "completed" and payload["id"].startswith("img_transform_")
    for field in ("prompt", "negative_prompt", "model", "strength", "steps", "guidance_scale", "style"):
        assert payload[field] == body[field], field
    assert isinstance(payload["seed"], int)
    assert payload["created_at"].endswith("Z") and payload["completed_at"] >= payload["created_at"]
    assert len(payload["images"]) == body["num_images"]
    pngs = []
    for image in payload["images"]:
        data, decoded = fetch_png(image["url"])
        assert decoded.size == (image["width"], image["height"])
        pngs.append(data)
    assert len(set(pngs)) == len(pngs), "num_images variations must differ"


def test_spec_example_with_base64_image(gateway: str, auth: dict[str, str]) -> None:
    source = make_image(1024, 768, seed=1, fmt="JPEG")
    body = spec_example(data_uri(source, "image/jpeg"))
    response = post(gateway, body, auth)
    assert response.status_code == 200, response.text
    payload = response.json()
    check_spec_response(payload, body)
    # 1024x768 -> longer side to the native 128, each side to the nearest multiple of the grid (16): 128x96.
    assert {(i["width"], i["height"]) for i in payload["images"]} == {(128, 96)}
    original = payload["original_image"]
    assert (original["width"], original["height"]) == (1024, 768)
    assert httpx.get(original["url"]).status_code == 401  # inputs are served only to the key that sent them
    stored = httpx.get(original["url"], headers=auth)  # a stored copy of the base64 input, byte for byte
    assert stored.status_code == 200 and stored.headers["content-type"] == "image/jpeg"
    assert stored.content == source


def test_spec_example_with_image_url(gateway: str, auth: dict[str, str], file_server: str) -> None:
    url = f"{file_server}/input-image.jpg"
    body = spec_example(url)
    response = post(gateway, body, auth)
    assert response.status_code == 200, response.text
    payload = response.json()
    check_spec_response(payload, body)
    assert payload["original_image"] == {"url": url, "width": 1024, "height": 1024}
    assert {(i["width"], i["height"]) for i in payload["images"]} == {(128, 128)}


def test_bare_base64_and_default_model(gateway: str, auth: dict[str, str]) -> None:
    raw = base64.b64encode(make_image(64, 64, fmt="WEBP")).decode()
    response = post(gateway, {"image": raw, "prompt": "a cat", "steps": 4}, auth)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert payload["model"] == "imagen-v2" and payload["strength"] == 0.7 and payload["guidance_scale"] == 7.5
    assert payload["style"] is None and payload["negative_prompt"] is None
    assert payload["effective_steps"] == 2  # int(4 * 0.7), as diffusers computes it


def test_same_seed_alone_gives_identical_png_bytes(gateway: str, auth: dict[str, str]) -> None:
    body = {"image": data_uri(make_image(128, 128, seed=3)), "prompt": "a lighthouse", "seed": 77, "steps": 8}
    first = post(gateway, body, auth).json()
    second = post(gateway, body, auth).json()
    assert first["seed"] == second["seed"] == 77
    assert fetch_png(first["images"][0]["url"])[0] == fetch_png(second["images"][0]["url"])[0]
    other = post(gateway, {**body, "seed": 78}, auth).json()
    assert fetch_png(other["images"][0]["url"])[0] != fetch_png(first["images"][0]["url"])[0]


def test_seed_is_random_when_absent_and_echoed(gateway: str, auth: dict[str, str]) -> None:
    body = {"image": data_uri(make_image(64, 64)), "prompt": "a boat", "steps": 2, "strength": 0.5}
    seeds = {post(gateway, body, auth).json()["seed"] for _ in range(3)}
    assert len(seeds) == 3


def _pixels(url: str) -> np.ndarray:
    return np.asarray(fetch_png(url)[1].convert("RGB")).astype(np.int16)


def test_eight_concurrent_requests_are_batched_and_seeded_results_hold(
    gateway: str, auth: dict[str, str], triton: TritonServer
) -> None:
    """8 concurrent requests all succeed; the UNet saw fewer executions than inferences (batching happened).

    The seeded request run alone and inside the burst gives pixels within the parity tolerance (2 levels):
    onnxruntime's CPU kernels may sum in another order for another batch size, so bytes need not be equal.
    """
    image = data_uri(make_image(128, 128, seed=9))
    probe = {"image": image, "prompt": "a castle at dusk", "seed": 4242, "steps": 12, "model": "imagen-v2"}
    alone = post(gateway, probe, auth).json()
    before = model_counts(triton.grpc_url, "imagen-v2_unet")

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=300) as client:
            bodies = [probe] + [
                {"image": image, "prompt": f"variation {i}", "seed": i, "steps": 12 + i, "model": "imagen-v2"}
                for i in range(7)
            ]
            return await asyncio.gather(
                *(client.post(f"{gateway}/v1/image-to-image", json=b, headers=auth) for b in bodies)
            )

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 8, [r.text for r in responses if r.status_code != 200]
    after = model_counts(triton.grpc_url, "imagen-v2_unet")
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert inferences > 0 and executions < inferences, (executions, inferences)

    diff = np.abs(_pixels(alone["images"][0]["url"]) - _pixels(responses[0].json()["images"][0]["url"]))
    assert diff.max() <= 2, f"max {diff.max()} levels"


def test_models_and_styles_endpoints(gateway: str, auth: dict[str, str]) -> None:
    models = httpx.get(f"{gateway}/v1/models", headers=auth).json()
    by_id = {m["id"]: m for m in models["data"]}
    assert set(by_id) == {"imagen-v2", "imagen-v3", "imagen-xl", "imagen-xl-turbo"}
    assert by_id["imagen-v2"]["native_resolution"] == 128 and by_id["imagen-v2"]["resolution_multiple"] == 16
    assert by_id["imagen-v3"]["scheduler"] == "EulerDiscreteScheduler"
    assert models["limits"]["steps"]["maximum"] == 150
    styles = {s["id"] for s in httpx.get(f"{gateway}/v1/styles", headers=auth).json()["data"]}
    assert {"cyberpunk", "artistic", "realistic", "anime", "photographic"} <= styles
    assert httpx.get(f"{gateway}/v1/models").status_code == 401


def test_health_and_readiness(gateway: str) -> None:
    assert httpx.get(f"{gateway}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{gateway}/readyz").status_code == 200


# --- every error path: status, code, and the spec's error shape ------------------------------------------

GOOD = {"prompt": "a cat", "steps": 2}


def _big_png() -> bytes:
    return make_image(2049, 16)


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="GIF")
    return buf.getvalue()


ERROR_CASES: list[tuple[str, dict[str, Any], int, str, str | None]] = [
    # (case, request parts, status, code, text the message or details must contain)
    ("no auth header", {"headers": {}}, 401, "unauthorized", "bearer"),
    ("wrong key", {"headers": {"Authorization": "Bearer nope"}}, 401, "unauthorized", "Invalid API key"),
    ("form body", {"content": b"image=x", "content_type": "application/x-www-form-urlencoded"}, 415,
     "unsupported_media_type", "application/json"),
    ("malformed JSON", {"content": b'{"image": ', "content_type": "application/json"}, 400, "invalid_request", "JSON"),
    ("non-UTF-8 body", {"content": b'{"image": "\xff\xfe"}', "content_type": "application/json"}, 400,
     "invalid_request", "UTF-8"),
    ("JSON array", {"json": [1, 2]}, 400, "invalid_request", "JSON object"),
    ("missing image", {"json": {"prompt": "x"}}, 400, "invalid_request", "'image'"),
    ("missing prompt", {"json": {"image": "IMG"}}, 400, "invalid_request", "'prompt'"),
    ("blank prompt", {"json": {"image": "IMG", "prompt": "   "}}, 400, "invalid_request", "'prompt'"),
    ("unknown field", {"json": {"image": "IMG", **GOOD, "sampler": "x"}}, 400, "invalid_request", "'sampler'"),
    ("strength too low", {"json": {"image": "IMG", **GOOD, "strength": 0.05}}, 400, "invalid_request", "'strength'"),
    ("steps as string", {"json": {"image": "IMG", **GOOD, "steps": "30"}}, 400, "invalid_request", "'steps'"),
    ("steps too many", {"json": {"image": "IMG", "prompt": "x", "steps": 151}}, 400, "invalid_request", "'steps'"),
    ("guidance too high", {"json": {"image": "IMG", **GOOD, "guidance_scale": 21}}, 400, "invalid_request",
     "'guidance_scale'"),
    ("num_images 5", {"json": {"image": "IMG", **GOOD, "num_images": 5}}, 400, "invalid_request", "'num_images'"),
    ("seed negative", {"json": {"image": "IMG", **GOOD, "seed": -1}}, 400, "invalid_request", "'seed'"),
    ("bool steps", {"json": {"image": "IMG", "prompt": "x", "steps": True}}, 400, "invalid_request", "'steps'"),
    ("unknown style", {"json": {"image": "IMG", **GOOD, "style": "vaporwave"}}, 400, "invalid_request", "cyberpunk"),
    ("bad webhook", {"json": {"image": "IMG", **GOOD, "webhook_url": "ftp://x"}}, 400, "invalid_request",
     "'webhook_url'"),
    ("unknown model", {"json": {"image": "IMG", **GOOD, "model": "imagen-v9"}}, 404, "model_not_found",
     "imagen-v2, imagen-v3"),
    ("not base64", {"json": {"image": "!!!not-base64!!!", **GOOD}}, 400, "invalid_image", None),
    ("truncated base64", {"json": {"image": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB", **GOOD}},
     400, "invalid_image", None),
    ("GIF image", {"json": {"image": "GIF", **GOOD}}, 400, "invalid_image", "GIF"),
    ("text as image", {"json": {"image": base64.b64encode(b"hello world, not an image").decode(), **GOOD}}, 400,
     "invalid_image", "not supported or file corrupted"),
    ("file URL", {"json": {"image": "file:///etc/passwd", **GOOD}}, 400, "invalid_image", None),
    ("over 2048 px", {"json": {"image": "BIG", **GOOD}}, 400, "image_dimensions_too_large", "2048x2048"),
    ("over 10 MB", {"json": {"image": "HUGE", **GOOD}}, 413, "image_too_large", "10MB"),
    ("URL 404", {"json": {"image": "URL:/missing.jpg", **GOOD}}, 400, "invalid_image", "404"),
    ("URL not an image", {"json": {"image": "URL:/not-an-image.jpg", **GOOD}}, 400, "invalid_image", None),
    ("URL over 10 MB", {"json": {"image": "URL:/huge.png", **GOOD}}, 413, "image_too_large", "10MB"),
    ("body over cap", {"content": b"x" * (21 * 1024 * 1024), "content_type": "application/json"}, 413,
     "payload_too_large", None),
]  # fmt: skip


def _resolve_image(value: Any, file_server: str) -> Any:
    if value == "IMG":
        return data_uri(make_image(32, 32))
    if value == "GIF":
        return data_uri(_gif(), "image/gif")
    if value == "BIG":
        return data_uri(_big_png())
    if value == "HUGE":
        return base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(10 * 1024 * 1024 + 1)).decode()
    if isinstance(value, str) and value.startswith("URL:"):
        return file_server + value[4:]
    return value


@pytest.mark.parametrize(("case", "parts", "status", "code", "text"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_error_paths(
    gateway: str,
    auth: dict[str, str],
    file_server: str,
    case: str,
    parts: dict[str, Any],
    status: int,
    code: str,
    text: str | None,
) -> None:
    headers = dict(parts.get("headers", auth))
    kwargs: dict[str, Any] = {}
    if "json" in parts:
        body = parts["json"]
        if isinstance(body, dict) and "image" in body:
            body = {**body, "image": _resolve_image(body["image"], file_server)}
        kwargs["json"] = body
    elif "content" in parts:
        kwargs["content"] = parts["content"]
        headers["Content-Type"] = parts["content_type"]
    else:
        kwargs["json"] = {"image": _resolve_image("IMG", file_server), **GOOD}
    response = httpx.post(f"{gateway}/v1/image-to-image", headers=headers, timeout=60, **kwargs)
    assert response.status_code == status, response.text
    payload = response.json()
    assert set(payload) == {"error"} and set(payload["error"]) == {"code", "message", "details"}
    assert payload["error"]["code"] == code
    assert isinstance(payload["error"]["message"], str) and payload["error"]["message"]
    if text is not None:
        blob = f"{payload['error']['message']} {payload['error']['details']}"
        assert text.lower() in blob.lower(), blob
    if status == 401:
        assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v1/image-to-image", 405, "method_not_allowed"),
        ("GET", "/v1/images/does_not_exist.png", 404, "not_found"),
        ("GET", "/v1/images/..%2F..%2Fetc%2Fpasswd", 404, "not_found"),
        ("GET", "/v1/nothing-here", 404, "not_found"),
    ],
)
def test_routing_errors(gateway: str, auth: dict[str, str], method: str, path: str, status: int, code: str) -> None:
    response = httpx.request(method, f"{gateway}{path}", headers=auth)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
