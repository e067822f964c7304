"""Issue 11: the LRU of text-encoder outputs in the img2img recipe, over a fake Triton."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gateway.diffusion.img2img import Generation, Img2ImgPipeline, TextEmbeddingCache
from gateway.observability import Metrics
from tests.unit.fakes import FakeTriton, tiny_manifest


def _generation(
    prompt: str = "a red fox", negative: str = "blurry", guidance: float = 7.5, seeds: int = 1
) -> Generation:
    image = np.linspace(-1, 1, 3 * 16 * 16, dtype=np.float32).reshape(1, 3, 16, 16)
    return Generation(
        prompt=prompt,
        negative_prompt=negative,
        image=image,
        strength=0.5,
        steps=4,
        guidance_scale=guidance,
        seeds=list(range(7, 7 + seeds)),
    )


def _rig(tmp_path: Path, size: int = 8) -> tuple[FakeTriton, Img2ImgPipeline, TextEmbeddingCache, list[bool]]:
    manifest = tiny_manifest(tmp_path)
    triton = FakeTriton(manifest)
    lookups: list[bool] = []
    cache = TextEmbeddingCache(size, on_lookup=lookups.append)
    return triton, Img2ImgPipeline(manifest, triton, text_cache=cache), cache, lookups  # type: ignore[arg-type]


def _text_calls(triton: FakeTriton) -> int:
    return sum(1 for model, _ in triton.calls if model == triton.manifest.text_encoder.model)


async def test_a_hit_skips_the_text_encoder_and_gives_the_same_images(tmp_path: Path) -> None:
    triton, pipeline, cache, lookups = _rig(tmp_path)
    first = await pipeline(_generation())
    assert _text_calls(triton) == 1 and lookups == [False]
    second = await pipeline(_generation())
    assert _text_calls(triton) == 1 and lookups == [False, True]  # no second text-encoder call
    assert np.array_equal(first.images, second.images)
    assert (cache.hits, cache.misses, len(cache)) == (1, 1, 1)
    # The UNet still got the embeddings (2 x cond/uncond for 2 images), repeated from the cached entry.
    third = await pipeline(_generation(seeds=2))
    assert _text_calls(triton) == 1 and third.images.shape[0] == 2
    unet_hidden = [shapes for model, shapes in triton.calls if model == triton.manifest.unet.model][-1]
    assert unet_hidden["encoder_hidden_states_in"][0] == 4


async def test_the_key_is_model_prompt_negative_prompt_and_guidance(tmp_path: Path) -> None:
    triton, pipeline, cache, _ = _rig(tmp_path)
    await pipeline(_generation())
    await pipeline(_generation(prompt="a blue fox"))
    await pipeline(_generation(negative="noisy"))
    await pipeline(_generation(guidance=1.0))  # no guidance: one text, another entry
    assert _text_calls(triton) == 4 and cache.misses == 4
    await pipeline(_generation(guidance=1.0, negative="anything"))  # unused without guidance: same entry
    assert _text_calls(triton) == 4 and cache.hits == 1
    (tmp_path / "b").mkdir()
    other_manifest = tiny_manifest(tmp_path / "b", name="other")
    other = Img2ImgPipeline(other_manifest, FakeTriton(other_manifest), text_cache=cache)  # type: ignore[arg-type]
    await other(_generation())  # same texts, another model: its own entry
    assert cache.misses == 5 and len(cache) == 5


async def test_bounded_lru_and_size_zero_disables(tmp_path: Path) -> None:
    triton, pipeline, cache, _ = _rig(tmp_path, size=2)
    for prompt in ("a", "b", "a", "c"):  # "a" was used after "b": "b" is evicted by "c"
        await pipeline(_generation(prompt=prompt))
    assert len(cache) == 2 and _text_calls(triton) == 3
    await pipeline(_generation(prompt="a"))
    assert _text_calls(triton) == 3
    await pipeline(_generation(prompt="b"))
    assert _text_calls(triton) == 4

    (tmp_path / "off").mkdir()
    triton, pipeline, cache, lookups = _rig(tmp_path / "off", size=0)
    await pipeline(_generation())
    await pipeline(_generation())
    assert _text_calls(triton) == 2 and len(cache) == 0 and lookups == [False, False]
    with pytest.raises(ValueError):
        TextEmbeddingCache(-1)


async def test_entries_are_read_only_and_no_cache_means_every_call(tmp_path: Path) -> None:
    triton, pipeline, _, _ = _rig(tmp_path)
    embeds = await pipeline.encode_prompt("a red fox", "blurry", True)
    assert not embeds.flags.writeable and embeds.shape[0] == 2
    assert await pipeline.encode_prompt("a red fox", "blurry", True) is embeds
    bare = Img2ImgPipeline(triton.manifest, triton)  # type: ignore[arg-type]
    await bare(_generation())
    await bare(_generation())
    assert _text_calls(triton) == 3


def test_metrics_count_hits_and_misses() -> None:
    metrics = Metrics()
    cache = TextEmbeddingCache(4, on_lookup=metrics.record_text_cache)
    key = ("m", "p", None, False)
    assert cache.get(key) is None
    cache.put(key, np.zeros((1, 2, 3), np.float32))
    assert cache.get(key) is not None and cache.get(key) is not None
    assert metrics.registry.get_sample_value("imagen_text_embedding_cache_hits_total") == 2.0
    assert metrics.registry.get_sample_value("imagen_text_embedding_cache_misses_total") == 1.0
