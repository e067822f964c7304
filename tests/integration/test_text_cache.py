"""Issue 11: the text-embedding cache on the real gateway and Triton: a repeated prompt skips the text encoder,
and the served pixels do not change."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import tritonclient.grpc as grpcclient

from gateway.triton.server import TritonServer
from tests.helpers import data_uri, make_image
from tests.integration.conftest import GatewayFactory, Repository

pytestmark = pytest.mark.integration


def _inference_count(triton: TritonServer, model: str) -> int:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        stats = client.get_inference_statistics(model, as_json=True, client_timeout=10.0)["model_stats"]
    finally:
        client.close()
    return sum(int(entry.get("inference_count", 0) or 0) for entry in stats)


def _run(url: str, body: dict[str, Any], auth: dict[str, str]) -> bytes:
    response = httpx.post(f"{url}/v1/image-to-image", json=body, headers=auth, timeout=120)
    assert response.status_code == 200, response.text
    (image,) = response.json()["images"]
    png = httpx.get(image["url"], timeout=30)
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    return png.content


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_a_cached_prompt_skips_the_text_encoder_and_serves_identical_bytes(
    make_gateway: GatewayFactory, triton: TritonServer, repository: Repository, auth: dict[str, str]
) -> None:
    text_encoder = repository.manifests["imagen-v2"].text_encoder.model
    body = {
        "image": data_uri(make_image(96, 96, seed=5)),
        "prompt": "a lighthouse in the style of neon",
        "negative_prompt": "blurry",
        "model": "imagen-v2",
        "seed": 1234,
        "cache": False,  # the text cache is under test, not the result cache that would answer first
        "steps": 4,
        "strength": 0.5,
    }
    with make_gateway() as url:
        assert _metric(url, "imagen_text_embedding_cache_hits_total") == 0.0
        before = _inference_count(triton, text_encoder)
        first = _run(url, body, auth)
        after_first = _inference_count(triton, text_encoder)
        assert after_first == before + 2  # negative prompt and prompt, one call
        second = _run(url, body, auth)
        assert _inference_count(triton, text_encoder) == after_first  # the hit sent nothing to the text encoder
        assert second == first
        assert _metric(url, "imagen_text_embedding_cache_hits_total") == 1.0
        assert _metric(url, "imagen_text_embedding_cache_misses_total") == 1.0
        _run(url, {**body, "prompt": "a lighthouse"}, auth)  # another prompt is a miss
        assert _inference_count(triton, text_encoder) == after_first + 2
    with make_gateway(text_cache_size=0) as url:  # off: every request encodes its prompt, same pixels
        before = _inference_count(triton, text_encoder)
        assert _run(url, body, auth) == first
        assert _run(url, body, auth) == first
        assert _inference_count(triton, text_encoder) == before + 4
        assert _metric(url, "imagen_text_embedding_cache_hits_total") == 0.0
