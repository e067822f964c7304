"""The request body, capped: one reader for every route that takes a body (JSON and multipart alike), so the
limit and its error are written once. A declared Content-Length over the cap is refused before reading; a body
that streams past it (chunked, or lying about its length) is refused at the first chunk over."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from starlette.requests import Request

from gateway.errors import PayloadTooLarge


def too_large(max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge("Request body too large", f"Maximum request body is {max_bytes // 2**20} MB")


async def capped_stream(request: Request, max_bytes: int) -> AsyncGenerator[bytes]:
    """The body's chunks, at most `max_bytes` in all (413 `payload_too_large` past it)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_large(max_bytes)
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large(max_bytes)
        yield chunk


async def read_capped(request: Request, max_bytes: int) -> bytes:
    """The whole body, at most `max_bytes`."""
    chunks = [chunk async for chunk in capped_stream(request, max_bytes)]
    body = b"".join(chunks)
    chunks.clear()
    return body
