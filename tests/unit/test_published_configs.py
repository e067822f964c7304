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

from export.checkpoint import CONV_IN_KEY, fit_unet_inputs
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


# An inpainting UNet's conv_in reads 9 channels instead of 4: 320 x 5 x 3 x 3 more weights.
INPAINTING_EXTRA = 320 * 5 * 3 * 3


def _unet_parameters(config: dict[str, object]) -> int:
    with torch.device("meta"):
        model = diffusers.UNet2DConditionModel.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", sorted(PUBLISHED))
def test_an_inpainting_file_widens_the_published_unet(family: str, tmp_path: Path) -> None:
    """SD 1.5, SD 2 and SDXL inpainting files (the published 859.54 M, 865.93 M and 2567.48 M UNets) are read with
    their family's configs, the UNet widened to the file's 9-channel conv_in; SD 2's is the 512 px epsilon model."""
    folder = config_folder(family, tmp_path / family)
    before = {p: json.loads(p.read_text()) for p in sorted(folder.glob("*/*config.json"))}
    conv_in = torch.empty((320, 9, 3, 3), device="meta")
    fit_unet_inputs(folder, family, ["other", CONV_IN_KEY], {CONV_IN_KEY: conv_in}.__getitem__, published=True)
    unet = json.loads((folder / "unet" / "config.json").read_text())
    assert unet["in_channels"] == 9 and unet["out_channels"] == 4
    assert _unet_parameters(unet) == COUNTS[family]["unet"] + INPAINTING_EXTRA
    changed = {p.parent.name for p in before if json.loads(p.read_text()) != before[p]}
    if family == "sd2":
        assert changed == {"unet", "vae", "scheduler"}
        assert unet["sample_size"] == 64
        assert json.loads((folder / "vae" / "config.json").read_text())["sample_size"] == 512
        assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "epsilon"
    else:
        assert changed == {"unet"}


@pytest.mark.parametrize("channels", [4, 5])
def test_a_file_that_is_not_inpainting_leaves_the_configs(channels: int, tmp_path: Path) -> None:
    """4 channels is the ordinary UNet; 5 is no inpainting layout, left for the conversion to refuse."""
    folder = config_folder("sd1", tmp_path / "sd1")
    before = (folder / "unet" / "config.json").read_text()
    conv_in = torch.empty((320, channels, 3, 3), device="meta")
    fit_unet_inputs(folder, "sd1", [CONV_IN_KEY], {CONV_IN_KEY: conv_in}.__getitem__, published=True)
    assert (folder / "unet" / "config.json").read_text() == before
    fit_unet_inputs(folder, "sd1", ["no conv_in"], {}.__getitem__, published=True)
    assert (folder / "unet" / "config.json").read_text() == before
