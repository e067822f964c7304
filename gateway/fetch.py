"""Download an image URL with hard caps on size, time and redirects.

Redirects are followed by hand (not by httpx) so every hop is checked here, which is also where the SSRF
guard will go.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import anyio
import httpx

from gateway.codecs import IMAGE_URL_SCHEMES, image_too_large
from gateway.errors import InvalidImage

MAX_REDIRECTS = 3
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Ask for uncompressed bytes so Content-Length is the real size and no gzip bomb is inflated in memory.
REQUEST_HEADERS: Mapping[str, str] = MappingProxyType({"Accept": "image/*", "Accept-Encoding": "identity"})
FETCH_FAILED_MESSAGE = "Unable to fetch the provided image URL"


def _failed(reason: str) -> InvalidImage:
    return InvalidImage(FETCH_FAILED_MESSAGE, f"Could not fetch image URL: {reason}")


def _check_url(url: httpx.URL) -> None:
    if url.scheme not in IMAGE_URL_SCHEMES or not url.host:
        raise _failed("only absolute http(s) URLs are supported")
    # TODO(SSRF protection, later issue): resolve the host and refuse loopback, private, link-local and
    # metadata addresses here, for the first URL and every redirect hop, pinning the resolved address.


def _declared_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


async def _read_capped(response: httpx.Response, max_bytes: int) -> bytes:
    """Read the body, aborting as soon as more than `max_bytes` have arrived."""
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > max_bytes:
            raise image_too_large(max_bytes)
    return bytes(body)


async def _fetch(url: str, client: httpx.AsyncClient, max_bytes: int, timeout_s: float) -> bytes:
    try:
        current = httpx.URL(url)
    except httpx.InvalidURL:
        raise _failed("invalid URL") from None
    for _hop in range(MAX_REDIRECTS + 1):
        _check_url(current)
        async with client.stream(
            "GET", current, headers=dict(REQUEST_HEADERS), follow_redirects=False, timeout=timeout_s
        ) as response:
            status = response.status_code
            if status in REDIRECT_STATUSES:
                location = response.headers.get("location")
                if not location:
                    raise _failed(f"HTTP {status} without a Location header")
                try:
                    current = response.url.join(location)
                except httpx.InvalidURL:
                    raise _failed("invalid redirect Location") from None
                continue
            if not response.is_success:
                raise _failed(f"HTTP {status}")
            declared = _declared_length(response)
            if declared is not None and declared > max_bytes:
                raise image_too_large(max_bytes)
            return await _read_capped(response, max_bytes)
    raise _failed(f"more than {MAX_REDIRECTS} redirects")


async def fetch_image(url: str, *, client: httpx.AsyncClient, max_bytes: int, timeout_s: float) -> bytes:
    """GET `url` and return its body; `timeout_s` bounds the whole fetch, redirects and slow bodies included.

    Any failure to obtain the bytes is `InvalidImage` (the client's image is unusable), except a body over
    `max_bytes`, which is `ImageTooLarge`, like an oversized base64 upload.
    """
    try:
        with anyio.fail_after(timeout_s):
            return await _fetch(url, client, max_bytes, timeout_s)
    except (TimeoutError, httpx.TimeoutException):
        raise _failed(f"timed out after {timeout_s:g}s") from None
    except httpx.HTTPError as exc:
        raise _failed(f"connection failed ({type(exc).__name__})") from None
    except httpx.InvalidURL:
        raise _failed("invalid URL") from None
