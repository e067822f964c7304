"""Typed view of the pipeline manifests the export writes; the gateway learns every model fact from here."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.diffusion.sampling import img2img_scheduler_config
from gateway.diffusion.schedulers import scheduler_choices, scheduler_name

log = logging.getLogger(__name__)

MANIFEST_SUFFIX = ".pipeline.json"
# 1: Stable Diffusion 1.x/2.x. 2 adds `family` ("sd" or "sdxl"), `turbo`, `vae_dtype`, and for SDXL
# `text_encoders` and `sdxl`; a version-1 manifest reads as an SD one. A component's optional `max_batch_size`
# (the rows one call may carry) needs no new version: without it, calls are not split.
SUPPORTED_MANIFEST_VERSIONS = (1, 2)
SUPPORTED_MANIFEST_VERSION = max(SUPPORTED_MANIFEST_VERSIONS)
FAMILIES = ("sd", "sdxl")


class ManifestError(ValueError):
    """A manifest that this gateway cannot serve."""


@dataclass(frozen=True)
class Component:
    model: str
    inputs: Mapping[str, str]  # role -> tensor name (roles are the optimum names)
    outputs: Mapping[str, str]
    # The most rows one Triton call may carry (the model's max_batch_size); None (older manifests): unbounded.
    max_batch_size: int | None = None


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder and its tokenizer (SD has one; SDXL two, or only the second for a refiner)."""

    component: Component
    tokenizer_path: Path


@dataclass(frozen=True)
class SdxlConditioning:
    """What SDXL's UNet is conditioned on besides the text, as the pipeline's config sets it."""

    force_zeros_for_empty_prompt: bool = True
    requires_aesthetics_score: bool = False  # the refiner: time ids end with an aesthetic score, not a size
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5


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

    @property
    def texts(self) -> tuple[TextEncoder, ...]:
        """The text encoders, in the order their hidden states are concatenated."""
        return self.text_encoders or (TextEncoder(self.text_encoder, self.tokenizer_path),)

    @property
    def models(self) -> tuple[str, ...]:
        parts = [t.component for t in self.texts] + [self.vae_encoder, self.unet, self.vae_decoder]
        return tuple(dict.fromkeys(c.model for c in parts))

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
        }


def _component(raw: Mapping[str, Any]) -> Component:
    return Component(
        model=str(raw["model"]),
        inputs={role: str(spec["name"]) for role, spec in raw["inputs"].items()},
        outputs={role: str(spec["name"]) for role, spec in raw["outputs"].items()},
        max_batch_size=None if raw.get("max_batch_size") is None else int(raw["max_batch_size"]),
    )


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
            TextEncoder(_component(comps[t["component"]]), path.parent / t["tokenizer"])
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
        return PipelineManifest(
            name=str(raw["name"]),
            path=path,
            native_resolution=int(raw["native_resolution"]),
            vae_scale_factor=int(raw["vae_scale_factor"]),
            grid=int(raw["grid"]),
            latent_channels=int(raw["latent_channels"]),
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
