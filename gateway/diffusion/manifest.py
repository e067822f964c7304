"""Typed view of the pipeline manifests the export writes; the gateway learns every model fact from here."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gateway.diffusion.sampling import img2img_scheduler_config
from gateway.diffusion.schedulers import scheduler_choices, scheduler_name

log = logging.getLogger(__name__)

MANIFEST_SUFFIX = ".pipeline.json"
# 1: Stable Diffusion 1.x/2.x. 2 adds `family` ("sd" or "sdxl"), `turbo`, `vae_dtype`, and for SDXL
# `text_encoders` and `sdxl`; a version-1 manifest reads as an SD one. A component's optional `max_batch_size`
# (the rows one call may carry) needs no new version: without it, calls are not split; nor does `lora` (an export
# with LoRA slots: `LoraSupport`), absent in every manifest written without them.
SUPPORTED_MANIFEST_VERSIONS = (1, 2)
SUPPORTED_MANIFEST_VERSION = max(SUPPORTED_MANIFEST_VERSIONS)
FAMILIES = ("sd", "sdxl")
# The Triton datatypes an output the recipe reads may have, as numpy dtypes (a manifest declares each output's
# `datatype`; the export serves FP32 outputs, fp16 models included).
OUTPUT_DTYPES: Mapping[str, str] = {"FP32": "float32", "FP16": "float16", "FP64": "float64"}


class ManifestError(ValueError):
    """A manifest that this gateway cannot serve."""


@dataclass(frozen=True)
class OutputSpec:
    """One output as the manifest declares it: Triton datatype and shape (-1: any size; the batch axis is -1)."""

    datatype: str = "FP32"
    shape: tuple[int, ...] | None = None  # None: not declared


@dataclass(frozen=True)
class ExpectedOutput:
    """What one output of one Triton call must be before the recipe uses it (`PipelineManifest.expected_outputs`):
    its dtype, its shape (None where any size goes; `shape` None: only the batch axis is known), finite or not."""

    dtype: np.dtype[Any]
    rows: int
    shape: tuple[int | None, ...] | None
    finite: bool = False


@dataclass(frozen=True)
class Component:
    model: str
    inputs: Mapping[str, str]  # role -> tensor name (roles are the optimum names)
    outputs: Mapping[str, str]
    # The most rows one Triton call may carry (the model's max_batch_size); None (older manifests): unbounded.
    max_batch_size: int | None = None
    # role -> the output's declared datatype and shape; a role absent: FP32, shape unknown.
    output_specs: Mapping[str, OutputSpec] = field(default_factory=dict)


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder and its tokenizer (SD has one; SDXL two, or only the second for a refiner)."""

    component: Component
    tokenizer_path: Path
    name: str = "text_encoder"  # the export's component name (`text_encoder_2`: SDXL's second)


@dataclass(frozen=True)
class SdxlConditioning:
    """What SDXL's UNet is conditioned on besides the text, as the pipeline's config sets it."""

    force_zeros_for_empty_prompt: bool = True
    requires_aesthetics_score: bool = False  # the refiner: time ids end with an aesthetic score, not a size
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5


@dataclass(frozen=True)
class LoraSupport:
    """An export with LoRA slots (`python -m export --lora-slots K --lora-rank R`): each UNet and text-encoder
    instance holds K adapters of rank at most R; a request names at most `max_per_request`."""

    slots: int
    rank: int
    max_per_request: int
    layers_per_block: int  # the UNet's: how SDXL's original block names map to diffusers'
    base: str  # the family an adapter must be made for: "sd1", "sd2", "sdxl", or "sd" (unpublished widths)
    targets: Mapping[str, Mapping[str, tuple[int, int]]]  # component -> layer -> (in, out) features

    def describe(self) -> dict[str, Any]:
        return {"slots": self.slots, "max_rank": self.rank, "max_per_request": self.max_per_request}


def _lora(raw: Mapping[str, Any] | None) -> LoraSupport | None:
    if raw is None:
        return None
    return LoraSupport(
        slots=int(raw["slots"]),
        rank=int(raw["rank"]),
        max_per_request=int(raw["max_per_request"]),
        layers_per_block=int(raw["layers_per_block"]),
        base=str(raw["base"]),
        targets={
            str(c): {str(layer): (int(d[0]), int(d[1])) for layer, d in layers.items()}
            for c, layers in raw["targets"].items()
        },
    )


@dataclass(frozen=True)
class PipelineManifest:
    name: str
    path: Path
    native_resolution: int
    vae_scale_factor: int
    grid: int
    latent_channels: int
    scaling_factor: float
    shift_factor: float | None
    max_length: int
    tokenizer_path: Path
    text_encoder: Component
    vae_encoder: Component
    unet: Component
    vae_decoder: Component
    scheduler: Mapping[str, Any]
    defaults: Mapping[str, Any]
    dtype: str
    backend: str
    family: str = "sd"
    turbo: bool = False  # distilled: few steps without guidance (the defaults say which)
    text_encoders: tuple[TextEncoder, ...] = ()  # empty: the one `text_encoder` with `tokenizer_path`
    sdxl: SdxlConditioning | None = None  # set exactly when family is "sdxl"
    vae_dtype: str = "float32"
    lora: LoraSupport | None = None  # None: exported without LoRA slots
    # The UNet's `sample` channels: None (and manifests before it was written) means the latents alone; an
    # inpainting UNet's are 2 x latent channels + 1 (latents, mask, masked-image latents).
    unet_in_channels: int | None = None

    @property
    def sample_channels(self) -> int:
        """The channels of the UNet's `sample` input."""
        return self.latent_channels if self.unet_in_channels is None else self.unet_in_channels

    @property
    def inpainting(self) -> bool:
        """A dedicated inpainting UNet (diffusers' 9-channel one for 4-channel latents)."""
        return self.sample_channels == 2 * self.latent_channels + 1

    @property
    def texts(self) -> tuple[TextEncoder, ...]:
        """The text encoders, in the order their hidden states are concatenated."""
        return self.text_encoders or (TextEncoder(self.text_encoder, self.tokenizer_path),)

    @property
    def models(self) -> tuple[str, ...]:
        parts = [t.component for t in self.texts] + [self.vae_encoder, self.unet, self.vae_decoder]
        return tuple(dict.fromkeys(c.model for c in parts))

    def expected_outputs(
        self, component: Component, input_shapes: Mapping[str, tuple[int, ...]]
    ) -> dict[str, ExpectedOutput]:
        """Role -> what `component` must answer to inputs of these shapes (by role): the declared datatype, as
        many rows as were sent, and the shape the recipe needs: a text encoder's hidden states [rows, tokens,
        width] and pooled [rows, width] (finite: they are cached), the VAE encoder's [rows, 2 x latent channels,
        H / scale, W / scale], the UNet's [rows, latent channels, h, w] (its `sample` may be wider: inpainting),
        the decoder's [rows, 3, h x scale, w x scale]; a size the recipe does not fix (a text width) is the
        declared one when the manifest declares it."""
        f = self.vae_scale_factor
        rows = next(iter(input_shapes.values()))[0] if input_shapes else 0
        text_models = {t.component.model for t in self.texts} | {self.text_encoder.model}
        sample, latent, ids = (input_shapes.get(r) for r in ("sample", "latent_sample", "input_ids"))
        expected = {}
        for role in component.outputs:
            spec = component.output_specs.get(role, OutputSpec())
            finite = False
            recipe: tuple[int | None, ...] | None = None
            if component.model == self.unet.model and sample is not None and len(sample) == 4:
                # The noise prediction: the latents' channels (an inpainting UNet's `sample` is wider).
                recipe = (rows, self.latent_channels, sample[2], sample[3])
            elif component.model == self.unet.model and sample is not None:
                recipe = tuple(sample)
            elif component.model == self.vae_encoder.model and sample is not None and len(sample) == 4:
                recipe = (rows, 2 * self.latent_channels, sample[2] // f, sample[3] // f)
            elif component.model == self.vae_decoder.model and latent is not None and len(latent) == 4:
                recipe = (rows, 3, latent[2] * f, latent[3] * f)
            elif component.model in text_models:
                tokens = ids[1] if ids is not None and len(ids) == 2 else None
                recipe = (rows, None) if role == "text_embeds" else (rows, tokens, None)
                finite = True
            shape, declared = recipe, spec.shape
            if declared is not None and (shape is None or len(shape) == len(declared)):
                # The recipe's sizes first; the declaration fills those it leaves open (-1 in it: any size).
                known = shape or (None,) * len(declared)
                shape = tuple(k if k is not None or d < 0 else d for k, d in zip(known, declared, strict=True))
            if shape is not None:
                shape = (rows, *shape[1:])
            expected[role] = ExpectedOutput(np.dtype(OUTPUT_DTYPES[spec.datatype]), rows, shape, finite)
        return expected

    def describe(self) -> dict[str, Any]:
        """The public view for `GET /v1/models`."""
        return {
            "id": self.name,
            "object": "model",
            "native_resolution": self.native_resolution,
            "resolution_multiple": self.grid,
            "scheduler": self.scheduler.get("_class_name"),
            "default_scheduler": scheduler_name(str(self.scheduler.get("_class_name"))),
            "schedulers": list(scheduler_choices(img2img_scheduler_config(self.scheduler, self.family))),
            "dtype": self.dtype,
            "defaults": dict(self.defaults),
            "family": self.family,
            "turbo": self.turbo,
            "inpainting": self.inpainting,
            "lora": None if self.lora is None else self.lora.describe(),
        }


def _output_spec(raw: Mapping[str, Any]) -> OutputSpec:
    datatype = str(raw.get("datatype", "FP32"))
    if datatype not in OUTPUT_DTYPES:
        supported = ", ".join(OUTPUT_DTYPES)
        raise ValueError(f"output {raw.get('name')!r} has datatype {datatype!r} (supported: {supported})")
    shape = raw.get("shape")
    return OutputSpec(datatype, None if shape is None else tuple(int(d) for d in shape))


def _component(raw: Mapping[str, Any]) -> Component:
    return Component(
        model=str(raw["model"]),
        inputs={role: str(spec["name"]) for role, spec in raw["inputs"].items()},
        outputs={role: str(spec["name"]) for role, spec in raw["outputs"].items()},
        max_batch_size=None if raw.get("max_batch_size") is None else int(raw["max_batch_size"]),
        output_specs={role: _output_spec(spec) for role, spec in raw["outputs"].items()},
    )


def _unet_channels(path: Path, raw: Mapping[str, Any], latent_channels: int) -> int:
    """The UNet's `sample` channels, checked against `inpainting` and the declared input.

    Manifests before issue 25 have neither key: an img2img UNet, whose `sample` is the latents."""
    unet_in = int(raw.get("unet_in_channels", latent_channels))
    inpainting = unet_in == 2 * latent_channels + 1
    if unet_in not in (latent_channels, 2 * latent_channels + 1):
        raise ManifestError(
            f"{path}: unet_in_channels {unet_in} is neither the {latent_channels} latent channels nor "
            f"{2 * latent_channels + 1} (inpainting)"
        )
    if bool(raw.get("inpainting", False)) != inpainting:
        raise ManifestError(f"{path}: inpainting {raw.get('inpainting')!r} contradicts unet_in_channels {unet_in}")
    sample = raw["components"]["unet"]["inputs"].get("sample", {}).get("shape")
    if sample is not None and len(sample) == 4 and int(sample[1]) >= 0 and int(sample[1]) != unet_in:
        raise ManifestError(f"{path}: the UNet's sample input has {sample[1]} channels, the manifest says {unet_in}")
    return unet_in


def load_manifest(path: Path) -> PipelineManifest:
    try:
        raw = json.loads(path.read_text("utf-8"))
        if raw.get("manifest_version") not in SUPPORTED_MANIFEST_VERSIONS:
            raise ManifestError(f"{path}: manifest_version {raw.get('manifest_version')!r} is not supported")
        comps = raw["components"]
        family = str(raw.get("family", "sd"))
        if family not in FAMILIES:
            raise ManifestError(f"{path}: family {family!r} is not supported (supported: {', '.join(FAMILIES)})")
        texts = tuple(
            TextEncoder(_component(comps[t["component"]]), path.parent / t["tokenizer"], str(t["component"]))
            for t in raw.get("text_encoders", ())
        )
        sdxl = None
        if family == "sdxl":
            conditioning = raw["sdxl"]
            sdxl = SdxlConditioning(
                force_zeros_for_empty_prompt=bool(conditioning["force_zeros_for_empty_prompt"]),
                requires_aesthetics_score=bool(conditioning["requires_aesthetics_score"]),
                aesthetic_score=float(conditioning["aesthetic_score"]),
                negative_aesthetic_score=float(conditioning["negative_aesthetic_score"]),
            )
            if not texts:
                raise ManifestError(f"{path}: an sdxl manifest lists its text_encoders")
        first_text = comps["text_encoder"] if "text_encoder" in comps else comps["text_encoder_2"]
        latent_channels = int(raw["latent_channels"])
        unet_in_channels = _unet_channels(path, raw, latent_channels)
        return PipelineManifest(
            name=str(raw["name"]),
            path=path,
            native_resolution=int(raw["native_resolution"]),
            vae_scale_factor=int(raw["vae_scale_factor"]),
            grid=int(raw["grid"]),
            latent_channels=latent_channels,
            scaling_factor=float(raw["scaling_factor"]),
            shift_factor=None if raw.get("shift_factor") is None else float(raw["shift_factor"]),
            max_length=int(raw["text"]["max_length"]),
            tokenizer_path=path.parent / raw["text"]["tokenizer"],
            text_encoder=_component(first_text),
            vae_encoder=_component(comps["vae_encoder"]),
            unet=_component(comps["unet"]),
            vae_decoder=_component(comps["vae_decoder"]),
            scheduler=dict(raw["scheduler"]),
            defaults=dict(raw.get("defaults", {})),
            dtype=str(raw.get("dtype", "float32")),
            backend=str(raw.get("backend", "python")),
            family=family,
            turbo=bool(raw.get("turbo", False)),
            text_encoders=texts,
            sdxl=sdxl,
            vae_dtype=str(raw.get("vae_dtype", raw.get("dtype", "float32"))),
            lora=_lora(raw.get("lora")),
            unet_in_channels=unet_in_channels,
        )
    except (OSError, KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ManifestError):
            raise
        raise ManifestError(f"{path}: unreadable pipeline manifest ({type(exc).__name__}: {exc})") from exc


def load_manifests(repository: Path) -> dict[str, PipelineManifest]:
    """Every readable manifest in the repository, by API model name; bad ones are logged and skipped."""
    manifests = {}
    for path in sorted(repository.glob(f"*{MANIFEST_SUFFIX}")):
        try:
            manifest = load_manifest(path)
        except ManifestError as exc:
            log.error("skipping pipeline: %s", exc)
            continue
        manifests[manifest.name] = manifest
    return manifests
