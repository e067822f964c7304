"""The OpenAPI 3.1 document served at `GET /openapi.json`: routes written here, schemas generated from `schema`.

Every component schema is the `model_json_schema` of a wire model in `gateway.http.schema`, the same models
that validate requests and describe responses, so the document cannot drift from the code; the error codes
come from `errors.ERROR_TABLE` and the style names from `styles`. A unit test checks it against the app's
routes and the OpenAPI 3.1 meta-schema, and the fuzz test checks live responses against it.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.diffusion.styles import STYLE_PRESETS
from gateway.http import schema as wire
from gateway.http.schema import JOB_STATUSES, SPEC_RESPONSE_FIELDS, error_codes_by_status
from gateway.media import codecs

__all__ = [
    "COMPONENTS",
    "JOB_STATUSES",
    "REF_TEMPLATE",
    "SPEC_RESPONSE_FIELDS",
    "component_schema",
    "error_codes_by_status",
    "openapi_document",
    "openapi_endpoint",
    "schemas",
]

OPENAPI_VERSION = "3.1.0"
API_VERSION = "1.0.0"
SCHEMAS_REF = "#/components/schemas/"
REF_TEMPLATE = SCHEMAS_REF + "{model}"

Schema = dict[str, Any]

# Component name -> (model, which side of the wire it is): requests are read (defaults apply), responses written.
COMPONENTS: Mapping[str, tuple[type[BaseModel], JsonSchemaMode]] = MappingProxyType(
    {
        "ImageToImageRequest": (wire.ImageToImageRequest, "validation"),
        "JobView": (wire.JobView, "serialization"),
        "Error": (wire.ErrorBody, "serialization"),
        "ModelList": (wire.ModelList, "serialization"),
        "StyleList": (wire.StyleList, "serialization"),
        "Status": (wire.Status, "serialization"),
        "WebhookSecret": (wire.WebhookSecret, "serialization"),
    }
)


def _ref(name: str) -> Schema:
    return {"$ref": SCHEMAS_REF + name}


def schemas() -> dict[str, Schema]:
    """`components/schemas`: each model's JSON Schema, its nested models (`$defs`) merged in beside it."""
    out: dict[str, Schema] = {}
    for name, (model, mode) in COMPONENTS.items():
        generated = model.model_json_schema(ref_template=REF_TEMPLATE, schema_generator=wire.WireJsonSchema, mode=mode)
        for nested, definition in generated.pop("$defs", {}).items():
            if out.setdefault(nested, definition) != definition:
                raise ValueError(f"two different schemas named {nested!r}")
        out[name] = generated
    # Styles are the deployment's (the validator takes them as an argument), so the document names the served ones.
    style = out["ImageToImageRequest"]["properties"]["style"]
    style["enum"] = [*STYLE_PRESETS, None]
    return out


def _json(schema: Schema) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _response(description: str, content: dict[str, Any], *extra_headers: str) -> dict[str, Any]:
    """A response with its content and headers; every response carries `X-Request-ID`."""
    headers = {"X-Request-ID": {"$ref": "#/components/headers/RequestId"}}
    for name in extra_headers:
        headers[name] = {"$ref": f"#/components/headers/{name.replace('-', '')}"}
    return {"description": description, "headers": headers, "content": content}


def _error(description: str, *extra_headers: str) -> dict[str, Any]:
    return _response(description, _json(_ref("Error")), *extra_headers)


def _operation(
    operation_id: str,
    summary: str,
    responses: dict[str, Any],
    *,
    public: bool = False,
    parameters: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    operation: dict[str, Any] = {"operationId": operation_id, "summary": summary}
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = body
    operation["responses"] = {
        **responses,
        "default": _error("Any other error (405 `method_not_allowed`, 500 `internal_error`) in the error shape"),
    }
    if public:
        operation["security"] = []
    return operation


UNAUTHORIZED = _error("Missing or unknown bearer key (`unauthorized`)", "WWW-Authenticate")
JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}, "description": "Job id"}


def _paths() -> dict[str, Any]:
    job_json = _json(_ref("JobView"))
    job_not_found = _error("No such job for this API key (`not_found`); another key's job is not found either")
    create = _operation(
        "createImageToImage",
        "Transform an image (synchronous, or asynchronous with a webhook)",
        {
            "200": _response(
                "The finished job (synchronous request): `completed`, or `canceled` if the client went away",
                job_json,
                "Location",
            ),
            "202": _response(
                "Accepted (a `webhook_url` was given, or `Prefer: respond-async`): the job is `queued` or "
                "`processing`; poll `Location` or wait for the webhook",
                job_json,
                "Location",
            ),
            "400": _error(
                "Invalid body or image (`invalid_request`, `invalid_image`, `image_dimensions_too_large`, "
                "`url_not_allowed` where the SSRF guard refuses a URL)"
            ),
            "401": UNAUTHORIZED,
            "404": _error("Unknown model (`model_not_found`)"),
            "409": _error("Idempotency-Key reused with another body (`idempotency_conflict`)"),
            "413": _error(
                f"Image over {codecs.MAX_IMAGE_BYTES // 2**20} MB (`image_too_large`) or body over the cap "
                "(`payload_too_large`)"
            ),
            "415": _error("Body is not `application/json` (`unsupported_media_type`)"),
            "429": _error("Over the per-key rate limit (`rate_limited`)", "Retry-After"),
            "502": _error("Triton answered with an error (`backend_error`)"),
            "503": _error(
                "Triton unreachable, model not loaded or timed out (`backend_unavailable`), or too much work "
                "queued (`overloaded`, with Retry-After)",
                "Retry-After",
            ),
        },
        parameters=[
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[\\x21-\\x7e]+$"},
                "description": "A retried POST with the same key and body returns the same job instead of running "
                "twice; the same key with another body is 409 `idempotency_conflict`.",
            },
            {
                "name": "Prefer",
                "in": "header",
                "required": False,
                "schema": {"type": "string"},
                "description": "`respond-async` (RFC 7240) answers 202 at once even without a `webhook_url`.",
            },
        ],
        body={"required": True, "content": _json(_ref("ImageToImageRequest"))},
    )
    return {
        "/v1/image-to-image": {"post": create},
        "/v1/image-to-image/{job_id}": {
            "get": _operation(
                "getJob",
                "Poll a job (only the API key that created it can read it)",
                {"200": _response("The job", job_json), "401": UNAUTHORIZED, "404": job_not_found},
                parameters=[JOB_ID],
            )
        },
        "/v1/image-to-image/{job_id}/cancel": {
            "post": _operation(
                "cancelJob",
                "Cancel a queued or running job (it stops between denoising steps and ends `canceled`)",
                {
                    "200": _response("The job, now canceled", job_json),
                    "401": UNAUTHORIZED,
                    "404": job_not_found,
                    "409": _error("The job already finished (`job_finished`)"),
                },
                parameters=[JOB_ID],
            )
        },
        "/v1/image-to-image/{job_id}/events": {
            "get": _operation(
                "jobEvents",
                "Server-sent events: an `event: job` with the job view on each change, until the job finishes",
                {
                    "200": _response(
                        "An event stream; each `data:` line is a JobView",
                        {"text/event-stream": {"schema": {"type": "string"}}},
                    ),
                    "401": UNAUTHORIZED,
                    "404": job_not_found,
                },
                parameters=[JOB_ID],
            )
        },
        "/v1/webhook-secret": {
            "get": _operation(
                "getWebhookSecret",
                "The HMAC-SHA256 secret this API key's webhooks are signed with",
                {"200": _response("The secret", _json(_ref("WebhookSecret"))), "401": UNAUTHORIZED},
            )
        },
        "/v1/images/{name}": {
            "get": _operation(
                "getImage",
                "A stored image (an output, or the stored copy of a base64 input)",
                {
                    "200": _response(
                        "The PNG", {"image/png": {"schema": {"type": "string", "contentMediaType": "image/png"}}}
                    ),
                    "404": _error("No such image (`not_found`)"),
                },
                public=True,
                parameters=[{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            )
        },
        "/v1/models": {
            "get": _operation(
                "listModels",
                "Served pipelines and parameter limits",
                {"200": _response("The models", _json(_ref("ModelList"))), "401": UNAUTHORIZED},
            )
        },
        "/v1/styles": {
            "get": _operation(
                "listStyles",
                "Style presets",
                {"200": _response("The styles", _json(_ref("StyleList"))), "401": UNAUTHORIZED},
            )
        },
        "/healthz": {
            "get": _operation(
                "healthz", "The process is alive", {"200": _response("Alive", _json(_ref("Status")))}, public=True
            )
        },
        "/readyz": {
            "get": _operation(
                "readyz",
                "Triton and every model of every manifest are ready",
                {
                    "200": _response("Ready", _json(_ref("Status"))),
                    "503": _response('Not ready (`{"status": "not_ready"}`)', _json(_ref("Status"))),
                },
                public=True,
            )
        },
        "/metrics": {
            "get": _operation(
                "metrics",
                "Prometheus metrics (text exposition format; OpenMetrics when asked for in Accept)",
                {"200": _response("The metrics", {"text/plain": {"schema": {"type": "string"}}})},
                public=True,
            )
        },
        "/openapi.json": {
            "get": _operation(
                "openapi",
                "This document",
                {"200": _response("OpenAPI 3.1", {"application/json": {"schema": {"type": "object"}}})},
                public=True,
            )
        },
    }


@functools.cache
def _document() -> dict[str, Any]:
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "imagen-serve",
            "version": API_VERSION,
            "description": (
                "Image-to-image diffusion (Stable Diffusion 1.x/2.x) behind the Image to Image API. Every response "
                "carries `X-Request-ID` (the client's, when it sends a sane one), also written in the server logs."
            ),
        },
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "security": [{"bearerAuth": []}],
        "paths": _paths(),
        "components": {
            "schemas": schemas(),
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "description": "`Authorization: Bearer <API key>`"}
            },
            "headers": {
                "RequestId": {
                    "description": "The request id (echoes a client's `X-Request-ID` of at most 64 [A-Za-z0-9._-])",
                    "schema": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"},
                },
                "RetryAfter": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}},
                "Location": {"description": "The job's URL, to poll", "schema": {"type": "string"}},
                "WWWAuthenticate": {"description": "`Bearer` (RFC 6750)", "schema": {"type": "string"}},
            },
        },
    }


def component_schema(document: dict[str, Any], name: str) -> Schema:
    """A standalone JSON Schema (2020-12) for one component, its `$ref`s resolving inside `document`."""
    return {"$ref": SCHEMAS_REF + name, "components": document["components"]}


def openapi_document() -> dict[str, Any]:
    """A fresh copy of the document (callers may mutate it)."""
    return copy.deepcopy(_document())


async def openapi_endpoint(request: Request) -> Response:
    """`GET /openapi.json`, unauthenticated, so clients and tools can discover the API."""
    return JSONResponse(_document())
