"""Issue 21: one capped body reader (gateway.http.body) for the JSON and the multipart routes."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.requests import Request

from gateway.errors import PayloadTooLarge
from gateway.http.body import capped_stream, read_capped

CAP = 10


def _request(chunks: list[bytes], content_length: int | None) -> tuple[Request, list[int]]:
    """A request whose body arrives in `chunks`; the list returned counts the chunks the reader pulled."""
    pulled: list[int] = []
    headers = [] if content_length is None else [(b"content-length", str(content_length).encode())]

    async def receive() -> dict[str, Any]:
        i = len(pulled)
        pulled.append(i)
        return {"type": "http.request", "body": chunks[i], "more_body": i + 1 < len(chunks)}

    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers, "query_string": b""}
    return Request(scope, receive), pulled


async def test_a_body_within_the_cap_is_read_whole() -> None:
    request, _ = _request([b"12345", b"67890"], content_length=None)
    assert await read_capped(request, CAP) == b"1234567890"


async def test_a_declared_length_over_the_cap_is_refused_before_reading() -> None:
    request, pulled = _request([b"x" * 11], content_length=11)
    with pytest.raises(PayloadTooLarge):
        await read_capped(request, CAP)
    assert pulled == []


@pytest.mark.parametrize("declared", [None, 4])  # chunked, or lying about its length
async def test_a_body_streaming_past_the_cap_is_refused_at_the_first_chunk_over(declared: int | None) -> None:
    request, pulled = _request([b"1234", b"5678", b"9abc", b"never read"], content_length=declared)
    with pytest.raises(PayloadTooLarge):
        async for _ in capped_stream(request, CAP):
            pass
    assert pulled == [0, 1, 2]
