"""Check that a folder is a diffusers Stable Diffusion 1.x/2.x pipeline before loading anything."""

from __future__ import annotations

from pathlib import Path

from export.errors import ExportError

_WEIGHT_GLOBS = ("*.safetensors", "*.bin")


def _has_weights(folder: Path) -> bool:
    return any(any(folder.glob(pattern)) for pattern in _WEIGHT_GLOBS)


def missing_parts(model_dir: Path) -> list[str]:
    """What a Stable Diffusion img2img folder lacks (empty when the layout is complete)."""
    missing = []
    for file in ("model_index.json", "scheduler/scheduler_config.json"):
        if not (model_dir / file).is_file():
            missing.append(file)
    for component in ("text_encoder", "unet", "vae"):
        folder = model_dir / component
        if not (folder / "config.json").is_file():
            missing.append(f"{component}/config.json")
        elif not _has_weights(folder):
            missing.append(f"{component}/ weights (*.safetensors or *.bin)")
    tokenizer = model_dir / "tokenizer"
    has_slow = (tokenizer / "vocab.json").is_file() and (tokenizer / "merges.txt").is_file()
    if not has_slow and not (tokenizer / "tokenizer.json").is_file():
        missing.append("tokenizer/ (vocab.json + merges.txt, or tokenizer.json)")
    return missing


def check_layout(model_dir: Path) -> Path:
    """Raise a one-line ExportError naming what is missing; return the resolved folder."""
    if not model_dir.exists():
        raise ExportError(f"model folder not found: {model_dir}")
    if not model_dir.is_dir():
        raise ExportError(f"not a folder: {model_dir}")
    missing = missing_parts(model_dir)
    if missing:
        raise ExportError(f"{model_dir} is not a Stable Diffusion pipeline folder; missing: {', '.join(missing)}")
    return model_dir.resolve()
