"""Issue 12: SDXL's conditioning (two encoders, pooled text, time ids, zeroed negatives) and its manifest, over a
fake Triton that records what each model is sent. The pixel-level parity with diffusers is in
tests/integration/test_parity_sdxl.py."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline

from gateway.diffusion.img2img import Generation, Img2ImgPipeline, TextEmbeddingCache
from gateway.diffusion.manifest import (
    Component,
    ManifestError,
    PipelineManifest,
    SdxlConditioning,
    TextEncoder,
    load_manifest,
)
from gateway.diffusion.sampling import img2img_scheduler_config, sdxl_add_time_ids
from gateway.triton.client import DEFAULT_PRIORITY
from tests.unit.fakes import sdxl_answers, write_word_tokenizer

WIDTHS = (3, 5)  # the two encoders' hidden widths (distinct, so a swapped concatenation would show)
POOLED = 4
MAX_LENGTH = 8


def _manifest(tmp_path: Path, *, force_zeros: bool = True, aesthetics: bool = False) -> PipelineManifest:
    def component(suffix: str, inputs: Sequence[str], outputs: Mapping[str, str]) -> Component:
        return Component(model=f"xl_{suffix}", inputs={r: r for r in inputs}, outputs=dict(outputs))

    texts = tuple(
        TextEncoder(
            component(name, ["input_ids"], outs),
            write_word_tokenizer(tmp_path / f"{name}.json", MAX_LENGTH),
        )
        for name, outs in (
            ("text_encoder", {"hidden_states": "hidden_states.1"}),
            ("text_encoder_2", {"hidden_states": "hidden_states.1", "text_embeds": "text_embeds"}),
        )
    )
    return PipelineManifest(
        name="xl",
        path=tmp_path / "xl.pipeline.json",
        native_resolution=16,
        vae_scale_factor=8,
        grid=8,
        latent_channels=4,
        scaling_factor=0.13025,
        shift_factor=None,
        max_length=MAX_LENGTH,
        tokenizer_path=texts[0].tokenizer_path,
        text_encoder=texts[0].component,
        vae_encoder=component("vae_encoder", ["sample"], {"latent_parameters": "latent_parameters"}),
        unet=component(
            "unet",
            ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"],
            {"out_sample": "out_sample"},
        ),
        vae_decoder=component("vae_decoder", ["latent_sample"], {"sample": "sample"}),
        scheduler={"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "steps_offset": 1},
        defaults={},
        dtype="float32",
        backend="python",
        family="sdxl",
        text_encoders=texts,
        sdxl=SdxlConditioning(force_zeros_for_empty_prompt=force_zeros, requires_aesthetics_score=aesthetics),
    )


class RecordingTriton:
    """Correctly shaped outputs; text encoders answer 1 + token id (never zero), so zeros can only be ours."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, np.ndarray]]] = []
        self.priorities: list[tuple[str, int]] = []  # (model, priority) of each call

    def sent(self, model: str) -> list[dict[str, np.ndarray]]:
        return [inputs for m, inputs in self.calls if m == f"xl_{model}"]

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        *,
        priority: int = DEFAULT_PRIORITY,
    ) -> dict[str, np.ndarray]:
        self.calls.append((model, {k: np.array(v) for k, v in inputs.items()}))
        self.priorities.append((model, priority))
        if model == "xl_unet":  # what SDXL's UNet is conditioned on, as the recipe must send it
            n = inputs["sample"].shape[0]
            assert inputs["encoder_hidden_states"].shape == (n, MAX_LENGTH, sum(WIDTHS))
            assert inputs["text_embeds"].shape == (n, POOLED) and inputs["timestep"].shape[0] == n
        result = sdxl_answers(model, inputs, widths=WIDTHS, pooled=POOLED)
        return {name: result[name.split(".")[0]] for name in outputs}


def _gen(negative: str = "", guidance: float = 5.0, seeds: int = 1) -> Generation:
    image = np.zeros((1, 3, 16, 24), np.float32)  # H 16, W 24: the time ids must say (16, 24), not (24, 16)
    return Generation("a cat", negative, image, strength=0.5, steps=4, guidance_scale=guidance, seeds=[3] * seeds)


async def test_empty_negative_prompt_is_zeros_and_encodes_only_the_prompt(tmp_path: Path) -> None:
    triton = RecordingTriton()
    await Img2ImgPipeline(_manifest(tmp_path), triton)(_gen(seeds=2))  # type: ignore[arg-type]
    assert [s["input_ids"].shape[0] for s in triton.sent("text_encoder") + triton.sent("text_encoder_2")] == [1, 1]
    unet = triton.sent("unet")[0]
    hidden, pooled, ids = unet["encoder_hidden_states"], unet["text_embeds"], unet["time_ids"]
    assert hidden.shape[0] == 4  # [uncond x 2, cond x 2]
    assert not hidden[:2].any() and not pooled[:2].any()  # zeros, as diffusers' force_zeros_for_empty_prompt
    assert hidden[2:].all() and pooled[2:].all()
    np.testing.assert_array_equal(ids, np.array([[16, 24, 0, 0, 16, 24]] * 4, np.float32))


async def test_a_negative_prompt_or_no_force_zeros_encodes_both_halves(tmp_path: Path) -> None:
    for manifest, negative in ((_manifest(tmp_path), "dog"), (_manifest(tmp_path, force_zeros=False), "")):
        triton = RecordingTriton()
        await Img2ImgPipeline(manifest, triton)(_gen(negative))  # type: ignore[arg-type]
        assert [s["input_ids"].shape[0] for s in triton.sent("text_encoder") + triton.sent("text_encoder_2")] == [2, 2]
        hidden = triton.sent("unet")[0]["encoder_hidden_states"]
        assert hidden.all()
        # Encoder 1's features first, then encoder 2's (concatenated on the feature axis).
        assert hidden.shape[-1] == sum(WIDTHS)


async def test_no_guidance_sends_one_half_and_the_cache_holds_pooled_too(tmp_path: Path) -> None:
    triton = RecordingTriton()
    cache = TextEmbeddingCache(4)
    pipeline = Img2ImgPipeline(_manifest(tmp_path), triton, text_cache=cache)  # type: ignore[arg-type]
    await pipeline(_gen("dog", guidance=1.0))
    unet = triton.sent("unet")[0]
    assert unet["encoder_hidden_states"].shape[0] == unet["time_ids"].shape[0] == 1
    await pipeline(_gen("dog", guidance=1.0))
    assert len(triton.sent("text_encoder")) == len(triton.sent("text_encoder_2")) == 1  # the hit skips both
    np.testing.assert_array_equal(triton.sent("unet")[-1]["text_embeds"], unet["text_embeds"])
    (entry,) = cache._entries.values()
    assert isinstance(entry, tuple) and [a.flags.writeable for a in entry] == [False, False]


@pytest.mark.parametrize("priority", [0, 2, None])
async def test_both_text_encoders_and_every_other_call_carry_the_jobs_priority(
    tmp_path: Path, priority: int | None
) -> None:
    triton = RecordingTriton()
    kwargs = {} if priority is None else {"priority": priority}
    await Img2ImgPipeline(_manifest(tmp_path), triton)(_gen("dog"), **kwargs)  # type: ignore[arg-type]
    models = [model for model, _ in triton.priorities]
    assert {"xl_text_encoder", "xl_text_encoder_2", "xl_vae_encoder", "xl_unet", "xl_vae_decoder"} == set(models)
    expected = DEFAULT_PRIORITY if priority is None else priority
    assert [p for _, p in triton.priorities] == [expected] * len(models)


async def test_refiner_time_ids_carry_the_aesthetic_scores(tmp_path: Path) -> None:
    triton = RecordingTriton()
    await Img2ImgPipeline(_manifest(tmp_path, aesthetics=True), triton)(_gen("dog"))  # type: ignore[arg-type]
    ids = triton.sent("unet")[0]["time_ids"]
    np.testing.assert_array_equal(ids, np.array([[16, 24, 0, 0, 2.5], [16, 24, 0, 0, 6.0]], np.float32))


@pytest.mark.parametrize("aesthetics", [False, True])
def test_add_time_ids_equal_diffusers(aesthetics: bool) -> None:
    """Against diffusers' own `_get_add_time_ids`, called on a stand-in with just the config it reads."""
    time_dim, pooled = 8, 32
    n_ids = 5 if aesthetics else 6
    fake = SimpleNamespace(
        config=SimpleNamespace(requires_aesthetics_score=aesthetics),
        unet=SimpleNamespace(
            config=SimpleNamespace(addition_time_embed_dim=time_dim),
            add_embedding=SimpleNamespace(linear_1=SimpleNamespace(in_features=time_dim * n_ids + pooled)),
        ),
    )
    size = (96, 128)
    theirs = StableDiffusionXLImg2ImgPipeline._get_add_time_ids(
        fake,  # type: ignore[arg-type]
        size, (0, 0), size, 6.0, 2.5, size, (0, 0), size, dtype=torch.float32, text_encoder_projection_dim=pooled,
    )  # fmt: skip
    ours = sdxl_add_time_ids(
        *size, requires_aesthetics_score=aesthetics, aesthetic_score=6.0, negative_aesthetic_score=2.5
    )
    for mine, reference in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(mine, reference.numpy())


def test_sdxl_scheduler_config_is_served_verbatim() -> None:
    """SD's img2img pipeline rewrites steps_offset / clip_sample at construction; SDXL's does not."""
    config = {"_class_name": "DDIMScheduler", "steps_offset": 0, "clip_sample": True}
    assert img2img_scheduler_config(config, "sdxl") == config
    assert img2img_scheduler_config(config)["steps_offset"] == 1


def _raw(tmp_path: Path, **changes: object) -> Path:
    """A version-1 (SD) manifest as the export wrote them before SDXL, with `changes` applied."""
    spec = {"name": "x", "datatype": "FP32", "shape": [-1]}
    comps = {
        c: {"model": f"m_{c}", "inputs": {"x": spec}, "outputs": {"y": {**spec, "name": "y"}}}
        for c in ("text_encoder", "vae_encoder", "unet", "vae_decoder")
    }
    raw = {
        "manifest_version": 1, "name": "m", "native_resolution": 128, "vae_scale_factor": 8, "grid": 16,
        "latent_channels": 4, "scaling_factor": 0.18215, "text": {"max_length": 77, "tokenizer": "t.json"},
        "components": comps, "scheduler": {"_class_name": "PNDMScheduler"},
        "defaults": {"steps": 30},
    }  # fmt: skip
    path = tmp_path / "m.pipeline.json"
    path.write_text(json.dumps({**raw, **changes}))
    return path


def test_version_1_manifests_still_load_as_sd_and_bad_families_are_refused(tmp_path: Path) -> None:
    old = load_manifest(_raw(tmp_path))
    assert (old.family, old.turbo, old.sdxl) == ("sd", False, None)
    assert [t.component.model for t in old.texts] == ["m_text_encoder"]
    assert old.describe()["family"] == "sd" and old.models == (
        "m_text_encoder",
        "m_vae_encoder",
        "m_unet",
        "m_vae_decoder",
    )
    with pytest.raises(ManifestError, match="family 'flux'"):
        load_manifest(_raw(tmp_path, manifest_version=2, family="flux"))
    with pytest.raises(ManifestError, match="manifest_version 3"):
        load_manifest(_raw(tmp_path, manifest_version=3))
    with pytest.raises(ManifestError, match="unreadable"):  # sdxl without its conditioning block
        load_manifest(_raw(tmp_path, manifest_version=2, family="sdxl"))
