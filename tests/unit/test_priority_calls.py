"""A job's priority reaches every Triton call of the recipe (text encoder, VAE encoder, each UNet step and each
chunk of a split one, VAE decoder), and `before_step` is awaited at every boundary between the recipe's Triton
stages (before the text encoding, the VAE encode, each UNet step and the decode), ahead of the stop check. The
SDXL encoders' share is in tests/unit/test_sdxl_recipe.py; the pool's and the engine's in
tests/unit/test_triton_pool.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from gateway.diffusion.img2img import Generation, GenerationCanceled, Img2ImgPipeline, TextEmbeddingCache
from gateway.triton.client import DEFAULT_PRIORITY, PRIORITY_LEVELS
from tests.unit.fakes import FakeTriton, tiny_manifest

STEPS = 3


def _gen() -> Generation:
    return Generation(
        prompt="a cat",
        negative_prompt="blurry",
        image=np.zeros((1, 3, 16, 16), np.float32),
        strength=1.0,
        steps=STEPS,
        guidance_scale=7.5,  # guided: 2 images are 4 UNet rows a step
        seeds=[3, 4],
    )


@pytest.mark.parametrize("priority", range(PRIORITY_LEVELS))
async def test_every_call_of_a_job_carries_its_priority(tmp_path: Path, priority: int) -> None:
    manifest = tiny_manifest(tmp_path)
    # A UNet that takes 2 rows: each guided step is two calls, both at the job's priority.
    manifest = dataclasses.replace(manifest, unet=dataclasses.replace(manifest.unet, max_batch_size=2))
    triton = FakeTriton(manifest)
    await Img2ImgPipeline(manifest, triton)(_gen(), priority=priority)  # type: ignore[arg-type]
    models = [model for model, _ in triton.calls]
    assert models.count(manifest.text_encoder.model) == models.count(manifest.vae_encoder.model) == 1
    assert models.count(manifest.vae_decoder.model) == 1 and triton.unet_calls == 2 * STEPS
    assert triton.priorities == [priority] * len(models)


async def test_without_a_priority_every_call_is_normal(tmp_path: Path) -> None:
    manifest = tiny_manifest(tmp_path)
    triton = FakeTriton(manifest)
    await Img2ImgPipeline(manifest, triton)(_gen())  # type: ignore[arg-type]
    assert len(triton.priorities) == 3 + STEPS and set(triton.priorities) == {DEFAULT_PRIORITY}


async def test_a_text_cache_hit_leaves_the_jobs_own_calls_at_its_priority(tmp_path: Path) -> None:
    """The cached embeddings are the first encoder's, whatever its priority; the second job sends no text call,
    and every call it sends is at its own priority."""
    manifest = tiny_manifest(tmp_path)
    triton = FakeTriton(manifest)
    pipeline = Img2ImgPipeline(manifest, triton, text_cache=TextEmbeddingCache(4))  # type: ignore[arg-type]
    await pipeline(_gen(), priority=0)
    first = len(triton.calls)
    await pipeline(_gen(), priority=2)
    second = [model for model, _ in triton.calls[first:]]
    assert manifest.text_encoder.model not in second
    assert triton.priorities[first:] == [2] * len(second)


async def test_before_step_is_awaited_before_every_stage_and_each_unet_step(tmp_path: Path) -> None:
    manifest = tiny_manifest(tmp_path)
    triton = FakeTriton(manifest)
    calls_seen: list[list[str]] = []

    async def before_step() -> None:
        calls_seen.append([model for model, _ in triton.calls])

    await Img2ImgPipeline(manifest, triton)(_gen(), before_step=before_step)  # type: ignore[arg-type]
    text, encode, unet, decode = (
        manifest.text_encoder.model,
        manifest.vae_encoder.model,
        manifest.unet.model,
        manifest.vae_decoder.model,
    )
    # Nothing sent before the first wait; then each wait comes after the previous stage's calls, before the next.
    expected = [[], [text], *([text, encode] + [unet] * k for k in range(STEPS)), [text, encode] + [unet] * STEPS]
    assert calls_seen == expected
    assert [model for model, _ in triton.calls] == [text, encode, *[unet] * STEPS, decode]


async def test_a_cancel_that_arrives_during_before_step_stops_the_job(tmp_path: Path) -> None:
    """A job held at a step boundary (a higher-priority job running first) and canceled meanwhile sends no
    further UNet step."""
    manifest = tiny_manifest(tmp_path)
    triton = FakeTriton(manifest)
    canceled = False

    async def before_step() -> None:
        nonlocal canceled
        canceled = triton.unet_calls == 1  # canceled while held before the second step

    pipeline = Img2ImgPipeline(manifest, triton)  # type: ignore[arg-type]
    with pytest.raises(GenerationCanceled):
        await pipeline(_gen(), should_stop=lambda: canceled, before_step=before_step)
    assert triton.unet_calls == 1 and manifest.vae_decoder.model not in [model for model, _ in triton.calls]
