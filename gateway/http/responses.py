"""Rendering our results and errors as HTTP responses: the one place an `ApiError` becomes a status and body."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.errors import ApiError, code_status, response_headers, status_and_code

Endpoint = Callable[[Request], Awaitable[Response]]


def error_body(code: str, message: str, details: str | None) -> dict[str, Any]:
    """Build the spec's error shape; `details` is always present (null only when nothing useful to add)."""
    return {"error": {"code": code, "message": message, "details": details}}


class ErrorDialect(Protocol):
    """How a family of routes renders errors: ours (`NATIVE_ERRORS`), or a compatible API's own shape
    (`openai_compat.OPENAI_ERRORS`); a route-table entry names its dialect (`routetable.Endpoint.errors`)."""

    def render(self, exc: ApiError) -> Response: ...

    def render_stored(self, code: str, message: str, details: str | None, headers: Mapping[str, str]) -> Response:
        """A failed job's stored error, with the status the error table gives its code."""
        ...


def error_response(exc: ApiError) -> JSONResponse:
    """Render `exc` as the JSON error response the spec documents, with any headers it carries."""
    status, code = status_and_code(exc)
    body = error_body(code, exc.message, exc.details)
    return JSONResponse(body, status_code=status, headers=response_headers(status, exc.headers))


def stored_error_response(code: str, message: str, details: str | None, headers: Mapping[str, str]) -> JSONResponse:
    """A failed job's stored error as its synchronous caller gets it: the same shape, and the status the table
    gives its code."""
    status = code_status(code)
    body = error_body(code, message, details)
    return JSONResponse(body, status_code=status, headers=response_headers(status, headers))


class NativeErrors:
    """The spec's error shape: `{"error": {"code", "message", "details"}}`."""

    def render(self, exc: ApiError) -> Response:
        return error_response(exc)

    def render_stored(self, code: str, message: str, details: str | None, headers: Mapping[str, str]) -> Response:
        return stored_error_response(code, message, details, headers)


NATIVE_ERRORS = NativeErrors()


def rendering_errors(endpoint: Endpoint, dialect: ErrorDialect) -> Endpoint:
    """`endpoint` with every `ApiError` it raises answered in `dialect` (the app's handlers answer in ours)."""

    async def rendered(request: Request) -> Response:
        try:
            return await endpoint(request)
        except ApiError as exc:
            return dialect.render(exc)

    return rendered


def raw_error_response(exc: ApiError) -> bytes:
    """`exc` as a whole HTTP/1.1 response, for an answer written to a connection before any request is read (the
    connection cap): the same status, body and headers as `error_response`, and the connection closed."""
    status, code = status_and_code(exc)
    body = json.dumps(error_body(code, exc.message, exc.details), separators=(",", ":")).encode()
    headers = {"content-type": "application/json", "content-length": str(len(body))}
    headers |= {name.lower(): value for name, value in response_headers(status, exc.headers).items()}
    headers |= {"connection": "close"}
    head = f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (head + "\r\n").encode("latin-1") + body
