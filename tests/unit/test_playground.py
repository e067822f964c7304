"""The playground's files: what the page loads is what the gateway serves, and the package (image) carries them."""

from __future__ import annotations

import re
from typing import Any

import pytest
from starlette.requests import Request

from gateway.errors import NotFound
from gateway.http.playground import ASSETS, CONTENT_SECURITY_POLICY, PAGE, STATIC_DIR, Playground
from gateway.settings import PROJECT_ROOT


def request(asset: str) -> Request:
    scope: dict[str, Any] = {"type": "http", "method": "GET", "path": f"/playground/{asset}", "headers": []}
    scope["path_params"] = {"asset": asset}
    return Request(scope)


def test_the_page_loads_exactly_the_served_files() -> None:
    html = (STATIC_DIR / PAGE).read_text()
    loaded = re.findall(r'(?:src|href)="playground/([^"]+)"', html)
    assert sorted(loaded) == sorted(ASSETS)
    assert all((STATIC_DIR / name).is_file() for name in ASSETS)


def test_the_script_builds_no_code_or_markup_from_strings() -> None:
    """The policy forbids eval; the page writes API answers with textContent, never as HTML."""
    script = (STATIC_DIR / "playground.js").read_text()
    assert not re.search(r"\beval\(|new Function\(|innerHTML|outerHTML|insertAdjacentHTML|document\.write", script)


async def test_assets_are_served_with_the_policy_and_unknown_names_are_not_found() -> None:
    playground = Playground()
    response = await playground.asset(request("playground.js"))
    assert response.body == (STATIC_DIR / "playground.js").read_bytes()
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert response.headers["x-content-type-options"] == "nosniff"
    for name in ("index.html", "../playground.py", "missing.js"):
        with pytest.raises(NotFound):
            await playground.asset(request(name))


def test_the_gateway_image_copies_the_static_files() -> None:
    dockerfile = (PROJECT_ROOT / "docker" / "gateway.Dockerfile").read_text()
    assert "COPY gateway/ gateway/" in dockerfile
    lines = (PROJECT_ROOT / ".dockerignore").read_text().splitlines()
    ignored = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert not [p for p in ignored if "static" in p or p.startswith("gateway")]
    assert STATIC_DIR.is_relative_to(PROJECT_ROOT / "gateway")
