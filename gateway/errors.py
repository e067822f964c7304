"""Our exception types and the ONE table that maps them to an HTTP status and a wire error code.

Every layer raises these; only the HTTP layer turns them into responses (`gateway.http.responses`), so the
status/code pairing lives here and nowhere else, and the OpenAPI error-code enum is generated from it. This
module imports no web framework: jobs, media, diffusion and triton use it without knowing about HTTP.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from http import HTTPStatus
from types import MappingProxyType
from typing import ClassVar

_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


class ApiError(Exception):
    """Base of every error a client may see; `message` is the summary, `details` says what to fix."""

    default_headers: ClassVar[Mapping[str, str]] = _NO_HEADERS

    def __init__(self, message: str, details: str | None = None, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.headers: Mapping[str, str] = MappingProxyType({**self.default_headers, **(headers or {})})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, {self.details!r})"


class InvalidRequest(ApiError):
    """The JSON body breaks the wire schema (wrong type, out of range, unknown field)."""


class InvalidImage(ApiError):
    """The image cannot be obtained or decoded (bad base64, unsupported format, fetch failed)."""


class ImageTooLarge(ApiError):
    """The image's bytes exceed the size cap."""


class ImageDimensionsTooLarge(ApiError):
    """The image's width or height exceeds the side cap (checked from the header, before decoding)."""


class UrlNotAllowed(ApiError):
    """An image or webhook URL the gateway refuses to call: not http(s), or a host that resolves to a private,
    loopback, link-local, multicast or reserved address (SSRF guard); `details` says which rule it broke."""


class Unauthorized(ApiError):
    """Missing or wrong bearer token; RFC 6750 asks for a `WWW-Authenticate` challenge."""

    default_headers: ClassVar[Mapping[str, str]] = MappingProxyType({"WWW-Authenticate": "Bearer"})


class ModelNotFound(ApiError):
    """The requested model is not served by this deployment."""


class NotFound(ApiError):
    """No such route or stored object."""


class MethodNotAllowed(ApiError):
    """The route exists but not for this HTTP method."""


class UnsupportedMediaType(ApiError):
    """The request body is not `application/json`."""


class RequestTimeout(ApiError):
    """The request body did not arrive within the body read timeout (a slow or stalled client)."""


class PayloadTooLarge(ApiError):
    """The whole request body is over the gateway's body cap (distinct from the image size cap)."""


class BackendUnavailable(ApiError):
    """The inference backend (Triton) is not reachable or not ready; retrying later may help."""


class BackendError(ApiError):
    """The inference backend answered, but with an error or an unusable result."""


class InternalError(ApiError):
    """A bug on our side; the details never carry internals."""


class Overloaded(ApiError):
    """Admission control: too much work queued; comes with Retry-After."""


class IdempotencyKeyReused(ApiError):
    """An Idempotency-Key already used by this API key for a different request body."""


class JobFinished(ApiError):
    """The job already reached a final state (e.g. cancel after completion)."""


class NothingToRedeliver(ApiError):
    """A webhook redelivery of a job that has not finished, or whose webhook has no final event."""


class RateLimited(ApiError):
    """The caller's token bucket for job creation is empty; comes with Retry-After."""


class TooManyJobs(ApiError):
    """The caller's key already has its cap of queued and running jobs (`max_active_jobs_per_key`); comes with
    Retry-After: one of them must finish first."""


class Interrupted(ApiError):
    """A synchronous job whose gateway restarted before it finished: its caller's connection is gone, so it is
    not re-run (asynchronous jobs are); retrying the request is safe."""


class StoreUnavailable(ApiError):
    """The job store did not answer in time (locked, full disk, connection lost); retrying later may help."""


class RunAttemptsExhausted(ApiError):
    """A job was re-run after crashes more times than allowed: it is failed rather than crash-looping."""


class QueueTimeout(ApiError):
    """The job waited in the queue longer than its `max_queue_s` and never started (Baseten's max time in queue)."""


class InsufficientStorage(ApiError):
    """The image storage is below its free-space floor or at its quota (or the disk is full): nothing is written."""


ERROR_TABLE: Mapping[type[ApiError], tuple[int, str]] = MappingProxyType(
    {
        InvalidRequest: (400, "invalid_request"),
        InvalidImage: (400, "invalid_image"),
        ImageTooLarge: (413, "image_too_large"),
        ImageDimensionsTooLarge: (400, "image_dimensions_too_large"),
        UrlNotAllowed: (400, "url_not_allowed"),
        Unauthorized: (401, "unauthorized"),
        ModelNotFound: (404, "model_not_found"),
        NotFound: (404, "not_found"),
        MethodNotAllowed: (405, "method_not_allowed"),
        UnsupportedMediaType: (415, "unsupported_media_type"),
        PayloadTooLarge: (413, "payload_too_large"),
        RequestTimeout: (408, "request_timeout"),
        BackendUnavailable: (503, "backend_unavailable"),
        BackendError: (502, "backend_error"),
        InternalError: (500, "internal_error"),
        Overloaded: (503, "overloaded"),
        IdempotencyKeyReused: (409, "idempotency_conflict"),
        JobFinished: (409, "job_finished"),
        NothingToRedeliver: (409, "nothing_to_redeliver"),
        RateLimited: (429, "rate_limited"),
        TooManyJobs: (429, "too_many_jobs"),
        Interrupted: (503, "interrupted"),
        StoreUnavailable: (503, "store_unavailable"),
        RunAttemptsExhausted: (500, "run_attempts_exhausted"),
        InsufficientStorage: (507, "insufficient_storage"),
        QueueTimeout: (503, "queue_timeout"),
        # A subclass someone forgot to register still maps to something safe.
        ApiError: (500, "internal_error"),
    }
)


def status_and_code(exc: ApiError) -> tuple[int, str]:
    """Return the (HTTP status, error code) of the nearest class in `exc`'s MRO that the table lists."""
    for cls in type(exc).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    raise TypeError(f"{type(exc).__name__} is not an ApiError")  # unreachable for ApiError instances


def retry_after_s(wait_s: float) -> int:
    """`Retry-After` in whole seconds, rounded up so a client that waits exactly that long gets a token."""
    return max(1, math.ceil(wait_s - 1e-9))


def rate_limited(message: str, rule: str, wait_s: float) -> RateLimited:
    """429 `rate_limited` for a per-key budget that is spent: `rule` states the budget, and the wait until the
    request fits, in whole seconds, ends the details and is the `Retry-After`."""
    seconds = retry_after_s(wait_s)
    return RateLimited(message, f"{rule}; retry in {seconds} s", headers={RETRY_AFTER: str(seconds)})


# Every 503 says when to try again (RFC 9110 15.6.4): an error without a `Retry-After` of its own gets this one.
DEFAULT_RETRY_AFTER_S = 2
RETRY_AFTER = "Retry-After"


def response_headers(status: int, headers: Mapping[str, str]) -> dict[str, str]:
    """The headers an error is answered with, in any dialect: its own, plus `Retry-After` on a 503 without one,
    so a client backs off from an outage (a store or Triton down, a full queue) instead of hammering it."""
    out = dict(headers)
    if status == HTTPStatus.SERVICE_UNAVAILABLE and not any(name.lower() == "retry-after" for name in out):
        out[RETRY_AFTER] = str(DEFAULT_RETRY_AFTER_S)
    return out


def code_status(code: str) -> int:
    """The HTTP status of a stored error code (a failed job's `error.code`); unknown codes are a bug: 500."""
    return _CODE_STATUS.get(code, ERROR_TABLE[ApiError][0])


_CODE_STATUS: Mapping[str, int] = MappingProxyType({code: status for status, code in ERROR_TABLE.values()})
