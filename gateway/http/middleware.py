"""The HTTP side of observability, as pure-ASGI middleware plus the `/metrics` handler: request ids echoed and
logged, and every request counted by route template, method and status (`gateway.observability` holds what they
feed, free of Starlette).

Pure ASGI (not `BaseHTTPMiddleware`) so streaming responses (server-sent events) pass through untouched and
the request id contextvar is visible to every task the request spawns.
"""

from __future__ import annotations

import logging
import time

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import ERROR_TABLE, InternalError
from gateway.http.responses import error_response
from gateway.observability import (
    KNOWN_METHODS,
    REQUEST_ID_HEADER,
    UNMATCHED_ROUTE,
    Metrics,
    accept_request_id,
    access_log,
    bind_request_id,
    unbind_request_id,
)

_REQUEST_ID_HEADER_BYTES = REQUEST_ID_HEADER.lower().encode("latin-1")
# Logged for a request the app ended without a response start (none of ours does): the internal error's status.
UNANSWERED_STATUS, _ = ERROR_TABLE[InternalError]


# --- route templates ------------------------------------------------------------------------------------------


def route_template(scope: Scope) -> str:
    """The route's path template (`/v1/image-to-image/{job_id}`), never the raw path: it bounds label cardinality.

    Starlette's router records the matched route in `scope["route"]` (also for a method mismatch). Requests
    answered before routing (rate limiting, body caps in middleware) are matched here against the app's routes.
    """
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    partial: str | None = None
    for candidate in getattr(scope.get("app"), "routes", ()):
        try:
            match, _ = candidate.matches(scope)
        except Exception:  # noqa: S112 - a route type that cannot match this scope: try the next one
            continue
        candidate_path = getattr(candidate, "path", None)
        if not isinstance(candidate_path, str):
            continue
        if match == Match.FULL:
            return candidate_path
        if match == Match.PARTIAL and partial is None:
            partial = candidate_path
    return partial or UNMATCHED_ROUTE


def _method_label(scope: Scope) -> str:
    method = str(scope.get("method", "")).upper()
    return method if method in KNOWN_METHODS else "other"


# --- request ids and the access log ---------------------------------------------------------------------------


class RequestIdMiddleware:
    """Gives each HTTP request an id (the client's `X-Request-ID` if sane), echoes it on every response, sets
    the contextvar that log lines read, and writes one access-log line per request.

    Placed inside Starlette's `ServerErrorMiddleware` (`add_middleware`), an unhandled exception would reach
    the client through a response this middleware never sees; so when the app raises before responding, this
    middleware answers the spec's 500 itself (with the id) and re-raises, and the outer handler, seeing the
    response started, only logs. Placed outside (wrapping the Starlette app), it sees that 500 go by.
    """

    def __init__(self, app: ASGIApp, *, logger: logging.Logger | None = None) -> None:
        self.app = app
        self.logger = logger or access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = None
        for name, value in scope.get("headers", ()):
            if name == _REQUEST_ID_HEADER_BYTES:
                incoming = value.decode("latin-1")
                break
        request_id = accept_request_id(incoming)
        token = bind_request_id(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        status: int | None = None
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if status is None:
                failed = error_response(InternalError("Internal server error", f"Request {request_id}"))
                status = failed.status_code
                await failed(scope, receive, send_with_id)
            self._log(scope, status, started, request_id)
            raise  # leave the context set: the outer error handler's log line still carries the id
        self._log(scope, status or UNANSWERED_STATUS, started, request_id)
        unbind_request_id(token)

    def _log(self, scope: Scope, status: int, started: float, request_id: str) -> None:
        elapsed_ms = (time.perf_counter() - started) * 1000
        route = route_template(scope)
        method = _method_label(scope)
        self.logger.info(
            "%s %s %d %.1fms",
            method,
            route,
            status,
            elapsed_ms,
            extra={
                "request_id": request_id,
                "http_method": method,
                "route": route,
                "status": status,
                "duration_ms": round(elapsed_ms, 3),
            },
        )


class MetricsMiddleware:
    """Counts every HTTP request by route template, method and status, and observes its duration."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: int | None = None
        started = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        self.metrics.http_in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.http_in_flight.dec()
            elapsed = time.perf_counter() - started
            self.metrics.record_request(route_template(scope), _method_label(scope), status or 500, elapsed)


async def metrics_endpoint(request: Request) -> Response:
    """`GET /metrics`: the app's `Metrics` (set as `app.state.metrics`) in Prometheus' text format."""
    metrics: Metrics = request.app.state.metrics
    body, content_type = await metrics.render(request.headers.get("accept"))
    return Response(body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})
