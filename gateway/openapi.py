"""The OpenAPI 3.1 document served at `GET /openapi.json`, built from the code that enforces the contract.

The request schema comes from `protocol`'s constants, the error codes from `errors.ERROR_TABLE` and the style
names from `styles`, so the document cannot drift from the validator; a unit test checks it against the app's
routes and the OpenAPI 3.1 meta-schema, and the fuzz test checks live responses against it.
"""

from __future__ import annotations

import copy
import functools
from collections import defaultdict
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway import codecs, protocol
from gateway.errors import ERROR_TABLE
from gateway.styles import STYLE_PRESETS

OPENAPI_VERSION = "3.1.0"
API_VERSION = "1.0.0"
JOB_STATUSES = ("queued", "processing", "completed", "failed", "canceled")
SCHEMAS_REF = "#/components/schemas/"
# The fields of the spec's success example: present in every job view, whatever the status.
SPEC_RESPONSE_FIELDS = (
    "id", "status", "prompt", "negative_prompt", "model", "strength", "steps", "guidance_scale", "seed", "style",
    "created_at", "completed_at", "original_image", "images",
)  # fmt: skip

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": SCHEMAS_REF + name}


def _nullable(schema: Schema) -> Schema:
    """JSON Schema 2020-12 (OpenAPI 3.1) spells nullable as a type union, or `anyOf` with null for a `$ref`."""
    if "$ref" in schema:
        return {"anyOf": [schema, {"type": "null"}]}
    out = dict(schema)
    out["type"] = [schema["type"], "null"]
    if "enum" in out:
        out["enum"] = [*out["enum"], None]
    return out


def error_codes_by_status() -> dict[int, list[str]]:
    """Every wire error code the gateway can send, grouped by HTTP status (from the one error table)."""
    grouped: dict[int, set[str]] = defaultdict(set)
    for status, code in ERROR_TABLE.values():
        grouped[status].add(code)
    return {status: sorted(codes) for status, codes in sorted(grouped.items())}


def _number_schema(field: str) -> Schema:
    limits = protocol.PARAMETER_LIMITS[field]
    schema: Schema = {"type": limits["type"], "minimum": limits["minimum"], "maximum": limits["maximum"]}
    if limits["default"] is not None:
        schema["default"] = limits["default"]
    return _nullable(schema) if limits["nullable"] else schema


def request_schema() -> Schema:
    """`POST /v1/image-to-image`'s body, from the validator's constants (`additionalProperties: false`)."""
    properties: dict[str, Schema] = {
        "image": {
            "type": "string",
            "minLength": 1,
            "description": (
                "An http(s) URL, a base64 data URI (`data:image/png;base64,...`) or bare base64. JPEG, PNG or WebP "
                f"(recognised by content), at most {codecs.MAX_IMAGE_BYTES // 2**20} MB (413 `image_too_large`) "
                f"and {codecs.MAX_IMAGE_SIDE}x{codecs.MAX_IMAGE_SIDE} pixels (400 `image_dimensions_too_large`)."
            ),
        },
        "prompt": {
            "type": "string",
            "minLength": 1,
            "maxLength": protocol.MAX_PROMPT_CHARS,
            "pattern": r"\S",
            "description": "Description of the desired transformation; not blank.",
        },
        "model": {
            "type": "string",
            "minLength": 1,
            "maxLength": protocol.MAX_MODEL_CHARS,
            "pattern": r"\S",
            "default": protocol.DEFAULT_MODEL,
            "description": "A served pipeline (`GET /v1/models`); unknown -> 404 `model_not_found`.",
        },
        "strength": {**_number_schema("strength"), "description": "How much to transform the image."},
        "steps": {
            **_number_schema("steps"),
            "description": (
                "Inference steps (a JSON integer: `30.0` is refused). diffusers runs `int(steps * strength)` "
                "denoising steps, which must be at least 1."
            ),
        },
        "guidance_scale": {
            **_number_schema("guidance_scale"),
            "description": "Classifier-free guidance; at most 1 disables it.",
        },
        "negative_prompt": {
            "type": ["string", "null"],
            "maxLength": protocol.MAX_NEGATIVE_PROMPT_CHARS,
            "description": "What to avoid.",
        },
        "seed": {**_number_schema("seed"), "description": "Random when absent; image i uses seed + i."},
        "num_images": {**_number_schema("num_images"), "description": "Number of variations."},
        "style": {
            "type": ["string", "null"],
            "enum": [*STYLE_PRESETS, None],
            "description": "A preset from `GET /v1/styles`.",
        },
        "webhook_url": {
            "type": ["string", "null"],
            "format": "uri",
            "minLength": 1,
            "maxLength": protocol.MAX_WEBHOOK_URL_CHARS,
            "pattern": "^[Hh][Tt][Tt][Pp][Ss]?://",
            "description": (
                "Absolute http(s) URL. When given the job runs asynchronously: 202 at once, then the final job "
                "JSON is POSTed here, signed with the key's webhook secret (`GET /v1/webhook-secret`)."
            ),
        },
    }
    assert tuple(properties) == protocol.FIELDS, "request schema and protocol.FIELDS disagree"
    return {
        "type": "object",
        "properties": properties,
        "required": list(protocol.REQUIRED_FIELDS),
        "additionalProperties": False,
        "description": (
            "Unknown fields, wrong types (`true` is not a number), NaN and out-of-range values are refused with "
            "400 `invalid_request` naming the field. Fields with a default must be omitted rather than sent as null."
        ),
    }


def _size() -> Schema:
    return {
        "type": "object",
        "properties": {"width": {"type": "integer", "minimum": 1}, "height": {"type": "integer", "minimum": 1}},
        "required": ["width", "height"],
    }


def schemas() -> dict[str, Schema]:
    codes = sorted({code for _, code in ERROR_TABLE.values()})
    image_ref = {
        "type": "object",
        "properties": {
            "url": {"type": "string", "format": "uri"},
            "width": {"type": "integer", "minimum": 1},
            "height": {"type": "integer", "minimum": 1},
        },
        "required": ["url", "width", "height"],
    }
    output_image = copy.deepcopy(image_ref)
    output_image["properties"]["seed"] = {
        "type": "integer",
        "minimum": protocol.MIN_SEED,
        "maximum": protocol.MAX_SEED,
        "description": "The seed this image used (seed + i); always sent by this gateway, absent from the spec",
    }
    error_object: Schema = {
        "type": "object",
        "properties": {
            "code": {"type": "string", "enum": codes},
            "message": {"type": "string", "minLength": 1},
            "details": {"type": ["string", "null"]},
        },
        "required": ["code", "message", "details"],
        "additionalProperties": False,
    }
    job_view: Schema = {
        "type": "object",
        "description": (
            "A job, in the spec's response shape. While `queued` or `processing`, `images` is [] and `completed_at` "
            "is null; a `failed` job carries the error object."
        ),
        "properties": {
            "id": {"type": "string", "minLength": 1},
            "status": {"type": "string", "enum": list(JOB_STATUSES)},
            "prompt": {"type": "string"},
            "negative_prompt": {"type": ["string", "null"]},
            "model": {"type": "string"},
            "strength": {"type": "number", "minimum": protocol.MIN_STRENGTH, "maximum": protocol.MAX_STRENGTH},
            "steps": {"type": "integer", "minimum": protocol.MIN_STEPS, "maximum": protocol.MAX_STEPS},
            "guidance_scale": {
                "type": "number",
                "minimum": protocol.MIN_GUIDANCE_SCALE,
                "maximum": protocol.MAX_GUIDANCE_SCALE,
            },
            "seed": {
                "type": "integer",
                "minimum": protocol.MIN_SEED,
                "maximum": protocol.MAX_SEED,
                "description": "Always set: a random seed is drawn when the job is created.",
            },
            "style": {"type": ["string", "null"]},
            "num_images": {"type": "integer", "minimum": protocol.MIN_NUM_IMAGES, "maximum": protocol.MAX_NUM_IMAGES},
            "webhook_url": {"type": ["string", "null"]},
            "created_at": {"type": "string", "format": "date-time"},
            "completed_at": {"type": ["string", "null"], "format": "date-time"},
            "original_image": {**_ref("ImageRef"), "description": "The input: its URL (or a stored copy) and size."},
            "processed_size": {**_ref("Size"), "description": "The size the model works at (= each output's size)."},
            "effective_steps": {"type": "integer", "minimum": 1, "description": "Denoising steps diffusers runs."},
            "images": {"type": "array", "items": _ref("OutputImage"), "maxItems": protocol.MAX_NUM_IMAGES},
            "progress": _nullable(_ref("Progress")),
            "error": _nullable(_ref("ErrorObject")),
            "webhook": _nullable(_ref("WebhookState")),
        },
        "required": list(SPEC_RESPONSE_FIELDS),
        "allOf": [
            {
                "if": {"properties": {"status": {"const": "completed"}}, "required": ["status"]},
                "then": {"properties": {"images": {"minItems": 1}, "completed_at": {"type": "string"}}},
            },
            {
                "if": {"properties": {"status": {"enum": ["queued", "processing"]}}, "required": ["status"]},
                "then": {"properties": {"images": {"maxItems": 0}, "completed_at": {"type": "null"}}},
            },
            {
                "if": {"properties": {"status": {"const": "failed"}}, "required": ["status"]},
                "then": {"properties": {"error": _ref("ErrorObject")}, "required": ["error"]},
            },
        ],
    }
    return {
        "ImageToImageRequest": request_schema(),
        "JobView": job_view,
        "ImageRef": image_ref,
        "OutputImage": output_image,
        "Size": _size(),
        "Progress": {
            "type": "object",
            "properties": {
                "step": {"type": "integer", "minimum": 0},
                "total_steps": {"type": "integer", "minimum": 0},
                "queue_position": {"type": ["integer", "null"], "minimum": 1},
            },
            "required": ["step", "total_steps", "queue_position"],
        },
        "WebhookState": {
            "type": "object",
            "properties": {
                "url": {"type": "string"},
                "status": {"type": "string", "description": "pending, then delivered or failed"},
                "attempts": {"type": "array", "items": _ref("WebhookAttempt")},
            },
            "required": ["url", "status", "attempts"],
        },
        "WebhookAttempt": {
            "type": "object",
            "properties": {
                "at": {"type": "string", "format": "date-time"},
                "status_code": {"type": ["integer", "null"]},
                "error": {"type": ["string", "null"]},
            },
            "required": ["at", "status_code", "error"],
        },
        "ErrorObject": error_object,
        "Error": {
            "type": "object",
            "description": "Every error response. Codes by status: "
            + "; ".join(f"{s}: {', '.join(c)}" for s, c in error_codes_by_status().items()),
            "properties": {"error": _ref("ErrorObject")},
            "required": ["error"],
            "additionalProperties": False,
        },
        "ModelList": {
            "type": "object",
            "properties": {
                "object": {"const": "list"},
                "default": {"type": "string"},
                "limits": {"type": "object", "description": "Parameter limits, as enforced (see the request schema)."},
                "data": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "id": {"type": "string"},
                            "object": {"const": "model"},
                            "native_resolution": {"type": "integer"},
                            "resolution_multiple": {"type": "integer"},
                            "scheduler": {"type": ["string", "null"]},
                            "dtype": {"type": "string"},
                            "defaults": {"type": "object"},
                        },
                        "required": ["id", "object", "native_resolution", "resolution_multiple"],
                    },
                },
            },
            "required": ["object", "data"],
        },
        "StyleList": {
            "type": "object",
            "properties": {
                "object": {"const": "list"},
                "data": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "id": {"type": "string"},
                            "prompt_template": {"type": "string"},
                            "negative_prompt": {"type": ["string", "null"]},
                        },
                        "required": ["id", "prompt_template"],
                    },
                },
            },
            "required": ["object", "data"],
        },
        "Status": {
            "type": "object",
            "properties": {"status": {"type": "string", "enum": ["ok", "ready", "not_ready"]}},
            "required": ["status"],
        },
        "WebhookSecret": {
            "type": "object",
            "properties": {"secret": {"type": "string", "minLength": 1}},
            "required": ["secret"],
        },
    }


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
            "413": _error("Image over 10 MB (`image_too_large`) or body over the cap (`payload_too_large`)"),
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
