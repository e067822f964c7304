"""Check that a folder is a diffusers Stable Diffusion 1.x/2.x or SDXL pipeline before loading anything."""

from __future__ import annotations

import json
from pathlib import Path

from export.errors import ExportError

_WEIGHT_GLOBS = ("*.safetensors", "*.bin")


def _has_weights(folder: Path) -> bool:
    return any(any(folder.glob(pattern)) for pattern in _WEIGHT_GLOBS)


def detect_family(model_dir: Path) -> str:
    """ "sdxl" when model_index.json names an SDXL pipeline class (base, img2img or refiner), else "sd"."""
    try:
        index = json.loads((model_dir / "model_index.json").read_text("utf-8"))
    except (OSError, ValueError):
        return "sd"
    name = index.get("_class_name") if isinstance(index, dict) else None
    return "sdxl" if isinstance(name, str) and name.startswith("StableDiffusionXL") else "sd"


def _present(model_dir: Path, component: str) -> bool:
    """Whether model_index.json lists `component` (a refiner lists `text_encoder` as [null, null])."""
    try:
        entry = json.loads((model_dir / "model_index.json").read_text("utf-8")).get(component)
    except (OSError, ValueError, AttributeError):
        return True
    return isinstance(entry, list) and entry[:1] != [None]


def missing_parts(model_dir: Path, *, weights: bool = True) -> list[str]:
    """What a Stable Diffusion (or SDXL) img2img folder lacks (empty when the layout is complete); without
    `weights`, only its configs and tokenizers (a single file's `--config` folder)."""
    missing = []
    for file in ("model_index.json", "scheduler/scheduler_config.json"):
        if not (model_dir / file).is_file():
            missing.append(file)
    if detect_family(model_dir) == "sdxl":
        texts = [(f"text_encoder{s}", f"tokenizer{s}") for s in ("", "_2") if _present(model_dir, f"text_encoder{s}")]
    else:
        texts = [("text_encoder", "tokenizer")]
    for component in [t[0] for t in texts] + ["unet", "vae"]:
        folder = model_dir / component
        if not (folder / "config.json").is_file():
            missing.append(f"{component}/config.json")
        elif weights and not _has_weights(folder):
            missing.append(f"{component}/ weights (*.safetensors or *.bin)")
    for _, name in texts:
        tokenizer = model_dir / name
        has_slow = (tokenizer / "vocab.json").is_file() and (tokenizer / "merges.txt").is_file()
        if not has_slow and not (tokenizer / "tokenizer.json").is_file():
            missing.append(f"{name}/ (vocab.json + merges.txt, or tokenizer.json)")
    return missing


def check_layout(model_dir: Path, *, weights: bool = True) -> Path:
    """Raise a one-line ExportError naming what is missing; return the resolved folder."""
    if not model_dir.exists():
        raise ExportError(f"model folder not found: {model_dir}")
    if not model_dir.is_dir():
        raise ExportError(f"not a folder: {model_dir}")
    missing = missing_parts(model_dir, weights=weights)
    if missing:
        raise ExportError(
            f"{model_dir} is not a Stable Diffusion (1.x/2.x or SDXL) pipeline folder; missing: {', '.join(missing)}"
        )
    return model_dir.resolve()
