"""Issue 18, item 4: a call with more rows than the model's max_batch_size goes out in chunks, together, and
comes back as one call would have."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from gateway.diffusion.img2img import Generation, Img2ImgPipeline, run_in_chunks
from gateway.diffusion.manifest import load_manifest
from gateway.triton.client import DEFAULT_PRIORITY
from tests.unit.fakes import FakeTriton, tiny_manifest


class RowEngine:
    """Each output row depends on its own input rows only; refuses more than `max_rows` rows (as Triton does),
    and records the rows of every call and how many calls were in flight at once."""

    def __init__(self, max_rows: int | None = None) -> None:
        self.max_rows = max_rows
        self.rows: list[int] = []
        self.in_flight = 0
        self.most_in_flight = 0

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        *,
        priority: int = DEFAULT_PRIORITY,
    ) -> dict[str, np.ndarray]:
        rows = len(inputs["x"])
        assert self.max_rows is None or rows <= self.max_rows, f"{rows} rows for a max of {self.max_rows}"
        self.rows.append(rows)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(0.01)
        self.in_flight -= 1
        x, t = inputs["x"], inputs["t"]
        return {"y": x * 3.0 + t[:, None], "z": x.sum(axis=1, keepdims=True) - t[:, None]}


def _feeds(rows: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(rows)
    return {"x": rng.standard_normal((rows, 5)).astype(np.float32), "t": np.arange(rows, dtype=np.float32) * 7}


@pytest.mark.parametrize(("rows", "max_rows", "calls"), [(8, 2, [2, 2, 2, 2]), (7, 3, [3, 3, 1]), (4, 4, [4])])
async def test_chunks_are_sent_together_and_joined_in_order(rows: int, max_rows: int, calls: list[int]) -> None:
    feeds = _feeds(rows)
    whole = await run_in_chunks(RowEngine(), "m", feeds, ["y", "z"], None)
    engine = RowEngine(max_rows)
    split = await run_in_chunks(engine, "m", feeds, ["y", "z"], max_rows)
    assert sorted(engine.rows, reverse=True) == calls
    assert engine.most_in_flight == len(calls)  # concurrent, so Triton may batch them with other requests
    for name in ("y", "z"):
        np.testing.assert_array_equal(split[name], whole[name])  # exactly the unsplit call, rows in order


async def test_a_pipeline_splits_only_the_component_whose_max_is_exceeded(tmp_path: Path) -> None:
    """A guided 2-image request is 4 UNet rows: with the UNet's max at 1, four 1-row calls per step."""
    manifest = tiny_manifest(tmp_path)
    bounded = dataclasses.replace(manifest, unet=dataclasses.replace(manifest.unet, max_batch_size=1))
    gen = Generation(
        prompt="a cat",
        negative_prompt="",
        image=np.zeros((1, 3, 16, 16), np.float32),
        strength=1.0,
        steps=2,
        guidance_scale=7.5,
        seeds=[3, 4],
    )
    plain_triton, split_triton = FakeTriton(manifest), FakeTriton(bounded)
    plain = await Img2ImgPipeline(manifest, plain_triton)(gen)  # type: ignore[arg-type]
    split = await Img2ImgPipeline(bounded, split_triton)(gen)  # type: ignore[arg-type]
    np.testing.assert_array_equal(split.images, plain.images)
    unet_rows = [shapes["sample_in"][0] for model, shapes in split_triton.calls if model == bounded.unet.model]
    assert unet_rows == [1] * 4 * 2 and plain_triton.unet_calls == 2
    text_rows = [
        shapes["input_ids_in"][0] for model, shapes in split_triton.calls if model == manifest.text_encoder.model
    ]
    assert text_rows == [2]  # the other components, with no max, are not split


def test_the_manifest_carries_each_components_max_and_older_ones_mean_no_split(tmp_path: Path) -> None:
    raw = {
        "manifest_version": 2,
        "name": "m",
        "native_resolution": 16,
        "vae_scale_factor": 8,
        "grid": 8,
        "latent_channels": 4,
        "scaling_factor": 0.18,
        "text": {"max_length": 8, "tokenizer": "t.json"},
        "scheduler": {"_class_name": "DDIMScheduler"},
        "components": {
            c: {"model": f"m_{c}", "inputs": {}, "outputs": {}}
            for c in ("text_encoder", "vae_encoder", "unet", "vae_decoder")
        },
    }
    raw["components"]["unet"]["max_batch_size"] = 2
    path = tmp_path / "m.pipeline.json"
    path.write_text(json.dumps(raw))
    manifest = load_manifest(path)
    assert manifest.unet.max_batch_size == 2 and manifest.vae_decoder.max_batch_size is None
