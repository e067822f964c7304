"""Issue 22, point 4: anonymous access serves callers without a key, and nothing that belongs to a key.

The app is the real one (routes, error handlers) over httpx's ASGI transport, without its lifespan: every answer
here is decided before a handler would reach the job system.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from gateway.app import create_app
from gateway.settings import Settings

KEY = "k" * 40


def _client(tmp_path: Path, keys: frozenset[str]) -> httpx.AsyncClient:
    settings = Settings(
        model_repository=tmp_path / "models",
        storage_dir=tmp_path / "images",
        jobs_db=tmp_path / "jobs.sqlite3",
        api_keys=keys,
        allow_anonymous=True,
    )
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(settings)), base_url="http://test")


@pytest.mark.parametrize("path", ["/v1/webhook-secret", "/v1/webhook-secret/rotate"])
async def test_the_anonymous_owner_has_no_webhook_secret(tmp_path: Path, path: str) -> None:
    method = "POST" if path.endswith("rotate") else "GET"
    async with _client(tmp_path, frozenset()) as http:
        response = await http.request(method, path)
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "unauthorized"
    assert response.headers["WWW-Authenticate"] == "Bearer"


async def test_a_mistyped_key_is_401_not_the_anonymous_user(tmp_path: Path) -> None:
    async with _client(tmp_path, frozenset({KEY})) as http:
        mistyped = await http.get("/v1/image-to-image/img_transform_x", headers={"Authorization": f"Bearer {KEY}x"})
        models = await http.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert mistyped.status_code == models.status_code == 401
    assert mistyped.json()["error"]["message"] == "Invalid API key"
