"""The served SDXL pipeline equals diffusers' StableDiffusionXLImg2ImgPipeline on the same weights, input and noise.

Same tolerance as the SD parity test (tests/integration/test_parity.py): at most 2 levels (of 255) on any 8-bit
pixel channel, mean absolute difference under 0.05; both sides fp32, so the difference is onnxruntime vs torch
kernels carried through the loop. Observed: max 1 level, mean < 1e-4; bit-identical with zeroed negatives.
`imagen-xl-turbo` is the same weights served with the turbo configuration (trailing ancestral Euler, no
guidance); diffusers gets that scheduler swapped in with `from_config`.
"""

from __future__ import annotations

import httpx
import pytest

from tests.helpers import data_uri, make_image
from tests.integration.conftest import Repository
from tests.integration.reference import assert_parity, diffusers_img2img, gateway_sized, serve_first_image

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("model", "strength", "steps", "guidance_scale", "negative_prompt", "size"),
    [
        ("imagen-xl", 0.7, 10, 5.0, "blurry, low quality", (128, 96)),  # guidance with a negative prompt
        # No negative prompt: force_zeros_for_empty_prompt makes the unconditional half zeros, not encoded "".
        ("imagen-xl", 0.6, 8, 6.0, None, (96, 128)),
        # Turbo: 2 steps at strength 0.5 run one denoising step, without guidance (SDXL-Turbo's img2img recipe).
        ("imagen-xl-turbo", 0.5, 2, 0.0, None, (128, 128)),
    ],
)
def test_served_sdxl_image_matches_diffusers(
    gateway: str,
    auth: dict[str, str],
    repository: Repository,
    model: str,
    strength: float,
    steps: int,
    guidance_scale: float,
    negative_prompt: str | None,
    size: tuple[int, int],
) -> None:
    source = make_image(*size, seed=7, fmt="PNG")
    seed, prompt = 4321, "a lighthouse at dusk, watercolor"
    body = {
        "image": data_uri(source),
        "prompt": prompt,
        "model": model,
        "strength": strength,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "seed": seed,
        "negative_prompt": negative_prompt,
    }
    payload, served = serve_first_image(gateway, auth, body)
    assert payload["effective_steps"] == int(steps * strength)

    manifest = repository.manifests[model]
    assert manifest.family == "sdxl" and manifest.turbo == (model == "imagen-xl-turbo")
    resized = gateway_sized(source, manifest)
    reference = diffusers_img2img(
        repository.diffusers_dirs[model],
        resized,
        prompt=prompt,
        negative_prompt=negative_prompt,
        strength=strength,
        steps=steps,
        guidance_scale=guidance_scale,
        seed=seed,
        sdxl=True,
        scheduler=dict(manifest.scheduler) if manifest.turbo else None,
        latent_channels=manifest.latent_channels,
        vae_scale_factor=manifest.vae_scale_factor,
    )
    assert served.shape == (resized.height, resized.width, 3)
    assert_parity(served, reference, model)


def test_models_list_says_family_turbo_and_defaults(gateway: str, auth: dict[str, str]) -> None:
    by_id = {m["id"]: m for m in httpx.get(f"{gateway}/v1/models", headers=auth).json()["data"]}
    assert (by_id["imagen-v2"]["family"], by_id["imagen-v2"]["turbo"]) == ("sd", False)
    assert (by_id["imagen-xl"]["family"], by_id["imagen-xl"]["turbo"]) == ("sdxl", False)
    assert by_id["imagen-xl"]["defaults"] == {"steps": 30, "guidance_scale": 7.5, "strength": 0.7}
    turbo = by_id["imagen-xl-turbo"]
    assert (turbo["family"], turbo["turbo"], turbo["scheduler"]) == ("sdxl", True, "EulerAncestralDiscreteScheduler")
    assert turbo["defaults"] == {"steps": 2, "guidance_scale": 0.0, "strength": 0.5}
