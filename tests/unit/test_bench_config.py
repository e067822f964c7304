"""The harness's model plans and options: `large` only when named; the ORT peer's folder links external data."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.__main__ import parse
from benchmarks.models import COMPONENTS, ModelFiles, _link_ort_folder
from export.tiny import SIZES, _text_config
from gateway.diffusion.sampling import img2img_effective_steps


def test_quick_and_full_runs_leave_the_large_model_out_unless_named() -> None:
    for argv in (["--quick"], []):
        _, config = parse(argv)
        assert [p.size for p in config.models] == ["tiny", "medium"]
    _, config = parse(["--quick", "--models", "tiny,medium,large"])
    assert [p.size for p in config.models] == ["tiny", "medium", "large"]
    _, config = parse(["--models", "large"])
    (large,) = config.models
    wl = large.workload
    assert (wl.image_side, img2img_effective_steps(wl.steps, wl.strength), wl.guidance_scale) == (256, 2, 7.5)
    assert large.concurrency == (1, 4) and large.repeats == 1


def test_an_unknown_model_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse(["--models", "tiny,huge"])
    assert exit_.value.code == 2
    assert "tiny, medium, large" in capsys.readouterr().err


def test_the_large_size_has_stable_diffusion_1_5s_shapes() -> None:
    spec = SIZES["large"]
    assert spec.unet_channels == (320, 640, 1280, 1280) and spec.unet_layers_per_block == 2
    assert spec.unet_down == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert spec.unet_up == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    assert (spec.attention_head_dim, spec.unet_groups) == (8, 32)
    assert spec.sample_size == 32  # the published 64 halved: native 256 px, the same weight shapes
    assert spec.vae_channels == (128, 256, 512, 512) and spec.vae_layers_per_block == 2 and spec.vae_groups == 32
    text = _text_config(spec)
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (768, 12, 12)
    assert (text.intermediate_size, text.max_position_embeddings, text.vocab_size) == (3072, 77, 49408)
    # the others keep their sizes (their weights for a seed are what the tests depend on)
    assert _text_config(SIZES["medium"]).intermediate_size == 4 * 384
    assert SIZES["tiny"].unet_layers_per_block == 1 and SIZES["medium"].unet_layers_per_block == 2
    assert SIZES["tiny"].vae_layers_per_block == SIZES["medium"].vae_layers_per_block == 1


def test_the_ort_peer_folder_links_each_model_and_its_external_data(tmp_path: Path) -> None:
    files = ModelFiles("large", "bench-large", tmp_path / "diffusers", tmp_path / "repo", tmp_path / "ort")
    for folder in ("scheduler", "tokenizer", "text_encoder", "unet", "vae"):
        (files.diffusers_dir / folder).mkdir(parents=True)
        (files.diffusers_dir / folder / "config.json").write_text("{}")
    (files.diffusers_dir / "model_index.json").write_text("{}")
    for component in COMPONENTS:
        files.onnx(component).parent.mkdir(parents=True)
        files.onnx(component).write_text(component)
        (files.onnx(component).parent / "model.py").write_text("")
    (files.onnx("unet").parent / "model.onnx_data").write_text("weights")
    _link_ort_folder(files)
    assert (files.ort_dir / "unet" / "model.onnx_data").read_text() == "weights"
    assert (files.ort_dir / "unet" / "model.onnx").read_text() == "unet"
    assert sorted(p.name for p in (files.ort_dir / "vae_decoder").iterdir()) == ["config.json", "model.onnx"]
