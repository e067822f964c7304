"""Every `scheduler` name serves what diffusers' StableDiffusionImg2ImgPipeline gives with that scheduler swapped
in via `Cls.from_config(pipe.scheduler.config)`, on the tiny SD model (`imagen-v2`, PNDM) and the same noise.

Same tolerance and noise injection as test_parity.py (at most 2 levels of 255, mean under 0.05): the VAE
sample and first-timestep noise are the gateway's seeded draws. Euler-ancestral also draws fresh noise at every
step; the gateway draws it from `PCG64([seed, num_images])` (img2img.py), so diffusers' per-step `randn_tensor`
is fed the same stream, draw by draw. With another stream the result is far outside the tolerance (checked
below), so the comparison covers the ancestral noise term too.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from gateway.diffusion.schedulers import SCHEDULER_NAMES
from tests.helpers import data_uri, make_image
from tests.integration.conftest import Repository
from tests.integration.reference import MAX_LEVELS, assert_parity, gateway_sized, run_pipeline, seeded_like_gateway

pytestmark = pytest.mark.integration

SEED, PROMPT, NEGATIVE = 4321, "a castle on a hill, watercolor", "blurry"
STRENGTH, STEPS, GUIDANCE = 0.6, 10, 7.5
SIZE = (128, 96)


@contextmanager
def step_noise_like_gateway(seed: int, num_images: int) -> Iterator[list[int]]:
    """Feed the ancestral scheduler's per-step `randn_tensor` from the gateway's step generator; yields a list
    that counts the draws."""
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as ancestral
    import torch

    rng = np.random.Generator(np.random.PCG64([seed, num_images]))
    draws: list[int] = []

    def fake_randn(shape: Any, generator: Any = None, device: Any = None, dtype: Any = None, **_: Any) -> Any:
        draws.append(1)
        return torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32)).to(dtype=dtype or torch.float32)

    saved = ancestral.randn_tensor
    ancestral.randn_tensor = fake_randn
    try:
        yield draws
    finally:
        ancestral.randn_tensor = saved


@pytest.fixture(scope="module")
def pipe(repository: Repository) -> Any:
    """diffusers' pipeline on imagen-v2's folder, loaded once; each run swaps its scheduler from the original."""
    import diffusers

    loaded = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(
        repository.diffusers_dirs["imagen-v2"],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    loaded.set_progress_bar_config(disable=True)
    loaded.original_scheduler_config = loaded.scheduler.config
    return loaded


def _reference(
    pipe: Any, image: Image.Image, class_name: str, latent_shape: tuple[int, ...], step_seed: int = SEED
) -> np.ndarray:
    import diffusers

    pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.original_scheduler_config)
    with seeded_like_gateway([SEED], latent_shape), step_noise_like_gateway(step_seed, 1) as draws:
        pixels = run_pipeline(
            pipe,
            image,
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            strength=STRENGTH,
            steps=STEPS,
            guidance_scale=GUIDANCE,
        )
    assert bool(draws) == (class_name == "EulerAncestralDiscreteScheduler")
    return pixels


def _serve(gateway: str, auth: dict[str, str], source: bytes, scheduler: str) -> dict[str, Any]:
    body = {
        "image": data_uri(source),
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE,
        "model": "imagen-v2",
        "strength": STRENGTH,
        "steps": STEPS,
        "guidance_scale": GUIDANCE,
        "seed": SEED,
        "scheduler": scheduler,
    }
    response = httpx.post(f"{gateway}/v1/image-to-image", json=body, headers=auth, timeout=120)
    assert response.status_code == 200, response.text
    payload: dict[str, Any] = response.json()
    return payload


def test_each_scheduler_matches_diffusers_from_config(
    gateway: str, auth: dict[str, str], repository: Repository, pipe: Any
) -> None:
    manifest = repository.manifests["imagen-v2"]
    source = make_image(*SIZE, seed=9, fmt="PNG")
    resized = gateway_sized(source, manifest)
    width, height = resized.size
    factor = manifest.vae_scale_factor
    latent_shape = (1, manifest.latent_channels, height // factor, width // factor)

    served: dict[str, np.ndarray] = {}
    digests: dict[str, str] = {}
    for name, class_name in SCHEDULER_NAMES.items():
        payload = _serve(gateway, auth, source, name)
        assert payload["scheduler"] == name
        digests[name] = payload["images"][0]["sha256"]
        pixels = np.asarray(Image.open(io.BytesIO(httpx.get(payload["images"][0]["url"]).content)).convert("RGB"))
        reference = _reference(pipe, resized, class_name, latent_shape)
        assert pixels.shape == (height, width, 3)
        assert_parity(pixels, reference, name)
        served[name] = pixels.astype(np.int16)
        if name == "euler_ancestral":  # other step noise: far outside the tolerance, so the noise is compared too
            other = _reference(pipe, resized, class_name, latent_shape, SEED + 1)
            assert np.abs(pixels.astype(np.int16) - other.astype(np.int16)).max() > 10 * MAX_LEVELS

    # The schedulers are really different samplers here (not one run five times)...
    names = list(served)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.abs(served[a] - served[b]).mean() > 1.0, (a, b)
    # ...the model's own scheduler named is the same run as none named, and a class name is its short name.
    by_class = _serve(gateway, auth, source, "DPMSolverMultistepScheduler")
    assert by_class["scheduler"] == "dpmpp_2m" and by_class["images"][0]["sha256"] == digests["dpmpp_2m"]
    body_without = {
        "image": data_uri(source),
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE,
        "strength": STRENGTH,
        "steps": STEPS,
        "guidance_scale": GUIDANCE,
        "seed": SEED,
    }
    unnamed = httpx.post(f"{gateway}/v1/image-to-image", json=body_without, headers=auth, timeout=120).json()
    assert unnamed["scheduler"] == "pndm" and unnamed["images"][0]["sha256"] == digests["pndm"]
