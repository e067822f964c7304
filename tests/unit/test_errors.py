"""The error table is the single source of (status, code); these tests pin it to the spec."""

from __future__ import annotations

import inspect
import json

import pytest

from gateway import errors
from gateway.errors import (
    ERROR_TABLE,
    ApiError,
    BackendError,
    BackendUnavailable,
    IdempotencyKeyReused,
    ImageDimensionsTooLarge,
    ImageTooLarge,
    InsufficientStorage,
    InternalError,
    Interrupted,
    InvalidImage,
    InvalidRequest,
    JobFinished,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    NothingToRedeliver,
    Overloaded,
    PayloadTooLarge,
    QueueTimeout,
    RateLimited,
    RequestTimeout,
    RunAttemptsExhausted,
    StoreUnavailable,
    TooManyJobs,
    Unauthorized,
    UnsupportedMediaType,
    UrlNotAllowed,
    status_and_code,
)
from gateway.http.responses import error_body, error_response, raw_error_response

EXPECTED = [
    (InvalidRequest, 400, "invalid_request"),
    (InvalidImage, 400, "invalid_image"),
    (ImageTooLarge, 413, "image_too_large"),
    (ImageDimensionsTooLarge, 400, "image_dimensions_too_large"),
    (Unauthorized, 401, "unauthorized"),
    (ModelNotFound, 404, "model_not_found"),
    (NotFound, 404, "not_found"),
    (MethodNotAllowed, 405, "method_not_allowed"),
    (UnsupportedMediaType, 415, "unsupported_media_type"),
    (PayloadTooLarge, 413, "payload_too_large"),
    (BackendUnavailable, 503, "backend_unavailable"),
    (BackendError, 502, "backend_error"),
    (InternalError, 500, "internal_error"),
    (UrlNotAllowed, 400, "url_not_allowed"),
    (Overloaded, 503, "overloaded"),
    (IdempotencyKeyReused, 409, "idempotency_conflict"),
    (JobFinished, 409, "job_finished"),
    (NothingToRedeliver, 409, "nothing_to_redeliver"),
    (RateLimited, 429, "rate_limited"),
    (RequestTimeout, 408, "request_timeout"),
    (TooManyJobs, 429, "too_many_jobs"),
    (Interrupted, 503, "interrupted"),
    (StoreUnavailable, 503, "store_unavailable"),
    (RunAttemptsExhausted, 500, "run_attempts_exhausted"),
    (InsufficientStorage, 507, "insufficient_storage"),
    (QueueTimeout, 503, "queue_timeout"),
]


@pytest.mark.parametrize(("cls", "status", "code"), EXPECTED)
def test_status_and_code(cls: type[ApiError], status: int, code: str) -> None:
    assert status_and_code(cls("m", "d")) == (status, code)
    assert ERROR_TABLE[cls] == (status, code)


def test_every_error_class_is_in_the_table() -> None:
    defined = {
        obj
        for obj in vars(errors).values()
        if inspect.isclass(obj) and issubclass(obj, ApiError) and obj.__module__ == errors.__name__
    }
    assert defined == set(ERROR_TABLE)
    assert {cls for cls, _, _ in EXPECTED} | {ApiError} == defined


def test_unregistered_subclass_walks_the_mro() -> None:
    class SpecificImageProblem(InvalidImage):
        pass

    class Unknown(ApiError):
        pass

    assert status_and_code(SpecificImageProblem("x")) == (400, "invalid_image")
    assert status_and_code(Unknown("x")) == (500, "internal_error")


def test_error_body_has_the_spec_shape() -> None:
    assert error_body("invalid_image", "Unable", "corrupt") == {
        "error": {"code": "invalid_image", "message": "Unable", "details": "corrupt"}
    }
    assert error_body("internal_error", "Oops", None) == {
        "error": {"code": "internal_error", "message": "Oops", "details": None}
    }


def test_error_response_renders_status_body_and_headers() -> None:
    response = error_response(ImageTooLarge("Image file size exceeds maximum limit", "Maximum file size is 10MB"))
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/json"
    assert json.loads(response.body) == {
        "error": {
            "code": "image_too_large",
            "message": "Image file size exceeds maximum limit",
            "details": "Maximum file size is 10MB",
        }
    }


def test_unauthorized_carries_bearer_challenge() -> None:
    exc = Unauthorized("Missing bearer token")
    assert exc.headers == {"WWW-Authenticate": "Bearer"}
    response = error_response(exc)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert json.loads(response.body)["error"]["details"] is None


def test_extra_headers_merge_and_do_not_leak_between_instances() -> None:
    exc = BackendUnavailable("busy", "retry later", headers={"Retry-After": "5"})
    assert dict(exc.headers) == {"Retry-After": "5"}
    assert error_response(exc).headers["retry-after"] == "5"
    assert dict(BackendUnavailable("busy").headers) == {}
    merged = Unauthorized("x", headers={"X-Extra": "1"})
    assert dict(merged.headers) == {"WWW-Authenticate": "Bearer", "X-Extra": "1"}
    assert dict(Unauthorized("y").headers) == {"WWW-Authenticate": "Bearer"}


def test_message_and_details_are_kept() -> None:
    exc = InvalidRequest("Invalid field 'steps'", "'steps' must be an integer between 1 and 150")
    assert str(exc) == "Invalid field 'steps'"
    assert exc.message == "Invalid field 'steps'"
    assert exc.details == "'steps' must be an integer between 1 and 150"
    assert "InvalidRequest" in repr(exc)


def test_a_connection_level_answer_is_the_renderers_status_body_and_headers() -> None:
    """The connection cap's raw 503 comes from the same table and body as every other error response."""
    refused = Overloaded("Too many open connections", "Retry later", headers={"Retry-After": "1"})
    head, _, body = raw_error_response(refused).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    rendered = error_response(refused)
    assert status_line == f"HTTP/1.1 {rendered.status_code} Service Unavailable"
    assert json.loads(body) == json.loads(rendered.body)
    assert headers["retry-after"] == "1" and headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
