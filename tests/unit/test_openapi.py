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
from gateway.jobs import request as protocol
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


def test_document_paths_are_the_documented_routes_that_routes_builds(tmp_path: Path) -> None:
    """One table gives both (`openapi.ENDPOINTS`): no route without its operation, no operation without a route."""
    from gateway.http.routes import Handlers, routes

    settings = Settings(model_repository=tmp_path, storage_dir=tmp_path, jobs_db=tmp_path / "jobs.sqlite3")
    served = [
        (route.path, method.lower())
        for route in routes(Handlers(settings))
        if isinstance(route, Route) and route.include_in_schema
        for method in route.methods or set()
        if method != "HEAD"  # Starlette adds HEAD to every GET
    ]
    documented = [(path, method) for path, item in openapi_document()["paths"].items() for method in item]
    assert sorted(served) == sorted(documented)
    assert len(served) == len(set(served)) > 10


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
    assert set(error_codes_by_status()[429]) == {"rate_limited", "too_many_jobs"}


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
    playground = {"/", "/playground", "/playground/{asset}"}
    assert public == {"/healthz", "/readyz", "/metrics", "/openapi.json", *playground}
    # Outputs need no key; a job's stored input needs the key that created the job.
    assert paths["/v1/images/{name}"]["get"]["security"] == [{}, {"bearerAuth": []}]
    image_ok = paths["/v1/images/{name}"]["get"]["responses"]["200"]
    assert {"X-Content-Type-Options", "Cache-Control"} <= set(image_ok["headers"])
    assert set(image_ok["content"]) == {"image/png", "image/jpeg", "image/webp"}
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


def _operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, op in item.items():
            if method in HTTP_METHODS:
                yield path, method, op


def test_every_operation_lists_its_statuses_and_each_error_status_names_codes_of_that_status(
    document: dict[str, Any],
) -> None:
    """No `default` response: schemathesis' status_code_conformance (and a client) can rely on the list. Each
    documented error status names only codes the error table pairs with that status, and every operation lists
    the answers any request may get (the connection cap's 503 `overloaded`, a bug's 500)."""
    by_status = {
        status: {code for s, code in ERROR_TABLE.values() if s == status} for status, _ in ERROR_TABLE.values()
    }
    for path, method, op in _operations(document):
        responses = op["responses"]
        assert "default" not in responses, (path, method)
        assert {"500", "503"} <= set(responses), (path, method)
        assert "Retry-After" in responses["503"]["headers"], (path, method)
        for status, response in responses.items():
            if int(status) < 400 or response["content"] != {
                "application/json": {"schema": {"$ref": REF_TEMPLATE.format(model="Error")}}
            }:
                continue
            named = set(re.findall(r"`([a-z_]+)`", response["description"]))
            assert named, (path, method, status)
            assert named <= by_status[int(status)], (path, method, status, named - by_status[int(status)])
        if op.get("security") != []:
            assert "401" in responses and "WWW-Authenticate" in responses["401"]["headers"], (path, method)


def test_create_documents_every_code_a_creation_can_answer(document: dict[str, Any]) -> None:
    responses = document["paths"]["/v1/image-to-image"]["post"]["responses"]
    named = {code for r in responses.values() for code in re.findall(r"`([a-z_]+)`", r["description"])}
    assert {
        "invalid_request", "invalid_image", "url_not_allowed", "unauthorized", "model_not_found", "request_timeout",
        "idempotency_conflict", "image_too_large", "payload_too_large", "unsupported_media_type", "rate_limited",
        "too_many_jobs", "backend_error", "backend_unavailable", "overloaded", "store_unavailable",
        "insufficient_storage", "internal_error",
    } <= named  # fmt: skip
    assert {"Retry-After"} <= set(responses["429"]["headers"])
    assert {"200", "202", "400", "401", "404", "408", "409", "413", "415", "429", "500", "502", "503", "507"} <= set(
        responses
    )


def test_links_name_operations_of_the_document(document: dict[str, Any]) -> None:
    ids = {op["operationId"]: op for _, _, op in _operations(document)}
    create = document["paths"]["/v1/image-to-image"]["post"]
    for status in ("200", "202"):
        links = create["responses"][status]["links"]
        assert {link["operationId"] for link in links.values()} == {"getJob", "cancelJob", "jobEvents"}
        for link in links.values():
            params = {p["name"] for p in ids[link["operationId"]]["parameters"] if p["in"] == "path"}
            assert set(link["parameters"]) == params == {"job_id"}
            assert link["parameters"]["job_id"] == "$response.body#/id"


def test_request_examples_are_valid_requests(document: dict[str, Any]) -> None:
    """The examples schemathesis sends first (and a reader copies) pass the request schema and the validator."""
    from gateway.jobs.request import parse_image_to_image
    from gateway.media.codecs import decode_image, parse_image_field

    media = document["paths"]["/v1/image-to-image"]["post"]["requestBody"]["content"]["application/json"]
    check = validator(document, "ImageToImageRequest")
    assert media["examples"]
    for example in media["examples"].values():
        body = example["value"]
        assert check.is_valid(body), list(check.iter_errors(body))
        request = parse_image_to_image(body, styles=STYLE_PRESETS)
        source = parse_image_field(request.image)
        assert source.data is not None
        assert decode_image(source.data).size == (32, 32)


def test_event_stream_schema_describes_each_event(document: dict[str, Any]) -> None:
    """`text/event-stream`'s schema is one parsed event (OpenAPI 3.2's reading, which schemathesis applies)."""
    content = document["paths"]["/v1/image-to-image/{job_id}/events"]["get"]["responses"]["200"]["content"]
    event_schema = {**content["text/event-stream"]["schema"], "components": document["components"]}
    check = Draft202012Validator(event_schema)
    assert check.is_valid({"event": "job", "data": json.dumps(COMPLETED_VIEW)})
    assert not check.is_valid({"event": "other", "data": "{}"})
    assert not check.is_valid("event: job")
