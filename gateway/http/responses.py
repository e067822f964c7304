"""Rendering our results and errors as HTTP responses: the one place an `ApiError` becomes a status and body."""

from __future__ import annotations

import json
from collections.abc import Mapping
from http import HTTPStatus

from starlette.responses import JSONResponse

from gateway.errors import ApiError, code_status, error_body, status_and_code


def error_response(exc: ApiError) -> JSONResponse:
    """Render `exc` as the JSON error response the spec documents, with any headers it carries."""
    status, code = status_and_code(exc)
    return JSONResponse(error_body(code, exc.message, exc.details), status_code=status, headers=dict(exc.headers))


def stored_error_response(code: str, message: str, details: str | None, headers: Mapping[str, str]) -> JSONResponse:
    """A failed job's stored error as its synchronous caller gets it: the same shape, and the status the table
    gives its code."""
    return JSONResponse(error_body(code, message, details), status_code=code_status(code), headers=dict(headers))


def raw_error_response(exc: ApiError) -> bytes:
    """`exc` as a whole HTTP/1.1 response, for an answer written to a connection before any request is read (the
    connection cap): the same status, body and headers as `error_response`, and the connection closed."""
    status, code = status_and_code(exc)
    body = json.dumps(error_body(code, exc.message, exc.details), separators=(",", ":")).encode()
    headers = {"content-type": "application/json", "content-length": str(len(body))}
    headers |= {name.lower(): value for name, value in exc.headers.items()} | {"connection": "close"}
    head = f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (head + "\r\n").encode("latin-1") + body
