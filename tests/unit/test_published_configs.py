"""The configs shipped for single-file checkpoints (export.published) describe the published models: built on the
meta device (no memory, no time), each component has the published parameter count, so a wrong width, depth or
head count would show."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import pytest
import torch
import transformers

from export.published import PUBLISHED, config_folder

# Parameters of the published models' components (SD 1.5, SD 2.1, SDXL base 1.0).
COUNTS = {
    "sd1": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd2": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
}


@pytest.mark.parametrize("family", sorted(PUBLISHED))
def test_shipped_configs_describe_the_published_models(family: str, tmp_path: Path) -> None:
    folder = config_folder(family, tmp_path / family)
    counts = {}
    with torch.device("meta"):
        for component in COUNTS[family]:
            config = json.loads((folder / component / "config.json").read_text())
            if component.startswith("text_encoder"):
                model = getattr(transformers, config["architectures"][0])(transformers.CLIPTextConfig(**config))
            else:
                model = getattr(diffusers, config["_class_name"]).from_config(config)
            counts[component] = sum(p.numel() for p in model.parameters())
    assert counts == COUNTS[family]
    index = json.loads((folder / "model_index.json").read_text())
    assert set(index) >= {"unet", "vae", "scheduler", "text_encoder", "tokenizer"}
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer")
    assert tokenizer("a photo of a cat").input_ids[0] == 49406 and tokenizer.model_max_length == 77
