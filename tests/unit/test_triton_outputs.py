"""Issue 22: every output the recipe reads from Triton is checked before use (dtype, rank, rows, the sizes the
manifest and the recipe fix, finite text embeddings); a bad answer is a 502 `backend_error` naming the model and
output, and is never cached. And the gRPC channel takes answers no bigger than the largest legitimate one."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from gateway.diffusion.img2img import Generation, Img2ImgPipeline, TextEmbeddingCache
from gateway.diffusion.manifest import (
    Component,
    ManifestError,
    OutputSpec,
    PipelineManifest,
    SdxlConditioning,
    TextEncoder,
    load_manifest,
)
from gateway.errors import BackendError, BackendUnavailable, status_and_code
from gateway.jobs.request import MAX_NUM_IMAGES
from gateway.media.codecs import MAX_IMAGE_SIDE
from gateway.triton import client as triton_client
from gateway.triton.client import DEFAULT_PRIORITY, MAX_RECEIVE_BYTES, translate_triton_errors
from tests.unit.fakes import HIDDEN, FakeTriton, sdxl_answers, tiny_manifest, write_word_tokenizer

Corrupt = Callable[[np.ndarray], np.ndarray]


def declared(manifest: PipelineManifest) -> PipelineManifest:
    """`manifest` with its outputs declared as the export declares them (FP32; -1 where any size goes)."""

    def spec(component: Any, shape: tuple[int, ...]) -> Any:
        (role,) = component.outputs
        return dataclasses.replace(component, output_specs={role: OutputSpec("FP32", shape)})

    return dataclasses.replace(
        manifest,
        text_encoder=spec(manifest.text_encoder, (-1, manifest.max_length, HIDDEN)),
        vae_encoder=spec(manifest.vae_encoder, (-1, 2 * manifest.latent_channels, -1, -1)),
        unet=spec(manifest.unet, (-1, manifest.latent_channels, -1, -1)),
        vae_decoder=spec(manifest.vae_decoder, (-1, 3, -1, -1)),
    )


class CorruptingTriton(FakeTriton):
    """FakeTriton whose answers from `model` pass through `corrupt` for the first `times` calls."""

    def __init__(self, manifest: PipelineManifest, model: str, corrupt: Corrupt, times: int = 1) -> None:
        super().__init__(manifest)
        self.model, self.corrupt, self.times = model, corrupt, times

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        *,
        priority: int = DEFAULT_PRIORITY,
    ) -> dict[str, np.ndarray]:
        answer = await super().infer(model, inputs, outputs, priority=priority)
        if model == self.model and self.times > 0:
            self.times -= 1
            return {name: self.corrupt(array) for name, array in answer.items()}
        return answer


def _gen(seeds: int = 2, guidance: float = 7.5) -> Generation:
    image = np.linspace(-1, 1, 3 * 16 * 16, dtype=np.float32).reshape(1, 3, 16, 16)
    return Generation("a cat", "blurry", image, strength=0.5, steps=2, guidance_scale=guidance, seeds=range(seeds))


def _nan(a: np.ndarray) -> np.ndarray:
    b = a.copy()
    b.flat[0] = np.nan
    return b


def _inf(a: np.ndarray) -> np.ndarray:
    b = a.copy()
    b.flat[-1] = np.inf
    return b


# (component, corruption): each answer is what a broken or mismatched model could send back.
BAD_ANSWERS: list[tuple[str, str, Corrupt]] = [
    ("text_encoder", "float64", lambda a: a.astype(np.float64)),
    ("text_encoder", "float16", lambda a: a.astype(np.float16)),
    ("text_encoder", "rank 2", lambda a: a[:, :, 0]),
    ("text_encoder", "rank 4", lambda a: a[..., None]),
    ("text_encoder", "one row short", lambda a: a[:1]),
    ("text_encoder", "a row too many", lambda a: np.concatenate([a, a[:1]])),
    ("text_encoder", "window", lambda a: a[:, :-1]),
    ("text_encoder", "hidden size", lambda a: a[:, :, :-1]),
    ("text_encoder", "NaN", _nan),
    ("text_encoder", "infinity", _inf),
    ("vae_encoder", "latent channels", lambda a: a[:, :4]),
    ("vae_encoder", "spatial", lambda a: a[:, :, :1]),
    ("vae_encoder", "dtype", lambda a: a.astype(np.float16)),
    ("unet", "latent channels", lambda a: a[:, :3]),
    ("unet", "rows", lambda a: a[:1]),
    ("unet", "spatial", lambda a: a[:, :, :, :1]),
    ("unet", "dtype", lambda a: a.astype(np.float64)),
    ("vae_decoder", "3 channels", lambda a: np.concatenate([a, a[:, :1]], axis=1)),
    ("vae_decoder", "spatial = latent x scale factor", lambda a: a[:, :, ::2, ::2]),
    ("vae_decoder", "rows", lambda a: a[:1]),
    ("vae_decoder", "dtype", lambda a: a.astype(np.float16)),
]


@pytest.mark.parametrize(("component", "case", "corrupt"), BAD_ANSWERS, ids=[f"{c}-{k}" for c, k, _ in BAD_ANSWERS])
async def test_a_bad_answer_is_a_backend_error_naming_model_and_output(
    tmp_path: Path, component: str, case: str, corrupt: Corrupt
) -> None:
    manifest = declared(tiny_manifest(tmp_path))
    part = getattr(manifest, component)
    cache = TextEmbeddingCache()
    triton = CorruptingTriton(manifest, part.model, corrupt)
    with pytest.raises(BackendError) as caught:
        await Img2ImgPipeline(manifest, triton, text_cache=cache)(_gen())  # type: ignore[arg-type]
    assert status_and_code(caught.value) == (502, "backend_error")
    (output,) = part.outputs.values()
    assert f"Model '{part.model}'" in (caught.value.details or "") and f"'{output}'" in (caught.value.details or "")
    if component == "text_encoder":
        assert len(cache) == 0  # a bad text-encoder answer is never cached
    if component in ("text_encoder", "vae_encoder"):
        assert triton.unet_calls == 0  # refused before anything used it


@pytest.mark.parametrize("seeds", [1, 2])
async def test_good_answers_pass_with_and_without_declared_shapes(tmp_path: Path, seeds: int) -> None:
    for manifest in (tiny_manifest(tmp_path), declared(tiny_manifest(tmp_path))):
        for guidance in (1.0, 7.5):
            result = await Img2ImgPipeline(manifest, FakeTriton(manifest))(_gen(seeds, guidance))  # type: ignore[arg-type]
            assert result.images.shape == (seeds, 3, 16, 16)


async def test_without_declared_shapes_the_recipe_sizes_are_still_checked(tmp_path: Path) -> None:
    manifest = tiny_manifest(tmp_path)  # no output specs: FP32, rank and the recipe's sizes only
    for component, corrupt in (
        ("text_encoder", lambda a: a[:, :, 0]),
        ("vae_decoder", lambda a: a[:, :2]),
        ("unet", lambda a: a.astype(np.float64)),
    ):
        triton = CorruptingTriton(manifest, getattr(manifest, component).model, corrupt)
        with pytest.raises(BackendError):
            await Img2ImgPipeline(manifest, triton)(_gen())  # type: ignore[arg-type]


async def test_a_bad_text_encoder_answer_is_not_cached_and_the_next_good_one_is(tmp_path: Path) -> None:
    manifest = declared(tiny_manifest(tmp_path))
    cache = TextEmbeddingCache()
    triton = CorruptingTriton(manifest, manifest.text_encoder.model, _nan)
    pipeline = Img2ImgPipeline(manifest, triton, text_cache=cache)  # type: ignore[arg-type]
    with pytest.raises(BackendError):
        await pipeline(_gen())
    assert len(cache) == 0
    good = await pipeline(_gen())  # the same prompt: a miss, encoded again, now cached
    assert len(cache) == 1 and cache.hits == 0
    (entry,) = cache._entries.values()
    assert isinstance(entry, np.ndarray) and np.all(np.isfinite(entry))
    again = await pipeline(_gen())
    assert cache.hits == 1 and np.array_equal(good.images, again.images)


async def test_each_chunk_of_a_split_call_is_checked_on_its_own_rows(tmp_path: Path) -> None:
    """A chunk answering more rows (or another width) than it was sent is refused as such, before the chunks
    are joined (a join would fail with a ValueError, or hide the bad chunk)."""
    manifest = declared(tiny_manifest(tmp_path))
    manifest = dataclasses.replace(manifest, unet=dataclasses.replace(manifest.unet, max_batch_size=1))
    for corrupt in (lambda a: np.concatenate([a, a]), lambda a: a.astype(np.float16)):
        triton = CorruptingTriton(manifest, manifest.unet.model, corrupt)
        with pytest.raises(BackendError, match="invalid result") as caught:
            await Img2ImgPipeline(manifest, triton)(_gen())  # type: ignore[arg-type]
        assert manifest.unet.model in (caught.value.details or "")


WIDTHS = (3, 5)  # the SDXL encoders' hidden widths
POOLED = 4


def sdxl_manifest(tmp_path: Path) -> PipelineManifest:
    """A 16-px SDXL pipeline whose text encoders declare their outputs as the export does."""

    def component(name: str, inputs: Sequence[str], outputs: Mapping[str, OutputSpec]) -> Component:
        return Component(
            model=f"xl_{name}",
            inputs={r: r for r in inputs},
            outputs={r: f"{r}.out" for r in outputs},
            output_specs=dict(outputs),
        )

    texts = tuple(
        TextEncoder(
            component(
                name,
                ["input_ids"],
                {"hidden_states": OutputSpec("FP32", (-1, 8, width))}
                | ({"text_embeds": OutputSpec("FP32", (-1, POOLED))} if name.endswith("_2") else {}),
            ),
            write_word_tokenizer(tmp_path / f"{name}.json", 8),
        )
        for name, width in zip(("text_encoder", "text_encoder_2"), WIDTHS, strict=True)
    )
    roles = ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    return PipelineManifest(
        name="xl",
        path=tmp_path / "xl.pipeline.json",
        native_resolution=16,
        vae_scale_factor=8,
        grid=8,
        latent_channels=4,
        scaling_factor=0.13025,
        shift_factor=None,
        max_length=8,
        tokenizer_path=texts[0].tokenizer_path,
        text_encoder=texts[0].component,
        vae_encoder=component("vae_encoder", ["sample"], {"latent_parameters": OutputSpec()}),
        unet=component("unet", roles, {"out_sample": OutputSpec()}),
        vae_decoder=component("vae_decoder", ["latent_sample"], {"sample": OutputSpec()}),
        scheduler={"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "steps_offset": 1},
        defaults={},
        dtype="float32",
        backend="python",
        family="sdxl",
        text_encoders=texts,
        sdxl=SdxlConditioning(),
    )


class SdxlTriton:
    """Correctly shaped SDXL answers, each passed through `corrupt(model/output, array)`."""

    def __init__(self, corrupt: Callable[[str, np.ndarray], np.ndarray]) -> None:
        self.corrupt = corrupt
        self.models: list[str] = []

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        *,
        priority: int = DEFAULT_PRIORITY,
    ) -> dict[str, np.ndarray]:
        self.models.append(model)
        answer = sdxl_answers(model, inputs, widths=WIDTHS, pooled=POOLED)
        return {name: self.corrupt(f"{model}/{name}", answer[name.split(".")[0]]) for name in outputs}


async def test_sdxl_pooled_and_hidden_widths_are_checked_and_not_cached(tmp_path: Path) -> None:
    manifest = sdxl_manifest(tmp_path)
    image = np.zeros((1, 3, 16, 24), np.float32)
    gen = Generation("a cat", "dog", image, strength=0.5, steps=2, guidance_scale=5.0, seeds=[3])
    for bad in (
        "xl_text_encoder_2/text_embeds.out",
        "xl_text_encoder/hidden_states.out",
        "xl_text_encoder_2/hidden_states.out",
    ):
        cache = TextEmbeddingCache()
        triton = SdxlTriton(lambda key, a, bad=bad: a[..., :-1] if key == bad else a)
        with pytest.raises(BackendError) as caught:
            await Img2ImgPipeline(manifest, triton, text_cache=cache)(gen)  # type: ignore[arg-type]
        model, output = bad.split("/")
        assert f"Model '{model}'" in (caught.value.details or "") and f"'{output}'" in (caught.value.details or "")
        assert len(cache) == 0 and "xl_unet" not in triton.models
    cache = TextEmbeddingCache()
    await Img2ImgPipeline(manifest, SdxlTriton(lambda key, a: a), text_cache=cache)(gen)  # type: ignore[arg-type]
    assert len(cache) == 1


def _raw_manifest(tmp_path: Path, datatype: str) -> Path:
    def component(name: str, inputs: list[str], outputs: dict[str, list[int]]) -> dict[str, Any]:
        return {
            "model": f"m_{name}",
            "inputs": {r: {"name": r, "datatype": "FP32", "shape": [-1]} for r in inputs},
            "outputs": {r: {"name": f"{r}.out", "datatype": datatype, "shape": s} for r, s in outputs.items()},
        }

    raw = {
        "manifest_version": 2,
        "name": "m",
        "native_resolution": 16,
        "vae_scale_factor": 8,
        "grid": 8,
        "latent_channels": 4,
        "scaling_factor": 0.18215,
        "text": {"max_length": 77, "hidden_size": 768, "tokenizer": "t.json"},
        "scheduler": {"_class_name": "DDIMScheduler"},
        "components": {
            "text_encoder": component("text_encoder", ["input_ids"], {"last_hidden_state": [-1, 77, 768]}),
            "vae_encoder": component("vae_encoder", ["sample"], {"latent_parameters": [-1, 8, -1, -1]}),
            "unet": component("unet", ["sample"], {"out_sample": [-1, 4, -1, -1]}),
            "vae_decoder": component("vae_decoder", ["latent_sample"], {"sample": [-1, 3, -1, -1]}),
        },
    }
    path = tmp_path / "m.pipeline.json"
    path.write_text(json.dumps(raw))
    return path


def test_the_manifest_declares_what_each_output_must_be(tmp_path: Path) -> None:
    manifest = load_manifest(_raw_manifest(tmp_path, "FP32"))
    assert manifest.text_encoder.output_specs == {"last_hidden_state": OutputSpec("FP32", (-1, 77, 768))}
    (text,) = manifest.expected_outputs(manifest.text_encoder, {"input_ids": (2, 77)}).values()
    assert (text.dtype, text.shape, text.finite) == (np.dtype(np.float32), (2, 77, 768), True)
    (latents,) = manifest.expected_outputs(manifest.vae_encoder, {"sample": (1, 3, 64, 48)}).values()
    assert latents.shape == (1, 8, 8, 6) and not latents.finite
    (noise,) = manifest.expected_outputs(manifest.unet, {"sample": (8, 4, 8, 6)}).values()
    assert noise.shape == (8, 4, 8, 6)
    (pixels,) = manifest.expected_outputs(manifest.vae_decoder, {"latent_sample": (4, 4, 8, 6)}).values()
    assert pixels.shape == (4, 3, 64, 48)
    with pytest.raises(ManifestError, match="datatype 'BF16'"):
        load_manifest(_raw_manifest(tmp_path, "BF16"))


# --- the gRPC receive bound -----------------------------------------------------------------------------------


def test_the_receive_bound_fits_the_largest_answer_and_no_more_than_twice_it() -> None:
    largest = MAX_NUM_IMAGES * 3 * MAX_IMAGE_SIDE * MAX_IMAGE_SIDE * 4  # the decoder's, float32
    assert largest <= MAX_RECEIVE_BYTES <= 2 * largest + (1 << 20)
    assert MAX_RECEIVE_BYTES < 512 * 1024 * 1024  # not gRPC's 2 GiB


def test_the_engine_channel_uses_the_receive_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []

    class Client:
        def __init__(self, url: str, *, channel_args: Any) -> None:
            seen.append(dict(channel_args))

    monkeypatch.setattr(triton_client.grpcclient, "InferenceServerClient", Client)
    triton_client.TritonEngine("127.0.0.1:1", timeout_s=1.0)
    assert seen[0]["grpc.max_receive_message_length"] == MAX_RECEIVE_BYTES


def test_an_oversized_answer_is_the_requests_failure_not_unavailable() -> None:
    """gRPC refuses an answer over the bound with RESOURCE_EXHAUSTED; it would be as big on every replica, so it is
    a `BackendError` (not retried elsewhere), while a busy server's RESOURCE_EXHAUSTED stays retryable."""
    oversized = "Stream removed (CLIENT: Received message larger than max (500000000 vs. 402653184))"
    with pytest.raises(BackendError) as caught, translate_triton_errors("m_vae_decoder"):
        raise InferenceServerException(oversized, status="StatusCode.RESOURCE_EXHAUSTED")
    assert not isinstance(caught.value, BackendUnavailable)
    with pytest.raises(BackendUnavailable), translate_triton_errors("m_unet"):
        raise InferenceServerException("queue full", status="StatusCode.RESOURCE_EXHAUSTED")
