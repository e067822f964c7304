"""URL fetching against an in-process `httpx.MockTransport`: no network is touched."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from gateway.errors import ImageTooLarge, InvalidImage
from gateway.fetch import MAX_REDIRECTS, fetch_image

Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]
URL = "https://images.example.test/in.png"
LIMIT = 1000
TIMEOUT_S = 2.0


async def fetch(handler: Handler, url: str = URL, *, max_bytes: int = LIMIT, timeout_s: float = TIMEOUT_S) -> bytes:
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        return await fetch_image(url, client=client, max_bytes=max_bytes, timeout_s=timeout_s)


async def details_of(handler: Handler, url: str = URL, *, timeout_s: float = TIMEOUT_S) -> str:
    with pytest.raises(InvalidImage) as info:
        await fetch(handler, url, timeout_s=timeout_s)
    assert info.value.message == "Unable to fetch the provided image URL"
    return info.value.details or ""


@pytest.mark.asyncio
async def test_returns_the_body_and_asks_for_identity_encoding() -> None:
    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"image-bytes")

    assert await fetch(handler) == b"image-bytes"
    assert str(seen[0].url) == URL
    assert seen[0].method == "GET"
    assert seen[0].headers["accept-encoding"] == "identity"


@pytest.mark.asyncio
async def test_exactly_max_bytes_is_accepted() -> None:
    async def handler(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"x" * LIMIT)

    assert len(await fetch(handler)) == LIMIT


@pytest.mark.asyncio
@pytest.mark.parametrize("status", [304, 400, 403, 404, 500, 503])
async def test_non_2xx_is_invalid_image(status: int) -> None:
    async def handler(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=b"nope")

    assert await details_of(handler) == f"Could not fetch image URL: HTTP {status}"


@pytest.mark.asyncio
async def test_declared_content_length_over_the_cap_is_refused_unread() -> None:
    read = False

    async def body() -> AsyncIterator[bytes]:
        nonlocal read
        read = True
        yield b"x"

    async def handler(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Length": str(LIMIT + 1)}, content=body())

    with pytest.raises(ImageTooLarge) as info:
        await fetch(handler)
    assert info.value.details == f"Maximum file size is {LIMIT} bytes"
    assert not read


@pytest.mark.asyncio
async def test_streamed_body_is_aborted_as_soon_as_it_exceeds_the_cap() -> None:
    chunks_sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal chunks_sent
        while True:
            chunks_sent += 1
            yield b"x" * 100

    async def handler(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=endless())  # no Content-Length: chunked

    with pytest.raises(ImageTooLarge):
        await fetch(handler)
    assert chunks_sent == LIMIT // 100 + 1


@pytest.mark.asyncio
async def test_lying_content_length_still_capped() -> None:
    async def handler(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Length": "10"}, content=b"x" * (LIMIT + 1))

    with pytest.raises(ImageTooLarge):
        await fetch(handler)


def redirect_chain(hops: int, final: httpx.Response) -> tuple[Handler, list[str]]:
    visited: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        visited.append(request.url.path)
        step = len(visited)
        if step <= hops:
            location = f"/hop{step}" if step % 2 else f"https://other.example.test/hop{step}"
            return httpx.Response(302 if step % 2 else 308, headers={"Location": location})
        return final

    return handler, visited


@pytest.mark.asyncio
async def test_follows_up_to_max_redirects_relative_and_absolute() -> None:
    handler, visited = redirect_chain(MAX_REDIRECTS, httpx.Response(200, content=b"done"))
    assert await fetch(handler) == b"done"
    assert visited == ["/in.png", "/hop1", "/hop2", "/hop3"]


@pytest.mark.asyncio
async def test_too_many_redirects() -> None:
    handler, visited = redirect_chain(MAX_REDIRECTS + 1, httpx.Response(200, content=b"done"))
    assert await details_of(handler) == f"Could not fetch image URL: more than {MAX_REDIRECTS} redirects"
    assert len(visited) == MAX_REDIRECTS + 1


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("headers", "fragment"),
    [
        ({}, "without a Location header"),
        ({"Location": "file:///etc/passwd"}, "only absolute http(s) URLs"),
        ({"Location": "ftp://example.test/a.png"}, "only absolute http(s) URLs"),
    ],
)
async def test_bad_redirects(headers: dict[str, str], fragment: str) -> None:
    async def handler(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(301, headers=headers)

    assert fragment in await details_of(handler)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("error", "fragment"),
    [
        (httpx.ConnectError("refused"), "connection failed (ConnectError)"),
        (httpx.RemoteProtocolError("bad"), "connection failed (RemoteProtocolError)"),
        (httpx.ReadTimeout("slow"), "timed out after 2s"),
        (httpx.ConnectTimeout("slow"), "timed out after 2s"),
    ],
)
async def test_transport_errors_are_invalid_image(error: Exception, fragment: str) -> None:
    async def handler(_request: httpx.Request) -> httpx.Response:
        raise error

    assert fragment in await details_of(handler)


@pytest.mark.asyncio
async def test_overall_deadline_covers_a_slow_server() -> None:
    async def handler(_request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)
        return httpx.Response(200, content=b"late")

    started = time.monotonic()
    assert await details_of(handler, timeout_s=0.05) == "Could not fetch image URL: timed out after 0.05s"
    assert time.monotonic() - started < 5


@pytest.mark.asyncio
async def test_overall_deadline_covers_a_slow_drip_body() -> None:
    async def drip() -> AsyncIterator[bytes]:
        while True:
            await asyncio.sleep(0.01)
            yield b"x"

    async def handler(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=drip())

    assert "timed out" in await details_of(handler, timeout_s=0.1)


@pytest.mark.asyncio
@pytest.mark.parametrize("url", ["ftp://example.test/a.png", "file:///etc/passwd", "https://", "not a url"])
async def test_bad_urls_never_reach_the_transport(url: str) -> None:
    async def handler(_request: httpx.Request) -> httpx.Response:
        raise AssertionError("should not be called")

    assert "Could not fetch image URL" in await details_of(handler, url)


def test_works_under_plain_asyncio_run() -> None:
    async def handler(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"ok")

    assert asyncio.run(fetch(handler)) == b"ok"
