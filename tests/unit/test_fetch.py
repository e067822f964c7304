"""URL fetching against an in-process `httpx.MockTransport`: no network is touched.

Names resolve through an injected resolver (every name is the public 93.184.216.34), so the SSRF guard runs as in
production but no DNS is asked; the guard itself is tested in `test_netguard.py`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from gateway.errors import ImageTooLarge, InvalidImage, UrlNotAllowed
from gateway.media.fetch import MAX_REDIRECTS, fetch_image
from gateway.media.netguard import OutboundPolicy

Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]
URL = "https://images.example.test/in.png"
LIMIT = 1000
TIMEOUT_S = 2.0
PUBLIC_IP = "93.184.216.34"
PRIVATE_NAMES = {"intranet.example.test": "10.0.0.5"}


async def resolver(host: str, _port: int) -> list[str]:
    return [PRIVATE_NAMES.get(host, PUBLIC_IP)]


POLICY = OutboundPolicy(resolver=resolver)


async def fetch(
    handler: Handler,
    url: str = URL,
    *,
    max_bytes: int = LIMIT,
    timeout_s: float = TIMEOUT_S,
    policy: OutboundPolicy = POLICY,
) -> bytes:
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        return await fetch_image(url, client=client, max_bytes=max_bytes, timeout_s=timeout_s, policy=policy)


async def details_of(
    handler: Handler, url: str = URL, *, timeout_s: float = TIMEOUT_S, policy: OutboundPolicy = POLICY
) -> str:
    with pytest.raises(InvalidImage) as info:
        await fetch(handler, url, timeout_s=timeout_s, policy=policy)
    assert info.value.message == "Unable to fetch the provided image URL"
    return info.value.details or ""


@pytest.mark.asyncio
async def test_returns_the_body_and_asks_for_identity_encoding() -> None:
    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"image-bytes")

    assert await fetch(handler) == b"image-bytes"
    # The connection goes to the checked address; the name travels in Host and as the TLS server name.
    assert str(seen[0].url) == f"https://{PUBLIC_IP}/in.png"
    assert seen[0].headers["host"] == "images.example.test"
    assert seen[0].extensions["sni_hostname"] == "images.example.test"
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
async def test_redirect_without_location() -> None:
    async def handler(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(301)

    assert await details_of(handler) == "Could not fetch image URL: HTTP 301 without a Location header"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("location", "fragment"),
    [
        ("file:///etc/passwd", "Only http and https URLs are allowed"),
        ("ftp://example.test/a.png", "Only http and https URLs are allowed"),
        ("http://127.0.0.1:8080/admin", "Address 127.0.0.1 is a loopback address"),
        ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
        ("https://intranet.example.test/secret.png", "resolves to a private address"),
    ],
)
async def test_redirects_where_the_guard_forbids_are_url_not_allowed(location: str, fragment: str) -> None:
    """The server, not the client, chose the target, but it is the same SSRF: refused as `url_not_allowed`."""
    seen: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(302, headers={"Location": location})

    with pytest.raises(UrlNotAllowed) as info:
        await fetch(handler)
    assert info.value.details is not None
    assert info.value.details.startswith("Redirect to ") and fragment in info.value.details
    assert seen == [f"https://{PUBLIC_IP}/in.png"]  # the forbidden hop was never requested


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/a.png",
        "http://[::1]/a.png",
        "http://10.0.0.1/a.png",
        "http://169.254.169.254/latest/meta-data/",
        "https://intranet.example.test/a.png",
    ],
)
async def test_forbidden_urls_never_reach_the_transport(url: str) -> None:
    async def handler(_request: httpx.Request) -> httpx.Response:
        raise AssertionError("should not be called")

    with pytest.raises(UrlNotAllowed):
        await fetch(handler, url)


@pytest.mark.asyncio
async def test_default_policy_refuses_loopback() -> None:
    async def handler(_request: httpx.Request) -> httpx.Response:
        raise AssertionError("should not be called")

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(UrlNotAllowed) as info:
            await fetch_image("http://localhost:1/a.png", client=client, max_bytes=LIMIT, timeout_s=TIMEOUT_S)
    assert info.value.details is not None and "a loopback address" in info.value.details


@pytest.mark.asyncio
async def test_allow_list_reaches_a_private_host() -> None:
    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"ok")

    policy = OutboundPolicy(allow=("intranet.example.test",), resolver=resolver)
    assert await fetch(handler, "https://intranet.example.test/a.png", policy=policy) == b"ok"
    assert seen[0].url.host == "10.0.0.5" and seen[0].headers["host"] == "intranet.example.test"


@pytest.mark.asyncio
async def test_unresolvable_host_is_invalid_image() -> None:
    async def nowhere(_host: str, _port: int) -> list[str]:
        return []

    async def handler(_request: httpx.Request) -> httpx.Response:
        raise AssertionError("should not be called")

    assert await details_of(handler, policy=OutboundPolicy(resolver=nowhere)) == (
        "Could not fetch image URL: could not resolve host 'images.example.test'"
    )


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


# --- issue 10: encodings, credentials, DNS backlog -------------------------------------------------------------


def _streamed(body: bytes, headers: dict[str, str]) -> Handler:
    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    async def handler(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=headers, content=chunks())

    return handler


@pytest.mark.asyncio
async def test_compressed_bombs_are_image_too_large_and_unknown_codings_invalid_image() -> None:
    import gzip

    bomb = gzip.compress(bytes(16 * 1024 * 1024), 9)
    with pytest.raises(ImageTooLarge):
        await fetch(_streamed(bomb, {"Content-Encoding": "gzip"}))
    for encoding in ("gzip, gzip", "br", "gzip, br", "zstd"):
        details = await details_of(_streamed(gzip.compress(bomb), {"Content-Encoding": encoding}))
        assert "Content-Encoding" in details, encoding
    assert await fetch(_streamed(gzip.compress(b"png" * 100), {"Content-Encoding": "gzip"})) == b"png" * 100


@pytest.mark.asyncio
async def test_urls_with_credentials_are_invalid_image_and_never_requested() -> None:
    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"x")

    for url in ("https://user:pass@images.example.test/in.png", "https://user@images.example.test/in.png"):
        details = await details_of(handler, url)
        assert "credentials" in details and "pass@" not in details
    assert seen == []


@pytest.mark.asyncio
async def test_a_dns_backlog_is_overloaded_with_retry_after() -> None:
    from gateway.errors import Overloaded
    from gateway.media import netguard

    async def busy(host: str, _port: int) -> list[str]:
        raise netguard.DnsBusy("too many DNS lookups in flight (16); retry later")

    async def handler(_request: httpx.Request) -> httpx.Response:
        raise AssertionError("no request without an address")

    with pytest.raises(Overloaded) as info:
        await fetch(handler, policy=OutboundPolicy(resolver=busy))
    assert info.value.headers["Retry-After"] == "5"
