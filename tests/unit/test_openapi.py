"""The OpenAPI document: valid OpenAPI 3.1, every `$ref` resolves, and it agrees with the code it describes."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from starlette.applications import Starlette
from starlette.routing import Route

from gateway.diffusion.styles import STYLE_PRESETS
from gateway.errors import ERROR_TABLE
from gateway.http import schema as protocol
from gateway.http.openapi import (
    COMPONENTS,
    JOB_STATUSES,
    REF_TEMPLATE,
    SPEC_RESPONSE_FIELDS,
    component_schema,
    error_codes_by_status,
    openapi_document,
    openapi_endpoint,
)
from gateway.http.schema import JobView, WireJsonSchema
from gateway.settings import Settings
from tests.helpers import SPEC_EXAMPLE
from tests.unit.test_protocol import COMPLETED_VIEW, FAILED_VIEW, QUEUED_VIEW

# Documented routes that app.py serves once the observability wiring lands there.
WIRED_SEPARATELY = {("GET", "/metrics"), ("GET", "/openapi.json")}
# The job routes of issue 5, documented ahead of the app (skipped until they exist).
JOB_ROUTES = {
    ("GET", "/v1/image-to-image/{}"),
    ("POST", "/v1/image-to-image/{}/cancel"),
    ("GET", "/v1/image-to-image/{}/events"),
    ("GET", "/v1/webhook-secret"),
}
HTTP_METHODS = {"get", "post", "put", "patch", "delete", "options", "head"}

# The spec's success example, verbatim.
SPEC_SUCCESS_EXAMPLE: dict[str, Any] = {
    "id": "img_transform_abc123",
    "status": "completed",
    "prompt": "Transform this into a cyberpunk style with neon lights and futuristic elements",
    "negative_prompt": "blurry, low quality",
    "model": "imagen-v3",
    "strength": 0.8,
    "steps": 50,
    "guidance_scale": 8.0,
    "seed": 42,
    "style": "cyberpunk",
    "created_at": "2024-01-15T10:30:00Z",
    "completed_at": "2024-01-15T10:30:20Z",
    "original_image": {"url": "https://example.com/input-image.jpg", "width": 1024, "height": 1024},
    "images": [
        {"url": "https://cdn.imagen.ai/images/img_transform_abc123_0.png", "width": 1024, "height": 1024},
        {"url": "https://cdn.imagen.ai/images/img_transform_abc123_1.png", "width": 1024, "height": 1024},
    ],
}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return openapi_document()


def validator(document: dict[str, Any], name: str) -> Draft202012Validator:
    return Draft202012Validator(component_schema(document, name))


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _normalize(path: str) -> str:
    """Path parameters by position, not by name: `/jobs/{id}` and `/jobs/{job_id}` are one route."""
    return re.sub(r"\{[^}]*\}", "{}", path)


def test_valid_openapi_31(document: dict[str, Any]) -> None:
    openapi_spec_validator = pytest.importorskip("openapi_spec_validator")
    assert document["openapi"].startswith("3.1")
    openapi_spec_validator.validate(document)


def test_every_ref_resolves(document: dict[str, Any]) -> None:
    refs = set(_refs(document))
    assert refs, "expected $refs"
    for ref in refs:
        assert _resolve(document, ref) is not None, ref
    for name, schema in document["components"]["schemas"].items():
        Draft202012Validator.check_schema(schema)
        validator(document, name)  # builds


def test_document_is_json_and_a_fresh_copy(document: dict[str, Any]) -> None:
    json.dumps(document, allow_nan=False)
    document["info"]["title"] = "changed"
    assert openapi_document()["info"]["title"] != "changed"


def test_every_app_route_is_documented_and_every_documented_route_exists(tmp_path: Path) -> None:
    from gateway.app import create_app  # here, so the document's own tests do not depend on the app's wiring

    app = create_app(Settings(model_repository=tmp_path, storage_dir=tmp_path, jobs_db=tmp_path / "jobs.sqlite3"))
    served = {
        (method, _normalize(route.path))
        for route in app.routes
        if isinstance(route, Route)
        for method in (route.methods or set())
        if method != "HEAD"  # Starlette adds HEAD to every GET
    }
    documented = {
        (method.upper(), _normalize(path))
        for path, item in openapi_document()["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }
    assert served - documented == set(), "routes missing from the OpenAPI document"
    not_served = documented - served
    pending_jobs = {r for r in JOB_ROUTES if r not in served}
    assert not_served <= WIRED_SEPARATELY | pending_jobs, not_served


def test_request_schema_follows_the_protocol(document: dict[str, Any]) -> None:
    schema = document["components"]["schemas"]["ImageToImageRequest"]
    assert tuple(schema["properties"]) == protocol.FIELDS
    assert schema["required"] == list(protocol.REQUIRED_FIELDS)
    assert schema["additionalProperties"] is False
    for field, limits in protocol.PARAMETER_LIMITS.items():
        prop = schema["properties"][field]
        types = prop["type"] if isinstance(prop["type"], list) else [prop["type"]]
        assert limits["type"] in types, field
        assert ("null" in types) == bool(limits.get("nullable")), field
        if "minimum" in limits:
            assert (prop["minimum"], prop["maximum"]) == (limits["minimum"], limits["maximum"]), field
        if "max_length" in limits:
            assert prop["maxLength"] == limits["max_length"], field
        if limits.get("default") is not None:
            assert prop["default"] == limits["default"], field
    assert schema["properties"]["style"]["enum"] == [*STYLE_PRESETS, None]


def test_request_schema_accepts_the_spec_example_and_refuses_what_the_validator_refuses(
    document: dict[str, Any],
) -> None:
    check = validator(document, "ImageToImageRequest")
    example = {
        "image": "https://example.com/input-image.jpg",
        **SPEC_EXAMPLE,
    }
    assert check.is_valid(example)
    for bad in (
        {"prompt": "x"},
        {**example, "sampler": "x"},
        {**example, "strength": 0.05},
        {**example, "steps": 151},
        {**example, "steps": "30"},
        {**example, "num_images": 5},
        {**example, "seed": -1},
        {**example, "style": "vaporwave"},
        {**example, "webhook_url": "ftp://x"},
        {**example, "prompt": "   "},
        {**example, "model": None},
    ):
        assert not check.is_valid(bad), bad


def test_error_schema_lists_every_code_of_the_error_table(document: dict[str, Any]) -> None:
    codes = document["components"]["schemas"]["ErrorObject"]["properties"]["code"]["enum"]
    assert set(codes) == {code for _, code in ERROR_TABLE.values()}
    assert {"rate_limited", "payload_too_large", "backend_unavailable"} <= set(codes)
    check = validator(document, "Error")
    assert check.is_valid({"error": {"code": "invalid_image", "message": "Unable", "details": None}})
    assert not check.is_valid({"error": {"code": "made_up", "message": "x", "details": None}})
    assert not check.is_valid({"error": {"code": "invalid_image", "message": "x"}})
    assert error_codes_by_status()[429] == ["rate_limited"]


def test_job_view_accepts_the_spec_example_and_every_status(document: dict[str, Any]) -> None:
    check = validator(document, "JobView")
    assert set(SPEC_SUCCESS_EXAMPLE) == set(SPEC_RESPONSE_FIELDS)
    assert check.is_valid(SPEC_SUCCESS_EXAMPLE), list(check.iter_errors(SPEC_SUCCESS_EXAMPLE))
    ours = {
        **SPEC_SUCCESS_EXAMPLE,
        "images": [{**image, "seed": 42 + i} for i, image in enumerate(SPEC_SUCCESS_EXAMPLE["images"])],
        "num_images": 2,
        "webhook_url": None,
        "processed_size": {"width": 1024, "height": 1024},
        "effective_steps": 40,
        "progress": {"step": 40, "total_steps": 40, "queue_position": None},
        "error": None,
        "webhook": None,
    }
    assert check.is_valid(ours), list(check.iter_errors(ours))
    queued = {**ours, "status": "queued", "images": [], "completed_at": None,
              "progress": {"step": 0, "total_steps": 40, "queue_position": 3},
              "webhook": {"url": "https://hooks.example/x", "status": "pending", "attempts": []}}  # fmt: skip
    assert check.is_valid(queued), list(check.iter_errors(queued))
    failed = {**ours, "status": "failed", "images": [],
              "error": {"code": "backend_unavailable", "message": "down", "details": None},
              "webhook": {"url": "https://hooks.example/x", "status": "delivered", "attempts": [
                  {"at": "2024-01-15T10:30:21Z", "status_code": 500, "error": None},
                  {"at": "2024-01-15T10:30:23Z", "status_code": 200, "error": None}]}}  # fmt: skip
    assert check.is_valid(failed), list(check.iter_errors(failed))
    assert {"queued", "processing", "completed", "failed", "canceled"} == set(JOB_STATUSES)
    for bad in (
        {**ours, "status": "done"},
        {**ours, "images": []},  # completed without images
        {**queued, "images": ours["images"]},  # queued with images
        {**queued, "completed_at": "2024-01-15T10:30:20Z"},
        {**ours, "status": "failed", "error": None},
        {k: v for k, v in ours.items() if k != "seed"},
    ):
        assert not check.is_valid(bad), bad


def test_routes_security_and_headers(document: dict[str, Any]) -> None:
    paths = document["paths"]
    create = paths["/v1/image-to-image"]["post"]
    assert set(create["responses"]) >= {"200", "202", "400", "401", "404", "409", "413", "415", "429", "502", "503"}
    assert "Location" in create["responses"]["202"]["headers"]
    assert "Retry-After" in create["responses"]["429"]["headers"]
    assert "Retry-After" in create["responses"]["503"]["headers"]
    assert [p["name"] for p in create["parameters"]] == ["Idempotency-Key", "Prefer"]
    assert paths["/v1/image-to-image/{job_id}/cancel"]["post"]["responses"].keys() >= {"200", "404", "409"}
    assert "text/event-stream" in paths["/v1/image-to-image/{job_id}/events"]["get"]["responses"]["200"]["content"]
    assert document["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "`Authorization: Bearer <API key>`",
    }
    public = {path for path, item in paths.items() for op in item.values() if op.get("security") == []}
    assert public == {"/healthz", "/readyz", "/metrics", "/openapi.json", "/v1/images/{name}"}
    for path, item in paths.items():
        for method, op in item.items():
            for status, response in op["responses"].items():
                assert "X-Request-ID" in response["headers"], (path, method, status)


async def test_openapi_endpoint_serves_the_document() -> None:
    app = Starlette(routes=[Route("/openapi.json", openapi_endpoint)])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as http:
        response = await http.get("/openapi.json")
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    assert response.json() == openapi_document()


async def test_served_error_schema_lists_every_code_of_the_error_table() -> None:
    app = Starlette(routes=[Route("/openapi.json", openapi_endpoint)])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as http:
        served = (await http.get("/openapi.json")).json()
    enum = served["components"]["schemas"]["ErrorObject"]["properties"]["code"]["enum"]
    for status, code in ERROR_TABLE.values():
        assert code in enum, (status, code)


def test_component_schemas_are_the_models_schemas(document: dict[str, Any]) -> None:
    """Generated, not hand-written: each component is its model's JSON Schema (styles aside, injected)."""
    components = document["components"]["schemas"]
    for name, (model, mode) in COMPONENTS.items():
        generated = model.model_json_schema(ref_template=REF_TEMPLATE, schema_generator=WireJsonSchema, mode=mode)
        for nested, definition in generated.pop("$defs", {}).items():
            assert components[nested] == definition, nested
        if name == "ImageToImageRequest":
            generated["properties"]["style"]["enum"] = [*STYLE_PRESETS, None]
        assert components[name] == generated, name


@pytest.mark.parametrize("view", [COMPLETED_VIEW, QUEUED_VIEW, FAILED_VIEW], ids=["completed", "queued", "failed"])
def test_what_the_job_view_model_dumps_the_document_accepts(document: dict[str, Any], view: dict[str, Any]) -> None:
    dumped = JobView.model_validate(view).model_dump(mode="json")
    check = validator(document, "JobView")
    assert check.is_valid(dumped), list(check.iter_errors(dumped))
