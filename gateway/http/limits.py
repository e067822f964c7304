"""Inbound limits: what one client, or many at once, may make the gateway hold while a request arrives.

- `BodyBudget` + `InboundLimitsMiddleware`: a process-wide budget of request-body bytes being read and parsed at
  once (`IMAGEN_MAX_INFLIGHT_BODY_BYTES`). A body reserves its `Content-Length` when the handler starts reading it
  (chunked bodies: each chunk as it arrives); a body that cannot be reserved within `IMAGEN_BODY_BUDGET_WAIT_S` is
  read and thrown away (so the client, still sending, can see the answer) and answered 503 `overloaded` with
  `Retry-After`. The handler gives its reservation back once the parsed request has become a job
  (`release_body_budget`), the middleware in any case when the request ends. The whole body must arrive within
  `IMAGEN_BODY_TIMEOUT_S` of the first read: 408 `request_timeout` otherwise.
- `GuardedH11Protocol`: uvicorn's h11 protocol with what it lacks against slow clients: a deadline for a request's
  head (`IMAGEN_HEADER_TIMEOUT_S`, from the connection's start or the previous response; uvicorn's own keep-alive
  timer stops at the first byte, so one byte every few seconds would hold a connection forever) and a cap on open
  connections per process (`IMAGEN_MAX_CONNECTIONS`, beyond it a 503 in the error shape and the socket closed).
  uvicorn passes the protocol its `Config`: `GatewayConfig` carries the two limits (and pickles into workers).
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

import uvicorn
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from gateway.errors import Overloaded, RequestTimeout
from gateway.http.responses import raw_error_response
from gateway.observability import REQUEST_ID_HEADER, new_request_id

log = logging.getLogger("gateway")

LEASE_KEY = "imagen.body_lease"
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_MAX_CONNECTIONS = 1000
OVER_CAP_RETRY_AFTER_S = 1


class BodyBudget:
    """Bytes of request bodies held at once in this process; `acquire` waits a bounded time for room."""

    def __init__(self, total: int) -> None:
        self.total = max(1, total)
        self.used = 0
        self._released: asyncio.Event | None = None

    def try_take(self, n: int) -> bool:
        if self.used + n > self.total:
            return False
        self.used += n
        return True

    async def acquire(self, n: int, wait_s: float) -> bool:
        n = min(n, self.total)  # a body up to the body cap always fits an otherwise idle budget
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, wait_s)
        while not self.try_take(n):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            if self._released is None:
                self._released = asyncio.Event()
            try:
                await asyncio.wait_for(self._released.wait(), remaining)
            except TimeoutError:
                return False
        return True

    def release(self, n: int) -> None:
        self.used = max(0, self.used - n)
        if self._released is not None:
            self._released.set()
            self._released = None


class BodyLease:
    """One request's share of the budget; `release` is idempotent."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.held = 0

    def release(self) -> None:
        if self.held:
            self.budget.release(self.held)
            self.held = 0


def release_body_budget(request: Request) -> None:
    """The handler is done with the body (parsed, validated, the job created): give its bytes back."""
    lease = request.scope.get(LEASE_KEY)
    if isinstance(lease, BodyLease):
        lease.release()


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return None


class InboundLimitsMiddleware:
    """Body budget and body read timeout on every HTTP request's `receive` (see the module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        budget_bytes: int,
        wait_s: float,
        max_body_bytes: int,
        body_timeout_s: float,
    ) -> None:
        self.app = app
        self.budget = BodyBudget(budget_bytes)
        self.wait_s = wait_s
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    def _overloaded(self) -> Overloaded:
        retry = max(1, math.ceil(self.wait_s))
        return Overloaded(
            "Too many request bodies are being received",
            f"The gateway is reading {self.budget.used} bytes of request bodies (limit {self.budget.total}); "
            f"retry in about {retry} s",
            headers={"Retry-After": str(retry)},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        lease = BodyLease(self.budget)
        scope[LEASE_KEY] = lease
        declared = _content_length(scope)
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        done = False
        received = 0

        async def next_message() -> Message:
            assert deadline is not None  # noqa: S101 (set before the first read)
            try:
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    return await receive()
            except TimeoutError:
                raise RequestTimeout(
                    "Request body not received in time",
                    f"The whole body must arrive within {self.body_timeout_s:g} s",
                ) from None

        async def drain() -> None:
            """Read and discard the rest of the body (memory stays flat), within the body's deadline and cap."""
            nonlocal done, received
            while not done and received <= self.max_body_bytes:
                try:
                    message = await next_message()
                except RequestTimeout:
                    return
                if message["type"] != "http.request" or not message.get("more_body", False):
                    done = True
                received += len(message.get("body", b""))

        async def limited_receive() -> Message:
            nonlocal deadline, done, received
            if done:
                return await receive()
            if deadline is None:
                deadline = loop.time() + self.body_timeout_s
                if declared is not None and declared <= self.max_body_bytes:
                    if not await self.budget.acquire(declared, self.wait_s):
                        await drain()
                        raise self._overloaded()
                    lease.held = min(declared, self.budget.total)
                    deadline = loop.time() + self.body_timeout_s  # the wait for room is not the client's time
            message = await next_message()
            if message["type"] == "http.request":
                size = len(message.get("body", b""))
                received += size
                if declared is None and size and received <= self.max_body_bytes:
                    if not self.budget.try_take(size):
                        lease.release()
                        await drain()
                        raise self._overloaded()
                    lease.held += size
                if not message.get("more_body", False):
                    done = True
            else:
                done = True
            return message

        try:
            await self.app(scope, limited_receive, send)
        finally:
            lease.release()


class GatewayConfig(uvicorn.Config):
    """uvicorn's Config with the gateway's connection limits, read by `GuardedH11Protocol`."""

    def __init__(
        self,
        app: Any,
        *,
        header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("http", GuardedH11Protocol)
        super().__init__(app, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections


def _over_capacity_response() -> bytes:
    # Answered before any request is read: a fresh id, so this answer too can be quoted in a report.
    refused = Overloaded(
        "Too many open connections",
        "Retry on a new connection later",
        headers={"Retry-After": str(OVER_CAP_RETRY_AFTER_S), REQUEST_ID_HEADER: new_request_id()},
    )
    return raw_error_response(refused)


class GuardedH11Protocol(H11Protocol):
    """h11 with a request-head deadline and a connection cap (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.header_timeout_s = float(getattr(config, "header_timeout_s", DEFAULT_HEADER_TIMEOUT_S))
        self.max_connections = int(getattr(config, "max_connections", DEFAULT_MAX_CONNECTIONS))
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_of: object = None  # the cycle whose head has arrived (None: waiting for one)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            log.warning(
                "connection refused: %d connections open (limit %d)", len(self.connections) - 1, self.max_connections
            )
            self.transport.write(_over_capacity_response())
            self.transport.close()
            return
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timeout)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            log.info("closing a connection that sent no complete request head in %g s", self.header_timeout_s)
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and self.cycle is not self._head_of:
            self._head_of = self.cycle  # a new request's head is complete
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._arm_head_timer()  # the next request's head (pipelined ones cancel it at once)
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)
