"""Issue 25, step 1: an inpainting (9-channel) UNet in the export's manifest, the gateway's reading of it, the
UNet's answer check and the TensorRT profile; manifests written before read as 4-channel img2img models."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from export.errors import ExportError
from export.onnx_export import COMPONENTS
from export.repository import DEFAULTS, TURBO_DEFAULTS, ServingOptions, TensorSpec, build_manifest, unet_channels
from export.tensorrt import InputProfile, profile
from gateway.diffusion.manifest import ManifestError, load_manifest


class _Config(dict[str, Any]):
    """A diffusers config: a dict read by attribute too."""

    def __getattr__(self, key: str) -> Any:
        return self[key]


def _pipeline(unet_in: int) -> Any:
    """What `build_manifest` reads of an SD pipeline (4 latent channels, 8 px per latent, 64 px native)."""
    return SimpleNamespace(
        vae=SimpleNamespace(config=_Config(latent_channels=4, block_out_channels=(8, 8, 8, 8), scaling_factor=0.18215)),
        unet=SimpleNamespace(config=_Config(in_channels=unet_in, sample_size=8, down_block_types=("a", "b"))),
        scheduler=SimpleNamespace(config=_Config(num_train_timesteps=1000)),
        text_encoder=SimpleNamespace(config=_Config(hidden_size=32)),
        tokenizer=SimpleNamespace(model_max_length=77),
    )


def _specs(unet_in: int) -> dict[str, tuple[list[TensorSpec], list[TensorSpec]]]:
    def latent(name: str, channels: int) -> TensorSpec:
        return TensorSpec(name, "FP32", (-1, channels, -1, -1))

    hidden = TensorSpec("encoder_hidden_states", "FP32", (-1, 77, 32))
    return {
        "text_encoder": (
            [TensorSpec("input_ids", "INT64", (-1, 77))],
            [TensorSpec("last_hidden_state", "FP32", hidden.shape)],
        ),
        "vae_encoder": ([latent("sample", 3)], [latent("latent_parameters", 8)]),
        "unet": ([latent("sample", unet_in), TensorSpec("timestep", "FP32", (-1,)), hidden], [latent("out_sample", 4)]),
        "vae_decoder": ([latent("latent_sample", 4)], [TensorSpec("sample", "FP32", (-1, 3, -1, -1))]),
    }


def _manifest(unet_in: int, *, turbo: bool = False) -> dict[str, Any]:
    return build_manifest(
        "m", _pipeline(unet_in), _specs(unet_in), ServingOptions(), dtype="float32", tokenizer_file="t.json",
        source="test", turbo=turbo,
    )  # fmt: skip


def _write(tmp_path: Path, raw: dict[str, Any]) -> Path:
    path = tmp_path / "m.pipeline.json"
    path.write_text(json.dumps(raw))
    return path


def test_a_nine_channel_unet_is_an_inpainting_model_with_the_vaes_latent_channels(tmp_path: Path) -> None:
    raw = _manifest(9)
    assert (raw["latent_channels"], raw["unet_in_channels"], raw["inpainting"]) == (4, 9, True)
    assert raw["defaults"] == {**DEFAULTS, "strength": 1.0}
    assert _manifest(9, turbo=True)["defaults"] == {**TURBO_DEFAULTS, "strength": 1.0}
    manifest = load_manifest(_write(tmp_path, raw))
    assert (manifest.latent_channels, manifest.unet_in_channels, manifest.sample_channels) == (4, 9, 9)
    assert manifest.inpainting and manifest.describe()["inpainting"] is True
    # The UNet answers the noise prediction: the latents' 4 channels, not its sample's 9.
    (noise,) = manifest.expected_outputs(manifest.unet, {"sample": (2, 9, 8, 6), "timestep": (2,)}).values()
    assert (noise.dtype, noise.rows, noise.shape) == (np.dtype(np.float32), 2, (2, 4, 8, 6))


def test_a_four_channel_unet_and_a_manifest_from_before_read_as_img2img(tmp_path: Path) -> None:
    raw = _manifest(4)
    assert (raw["latent_channels"], raw["unet_in_channels"], raw["inpainting"]) == (4, 4, False)
    assert raw["defaults"] == DEFAULTS
    for old in (raw, {k: v for k, v in raw.items() if k not in ("unet_in_channels", "inpainting")}):
        manifest = load_manifest(_write(tmp_path, old))
        assert (manifest.latent_channels, manifest.sample_channels, manifest.inpainting) == (4, 4, False)
        assert manifest.describe()["inpainting"] is False
        (noise,) = manifest.expected_outputs(manifest.unet, {"sample": (3, 4, 8, 6)}).values()
        assert noise.shape == (3, 4, 8, 6)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"unet_in_channels": 5}, "unet_in_channels 5 is neither"),
        ({"inpainting": False}, "contradicts unet_in_channels 9"),
        ({"unet_in_channels": 4, "inpainting": False}, "sample input has 9 channels"),
    ],
)
def test_inconsistent_channels_are_a_manifest_error(tmp_path: Path, change: dict[str, Any], match: str) -> None:
    with pytest.raises(ManifestError, match=match):
        load_manifest(_write(tmp_path, {**_manifest(9), **change}))


def test_the_export_refuses_a_unet_neither_img2img_nor_inpainting() -> None:
    assert unet_channels(_pipeline(4)) == (4, 4, False) and unet_channels(_pipeline(9)) == (4, 9, True)
    with pytest.raises(ExportError, match="takes 5 input channels"):
        unet_channels(_pipeline(5))


def test_the_tensorrt_profile_of_a_nine_channel_sample_is_latent_sized() -> None:
    """64 px native, grid 16: image sides 16..64 px, latents 2..8; the 9 channels are fixed, not a pixel side."""
    manifest = _manifest(9)
    assert [c for c in COMPONENTS if c in manifest["components"]] == list(COMPONENTS)
    sample, timestep, hidden = profile(manifest, "unet", 4)
    assert sample == InputProfile("sample", (1, 9, 2, 2), (4, 9, 8, 8), (4, 9, 8, 8))
    assert timestep.min == (1,) and hidden.max == (4, 77, 32)
    (latent,) = profile(manifest, "vae_decoder", 4)
    assert latent == InputProfile("latent_sample", (1, 4, 2, 2), (4, 4, 8, 8), (4, 4, 8, 8))
    (pixels,) = profile(manifest, "vae_encoder", 4)
    assert pixels == InputProfile("sample", (1, 3, 16, 16), (4, 3, 64, 64), (4, 3, 64, 64))
    assert profile(_manifest(4), "unet", 4)[0] == InputProfile("sample", (1, 4, 2, 2), (4, 4, 8, 8), (4, 4, 8, 8))
