"""The OpenAPI 3.1 document served at `GET /openapi.json`: the route table (`ENDPOINTS`, each route with its
operation; `routes.routes()` serves the same table) written here, schemas generated from `schema`.

Every component schema is the `model_json_schema` of a wire model in `gateway.http.schema` (the request's lives in
`gateway.jobs.request`, where admission parses with it, and is re-exported there), the same models
that validate requests and describe responses, so the document cannot drift from the code; the error codes
come from `errors.ERROR_TABLE` and the style names from `styles`. A unit test checks it against the app's
routes and the OpenAPI 3.1 meta-schema, and the fuzz test checks live responses against it.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from http import HTTPStatus
from types import MappingProxyType
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.diffusion.styles import STYLE_PRESETS
from gateway.errors import ERROR_TABLE
from gateway.http import openai_compat
from gateway.http import schema as wire
from gateway.http.routetable import Endpoint, Operation
from gateway.http.schema import JOB_STATUSES, SPEC_RESPONSE_FIELDS, error_codes_by_status
from gateway.media import codecs

__all__ = [
    "COMPONENTS",
    "ENDPOINTS",
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
        "LoraList": (wire.LoraList, "serialization"),
        "Status": (wire.Status, "serialization"),
        "WebhookSecret": (wire.WebhookSecret, "serialization"),
        "ImageEditRequest": (openai_compat.ImageEditForm, "validation"),
        "ImagesResponse": (openai_compat.ImagesResponse, "serialization"),
        "OpenAIError": (openai_compat.OpenAIErrorBody, "serialization"),
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


# What each error code means on the wire, for the responses' descriptions; the status comes from ERROR_TABLE.
CODE_NOTES: Mapping[str, str] = MappingProxyType(
    {
        "url_not_allowed": "the SSRF guard refuses an image or webhook URL",
        "image_too_large": f"an image over {codecs.MAX_IMAGE_BYTES // 2**20} MB",
        "payload_too_large": "a body over the body cap",
        "request_timeout": "the body did not arrive within the body read timeout",
        "idempotency_conflict": "an Idempotency-Key reused with another body",
        "job_finished": "the job already finished",
        "nothing_to_redeliver": "the job has not finished, or its webhook has no final event",
        "rate_limited": "over the key's rate or work limit",
        "too_many_jobs": "the key already has its cap of queued and running jobs",
        "overloaded": "too much work queued, too many request bodies being read, or too many open connections",
        "backend_unavailable": "Triton unreachable, model not loaded or timed out",
        "backend_error": "Triton answered with an error",
        "store_unavailable": "the job store did not answer in time",
        "interrupted": "a synchronous job whose gateway restarted",
        "insufficient_storage": "the image storage is below its free-space floor or at its quota",
        "internal_error": "a bug; the details carry the request id",
        "run_attempts_exhausted": "a job re-run after crashes too often",
        "unauthorized": "missing or unknown bearer key",
    }
)
# Codes answered with `Retry-After`: the per-key limits, and every 503 (`errors.response_headers`).
RETRY_AFTER_CODES = frozenset(
    {"rate_limited", "too_many_jobs"}
    | {code for status, code in ERROR_TABLE.values() if status == HTTPStatus.SERVICE_UNAVAILABLE}
)
# Any request, before it reaches an operation: the connection cap (`overloaded`) and a bug (`internal_error`).
ANY_REQUEST = ("overloaded", "internal_error")
AUTHENTICATED = ("unauthorized", *ANY_REQUEST)


def _status_of(code: str) -> int:
    for status, known in ERROR_TABLE.values():
        if known == code:
            return status
    raise ValueError(f"error code {code!r} is not in errors.ERROR_TABLE")


def error_responses(*codes: str) -> dict[str, Any]:
    """The error responses of an operation that can answer `codes`: one per status, naming its codes.

    Every status an operation can answer is listed (there is no `default`), so a client, and schemathesis'
    `status_code_conformance`, can rely on the list; each status's codes come from the one error table."""
    by_status: dict[int, list[str]] = {}
    for code in dict.fromkeys(codes):
        by_status.setdefault(_status_of(code), []).append(code)
    out: dict[str, Any] = {}
    for status in sorted(by_status):
        listed = by_status[status]
        text = "; ".join(f"`{c}`" + (f" ({CODE_NOTES[c]})" if c in CODE_NOTES else "") for c in listed)
        headers = [h for c, h in (("unauthorized", "WWW-Authenticate"),) if c in listed]
        if RETRY_AFTER_CODES & set(listed):
            headers.append("Retry-After")
        out[str(status)] = _error(f"In the error shape: {text}", *headers)
    return out


def _operation(
    operation_id: str,
    summary: str,
    responses: dict[str, Any],
    *,
    public: bool = False,
    optional_auth: bool = False,
    parameters: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`public`: no key needed; `optional_auth`: no key needed, but some answers need one (a job's stored input)."""
    operation: dict[str, Any] = {"operationId": operation_id, "summary": summary}
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = body
    operation["responses"] = dict(sorted(responses.items()))
    if public:
        operation["security"] = []
    elif optional_auth:
        operation["security"] = [{}, {"bearerAuth": []}]
    return operation


def _merge(*parts: dict[str, Any]) -> dict[str, Any]:
    """Responses from several sources; a status given twice keeps the first (the success or the specific one)."""
    out: dict[str, Any] = {}
    for part in parts:
        for status, response in part.items():
            out.setdefault(status, response)
    return out


JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}, "description": "Job id"}
# The job a create answered, for the operations on it (OpenAPI links; schemathesis' stateful phase follows them).
JOB_LINKS = {
    name: {"operationId": operation_id, "parameters": {"job_id": "$response.body#/id"}, "description": description}
    for name, operation_id, description in (
        ("GetJob", "getJob", "Poll the job"),
        ("CancelJob", "cancelJob", "Cancel the job"),
        ("JobEvents", "jobEvents", "Follow the job's events"),
    )
}
# A request the tiny demo pipelines answer in well under a second: a 32x32 PNG, 2 denoising steps.
EXAMPLE_IMAGE = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAACAAAAAgCAIAAAD8GO2jAAAALUlEQVR42u3NsQ0AIAzAsCAx9GxO5wnYHGX3qj"
    "P17930NQAAAAAAAAAAAPCqC4UeAu65Hn1TAAAAAElFTkSuQmCC"
)
REQUEST_EXAMPLES = {
    "small": {
        "summary": "A small synchronous request",
        "value": {"image": EXAMPLE_IMAGE, "prompt": "a watercolor fox", "steps": 4, "strength": 0.5, "seed": 42},
    },
    "jpeg_ancestral": {
        "summary": "Another scheduler, JPEG output",
        "value": {
            "image": EXAMPLE_IMAGE,
            "prompt": "a watercolor fox",
            "steps": 4,
            "strength": 0.5,
            "seed": 42,
            "scheduler": "euler_ancestral",
            "output_format": "jpeg",
            "output_quality": 85,
        },
    },
}
# One event of the stream, as parsed (OpenAPI 3.2's reading of `schema` for `text/event-stream`, which
# schemathesis applies to 3.1 too): `event: job`, and `data:` a JobView in JSON.
SSE_JOB_EVENT = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"const": "job"},
        "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": _ref("JobView")},
    },
}
PLAYGROUND_HTML = {"text/html": {"schema": {"type": "string"}}}
CREATE_ERRORS = (
    "invalid_request",
    "invalid_image",
    "image_dimensions_too_large",
    "url_not_allowed",
    *AUTHENTICATED,
    "model_not_found",
    "request_timeout",
    "idempotency_conflict",
    "image_too_large",
    "payload_too_large",
    "unsupported_media_type",
    "rate_limited",
    "too_many_jobs",
    "backend_error",
    "backend_unavailable",
    "interrupted",
    "store_unavailable",
    "insufficient_storage",
    "run_attempts_exhausted",
)
JOB_ERRORS = (*AUTHENTICATED, "not_found", "store_unavailable")
EDIT_ERRORS = (*CREATE_ERRORS, "job_finished")  # job_finished: the job was canceled (its Location is answered)
# Statuses answered before the edits handler runs (the request rate limit, the connection cap, a bug) keep the
# native error shape; every other error of that route is in OpenAI's.
NATIVE_SHAPE_STATUSES = frozenset({"429", "500", "503"})


def openai_error_responses(*codes: str) -> dict[str, Any]:
    """`error_responses` for the OpenAI-compatible route: OpenAI's error shape (and the native one where a
    middleware may answer first), the same statuses and codes."""
    out = error_responses(*codes)
    for status, response in out.items():
        openai_shape = _ref("OpenAIError")
        schema = {"anyOf": [openai_shape, _ref("Error")]} if status in NATIVE_SHAPE_STATUSES else openai_shape
        response["content"] = _json(schema)
        response["description"] = response["description"].replace(
            "In the error shape", "In OpenAI's error shape (`error.code` is the native code)", 1
        )
    return out


JOB_JSON = _json(_ref("JobView"))
JOB_NOT_FOUND = {
    "404": _error(
        "In the error shape: `not_found` (no such job for this API key; another key's job is not found either)"
    )
}
IMAGE_CONTENT = {
    media: {"schema": {"type": "string", "contentMediaType": media}}
    for media in ("image/png", "image/jpeg", "image/webp")
}


def _playground_page(operation_id: str) -> Operation:
    return _operation(
        operation_id,
        "The playground: a page that calls this API from the browser (the key stays in the browser)",
        _merge(
            {"200": _response("The page", PLAYGROUND_HTML, "Content-Security-Policy")},
            error_responses(*ANY_REQUEST),
        ),
        public=True,
    )


# The route table: `routes.routes()` serves these, in this order (it is the routing order), and the document's
# paths are their operations.
ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "POST",
        "/v1/image-to-image",
        lambda s: s.handlers.image_to_image,
        _operation(
            "createImageToImage",
            "Transform an image (synchronous, or asynchronous with a webhook)",
            _merge(
                {
                    "200": {
                        **_response(
                            "The finished job (synchronous request): `completed`, or `canceled` if the "
                            "client went away",
                            JOB_JSON,
                            "Location",
                        ),
                        "links": JOB_LINKS,
                    },
                    "202": {
                        **_response(
                            "Accepted (a `webhook_url` was given, or `Prefer: respond-async`): the job is `queued` or "
                            "`processing`; poll `Location` or wait for the webhook",
                            JOB_JSON,
                            "Location",
                        ),
                        "links": JOB_LINKS,
                    },
                },
                error_responses(*CREATE_ERRORS),
            ),
            parameters=[
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[\\x21-\\x7e]+$"},
                    "description": "A retried POST with the same key and body returns the same job instead of "
                    "running twice; the same key with another body is 409 `idempotency_conflict`.",
                },
                {
                    "name": "Prefer",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string"},
                    "description": "`respond-async` (RFC 7240) answers 202 at once even without a `webhook_url`.",
                },
            ],
            body={
                "required": True,
                "content": {"application/json": {"schema": _ref("ImageToImageRequest"), "examples": REQUEST_EXAMPLES}},
            },
        ),
    ),
    Endpoint(  # before `GET /v1/images/{name}`, whose pattern matches this path too (routes.OwnPathRoute)
        "POST",
        openai_compat.EDITS_PATH,
        lambda s: s.handlers.openai_image_edits,
        _operation(
            "createImageEdit",
            "OpenAI-compatible image edit (OpenAI's multipart form and response; synchronous): the same jobs as "
            "`POST /v1/image-to-image`",
            _merge(
                {
                    "200": _response(
                        "OpenAI's `ImagesResponse`: `data[]` with `url` or `b64_json`; `Location` is the job",
                        _json(_ref("ImagesResponse")),
                        "Location",
                    )
                },
                openai_error_responses(*EDIT_ERRORS),
            ),
            body={
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": _ref("ImageEditRequest"),
                        "encoding": {
                            "image": {"contentType": "image/png, image/jpeg, image/webp"},
                            "mask": {"contentType": "image/png, image/webp"},
                        },
                    }
                },
            },
        ),
        errors=openai_compat.OPENAI_ERRORS,
    ),
    Endpoint(
        "GET",
        "/v1/image-to-image/{job_id}",
        lambda s: s.handlers.get_job,
        _operation(
            "getJob",
            "Poll a job (only the API key that created it can read it)",
            _merge({"200": _response("The job", JOB_JSON)}, JOB_NOT_FOUND, error_responses(*JOB_ERRORS)),
            parameters=[JOB_ID],
        ),
    ),
    Endpoint(
        "POST",
        "/v1/image-to-image/{job_id}/cancel",
        lambda s: s.handlers.cancel_job,
        _operation(
            "cancelJob",
            "Cancel a queued or running job (it stops between denoising steps and ends `canceled`)",
            _merge(
                {"200": _response("The job, now canceled", JOB_JSON)},
                JOB_NOT_FOUND,
                error_responses(*JOB_ERRORS, "job_finished"),
            ),
            parameters=[JOB_ID],
        ),
    ),
    Endpoint(
        "GET",
        "/v1/image-to-image/{job_id}/events",
        lambda s: s.handlers.job_events,
        _operation(
            "jobEvents",
            "Server-sent events: an `event: job` with the job view on each change, until the job finishes",
            _merge(
                {
                    "200": _response(
                        "An event stream; each `data:` line is a JobView (`: keep-alive` comments between)",
                        {"text/event-stream": {"schema": SSE_JOB_EVENT}},
                    )
                },
                JOB_NOT_FOUND,
                error_responses(*JOB_ERRORS, "rate_limited"),
            ),
            parameters=[JOB_ID],
        ),
    ),
    Endpoint(
        "POST",
        "/v1/image-to-image/{job_id}/webhook/redeliver",
        lambda s: s.handlers.redeliver_webhook,
        _operation(
            "redeliverWebhook",
            "Send the job's final webhook event again (the same `webhook-id`, a new timestamp and signature), "
            "through the outbox",
            _merge(
                {"202": _response("The job, its webhook pending again", JOB_JSON)},
                JOB_NOT_FOUND,
                error_responses(*JOB_ERRORS, "nothing_to_redeliver", "rate_limited"),
            ),
            parameters=[JOB_ID],
        ),
    ),
    Endpoint(
        "GET",
        "/v1/webhook-secret",
        lambda s: s.handlers.webhook_secret,
        _operation(
            "getWebhookSecret",
            "This API key's Standard Webhooks secret (`whsec_...`), created on first need; verify deliveries "
            "with `standardwebhooks.Webhook(secret).verify(body, headers)`",
            _merge({"200": _response("The secret", _json(_ref("WebhookSecret")))}, error_responses(*AUTHENTICATED)),
        ),
    ),
    Endpoint(
        "POST",
        "/v1/webhook-secret/rotate",
        lambda s: s.handlers.rotate_webhook_secret,
        _operation(
            "rotateWebhookSecret",
            "Issue a new secret for this API key; the previous one keeps signing beside it (several "
            "`v1,` signatures in `webhook-signature`) until `previous_expires_at`. Concurrent rotations make one.",
            _merge(
                {"200": _response("The new secret", _json(_ref("WebhookSecret")))},
                error_responses(*AUTHENTICATED, "rate_limited"),
            ),
        ),
    ),
    Endpoint(
        "GET",
        "/v1/images/{name}",
        lambda s: s.handlers.get_image,
        _operation(
            "getImage",
            "A stored image: an output (a capability URL: anyone with it may fetch it until retention deletes "
            "it), or a job's stored input (`{job_id}_input.*`: only with the API key that created the job)",
            _merge(
                {
                    "200": _response(
                        "The image, streamed (`X-Content-Type-Options: nosniff`; cached at most for the "
                        "retention: public for outputs, private for inputs)",
                        IMAGE_CONTENT,
                        "Cache-Control",
                        "X-Content-Type-Options",
                    ),
                    "404": _error("In the error shape: `not_found` (no such image, or an input of another key's job)"),
                },
                error_responses(*AUTHENTICATED, "store_unavailable"),
            ),
            optional_auth=True,
            parameters=[{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
        ),
    ),
    Endpoint(
        "GET",
        "/v1/models",
        lambda s: s.handlers.list_models,
        _operation(
            "listModels",
            "Served pipelines and parameter limits",
            _merge({"200": _response("The models", _json(_ref("ModelList")))}, error_responses(*AUTHENTICATED)),
        ),
    ),
    Endpoint(
        "GET",
        "/v1/loras",
        lambda s: s.handlers.list_loras,
        _operation(
            "listLoras",
            "LoRA adapters",
            _merge(
                {"200": _response("The adapters, with the models each fits", _json(_ref("LoraList")))},
                error_responses(*AUTHENTICATED, "model_not_found"),
            ),
            parameters=[
                {
                    "name": "model",
                    "in": "query",
                    "required": False,
                    "description": "Only the adapters this model can run (404 when it is not served).",
                    "schema": {"type": "string"},
                }
            ],
        ),
    ),
    Endpoint(
        "GET",
        "/v1/styles",
        lambda s: s.handlers.list_styles,
        _operation(
            "listStyles",
            "Style presets",
            _merge({"200": _response("The styles", _json(_ref("StyleList")))}, error_responses(*AUTHENTICATED)),
        ),
    ),
    Endpoint(
        "GET",
        "/healthz",
        lambda s: s.handlers.healthz,
        _operation(
            "healthz",
            "The process is alive",
            _merge({"200": _response("Alive", _json(_ref("Status")))}, error_responses(*ANY_REQUEST)),
            public=True,
        ),
    ),
    Endpoint(
        "GET",
        "/readyz",
        lambda s: s.handlers.readyz,
        _operation(
            "readyz",
            "Triton and every model of every manifest are ready",
            _merge(
                {
                    "200": _response("Ready", _json(_ref("Status"))),
                    "503": _response(
                        'Not ready (`{"status": "not_ready"}`), or `overloaded` in the error shape (too many '
                        "open connections); either with Retry-After",
                        _json({"anyOf": [_ref("Status"), _ref("Error")]}),
                        "Retry-After",
                    ),
                },
                error_responses(*ANY_REQUEST),
            ),
            public=True,
        ),
    ),
    Endpoint(
        "GET",
        "/metrics",
        lambda s: s.metrics,
        _operation(
            "metrics",
            "Prometheus metrics (text exposition format; OpenMetrics when asked for in Accept)",
            _merge(
                {
                    "200": _response(
                        "The metrics",
                        {
                            "text/plain": {"schema": {"type": "string"}},
                            "application/openmetrics-text": {"schema": {"type": "string"}},
                        },
                    )
                },
                error_responses(*ANY_REQUEST),
            ),
            public=True,
        ),
    ),
    Endpoint(
        "GET",
        "/openapi.json",
        lambda s: s.openapi,
        _operation(
            "openapi",
            "This document",
            _merge(
                {"200": _response("OpenAPI 3.1", {"application/json": {"schema": {"type": "object"}}})},
                error_responses(*ANY_REQUEST),
            ),
            public=True,
        ),
    ),
    Endpoint("GET", "/", lambda s: s.playground.index, _playground_page("home")),
    Endpoint("GET", "/playground", lambda s: s.playground.index, _playground_page("playground")),
    Endpoint(
        "GET",
        "/playground/{asset}",
        lambda s: s.playground.asset,
        _operation(
            "playgroundAsset",
            "A file of the playground page (its script and style sheet)",
            _merge(
                {
                    "200": _response(
                        "The file",
                        {
                            "text/javascript": {"schema": {"type": "string"}},
                            "text/css": {"schema": {"type": "string"}},
                        },
                        "Content-Security-Policy",
                    ),
                    "404": _error("In the error shape: `not_found` (no such file)"),
                },
                error_responses(*ANY_REQUEST),
            ),
            public=True,
            parameters=[{"name": "asset", "in": "path", "required": True, "schema": {"type": "string"}}],
        ),
    ),
)


def _paths() -> dict[str, Any]:
    """The documented entries of the route table, grouped by path."""
    paths: dict[str, Any] = {}
    for endpoint in ENDPOINTS:
        if endpoint.include_in_schema:
            paths.setdefault(endpoint.path, {})[endpoint.method.lower()] = endpoint.operation
    return paths


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
                "CacheControl": {"description": "How long the image may be cached", "schema": {"type": "string"}},
                "XContentTypeOptions": {"description": "`nosniff`", "schema": {"type": "string", "const": "nosniff"}},
                "ContentSecurityPolicy": {
                    "description": "The playground's policy: scripts, styles and requests from this origin only",
                    "schema": {"type": "string"},
                },
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
