"""Download an image URL with hard caps on size, time and redirects, through the SSRF guard (`netguard`).

The guard resolves each hop once, refuses private/loopback/link-local/... addresses (`UrlNotAllowed`, 400
`url_not_allowed`) and connects to the address it checked; this module maps everything else to the image
errors the API documents. The body's decoded size is capped as it is produced (`netguard.read_capped`): a
compressed bomb answers 413 `image_too_large`, a coding not decoded there (br, `gzip, gzip`) 400 `invalid_image`.
A URL with credentials (`user:pass@`) is refused as `invalid_image` before any connection: it is never sent as
Basic auth nor echoed back in the job.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import anyio
import httpx

from gateway.errors import InvalidImage, Overloaded
from gateway.media import netguard
from gateway.media.codecs import IMAGE_URL_SCHEMES, image_too_large
from gateway.media.netguard import OutboundPolicy

MAX_REDIRECTS = netguard.MAX_REDIRECTS
# Ask for uncompressed bytes so Content-Length is the real size and no gzip bomb is inflated in memory.
REQUEST_HEADERS: Mapping[str, str] = MappingProxyType({"Accept": "image/*", "Accept-Encoding": "identity"})
FETCH_FAILED_MESSAGE = "Unable to fetch the provided image URL"
DNS_BUSY_RETRY_AFTER_S = 5
DEFAULT_POLICY = OutboundPolicy()


def _failed(reason: str) -> InvalidImage:
    return InvalidImage(FETCH_FAILED_MESSAGE, f"Could not fetch image URL: {reason}")


def _parse_first(url: str) -> httpx.URL:
    """The client's own URL: a malformed or non-http(s) one is an unusable image (400 `invalid_image`), as
    `codecs.parse_image_field` already says; the guard's `url_not_allowed` is for where it points."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        raise _failed("invalid URL") from None
    if parsed.scheme not in IMAGE_URL_SCHEMES or not parsed.host:
        raise _failed("only absolute http(s) URLs are supported")
    if parsed.userinfo:
        raise _failed("URLs with credentials (user:password@) are not accepted")
    return parsed


async def _fetch(
    url: str, client: httpx.AsyncClient, max_bytes: int, timeout_s: float, policy: OutboundPolicy
) -> bytes:
    async with netguard.open_stream(
        "GET",
        _parse_first(url),
        policy=policy,
        client=client,
        headers=REQUEST_HEADERS,
        timeout_s=timeout_s,
        max_redirects=MAX_REDIRECTS,
    ) as opened:
        response = opened.response
        if not response.is_success:
            raise _failed(f"HTTP {response.status_code}")
        return await netguard.read_capped(response, max_bytes)


async def fetch_image(
    url: str,
    *,
    client: httpx.AsyncClient,
    max_bytes: int,
    timeout_s: float,
    policy: OutboundPolicy = DEFAULT_POLICY,
) -> bytes:
    """GET `url` and return its body; `timeout_s` bounds the whole fetch, redirects and slow bodies included.

    A URL (or redirect) that points where `policy` forbids is `UrlNotAllowed`, refused before any connection.
    Any other failure to obtain the bytes is `InvalidImage` (the client's image is unusable), except a body over
    `max_bytes`, which is `ImageTooLarge`, like an oversized base64 upload. The default policy allows public
    addresses only.
    """
    try:
        with anyio.fail_after(timeout_s):
            return await _fetch(url, client, max_bytes, timeout_s, policy)
    except netguard.ResponseTooLarge:
        raise image_too_large(max_bytes) from None
    except netguard.DnsBusy:
        raise Overloaded(
            "Too many image URL lookups in progress",
            "The gateway's DNS lookups are backed up; retry later",
            headers={"Retry-After": str(DNS_BUSY_RETRY_AFTER_S)},
        ) from None
    except netguard.OutboundError as exc:
        raise _failed(exc.reason) from None
    except (TimeoutError, httpx.TimeoutException):
        raise _failed(f"timed out after {timeout_s:g}s") from None
    except httpx.HTTPError as exc:
        raise _failed(f"connection failed ({type(exc).__name__})") from None
    except httpx.InvalidURL:
        raise _failed("invalid URL") from None
