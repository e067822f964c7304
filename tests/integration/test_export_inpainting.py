"""Issue 25, step 1: a tiny 9-channel (inpainting) SD pipeline exports like any other, its UNet's `sample` wider
than the latents, and the manifest says so (no Triton: the repository's files and the export's own check)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from export.pipeline import ExportRequest, run_export
from export.repository import DEFAULTS
from gateway.diffusion.manifest import load_manifest

pytestmark = pytest.mark.integration


def _tensor_dims(config: str, name: str) -> list[int]:
    match = re.search(rf'name: "{name}" data_type: \w+ dims: \[ ([^\]]*) \]', config)
    assert match is not None, config
    return [int(d) for d in match.group(1).split(",")]


def test_a_tiny_inpainting_sd_pipeline_exports_with_a_nine_channel_sample(tmp_path: Path) -> None:
    """Validation on: each ONNX component matches torch (the UNet traced with 9 channels, the decoder fed the
    VAE's 4), the UNet's Triton config takes [9, h, w] and answers [4, h, w], and the manifest reads back as an
    inpainting model at strength 1.0."""
    repo = tmp_path / "repo"
    manifest = run_export(
        ExportRequest(model_dir=None, repository=repo, name="inpaint", tiny_size="tiny", tiny_inpainting=True),
        progress=False,
    )
    assert manifest["latent_channels"] == 4 and manifest["unet_in_channels"] == 9 and manifest["inpainting"] is True
    assert manifest["components"]["unet"]["inputs"]["sample"]["shape"] == [-1, 9, -1, -1]
    assert manifest["components"]["unet"]["outputs"]["out_sample"]["shape"] == [-1, 4, -1, -1]
    assert manifest["components"]["vae_decoder"]["inputs"]["latent_sample"]["shape"] == [-1, 4, -1, -1]
    assert manifest["defaults"] == {**DEFAULTS, "strength": 1.0}
    assert "inpainting" in manifest["source"]

    config = (repo / "inpaint_unet" / "config.pbtxt").read_text()
    assert _tensor_dims(config, "sample") == [9, -1, -1]
    assert _tensor_dims(config, "out_sample") == [4, -1, -1]
    assert _tensor_dims((repo / "inpaint_vae_decoder" / "config.pbtxt").read_text(), "latent_sample") == [4, -1, -1]

    loaded = load_manifest(repo / "inpaint.pipeline.json")
    assert (loaded.latent_channels, loaded.sample_channels, loaded.inpainting) == (4, 9, True)
    assert loaded.describe()["inpainting"] is True
    assert json.loads((repo / "inpaint.pipeline.json").read_text())["inpainting"] is True


def test_an_sdxl_inpainting_folder_is_detected_from_its_unet_config(tmp_path: Path) -> None:
    """`--model-dir`: diffusers' SDXL inpaint pipeline folder (saved as `StableDiffusionXLInpaintPipeline`) loads
    through the img2img class, and its UNet's `in_channels` makes it an inpainting model."""
    from export.tiny import build_random_pipeline

    folder = build_random_pipeline(tmp_path / "xl", size="tiny", arch="sdxl", inpainting=True)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLInpaintPipeline"
    manifest = run_export(
        ExportRequest(model_dir=folder, repository=tmp_path / "repo", name="xl-inpaint", validate=False),
        progress=False,
    )
    assert manifest["family"] == "sdxl" and manifest["inpainting"] is True
    assert (manifest["latent_channels"], manifest["unet_in_channels"]) == (4, 9)
    assert manifest["components"]["unet"]["inputs"]["sample"]["shape"] == [-1, 9, -1, -1]
