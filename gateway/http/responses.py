"""Rendering our results and errors as HTTP responses: the one place an `ApiError` becomes a status and body."""

from __future__ import annotations

from starlette.responses import JSONResponse

from gateway.errors import ApiError, error_body, status_and_code


def error_response(exc: ApiError) -> JSONResponse:
    """Render `exc` as the JSON error response the spec documents, with any headers it carries."""
    status, code = status_and_code(exc)
    return JSONResponse(error_body(code, exc.message, exc.details), status_code=status, headers=dict(exc.headers))
