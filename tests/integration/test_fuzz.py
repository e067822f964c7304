"""Hostile input against the real gateway over loopback: a bounded, derandomized hypothesis fuzz plus explicit cases.

Bodies are generated from the served OpenAPI document's request schema, then mutated (wrong types, missing and
extra fields, huge numbers, NaN, unicode, nested junk, non-object JSON) and encoded in hostile ways (truncated,
non-UTF-8, deeply nested), under random content types. Every answer must be a non-5xx JSON response that matches
the document: a job view for 2xx, the error schema for 4xx with a code the error table pairs with that status,
and an `X-Request-ID` header. `steps` stays tiny so the requests that are valid run in a fraction of a second.

Safety: every URL the gateway could fetch or call (image, webhook) is rewritten to a closed loopback port.
"""

from __future__ import annotations

import base64
import io
import json
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import replace
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import create_app
from gateway.errors import ERROR_TABLE
from gateway.http.middleware import MetricsMiddleware, RequestIdMiddleware, metrics_endpoint
from gateway.http.openapi import component_schema, openapi_document, openapi_endpoint
from gateway.jobs.request import FIELDS
from gateway.media import codecs
from gateway.observability import REQUEST_ID_PATTERN, Metrics, triton_stats_source
from gateway.settings import Settings
from gateway.triton.client import TritonEngine
from tests.helpers import ThreadedUvicorn, data_uri, free_port, make_image
from tests.integration.conftest import API_KEY, Repository
from tests.unit.test_codecs import many_scan_jpeg

pytestmark = pytest.mark.integration

FUZZ_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same examples on every run (CI)
    database=None,
    phases=(Phase.explicit, Phase.generate, Phase.shrink),
    suppress_health_check=list(HealthCheck),
)
CLOSED_PORT = free_port()  # bound and released: nothing listens there
LOOPBACK_IMAGE_URL = f"http://127.0.0.1:{CLOSED_PORT}/input.png"
LOOPBACK_WEBHOOK_URL = f"http://127.0.0.1:{CLOSED_PORT}/hook"
JSON_TYPE = "application/json"
CODES_BY_STATUS: dict[int, set[str]] = {}
for _status, _code in ERROR_TABLE.values():
    CODES_BY_STATUS.setdefault(_status, set()).add(_code)
MAX_BODY = 20 * 1024 * 1024


class Target:
    """The running gateway, its document and validators; a plain class so failure reports stay one line."""

    def __init__(self, url: str, document: dict[str, Any], client: httpx.Client) -> None:
        self.url = url
        self.document = document
        self.client = client
        self.job_view = Draft202012Validator(component_schema(document, "JobView"))
        self.error = Draft202012Validator(component_schema(document, "Error"))
        self.bodies = encoded(bodies(document))

    def __repr__(self) -> str:
        return f"Target({self.url})"


def observed_app(settings_: Settings, repository: Repository) -> Any:
    """`create_app` plus the observability pieces app.py does not wire yet (each added only when missing)."""
    app = create_app(settings_)
    paths = {getattr(route, "path", None) for route in app.routes}
    wired = {m.cls for m in app.user_middleware}
    if "/openapi.json" not in paths:
        app.add_route("/openapi.json", openapi_endpoint, methods=["GET"])
    if "/metrics" not in paths:

        async def statistics(model: str) -> dict[str, Any]:
            assert settings_.triton_url is not None
            engine = TritonEngine(settings_.triton_url, timeout_s=5.0)  # created in the serving loop
            try:
                return await engine.statistics(model)
            finally:
                await engine.close()

        unets = [m.unet.model for m in repository.manifests.values()]
        app.state.metrics = Metrics(triton_stats_source(statistics, lambda: unets))
        app.add_route("/metrics", metrics_endpoint, methods=["GET"])
        if MetricsMiddleware not in wired:
            app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    if RequestIdMiddleware not in wired:
        app.add_middleware(RequestIdMiddleware)
    return app


@pytest.fixture(scope="module")
def target(
    gateway_settings: Settings, repository: Repository, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    settings_ = replace(
        gateway_settings,
        port=free_port(),
        jobs_db=tmp_path_factory.mktemp("fuzz-jobs") / "jobs.sqlite3",
        rate_limit_per_minute=0,  # the fuzz sends bursts; the limiter has its own tests
        webhook_max_attempts=1,
    )
    server = ThreadedUvicorn(observed_app(settings_, repository), settings_.port)
    server.start()
    try:
        # A connection per request: a keep-alive race after an early answer (413, 415) is not the gateway's answer.
        no_reuse = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(base_url=server.url, timeout=60, limits=no_reuse) as client:
            document = client.get("/openapi.json").json()
            assert document == openapi_document()
            yield Target(server.url, document, client)
    finally:
        server.stop()


def check_response(target: Target, response: httpx.Response, context: Any) -> dict[str, Any]:
    """The invariants every answer keeps: no 5xx, an id, JSON matching the document for its status."""
    where = f"{response.status_code} {response.text[:500]!r} for {str(context)[:300]}"
    assert response.status_code < 500, where
    assert REQUEST_ID_PATTERN.fullmatch(response.headers.get("x-request-id", "")), where
    assert response.headers.get("content-type", "").startswith(JSON_TYPE), where
    payload = response.json()
    if response.status_code < 300:
        errors = [e.message for e in target.job_view.iter_errors(payload)]
    else:
        errors = [e.message for e in target.error.iter_errors(payload)]
        if not errors:
            code = payload["error"]["code"]
            assert code in CODES_BY_STATUS.get(response.status_code, set()), f"code {code!r}: {where}"
    assert not errors, f"{errors[:3]}: {where}"
    return payload


# --- strategies -----------------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A few hundred bytes declaring a huge RGB image (30 GB decoded): the header must be refused, not decoded."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (1 + 3 * min(width, 4096)) * 16, 9)  # the start of the pixel data
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", rows) + _png_chunk(b"IEND", b"")


def _gif() -> bytes:
    return base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")


SMALL_PNG = make_image(32, 32)
PNG_B64 = base64.b64encode(SMALL_PNG).decode()
VALID_IMAGES = [
    data_uri(SMALL_PNG),
    base64.b64encode(make_image(40, 24, seed=1, fmt="WEBP")).decode(),
    data_uri(make_image(24, 40, seed=2, fmt="JPEG"), "image/jpeg"),
]
INVALID_IMAGES = [
    "data:image/png;base64," + PNG_B64[: len(PNG_B64) // 2 - 1],  # truncated mid-quantum: not base64
    "data:image/png;base64," + PNG_B64[: (len(PNG_B64) // 8) * 4],  # valid base64 of a truncated PNG
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB",
    "data:image/png;base64,",
    "data:image/png," + PNG_B64,
    "data:;base64,AAAA",
    "data:image/png;base64,!!!!",
    "data:image/png;base64,\u00e9\u00e9\u00e9\u00e9",
    "data:" + "x" * 300 + ";base64,AAAA",
    "data:",
    data_uri(_gif(), "image/gif"),
    data_uri(png_bomb()),
    data_uri(make_image(2049, 16)),
    base64.b64encode(b"hello, not an image").decode(),
    "file:///etc/passwd",
    "ftp://127.0.0.1/x.png",
    "javascript:alert(1)",
    "http://",
    "https://[::1",
    LOOPBACK_IMAGE_URL,
    "   ",
]


def _rewrite_url(value: Any, replacement: str) -> Any:
    """Point any URL the gateway might fetch or call at a closed loopback port (never another host)."""
    if not isinstance(value, str):
        return value
    try:
        source = codecs.parse_image_field(value)
        url = source.url
    except Exception:  # not an image URL the gateway would fetch
        url = value if "://" in value else None
    if url is None:
        return value
    try:
        host = urlsplit(url.strip()).hostname
    except ValueError:
        host = None
    return value if host == "127.0.0.1" else replacement


def sanitize(body: Any) -> Any:
    if isinstance(body, dict):
        body = dict(body)
        if "image" in body:
            body["image"] = _rewrite_url(body["image"], LOOPBACK_IMAGE_URL)
        if "webhook_url" in body:
            body["webhook_url"] = _rewrite_url(body["webhook_url"], LOOPBACK_WEBHOOK_URL)
    return body


def _resolve(document: dict[str, Any], ref: str) -> dict[str, Any]:
    node: Any = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def from_schema(schema: dict[str, Any], document: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values valid for the subset of JSON Schema the request schema uses (strings kept short)."""
    if "$ref" in schema:
        return from_schema(_resolve(document, schema["$ref"]), document)
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "const" in schema:
        return st.just(schema["const"])
    kind = schema.get("type")
    if isinstance(kind, list):
        return st.one_of([from_schema({**schema, "type": k}, document) for k in kind])
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if kind == "number":
        return st.floats(schema.get("minimum"), schema.get("maximum"), allow_nan=False, allow_infinity=False)
    if kind == "string":
        if schema.get("format") == "uri":
            return st.just(LOOPBACK_WEBHOOK_URL)
        low = schema.get("minLength", 0)
        return st.text(min_size=low, max_size=max(low, min(schema.get("maxLength", 40), 40)))
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {}), document), max_size=3)
    if kind == "object":
        properties = schema.get("properties", {})
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries(
            {k: from_schema(v, document) for k, v in properties.items() if k in required},
            optional={k: from_schema(v, document) for k, v in properties.items() if k not in required},
        )
    return JUNK


JUNK: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**18, max_value=10**40)
    | st.floats()  # NaN and infinities: json.dumps writes NaN / Infinity, which Python's parser accepts
    | st.text(max_size=30)
    | st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "null", "true", "", "\x00", "\ufeff", "🙂" * 8, "30"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)


def valid_bodies(document: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Schema-valid bodies with a real small image, tiny steps and few images, so a valid one runs fast."""
    schema = document["components"]["schemas"]["ImageToImageRequest"]
    properties = dict(schema["properties"])
    properties["image"] = {"enum": VALID_IMAGES}
    properties["steps"] = {"type": "integer", "minimum": 1, "maximum": 4}
    properties["num_images"] = {"type": "integer", "minimum": 1, "maximum": 2}
    properties["model"] = {"enum": ["imagen-v2", "imagen-v3", "imagen-v9"]}
    properties["webhook_url"] = {"type": "null"}  # async jobs would outlive the example
    properties["mask"] = properties["mask_blur"] = {"type": "null"}  # a random mask is refused (or has no blur)
    return from_schema({**schema, "properties": properties}, document)


def bodies(document: dict[str, Any]) -> st.SearchStrategy[Any]:
    valid = valid_bodies(document)
    schema_valid = from_schema(document["components"]["schemas"]["ImageToImageRequest"], document)
    image = st.sampled_from(VALID_IMAGES) | st.sampled_from(INVALID_IMAGES) | st.text(max_size=60)
    fields = st.sampled_from(FIELDS)
    return st.one_of(
        valid,
        schema_valid.map(lambda b: {**b, "steps": 2}),  # any schema-valid body, kept cheap
        st.tuples(valid, image).map(lambda t: {**t[0], "image": t[1]}),
        st.tuples(valid, image).map(lambda t: {**t[0], "mask": t[1]}),  # hostile or mismatched masks
        st.tuples(valid, fields, JUNK).map(lambda t: {**t[0], t[1]: t[2]}),  # wrong types, huge numbers, NaN
        st.tuples(valid, fields).map(lambda t: {k: v for k, v in t[0].items() if k != t[1]}),  # missing field
        st.tuples(valid, st.text(min_size=1, max_size=12).filter(lambda k: k not in FIELDS), JUNK).map(
            lambda t: {**t[0], t[1]: t[2]}  # unknown field
        ),
        JUNK,  # non-object JSON (and objects of junk)
    )


ENCODINGS = ("truncated", "latin-1", "utf-16", "binary", "deep", "bigint")


@st.composite
def encoded(draw: st.DrawFn, values: st.SearchStrategy[Any]) -> tuple[bytes, Any]:
    """A body's bytes, sometimes broken on purpose; returns (bytes, the JSON value or a description)."""
    body = sanitize(draw(values))
    text = json.dumps(body, ensure_ascii=draw(st.booleans()))
    mode = draw(st.sampled_from(["json"] * 6 + list(ENCODINGS)))
    if mode == "json":
        return text.encode("utf-8", "surrogatepass"), body  # lone surrogates make it invalid UTF-8
    if mode == "truncated":
        return text.encode("utf-8", "surrogatepass")[: draw(st.integers(0, max(0, len(text) - 1)))], mode
    if mode == "latin-1":
        return ('{"prompt": "caf\u00e9 na\u00efve", "image": "x"}' + text[:50]).encode("latin-1", "replace"), mode
    if mode == "utf-16":
        return text.encode("utf-16"), mode
    if mode == "binary":
        return draw(st.binary(max_size=300)), mode
    if mode == "deep":
        depth = draw(st.sampled_from([50, 5_000, 200_000]))
        return b"[" * depth + b"]" * depth, mode
    digits = draw(st.sampled_from([20, 4_301, 50_000]))
    return b'{"image": "x", "prompt": "y", "steps": ' + b"9" * digits + b"}", mode


CONTENT_TYPES = st.sampled_from(
    [JSON_TYPE] * 8
    + [
        "application/json; charset=utf-8",
        "APPLICATION/JSON",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=xyz",
        "application/jsonx",
        "application/json, text/plain",
        "",
        None,
    ]
)
AUTH = st.sampled_from([f"Bearer {API_KEY}"] * 8 + [None, "Bearer wrong-key", "Basic dXNlcjpwYXNz", "Bearer"])


def _expected(auth: str | None, content_type: str | None, raw: bytes, value: Any) -> tuple[int, str] | None:
    """What the documented order of checks makes certain (auth, then media type, then the JSON itself)."""
    if auth != f"Bearer {API_KEY}":
        return 401, "unauthorized"
    if (content_type or "").split(";")[0].strip().lower() != JSON_TYPE:
        return 415, "unsupported_media_type"
    if value in ("deep", "bigint"):
        # Refused whatever the depth or length (a list, or an out-of-range 'steps'). Not parsed here: a
        # RecursionError from the C JSON scanner upsets CPython 3.11's AST recursion counter in this thread.
        return 400, "invalid_request"
    try:
        value = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return 400, "invalid_request"
    if not isinstance(value, dict):
        return 400, "invalid_request"
    return None


# --- the fuzz -------------------------------------------------------------------------------------------------


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_image_to_image(target: Target, data: st.DataObject) -> None:
    raw, value = data.draw(target.bodies, label="body")
    event(f"encoding: {value if isinstance(value, str) and value in ENCODINGS else 'json'}")
    content_type = data.draw(CONTENT_TYPES, label="content_type")
    auth = data.draw(AUTH, label="authorization")
    headers = {}
    if content_type is not None:
        headers["Content-Type"] = content_type
    if auth is not None:
        headers["Authorization"] = auth
    response = target.client.post("/v1/image-to-image", content=raw, headers=headers)
    payload = check_response(target, response, (headers, value))
    event(f"{response.status_code} {payload['status'] if response.status_code < 300 else payload['error']['code']}")
    expected = _expected(auth, content_type, raw, value)
    if expected is not None:
        assert (response.status_code, payload["error"]["code"]) == expected, (payload, headers, value)


@settings(max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(
    # No "/" (another route) and no dot segments (the client normalizes them away, Starlette then redirects).
    segment=st.text(st.characters(exclude_characters="/"), min_size=1, max_size=40).filter(
        lambda s: s not in {".", ".."}
    ),
    route=st.sampled_from(
        [
            ("GET", "/v1/image-to-image/{}"),
            ("POST", "/v1/image-to-image/{}/cancel"),
            ("GET", "/v1/image-to-image/{}/events"),
            ("GET", "/v1/images/{}"),
        ]
    ),
)
def test_fuzz_unknown_ids(target: Target, segment: str, route: tuple[str, str]) -> None:
    method, template = route
    url = template.format(quote(segment, safe=""))
    response = target.client.request(method, url, headers={"Authorization": f"Bearer {API_KEY}"})
    payload = check_response(target, response, (method, url))
    assert response.status_code == 404 and payload["error"]["code"] == "not_found", (url, payload)


# --- explicit hostile inputs (the list) -------------------------------------------------------------------


def _json_body(**fields: Any) -> bytes:
    return json.dumps({"prompt": "a cat", "steps": 2, **fields}).encode()


EXPLICIT_CASES: list[tuple[str, bytes, str | None, int, str]] = [
    # (case, body, content type, status, code)
    ("truncated base64 (mid-quantum)", _json_body(image=INVALID_IMAGES[0]), JSON_TYPE, 400, "invalid_image"),
    ("truncated base64 (a truncated PNG)", _json_body(image=INVALID_IMAGES[1]), JSON_TYPE, 400, "invalid_image"),
    ("bare truncated base64", _json_body(image=PNG_B64[:-3]), JSON_TYPE, 400, "invalid_image"),
    ("PNG bomb 100000x100000", _json_body(image=data_uri(png_bomb())), JSON_TYPE, 400,
     "image_dimensions_too_large"),
    ("PNG bomb, bare base64", _json_body(image=base64.b64encode(png_bomb(60_000, 2)).decode()), JSON_TYPE, 400,
     "image_dimensions_too_large"),
    ("invalid data URI (no base64)", _json_body(image="data:image/png," + PNG_B64), JSON_TYPE, 400, "invalid_image"),
    ("invalid data URI (no comma)", _json_body(image="data:image/png;base64"), JSON_TYPE, 400, "invalid_image"),
    ("text/plain", _json_body(image=VALID_IMAGES[0]), "text/plain", 415, "unsupported_media_type"),
    ("form", b"image=x&prompt=y", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
    ("multipart", b"--x\r\n\r\n--x--", "multipart/form-data; boundary=x", 415, "unsupported_media_type"),
    ("no content type", _json_body(image=VALID_IMAGES[0]), None, 415, "unsupported_media_type"),
    ("non-UTF-8 (latin-1)", '{"image": "x", "prompt": "caf\u00e9"}'.encode("latin-1"), JSON_TYPE, 400,
     "invalid_request"),
    ("non-UTF-8 (UTF-16)", '{"image": "x", "prompt": "y"}'.encode("utf-16"), JSON_TYPE, 400, "invalid_request"),
    ("non-UTF-8 (lone surrogate)", b'{"image": "x", "prompt": "\xed\xa0\x80"}', JSON_TYPE, 400, "invalid_request"),
    ("binary junk", bytes(range(256)), JSON_TYPE, 400, "invalid_request"),
    ("NaN strength", b'{"image": "x", "prompt": "y", "strength": NaN}', JSON_TYPE, 400, "invalid_request"),
    ("1e999 guidance", b'{"image": "x", "prompt": "y", "guidance_scale": 1e999}', JSON_TYPE, 400,
     "invalid_request"),
    ("deeply nested JSON", b"[" * 200_000 + b"]" * 200_000, JSON_TYPE, 400, "invalid_request"),
    ("integer of 50000 digits", b'{"image": "x", "prompt": "y", "seed": ' + b"9" * 50_000 + b"}", JSON_TYPE, 400,
     "invalid_request"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "body", "content_type", "status", "code"), EXPLICIT_CASES, ids=[c[0] for c in EXPLICIT_CASES]
)
def test_hostile_input_gets_a_clear_4xx(
    target: Target, case: str, body: bytes, content_type: str | None, status: int, code: str
) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    response = target.client.post("/v1/image-to-image", content=body, headers=headers)
    payload = check_response(target, response, case)
    assert (response.status_code, payload["error"]["code"]) == (status, code), payload
    assert payload["error"]["message"] and payload["error"]["details"]


# --- masks (issue 25): a hostile mask is refused exactly as the same bytes sent as the image ------------------

HOSTILE_MASKS: list[tuple[str, str, str]] = [
    # (case, value, code): the same bytes as `image` get the same code
    ("truncated base64 (mid-quantum)", INVALID_IMAGES[0], "invalid_image"),
    ("truncated base64 (a truncated PNG)", INVALID_IMAGES[1], "invalid_image"),
    ("bare truncated base64", PNG_B64[:-3], "invalid_image"),
    ("PNG bomb 100000x100000", data_uri(png_bomb()), "image_dimensions_too_large"),
    ("PNG bomb, bare base64", base64.b64encode(png_bomb(60_000, 2)).decode(), "image_dimensions_too_large"),
    ("many-scan JPEG", data_uri(many_scan_jpeg(200), "image/jpeg"), "invalid_image"),
    ("not an image", base64.b64encode(b"hello, not an image").decode(), "invalid_image"),
    ("a GIF", data_uri(_gif(), "image/gif"), "invalid_image"),
    ("invalid data URI (no base64)", "data:image/png," + PNG_B64, "invalid_image"),
]


def _post(target: Target, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    response = target.client.post("/v1/image-to-image", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    return response.status_code, check_response(target, response, body)


@pytest.mark.parametrize(("case", "value", "code"), HOSTILE_MASKS, ids=[c[0] for c in HOSTILE_MASKS])
def test_hostile_mask_is_refused_like_a_hostile_image(target: Target, case: str, value: str, code: str) -> None:
    as_image = _post(target, {"image": value, "prompt": "a cat", "steps": 2})
    as_mask = _post(target, {"image": VALID_IMAGES[0], "mask": value, "prompt": "a cat", "steps": 2})
    assert (as_mask[0], as_mask[1]["error"]["code"]) == (as_image[0], as_image[1]["error"]["code"]) == (400, code)
    assert as_mask[1]["error"]["message"].startswith("Invalid field 'mask'"), as_mask
    assert as_mask[1]["error"]["details"] == as_image[1]["error"]["details"], (as_mask, as_image)


def _mask(width: int, height: int, box: tuple[int, int, int, int] | None) -> str:
    """An L-mode PNG data URI, black (keep) with white (change) in `box`."""
    image = Image.new("L", (width, height), 0)
    if box is not None:
        image.paste(255, box)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return data_uri(out.getvalue())


BAD_MASKS: list[tuple[str, dict[str, Any], str, str]] = [
    # (case, fields beside a valid 32x32 image, code, the field the message names)
    ("another aspect ratio", {"mask": _mask(64, 32, (0, 0, 32, 32))}, "invalid_request", "mask"),
    ("all black: nothing to change", {"mask": _mask(32, 32, None)}, "invalid_request", "mask"),
    ("one white pixel, gone after the blur", {"mask": _mask(32, 32, (16, 16, 17, 17))}, "invalid_request", "mask"),
    ("a number", {"mask": 7}, "invalid_request", "mask"),
    ("empty", {"mask": ""}, "invalid_request", "mask"),
    ("mask_blur without a mask", {"mask_blur": 4}, "invalid_request", "mask_blur"),
    ("mask_blur above 64", {"mask": _mask(32, 32, (0, 0, 16, 32)), "mask_blur": 65}, "invalid_request", "mask_blur"),
    ("mask_blur negative", {"mask": _mask(32, 32, (0, 0, 16, 32)), "mask_blur": -1}, "invalid_request", "mask_blur"),
]


@pytest.mark.parametrize(("case", "fields", "code", "field"), BAD_MASKS, ids=[c[0] for c in BAD_MASKS])
def test_bad_mask_gets_a_400_naming_the_field(
    target: Target, case: str, fields: dict[str, Any], code: str, field: str
) -> None:
    status, payload = _post(target, {"image": VALID_IMAGES[0], "prompt": "a cat", "steps": 2, **fields})
    assert (status, payload["error"]["code"]) == (400, code), payload
    assert f"'{field}'" in payload["error"]["message"], payload


def test_a_valid_mask_runs(target: Target) -> None:
    """The control for the two tables above: the same image with a half mask completes, and says it was masked."""
    status, payload = _post(
        target, {"image": VALID_IMAGES[0], "mask": _mask(32, 32, (0, 0, 16, 32)), "prompt": "a cat", "steps": 2}
    )
    assert status == 200 and payload["status"] == "completed", payload
    assert (payload["masked"], payload["mask_blur"]) == (True, 4), payload


def test_huge_json_body_is_refused_before_parsing(target: Target) -> None:
    """Over the 20 MB cap: 413, whether the size is declared (Content-Length) or only discovered (chunked)."""
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": JSON_TYPE}
    body = b'{"prompt": "x", "image": "' + b"A" * (MAX_BODY + 1024) + b'"}'
    declared = target.client.post("/v1/image-to-image", content=body, headers=headers)
    payload = check_response(target, declared, "declared")
    assert (declared.status_code, payload["error"]["code"]) == (413, "payload_too_large")

    def chunks() -> Iterator[bytes]:
        step = 1024 * 1024
        for start in range(0, len(body), step):
            yield body[start : start + step]

    try:
        streamed = target.client.post("/v1/image-to-image", content=chunks(), headers=headers)
    except (httpx.WriteError, httpx.RemoteProtocolError) as exc:  # the server may close before reading it all
        pytest.fail(f"no 413 answer to a chunked oversized body: {exc!r}")
    assert "content-length" not in streamed.request.headers
    payload = check_response(target, streamed, "chunked")
    assert (streamed.status_code, payload["error"]["code"]) == (413, "payload_too_large")


def test_valid_request_matches_the_job_view_schema(target: Target) -> None:
    """The completed synchronous response validates against the document (seeds, sizes, effective steps)."""
    body = {"image": VALID_IMAGES[0], "prompt": "a lighthouse", "steps": 4, "strength": 0.5, "num_images": 2}
    response = target.client.post("/v1/image-to-image", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    payload = check_response(target, response, body)
    assert response.status_code == 200 and payload["status"] == "completed"
    assert len(payload["images"]) == 2 and payload["effective_steps"] == 2


def test_metrics_after_the_fuzz(target: Target) -> None:
    """The scrape reports requests by route template (never raw paths) and the UNet's batching from Triton."""
    target.client.post("/v1/image-to-image", content=b"{", headers={"Authorization": f"Bearer {API_KEY}"})
    target.client.get("/v1/image-to-image/some-unknown-job")
    response = target.client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = [s for family in text_string_to_metric_families(response.text) for s in family.samples]
    routes = {s.labels["route"] for s in samples if s.name == "imagen_http_requests_total"}
    assert "/v1/image-to-image" in routes, routes
    assert any(re.fullmatch(r"/v1/image-to-image/\{\w+\}", r) for r in routes), routes
    assert not any("some-unknown-job" in r for r in routes)
    unet = {s.labels["model"]: s.value for s in samples if s.name == "imagen_triton_inferences_total"}
    assert unet.keys() >= {"imagen-v2_unet", "imagen-v3_unet"}, unet
    assert any(s.name == "imagen_triton_mean_batch_size" and s.value >= 1 for s in samples)
    assert re.search(r"imagen_http_request_duration_seconds_bucket\{", response.text)


def test_openapi_document_is_served_without_a_key(target: Target) -> None:
    """`/openapi.json` is served without a key and is the same document the unit tests validate."""
    response = httpx.get(f"{target.url}/openapi.json")
    assert response.status_code == 200 and response.json() == openapi_document()
