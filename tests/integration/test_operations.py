"""Issue 5, operations: rate limits, request ids, /metrics, /openapi.json against the real gateway."""

from __future__ import annotations

import time

import httpx
import pytest
from openapi_spec_validator import validate

from tests.helpers import data_uri, make_image
from tests.integration.conftest import GatewayFactory

pytestmark = pytest.mark.integration

BODY = {"image": data_uri(make_image(64, 64)), "prompt": "a kite", "steps": 4, "strength": 0.5}


def test_rate_limit_burst_gets_429_with_retry_after_and_accepted_jobs_complete(
    make_gateway: GatewayFactory, auth: dict[str, str]
) -> None:
    with make_gateway(rate_limit_per_minute=30, rate_limit_burst=3) as url:
        headers = {**auth, "Prefer": "respond-async"}
        responses = [httpx.post(f"{url}/v1/image-to-image", json=BODY, headers=headers) for _ in range(6)]
        codes = [r.status_code for r in responses]
        assert codes[:3] == [202, 202, 202] and set(codes[3:]) == {429}, codes
        for r in responses[3:]:
            assert r.json()["error"]["code"] == "rate_limited" and int(r.headers["retry-after"]) >= 1
        for r in responses[:3]:
            job_url = f"{url}/v1/image-to-image/{r.json()['id']}"
            deadline = time.monotonic() + 60
            while (job := httpx.get(job_url, headers=auth).json())["status"] not in {"completed", "failed"}:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert job["status"] == "completed"
        assert httpx.get(f"{url}/v1/models", headers=auth).status_code == 200  # reads are not limited


def test_request_ids_metrics_and_openapi(gateway: str, auth: dict[str, str]) -> None:
    ok = httpx.post(f"{gateway}/v1/image-to-image", json=BODY, headers={**auth, "X-Request-ID": "trace-123"})
    assert ok.status_code == 200 and ok.headers["x-request-id"] == "trace-123"
    bad = httpx.post(f"{gateway}/v1/image-to-image", json={"prompt": 1}, headers=auth)
    assert bad.status_code == 400 and len(bad.headers["x-request-id"]) >= 16

    metrics = httpx.get(f"{gateway}/metrics").text
    assert 'imagen_http_requests_total{method="POST",route="/v1/image-to-image",status="200"}' in metrics
    assert 'imagen_http_requests_total{method="POST",route="/v1/image-to-image",status="400"}' in metrics
    assert "imagen_http_request_duration_seconds_bucket" in metrics
    assert 'imagen_triton_mean_batch_size{model="imagen-v2_unet"}' in metrics
    assert 'imagen_jobs_total{status="completed"}' in metrics
    assert "imagen_jobs_queued" in metrics and "imagen_jobs_running" in metrics

    document = httpx.get(f"{gateway}/openapi.json").json()
    validate(document)
    assert "/v1/image-to-image/{job_id}/cancel" in document["paths"]
