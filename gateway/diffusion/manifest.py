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
SUPPORTED_MANIFEST_VERSION = 1


class ManifestError(ValueError):
    """A manifest that this gateway cannot serve."""


@dataclass(frozen=True)
class Component:
    model: str
    inputs: Mapping[str, str]  # role -> tensor name (roles are the optimum names)
    outputs: Mapping[str, str]


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

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(c.model for c in (self.text_encoder, self.vae_encoder, self.unet, self.vae_decoder))

    def describe(self) -> dict[str, Any]:
        """The public view for `GET /v1/models`."""
        return {
            "id": self.name,
            "object": "model",
            "native_resolution": self.native_resolution,
            "resolution_multiple": self.grid,
            "scheduler": self.scheduler.get("_class_name"),
            "default_scheduler": scheduler_name(str(self.scheduler.get("_class_name"))),
            "schedulers": list(scheduler_choices(img2img_scheduler_config(self.scheduler))),
            "dtype": self.dtype,
            "defaults": dict(self.defaults),
        }


def _component(raw: Mapping[str, Any]) -> Component:
    return Component(
        model=str(raw["model"]),
        inputs={role: str(spec["name"]) for role, spec in raw["inputs"].items()},
        outputs={role: str(spec["name"]) for role, spec in raw["outputs"].items()},
    )


def load_manifest(path: Path) -> PipelineManifest:
    try:
        raw = json.loads(path.read_text("utf-8"))
        if raw.get("manifest_version") != SUPPORTED_MANIFEST_VERSION:
            raise ManifestError(f"{path}: manifest_version {raw.get('manifest_version')!r} is not supported")
        comps = raw["components"]
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
            text_encoder=_component(comps["text_encoder"]),
            vae_encoder=_component(comps["vae_encoder"]),
            unet=_component(comps["unet"]),
            vae_decoder=_component(comps["vae_decoder"]),
            scheduler=dict(raw["scheduler"]),
            defaults=dict(raw.get("defaults", {})),
            dtype=str(raw.get("dtype", "float32")),
            backend=str(raw.get("backend", "python")),
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
