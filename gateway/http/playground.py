"""The playground: one static page (plain HTML, CSS and JavaScript in `static/`, no build step) that calls the API.

The files ship inside the `gateway` package (the gateway image copies `gateway/` whole) and are read once, at
startup, into memory: the page is a fixed set of names, never a path into the file system. Every answer carries
a strict Content-Security-Policy: scripts and styles only from this origin (no inline code), requests only to
this origin (`connect-src 'self'`: the API key, which the page keeps in the browser and sends as an
`Authorization` header, can go nowhere else), no frames, forms or plugins. Images may come from any http(s)
origin, so the page can preview a pasted image URL; an image cannot run code.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from starlette.requests import Request
from starlette.responses import Response

from gateway.errors import NotFound

STATIC_DIR = Path(__file__).resolve().parent / "static"
PAGE = "index.html"
# The files the page loads (`/playground/{name}`), with their media types.
ASSETS: Mapping[str, str] = MappingProxyType(
    {
        "playground.js": "text/javascript; charset=utf-8",
        "playground.css": "text/css; charset=utf-8",
    }
)
PAGE_TYPE = "text/html; charset=utf-8"
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob: data: https: http:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
HEADERS: Mapping[str, str] = MappingProxyType(
    {
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",  # revalidate: a new release's page and script arrive together
    }
)


class Playground:
    """`GET /` and `/playground` (the page) and `GET /playground/{asset}`; public, like `/openapi.json`."""

    def __init__(self, folder: Path = STATIC_DIR) -> None:
        self.page = (folder / PAGE).read_bytes()
        self.assets = {name: (folder / name).read_bytes() for name in ASSETS}

    async def index(self, request: Request) -> Response:
        return Response(self.page, media_type=PAGE_TYPE, headers=dict(HEADERS))

    async def asset(self, request: Request) -> Response:
        name = request.path_params["asset"]
        body = self.assets.get(name)
        if body is None:
            raise NotFound("Not found", f"The playground has no file named '{name}'")
        return Response(body, media_type=ASSETS[name], headers=dict(HEADERS))
