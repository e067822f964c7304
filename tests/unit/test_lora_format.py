"""LoRA adapter files (gateway/diffusion/lora_format.py) and the runner's bank (python_backend/lora_bank.py), on
safetensors files written here by hand: no torch, no safetensors package."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.diffusion import lora_format
from gateway.diffusion.lora_format import LoraFileError, families_match, fit_adapter, load_weights, parse_adapter

BANK_PY = Path(__file__).resolve().parents[2] / "model_repository" / "python_backend" / "lora_bank.py"

# Diffusers names of a few UNet and text-encoder layers.
Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
K2 = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
OUT = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
PROJ_IN = "down_blocks.0.attentions.0.proj_in"
TE_Q = "text_model.encoder.layers.0.self_attn.q_proj"


# --- writing safetensors files ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """A tensor as bytes with its safetensors dtype (for dtypes numpy has no name for, and for corrupt files)."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes


_NUMPY_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.float64): "F64"}


def bf16(values: np.ndarray) -> Raw:
    """bfloat16: the upper 16 bits of each float32."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    upper = (values.view(np.uint32) >> 16).astype("<u2")
    return Raw("BF16", values.shape, upper.tobytes())


def write_raw(path: Path, header: Mapping[str, Any], payload: bytes = b"") -> Path:
    """8-byte little-endian header length, the JSON header, then the data."""
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + payload)
    return path


def write_safetensors(
    path: Path, tensors: Mapping[str, np.ndarray | Raw], metadata: Mapping[str, Any] | None = None
) -> Path:
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    payload = b""
    for key, tensor in tensors.items():
        if isinstance(tensor, np.ndarray):
            array = np.ascontiguousarray(tensor)
            tensor = Raw(_NUMPY_DTYPES[array.dtype], array.shape, array.astype(array.dtype.newbyteorder("<")).tobytes())
        header[key] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [len(payload), len(payload) + len(tensor.data)],
        }
        payload += tensor.data
    return write_raw(path, header, payload)


def rand(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def peft_layer(prefix: str, layer: str, rank: int, fan_in: int, fan_out: int, seed: int) -> dict[str, np.ndarray]:
    """diffusers/PEFT: lora_A [r, in], lora_B [out, r]."""
    return {
        f"{prefix}.{layer}.lora_A.weight": rand(seed, rank, fan_in),
        f"{prefix}.{layer}.lora_B.weight": rand(seed + 1, fan_out, rank),
    }


def kohya_layer(
    prefix: str, flat: str, rank: int, fan_in: int, fan_out: int, seed: int, alpha: float | None = None
) -> dict[str, np.ndarray]:
    tensors = {
        f"{prefix}{flat}.lora_down.weight": rand(seed, rank, fan_in),
        f"{prefix}{flat}.lora_up.weight": rand(seed + 1, fan_out, rank),
    }
    if alpha is not None:
        tensors[f"{prefix}{flat}.alpha"] = np.array(alpha, np.float32)  # a scalar: shape []
    return tensors


def fit_all(adapter: lora_format.Adapter, *, rank: int = 16, base: str = "sd", lpb: int = 2) -> lora_format.Fit:
    """Fit against targets made from the adapter's own layers (resolved names where they are diffusers')."""
    targets = {
        c: {n: (layer.fan_in, layer.fan_out) for n, layer in layers.items()} for c, layers in adapter.layers.items()
    }
    return fit_adapter(adapter, targets, rank=rank, layers_per_block=lpb, base=base)


# --- diffusers / PEFT layout -------------------------------------------------------------------------------------


def test_peft_layout_with_metadata_alpha(tmp_path: Path) -> None:
    tensors = {
        **peft_layer("unet", Q, 2, 8, 6, seed=1),
        **peft_layer("unet", K2, 2, 5, 6, seed=3),
        **peft_layer("text_encoder", TE_Q, 2, 4, 4, seed=5),
    }
    meta = {"lora_adapter_metadata": {"unet.lora_alpha": 8, "unet.r": 2}}
    path = write_safetensors(tmp_path / "ink.safetensors", tensors, meta)
    adapter = parse_adapter(path, "ink")
    assert adapter.name == "ink" and adapter.layout == "diffusers"
    assert adapter.family is None  # attn2.to_k of width 5: no published family
    assert adapter.components == ("unet", "text_encoder")
    assert adapter.rank == 2
    assert set(adapter.layers["unet"]) == {Q, K2}
    q = adapter.layers["unet"][Q]
    assert (q.rank, q.fan_in, q.fan_out, q.alpha_key) == (2, 8, 6, None)
    assert adapter.size_bytes == path.stat().st_size
    weights = load_weights(adapter, fit_all(adapter))
    down, up = weights["unet"][Q]
    assert down.dtype == np.float32 and down.shape == (8, 2) and up.shape == (2, 6)
    np.testing.assert_array_equal(down, tensors[f"unet.{Q}.lora_A.weight"].T)
    np.testing.assert_allclose(up, tensors[f"unet.{Q}.lora_B.weight"].T * 4.0, rtol=1e-6)  # alpha 8 / r 2
    # no lora_alpha for the text encoder in the metadata: scale 1
    te_down, te_up = weights["text_encoder"][TE_Q]
    np.testing.assert_array_equal(te_down, tensors[f"text_encoder.{TE_Q}.lora_A.weight"].T)
    np.testing.assert_array_equal(te_up, tensors[f"text_encoder.{TE_Q}.lora_B.weight"].T)


def test_peft_layout_without_metadata_scales_by_one(tmp_path: Path) -> None:
    tensors = peft_layer("unet", Q, 4, 8, 8, seed=1)
    adapter = parse_adapter(write_safetensors(tmp_path / "a.safetensors", tensors), "a")
    down, up = load_weights(adapter, fit_all(adapter))["unet"][Q]
    np.testing.assert_array_equal(down, tensors[f"unet.{Q}.lora_A.weight"].T)
    np.testing.assert_array_equal(up, tensors[f"unet.{Q}.lora_B.weight"].T)


def test_peft_alpha_pattern_overrides_one_layer(tmp_path: Path) -> None:
    tensors = {**peft_layer("unet", Q, 2, 8, 8, seed=1), **peft_layer("unet", K2, 2, 8, 8, seed=3)}
    meta = {"lora_adapter_metadata": {"unet.lora_alpha": 8, "unet.r": 2, "unet.alpha_pattern": {"attn2.to_k": 1}}}
    adapter = parse_adapter(write_safetensors(tmp_path / "a.safetensors", tensors, meta), "a")
    weights = load_weights(adapter, fit_all(adapter))["unet"]
    np.testing.assert_allclose(weights[Q][1], tensors[f"unet.{Q}.lora_B.weight"].T * 4.0, rtol=1e-6)
    np.testing.assert_allclose(weights[K2][1], tensors[f"unet.{K2}.lora_B.weight"].T * 0.5, rtol=1e-6)


def test_peft_rslora_scales_by_alpha_over_sqrt_rank(tmp_path: Path) -> None:
    tensors = peft_layer("unet", Q, 4, 8, 8, seed=1)
    meta = {"lora_adapter_metadata": {"unet.lora_alpha": 8, "unet.r": 4, "unet.use_rslora": True}}
    adapter = parse_adapter(write_safetensors(tmp_path / "a.safetensors", tensors, meta), "a")
    _, up = load_weights(adapter, fit_all(adapter))["unet"][Q]
    np.testing.assert_allclose(up, tensors[f"unet.{Q}.lora_B.weight"].T * (8 / math.sqrt(4)), rtol=1e-6)


def test_peft_metadata_not_json(tmp_path: Path) -> None:
    path = write_safetensors(
        tmp_path / "a.safetensors", peft_layer("unet", Q, 2, 8, 8, 1), {"lora_adapter_metadata": "{"}
    )
    adapter = parse_adapter(path, "a")
    with pytest.raises(LoraFileError, match="lora_adapter_metadata metadata is not JSON"):
        load_weights(adapter, fit_all(adapter))


def test_per_layer_alpha_key_in_diffusers_layout(tmp_path: Path) -> None:
    tensors = {
        f"unet.{Q}.lora.down.weight": rand(1, 2, 8),
        f"unet.{Q}.lora.up.weight": rand(2, 8, 2),
        f"unet.{Q}.alpha": np.array(1.0, np.float32),
    }
    adapter = parse_adapter(write_safetensors(tmp_path / "a.safetensors", tensors), "a")
    assert adapter.layers["unet"][Q].alpha_key == f"unet.{Q}.alpha"
    _, up = load_weights(adapter, fit_all(adapter))["unet"][Q]
    np.testing.assert_allclose(up, tensors[f"unet.{Q}.lora.up.weight"].T * 0.5, rtol=1e-6)


# --- the older diffusers forms -----------------------------------------------------------------------------------


def test_old_diffusers_lora_down_up(tmp_path: Path) -> None:
    tensors = {
        f"unet.{Q}.lora.down.weight": rand(1, 2, 8),
        f"unet.{Q}.lora.up.weight": rand(2, 6, 2),
        f"text_encoder.{TE_Q}.lora.down.weight": rand(3, 2, 4),
        f"text_encoder.{TE_Q}.lora.up.weight": rand(4, 4, 2),
    }
    adapter = parse_adapter(write_safetensors(tmp_path / "a.safetensors", tensors), "a")
    assert adapter.layout == "diffusers"
    assert {c: set(layers) for c, layers in adapter.layers.items()} == {"unet": {Q}, "text_encoder": {TE_Q}}
    layer = adapter.layers["unet"][Q]
    assert (layer.down, layer.up, layer.rank, layer.fan_in, layer.fan_out) == (
        f"unet.{Q}.lora.down.weight",
        f"unet.{Q}.lora.up.weight",
        2,
        8,
        6,
    )
    down, up = load_weights(adapter, fit_all(adapter))["unet"][Q]
    np.testing.assert_array_equal(down, tensors[f"unet.{Q}.lora.down.weight"].T)
    np.testing.assert_array_equal(up, tensors[f"unet.{Q}.lora.up.weight"].T)


def test_attention_processor_form(tmp_path: Path) -> None:
    attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    tensors: dict[str, np.ndarray] = {}
    for seed, projection in enumerate(("to_q", "to_k", "to_v", "to_out")):
        tensors[f"unet.{attn}.processor.{projection}_lora.down.weight"] = rand(2 * seed, 2, 8)
        tensors[f"unet.{attn}.processor.{projection}_lora.up.weight"] = rand(2 * seed + 1, 8, 2)
    adapter = parse_adapter(write_safetensors(tmp_path / "a.safetensors", tensors), "a")
    assert adapter.layout == "diffusers"
    assert set(adapter.layers["unet"]) == {f"{attn}.to_q", f"{attn}.to_k", f"{attn}.to_v", f"{attn}.to_out.0"}
    out = adapter.layers["unet"][f"{attn}.to_out.0"]
    assert out.down == f"unet.{attn}.processor.to_out_lora.down.weight"
    assert out.up == f"unet.{attn}.processor.to_out_lora.up.weight"
    targets = {"unet": {f"{attn}.{p}": (8, 8) for p in ("to_q", "to_k", "to_v", "to_out.0")}}
    fit = fit_adapter(adapter, targets, rank=4, layers_per_block=2, base="sd1")
    down, up = load_weights(adapter, fit)["unet"][f"{attn}.to_out.0"]
    np.testing.assert_array_equal(down, tensors[f"unet.{attn}.processor.to_out_lora.down.weight"].T)
    np.testing.assert_array_equal(up, tensors[f"unet.{attn}.processor.to_out_lora.up.weight"].T)


# --- kohya layout ------------------------------------------------------------------------------------------------


def test_kohya_layout_alpha_and_text_encoder(tmp_path: Path) -> None:
    flat_q = Q.replace(".", "_")
    flat_te = TE_Q.replace(".", "_")
    tensors = {
        **kohya_layer("lora_unet_", flat_q, 4, 8, 6, seed=1, alpha=2.0),
        **kohya_layer("lora_te_", flat_te, 4, 4, 4, seed=3, alpha=8.0),
    }
    adapter = parse_adapter(write_safetensors(tmp_path / "k.safetensors", tensors), "k")
    assert adapter.layout == "kohya"
    assert adapter.components == ("unet", "text_encoder")
    assert set(adapter.layers["unet"]) == {flat_q}  # as written: resolved against a model by fit_adapter
    assert adapter.layers["unet"][flat_q].alpha_key == f"lora_unet_{flat_q}.alpha"
    targets = {"unet": {Q: (8, 6), K2: (8, 6)}, "text_encoder": {TE_Q: (4, 4)}}
    fit = fit_adapter(adapter, targets, rank=4, layers_per_block=2, base="sd")
    assert {c: set(layers) for c, layers in fit.layers.items()} == {"unet": {Q}, "text_encoder": {TE_Q}}
    assert fit.layers["unet"][Q] is adapter.layers["unet"][flat_q]
    weights = load_weights(adapter, fit)
    down, up = weights["unet"][Q]
    np.testing.assert_array_equal(down, tensors[f"lora_unet_{flat_q}.lora_down.weight"].T)
    np.testing.assert_allclose(up, tensors[f"lora_unet_{flat_q}.lora_up.weight"].T * 0.5, rtol=1e-6)  # 2 / 4
    _, te_up = weights["text_encoder"][TE_Q]
    np.testing.assert_allclose(te_up, tensors[f"lora_te_{flat_te}.lora_up.weight"].T * 2.0, rtol=1e-6)  # 8 / 4


def test_kohya_without_alpha_scales_by_one(tmp_path: Path) -> None:
    tensors = kohya_layer("lora_unet_", Q.replace(".", "_"), 4, 8, 8, seed=1)
    adapter = parse_adapter(write_safetensors(tmp_path / "k.safetensors", tensors), "k")
    fit = fit_adapter(adapter, {"unet": {Q: (8, 8)}}, rank=4, layers_per_block=2, base="sd")
    _, up = load_weights(adapter, fit)["unet"][Q]
    np.testing.assert_array_equal(up, tensors[f"lora_unet_{Q.replace('.', '_')}.lora_up.weight"].T)


def test_kohya_te1_te2_are_the_sdxl_encoders(tmp_path: Path) -> None:
    flat = TE_Q.replace(".", "_")
    tensors = {**kohya_layer("lora_te1_", flat, 2, 4, 4, seed=1), **kohya_layer("lora_te2_", flat, 2, 6, 6, seed=3)}
    adapter = parse_adapter(write_safetensors(tmp_path / "k.safetensors", tensors), "k")
    assert adapter.components == ("text_encoder", "text_encoder_2")
    assert set(adapter.layers["text_encoder"]) == {flat} and set(adapter.layers["text_encoder_2"]) == {flat}
    assert adapter.layers["text_encoder_2"][flat].fan_in == 6
    assert adapter.family == "sdxl"  # a second text encoder
    targets = {"text_encoder": {TE_Q: (4, 4)}, "text_encoder_2": {TE_Q: (6, 6)}}
    fit = fit_adapter(adapter, targets, rank=2, layers_per_block=2, base="sdxl")
    weights = load_weights(adapter, fit)
    np.testing.assert_array_equal(weights["text_encoder_2"][TE_Q][0], tensors[f"lora_te2_{flat}.lora_down.weight"].T)


def test_kohya_1x1_convolution(tmp_path: Path) -> None:
    flat = PROJ_IN.replace(".", "_")
    tensors = {
        f"lora_unet_{flat}.lora_down.weight": rand(1, 2, 8, 1, 1),
        f"lora_unet_{flat}.lora_up.weight": rand(2, 6, 2, 1, 1),
        f"lora_unet_{flat}.alpha": np.array(1.0, np.float32),
    }
    adapter = parse_adapter(write_safetensors(tmp_path / "k.safetensors", tensors), "k")
    layer = adapter.layers["unet"][flat]
    assert (layer.rank, layer.fan_in, layer.fan_out) == (2, 8, 6)
    fit = fit_adapter(adapter, {"unet": {PROJ_IN: (8, 6)}}, rank=2, layers_per_block=2, base="sd")
    down, up = load_weights(adapter, fit)["unet"][PROJ_IN]
    assert down.shape == (8, 2) and up.shape == (2, 6)
    np.testing.assert_array_equal(down, tensors[f"lora_unet_{flat}.lora_down.weight"].reshape(2, 8).T)
    np.testing.assert_allclose(up, tensors[f"lora_unet_{flat}.lora_up.weight"].reshape(6, 2).T * 0.5, rtol=1e-6)


def test_a_3x3_convolution_is_refused(tmp_path: Path) -> None:
    flat = "down_blocks_0_resnets_0_conv1"
    tensors = {
        f"lora_unet_{flat}.lora_down.weight": rand(1, 2, 8, 3, 3),
        f"lora_unet_{flat}.lora_up.weight": rand(2, 8, 2, 1, 1),
    }
    path = write_safetensors(tmp_path / "k.safetensors", tensors)
    with pytest.raises(LoraFileError, match=r"shape \[2, 8, 3, 3\] \(only linear and 1x1 convolution"):
        parse_adapter(path, "k")


_BLOCK = "transformer_blocks.0.attn1.to_q"


# (layers_per_block, SGM name as kohya writes it, diffusers' name): the inverse of diffusers' own
# `_maybe_map_sgm_blocks_to_diffusers` (input i -> block (i-1)//(lpb+1), attention (i-1)%(lpb+1); output
# i -> block i//(lpb+1), attention i%(lpb+1); middle_block.1 -> mid_block.attentions.0).
@pytest.mark.parametrize(
    ("lpb", "sgm", "diffusers"),
    [
        (2, "input_blocks_1_1", "down_blocks.0.attentions.0"),
        (2, "input_blocks_2_1", "down_blocks.0.attentions.1"),
        (2, "input_blocks_4_1", "down_blocks.1.attentions.0"),
        (2, "input_blocks_5_1", "down_blocks.1.attentions.1"),
        (2, "input_blocks_7_1", "down_blocks.2.attentions.0"),
        (2, "input_blocks_8_1", "down_blocks.2.attentions.1"),
        (2, "output_blocks_0_1", "up_blocks.0.attentions.0"),
        (2, "output_blocks_2_1", "up_blocks.0.attentions.2"),
        (2, "output_blocks_3_1", "up_blocks.1.attentions.0"),
        (2, "output_blocks_5_1", "up_blocks.1.attentions.2"),
        (2, "middle_block_1", "mid_block.attentions.0"),
        (1, "input_blocks_1_1", "down_blocks.0.attentions.0"),
        (1, "input_blocks_3_1", "down_blocks.1.attentions.0"),
        (1, "input_blocks_5_1", "down_blocks.2.attentions.0"),
        (1, "output_blocks_0_1", "up_blocks.0.attentions.0"),
        (1, "output_blocks_1_1", "up_blocks.0.attentions.1"),
        (1, "output_blocks_2_1", "up_blocks.1.attentions.0"),
        (1, "output_blocks_3_1", "up_blocks.1.attentions.1"),
        (1, "middle_block_1", "mid_block.attentions.0"),
    ],
)
def test_sgm_names_resolve_to_diffusers(tmp_path: Path, lpb: int, sgm: str, diffusers: str) -> None:
    flat = f"{sgm}_{_BLOCK.replace('.', '_')}"
    target = f"{diffusers}.{_BLOCK}"
    assert lora_format.layer_names("unet", {target: (8, 8)}, lpb)[flat] == target
    adapter = parse_adapter(
        write_safetensors(tmp_path / "x.safetensors", kohya_layer("lora_unet_", flat, 2, 8, 8, 1)), "x"
    )
    assert adapter.family == "sdxl"  # SGM names are SDXL's
    # among other attentions of the same UNet, it resolves to exactly this one
    others = [
        f"{kind}.{block}.attentions.{index}.{_BLOCK}"
        for kind in ("down_blocks", "up_blocks")
        for block in range(3)
        for index in range(lpb + 1)
    ] + [f"mid_block.attentions.0.{_BLOCK}"]
    fit = fit_adapter(adapter, {"unet": dict.fromkeys(others, (8, 8))}, rank=2, layers_per_block=lpb, base="sdxl")
    assert list(fit.layers["unet"]) == [target]


def test_sdxl_sgm_file_fits_diffusers_targets(tmp_path: Path) -> None:
    names = {
        "input_blocks_4_1_transformer_blocks_0_attn1_to_q": f"down_blocks.1.attentions.0.{_BLOCK}",
        "output_blocks_3_1_transformer_blocks_0_attn1_to_q": f"up_blocks.1.attentions.0.{_BLOCK}",
        "middle_block_1_transformer_blocks_0_attn1_to_q": f"mid_block.attentions.0.{_BLOCK}",
    }
    tensors: dict[str, np.ndarray] = {}
    for seed, flat in enumerate(names):
        tensors.update(kohya_layer("lora_unet_", flat, 2, 8, 8, seed=10 * seed, alpha=1.0))
    adapter = parse_adapter(write_safetensors(tmp_path / "xl.safetensors", tensors), "xl")
    assert adapter.family == "sdxl"
    targets = {"unet": dict.fromkeys(names.values(), (8, 8))}
    fit = fit_adapter(adapter, targets, rank=4, layers_per_block=2, base="sdxl")
    assert {t: layer.down for t, layer in fit.layers["unet"].items()} == {
        target: f"lora_unet_{flat}.lora_down.weight" for flat, target in names.items()
    }
    weights = load_weights(adapter, fit)["unet"]
    for flat, target in names.items():
        np.testing.assert_allclose(weights[target][1], tensors[f"lora_unet_{flat}.lora_up.weight"].T * 0.5, rtol=1e-6)


# --- dtypes ------------------------------------------------------------------------------------------------------


def test_f16_and_bf16_read_as_float32(tmp_path: Path) -> None:
    # values exact in both half formats
    down = np.array([[1.0, -2.5, 0.15625, 384.0], [0.5, -0.75, 3.0, -96.0]], np.float32)  # [r=2, in=4]
    up = np.array([[0.25, -1.0], [2.0, 6.5], [-0.125, 1.5]], np.float32)  # [out=3, r=2]
    tensors: dict[str, np.ndarray | Raw] = {
        f"unet.{Q}.lora_A.weight": down.astype(np.float16),
        f"unet.{Q}.lora_B.weight": bf16(up),
        f"unet.{K2}.lora_A.weight": bf16(down),
        f"unet.{K2}.lora_B.weight": up.astype(np.float64),
    }
    adapter = parse_adapter(write_safetensors(tmp_path / "h.safetensors", tensors), "h")
    assert adapter.tensors[f"unet.{Q}.lora_B.weight"].dtype == "BF16"
    weights = load_weights(adapter, fit_all(adapter))["unet"]
    for layer in (Q, K2):
        got_down, got_up = weights[layer]
        assert got_down.dtype == np.float32 and got_up.dtype == np.float32
        np.testing.assert_array_equal(got_down, down.T)
        np.testing.assert_array_equal(got_up, up.T)


def test_bf16_keeps_the_upper_bits_only(tmp_path: Path) -> None:
    value = np.float32(1.0 + 2**-10)  # below bfloat16's precision: truncated to 1.0
    tensors = {
        f"unet.{Q}.lora_A.weight": bf16(np.full((1, 2), value)),
        f"unet.{Q}.lora_B.weight": bf16(np.ones((2, 1))),
    }
    adapter = parse_adapter(write_safetensors(tmp_path / "h.safetensors", tensors), "h")
    down, _ = load_weights(adapter, fit_all(adapter))["unet"][Q]
    np.testing.assert_array_equal(down, np.ones((2, 1), np.float32))


# --- corrupt and unusable files ----------------------------------------------------------------------------------


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "e.safetensors"
    path.write_bytes(b"")
    with pytest.raises(LoraFileError, match=r"not a safetensors file \(shorter than its header length\)"):
        parse_adapter(path, "e")


def test_header_length_past_the_end(tmp_path: Path) -> None:
    path = tmp_path / "e.safetensors"
    path.write_bytes(struct.pack("<Q", 100) + b"{}")
    with pytest.raises(LoraFileError, match="its header length is past the end of the file"):
        parse_adapter(path, "e")


def test_header_length_above_the_bound(tmp_path: Path) -> None:
    path = tmp_path / "e.safetensors"
    path.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    with pytest.raises(LoraFileError, match="header length is past the end"):
        parse_adapter(path, "e")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "its header is not JSON"),
        (b"\xff\xfe{}", "its header is not JSON"),
        (b"[1, 2]", "its header is not a JSON object"),
        (b'{"__metadata__": [1]}', "__metadata__ is not an object"),
        (b'{"x": {"dtype": "F32", "shape": [1]}}', "corrupt safetensors header at 'x'"),
        (b'{"x": "F32"}', "corrupt safetensors header at 'x'"),
    ],
)
def test_header_not_usable(tmp_path: Path, raw: bytes, message: str) -> None:
    path = tmp_path / "e.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(LoraFileError, match=message):
        parse_adapter(path, "e")


@pytest.mark.parametrize(
    ("offsets", "payload_len"),
    [
        ([0, 12], 16),  # 12 bytes for [2, 2] F32 (16)
        ([0, 20], 20),  # 20 bytes for 16
        ([8, 4], 16),  # reversed
        ([0, 16], 8),  # the file ends inside the tensor: truncated
        ([8, 24], 16),  # runs past the end
    ],
)
def test_tensor_that_does_not_fit_its_bytes(tmp_path: Path, offsets: list[int], payload_len: int) -> None:
    header = {f"unet.{Q}.lora_A.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": offsets}}
    path = write_raw(tmp_path / "t.safetensors", header, bytes(payload_len))
    with pytest.raises(
        LoraFileError, match=rf"tensor 'unet\.{Q}\.lora_A\.weight' does not fit its bytes \(truncated\?\)"
    ):
        parse_adapter(path, "t")


def test_truncated_copy_of_a_good_file(tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "t.safetensors", peft_layer("unet", Q, 2, 8, 8, 1))
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(LoraFileError, match=r"does not fit its bytes \(truncated\?\)"):
        parse_adapter(path, "t")


def test_unknown_dtype(tmp_path: Path) -> None:
    tensors: dict[str, np.ndarray | Raw] = {
        f"unet.{Q}.lora_A.weight": Raw("I8", (2, 2), bytes(4)),
        f"unet.{Q}.lora_B.weight": rand(1, 2, 2),
    }
    path = write_safetensors(tmp_path / "d.safetensors", tensors)
    with pytest.raises(LoraFileError, match=r"has dtype I8; LoRA weights must be F32, F16, BF16 or F64"):
        parse_adapter(path, "d")


def test_no_lora_keys(tmp_path: Path) -> None:
    tensors = {"model.diffusion_model.input_blocks.0.0.weight": rand(1, 2, 2), "unet.foo.weight": rand(2, 2, 2)}
    path = write_safetensors(tmp_path / "n.safetensors", tensors)
    with pytest.raises(LoraFileError, match=r"no LoRA weights found \(neither the diffusers/PEFT nor the kohya"):
        parse_adapter(path, "n")


def test_unrelated_keys_beside_lora_keys_are_ignored(tmp_path: Path) -> None:
    tensors = {**peft_layer("unet", Q, 2, 8, 8, 1), "vae.decoder.conv_in.weight": rand(3, 2, 2)}
    adapter = parse_adapter(write_safetensors(tmp_path / "n.safetensors", tensors), "n")
    assert {c: set(layers) for c, layers in adapter.layers.items()} == {"unet": {Q}}


def test_layer_with_only_down(tmp_path: Path) -> None:
    tensors = {**peft_layer("unet", Q, 2, 8, 8, 1), f"unet.{K2}.lora_A.weight": rand(3, 2, 8)}
    path = write_safetensors(tmp_path / "o.safetensors", tensors)
    with pytest.raises(LoraFileError, match=rf"layer '{K2}' of unet has only one of its two LoRA matrices"):
        parse_adapter(path, "o")


def test_ranks_disagree(tmp_path: Path) -> None:
    tensors = {f"unet.{Q}.lora_A.weight": rand(1, 2, 8), f"unet.{Q}.lora_B.weight": rand(2, 8, 3)}
    path = write_safetensors(tmp_path / "r.safetensors", tensors)
    with pytest.raises(LoraFileError, match=rf"layer '{Q}' of unet: its matrices disagree on the rank"):
        parse_adapter(path, "r")


def test_mixed_layouts(tmp_path: Path) -> None:
    tensors = {**peft_layer("unet", Q, 2, 8, 8, 1), **kohya_layer("lora_unet_", K2.replace(".", "_"), 2, 8, 8, 3)}
    path = write_safetensors(tmp_path / "m.safetensors", tensors)
    with pytest.raises(LoraFileError, match="the file mixes the diffusers and kohya layouts"):
        parse_adapter(path, "m")


def test_fit_layer_without_a_target_mentions_locon(tmp_path: Path) -> None:
    conv = "down_blocks_0_resnets_0_conv_shortcut"
    tensors = {
        **kohya_layer("lora_unet_", Q.replace(".", "_"), 2, 8, 8, 1),
        **kohya_layer("lora_unet_", conv, 2, 8, 8, 3),
    }
    adapter = parse_adapter(write_safetensors(tmp_path / "l.safetensors", tensors), "l")
    with pytest.raises(LoraFileError, match=rf"adapts unet layers this model has no LoRA branch on \({conv}\)") as info:
        fit_adapter(adapter, {"unet": {Q: (8, 8)}}, rank=4, layers_per_block=2, base="sd")
    assert "no LoCon/LyCORIS convolutions" in str(info.value)


def test_fit_lists_at_most_three_unknown_layers(tmp_path: Path) -> None:
    tensors: dict[str, np.ndarray] = {}
    for i in range(5):
        tensors.update(kohya_layer("lora_unet_", f"down_blocks_0_resnets_{i}_conv1", 2, 8, 8, 2 * i))
    adapter = parse_adapter(write_safetensors(tmp_path / "l.safetensors", tensors), "l")
    with pytest.raises(LoraFileError, match=r"resnets_2_conv1 and 2 more\)"):
        fit_adapter(adapter, {"unet": {Q: (8, 8)}}, rank=4, layers_per_block=2, base="sd")


def test_fit_features_differ(tmp_path: Path) -> None:
    adapter = parse_adapter(write_safetensors(tmp_path / "f.safetensors", peft_layer("unet", Q, 2, 8, 6, 1)), "f")
    with pytest.raises(LoraFileError, match=rf"layer {Q} of unet is 8->6 in the file and 16->6 in the model"):
        fit_adapter(adapter, {"unet": {Q: (16, 6)}}, rank=4, layers_per_block=2, base="sd")


def test_fit_rank_above_the_bank(tmp_path: Path) -> None:
    adapter = parse_adapter(write_safetensors(tmp_path / "f.safetensors", peft_layer("unet", Q, 8, 8, 8, 1)), "f")
    with pytest.raises(LoraFileError, match=r"its rank 8 is above this model's LoRA rank 4 \(--lora-rank\)"):
        fit_adapter(adapter, {"unet": {Q: (8, 8)}}, rank=4, layers_per_block=2, base="sd")
    assert (
        fit_adapter(adapter, {"unet": {Q: (8, 8)}}, rank=8, layers_per_block=2, base="sd").layers["unet"][Q].rank == 8
    )


def test_fit_component_the_model_lacks(tmp_path: Path) -> None:
    tensors = {**peft_layer("unet", Q, 2, 8, 8, 1), **peft_layer("text_encoder", TE_Q, 2, 4, 4, 3)}
    adapter = parse_adapter(write_safetensors(tmp_path / "c.safetensors", tensors), "c")
    with pytest.raises(LoraFileError, match="it adapts text_encoder, which this model has no LoRA branches on"):
        fit_adapter(adapter, {"unet": {Q: (8, 8)}}, rank=4, layers_per_block=2, base="sd")
    # restricted to the UNet (as a runner's UNet bank asks), the text encoder's layers are not looked at
    fit = fit_adapter(adapter, {"unet": {Q: (8, 8)}}, rank=4, layers_per_block=2, base="sd", components=("unet",))
    assert set(fit.layers) == {"unet"}
    # restricted to a component the file does not adapt: nothing to load, and no error (the bank leaves it alone)
    targets = {"text_encoder_2": {TE_Q: (4, 4)}}
    fit = fit_adapter(adapter, targets, rank=4, layers_per_block=2, base="sd", components=("text_encoder_2",))
    assert fit.layers == {}
    assert load_weights(adapter, fit) == {}


# --- families ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "family"),
    [
        ({"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl"),
        ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "sdxl"),
        ({"ss_base_model_version": "sd_v2_768_v"}, "sd2"),
        ({"modelspec.architecture": "stable-diffusion-v2-768-v/lora"}, "sd2"),
        ({"ss_base_model_version": "sd_v1"}, "sd1"),
        ({"modelspec.architecture": "stable-diffusion-v1/lora"}, "sd1"),
        ({}, None),
    ],
)
def test_family_from_metadata(tmp_path: Path, metadata: dict[str, str], family: str | None) -> None:
    path = write_safetensors(tmp_path / "m.safetensors", peft_layer("unet", Q, 2, 8, 8, 1), metadata)
    assert parse_adapter(path, "m").family == family


@pytest.mark.parametrize(("width", "family"), [(768, "sd1"), (1024, "sd2"), (2048, "sdxl"), (512, None)])
def test_family_from_cross_attention_width(tmp_path: Path, width: int, family: str | None) -> None:
    peft = write_safetensors(tmp_path / "p.safetensors", peft_layer("unet", K2, 1, width, 4, 1))
    assert parse_adapter(peft, "p").family == family
    kohya = write_safetensors(
        tmp_path / "k.safetensors", kohya_layer("lora_unet_", K2.replace(".", "_"), 1, width, 4, 1)
    )
    assert parse_adapter(kohya, "k").family == family


def test_family_metadata_wins_over_width(tmp_path: Path) -> None:
    path = write_safetensors(
        tmp_path / "m.safetensors", peft_layer("unet", K2, 1, 768, 4, 1), {"ss_base_model_version": "sd_v2"}
    )
    assert parse_adapter(path, "m").family == "sd2"


def test_family_from_a_second_text_encoder(tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "t.safetensors", peft_layer("text_encoder_2", TE_Q, 2, 4, 4, 1))
    adapter = parse_adapter(path, "t")
    assert adapter.family == "sdxl" and adapter.components == ("text_encoder_2",)


@pytest.mark.parametrize(
    ("file_family", "base", "ok"),
    [
        (None, "sd", True),
        ("sd1", "sd", True),
        ("sd2", "sd", True),
        ("sdxl", "sd", False),
        (None, "sd1", True),
        ("sd1", "sd1", True),
        ("sd2", "sd1", False),
        ("sdxl", "sd1", False),
        ("sd2", "sd2", True),
        ("sd1", "sd2", False),
        ("sdxl", "sdxl", True),
        ("sd1", "sdxl", False),
        (None, "sdxl", True),
    ],
)
def test_families_match(file_family: str | None, base: str, ok: bool) -> None:
    assert families_match(file_family, base) is ok


def test_fit_refuses_another_family(tmp_path: Path) -> None:
    path = write_safetensors(
        tmp_path / "x.safetensors", peft_layer("unet", Q, 2, 8, 8, 1), {"ss_base_model_version": "sdxl_base_v1-0"}
    )
    adapter = parse_adapter(path, "x")
    with pytest.raises(LoraFileError, match=r"made for SDXL, but the model is SD 1\.x/2\.x"):
        fit_adapter(adapter, {"unet": {Q: (8, 8)}}, rank=4, layers_per_block=2, base="sd")
    with pytest.raises(LoraFileError, match=r"made for SDXL, but the model is SD 1\.x$"):
        fit_adapter(adapter, {"unet": {Q: (8, 8)}}, rank=4, layers_per_block=2, base="sd1")
    assert fit_adapter(adapter, {"unet": {Q: (8, 8)}}, rank=4, layers_per_block=2, base="sdxl").layers


# --- reading the weights -----------------------------------------------------------------------------------------


def test_load_weights_of_a_changed_file(tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "c.safetensors", peft_layer("unet", Q, 2, 8, 8, 1))
    adapter = parse_adapter(path, "c")
    fit = fit_all(adapter)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with pytest.raises(LoraFileError, match="the file changed while it was read"):
        load_weights(adapter, fit)
    assert lora_format.fingerprint(path) != adapter.fingerprint
    assert load_weights(parse_adapter(path, "c"), fit)["unet"][Q][0].shape == (8, 2)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_infinity_in_a_weight(tmp_path: Path, bad: float) -> None:
    tensors = peft_layer("unet", Q, 2, 8, 8, 1)
    tensors[f"unet.{Q}.lora_B.weight"][3, 1] = bad
    adapter = parse_adapter(write_safetensors(tmp_path / "n.safetensors", tensors), "n")
    with pytest.raises(LoraFileError, match=rf"layer {Q} of unet holds NaN or infinity"):
        load_weights(adapter, fit_all(adapter))


def test_nan_alpha(tmp_path: Path) -> None:
    tensors = kohya_layer("lora_unet_", Q.replace(".", "_"), 2, 8, 8, 1, alpha=float("nan"))
    adapter = parse_adapter(write_safetensors(tmp_path / "n.safetensors", tensors), "n")
    fit = fit_adapter(adapter, {"unet": {Q: (8, 8)}}, rank=2, layers_per_block=2, base="sd")
    with pytest.raises(LoraFileError, match="holds NaN or infinity"):
        load_weights(adapter, fit)


# --- the folder --------------------------------------------------------------------------------------------------


def test_scan_folder(tmp_path: Path) -> None:
    folder = tmp_path / "loras"
    folder.mkdir()
    for name in ("b.safetensors", "A_1.2-x.safetensors", "a.safetensors", "-dash.safetensors", ".hidden.safetensors"):
        (folder / name).write_bytes(b"")
    (folder / f"{'n' * 65}.safetensors").write_bytes(b"")  # a name longer than 64 characters
    (folder / f"{'n' * 64}.safetensors").write_bytes(b"")
    (folder / "sp ace.safetensors").write_bytes(b"")
    (folder / "notes.txt").write_bytes(b"")
    (folder / "c.ckpt").write_bytes(b"")
    (folder / "c.safetensors.bak").write_bytes(b"")
    (folder / "dir.safetensors").mkdir()
    expected = ["A_1.2-x", "a", "b", "n" * 64]
    assert lora_format.scan_folder(folder) == [(n, folder / f"{n}.safetensors") for n in expected]
    assert lora_format.scan_folder(tmp_path / "missing") == []
    assert lora_format.adapter_path(folder, "a") == folder / "a.safetensors"


# --- the runner's bank -------------------------------------------------------------------------------------------


def _bank_module() -> Any:
    spec = importlib.util.spec_from_file_location("lora_bank_under_test", BANK_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


lora_bank: Any = _bank_module()

# Two UNet layers of the bank, rank 4: Q 8->6, K2 5->6.
BANK_RANK = 4
BANK_SHAPES: dict[str, list[Any]] = {
    f"lora.{Q}.down": ["K", 8, BANK_RANK],
    f"lora.{Q}.up": ["K", BANK_RANK, 6],
    f"lora.{K2}.down": ["K", 5, BANK_RANK],
    f"lora.{K2}.up": ["K", BANK_RANK, 6],
}


def _adapter_files(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    """a: rank 2 on both layers (alpha 4: scale 2); b: rank 4 on Q only; c: rank 1 on K2; te: the text encoder
    only; bad: NaN in a weight (its header is fine)."""
    folder.mkdir(exist_ok=True)
    files = {
        "a": {**peft_layer("unet", Q, 2, 8, 6, 1), **peft_layer("unet", K2, 2, 5, 6, 3)},
        "b": peft_layer("unet", Q, 4, 8, 6, 5),
        "c": peft_layer("unet", K2, 1, 5, 6, 7),
        "te": peft_layer("text_encoder", TE_Q, 2, 4, 4, 9),
        "bad": peft_layer("unet", Q, 2, 8, 6, 11),
    }
    files["bad"][f"unet.{Q}.lora_A.weight"][0, 0] = np.nan
    for name, tensors in files.items():
        meta = {"lora_adapter_metadata": {"unet.lora_alpha": 4, "unet.r": 2}} if name == "a" else None
        write_safetensors(folder / f"{name}.safetensors", tensors, meta)
    return files


def _bank(folder: Path, *, component: str = "unet", shapes: Mapping[str, Sequence[Any]] = BANK_SHAPES) -> Any:
    log: list[str] = []
    bank = lora_bank.LoraBank(
        lora_format, component, shapes, slots=2, folder=folder, layers_per_block=2, base="sd", log=log.append
    )
    bank.test_log = log
    return bank


def test_bank_feeds_rows_slots_scales_and_padded_rank(tmp_path: Path) -> None:
    files = _adapter_files(tmp_path / "loras")
    bank = _bank(tmp_path / "loras")
    assert bank.rank == BANK_RANK and bank.down[Q].shape == (2, 8, 4) and bank.up[K2].shape == (2, 4, 6)
    assert bank.nbytes == 4 * 2 * 4 * (8 + 6 + 5 + 6)
    # b first, into slot 0, so that a's slot (1) differs from the padding's
    assert bank.feeds([(("b", 1.0),)])[lora_bank.SLOTS].tolist() == [[0]]
    rows = [(("a", 0.5),), (), (("a", 1.0), ("b", -1.0))]
    feeds = bank.feeds(rows)
    assert feeds["lora_rows"].dtype == np.int64 and feeds["lora_rows"].tolist() == [0, 2]
    assert feeds["lora_slots"].dtype == np.int64
    # a row with fewer adapters than the widest pads with slot 0 at scale 0
    assert feeds["lora_slots"].tolist() == [[1, 0], [1, 0]]
    assert feeds["lora_scales"].dtype == np.float32 and feeds["lora_scales"].tolist() == [[0.5, 0.0], [1.0, -1.0]]
    assert set(feeds) == {"lora_rows", "lora_slots", "lora_scales", *BANK_SHAPES}
    assert feeds[f"lora.{Q}.down"] is bank.down[Q]
    # a (rank 2, scale alpha 4 / r 2 = 2) in slot 1: columns / rows 2..3 zero
    a = files["a"]
    np.testing.assert_array_equal(bank.down[Q][1, :, :2], a[f"unet.{Q}.lora_A.weight"].T)
    np.testing.assert_array_equal(bank.down[Q][1, :, 2:], 0.0)
    np.testing.assert_allclose(bank.up[Q][1, :2, :], a[f"unet.{Q}.lora_B.weight"].T * 2.0, rtol=1e-6)
    np.testing.assert_array_equal(bank.up[Q][1, 2:, :], 0.0)
    np.testing.assert_array_equal(bank.down[K2][1, :, :2], a[f"unet.{K2}.lora_A.weight"].T)
    np.testing.assert_array_equal(bank.down[K2][1, :, 2:], 0.0)
    # b (rank 4, no metadata: scale 1) in slot 0, on Q only
    b = files["b"]
    np.testing.assert_array_equal(bank.down[Q][0], b[f"unet.{Q}.lora_A.weight"].T)
    np.testing.assert_array_equal(bank.up[Q][0], b[f"unet.{Q}.lora_B.weight"].T)
    np.testing.assert_array_equal(bank.down[K2][0], 0.0)
    np.testing.assert_array_equal(bank.up[K2][0], 0.0)
    assert bank.test_log == [
        "LoRA 'b' loaded into slot 0 of the unet bank",
        "LoRA 'a' loaded into slot 1 of the unet bank",
    ]


def test_bank_feeds_without_adapters(tmp_path: Path) -> None:
    _adapter_files(tmp_path / "loras")
    feeds = _bank(tmp_path / "loras").feeds([(), ()])
    assert feeds["lora_rows"].shape == (0,)
    assert feeds["lora_slots"].shape == (0, 1) and feeds["lora_scales"].shape == (0, 1)


def test_bank_evicts_the_least_recently_used_and_clears_its_slot(tmp_path: Path) -> None:
    _adapter_files(tmp_path / "loras")
    bank = _bank(tmp_path / "loras")
    bank.feeds([(("a", 1.0),)])  # slot 0
    bank.feeds([(("b", 1.0),)])  # slot 1
    bank.feeds([(("a", 1.0),)])  # a used again: b is the least recently used
    feeds = bank.feeds([(("c", 1.0),)])
    assert feeds["lora_slots"].tolist() == [[1]]
    assert bank.test_log[-1] == "LoRA 'c' loaded into slot 1 of the unet bank, evicting 'b'"
    np.testing.assert_array_equal(bank.down[Q][1], 0.0)  # c does not adapt Q: b's weights are gone
    assert list(bank.held) == ["a", "c"]


def test_bank_reloads_a_changed_file_in_place(tmp_path: Path) -> None:
    _adapter_files(tmp_path / "loras")
    bank = _bank(tmp_path / "loras")
    bank.feeds([(("a", 1.0),)])
    replacement = peft_layer("unet", Q, 3, 8, 6, 21)
    path = write_safetensors(tmp_path / "loras" / "a.safetensors", replacement)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert bank.feeds([(("a", 1.0),)])["lora_slots"].tolist() == [[0]]
    np.testing.assert_array_equal(bank.down[Q][0, :, :3], replacement[f"unet.{Q}.lora_A.weight"].T)
    np.testing.assert_array_equal(bank.down[K2][0], 0.0)  # the new file does not adapt K2


def test_bank_plan_groups_and_errors(tmp_path: Path) -> None:
    _adapter_files(tmp_path / "loras")
    bank = _bank(tmp_path / "loras")
    requests = [
        [(("a", 1.0),)],
        [(("b", 1.0),), (("b", 0.5),)],
        [(("c", 1.0),)],
        [(("ghost", 1.0),)],
        [(("a", 1.0), ("b", 1.0))],
        [()],
        [(("a", 1.0), ("b", 1.0), ("c", 1.0))],
        [(("../x", 1.0),)],
        [(("c", 1.0), ("b", 1.0))],
    ]
    groups, errors = bank.plan(requests)
    assert groups == [[0, 1, 4, 5], [2, 8]]
    assert errors == {
        3: "LoRA 'ghost': no file ghost.safetensors in the LoRA folder",
        6: "3 LoRA adapters in one request; this model has 2 slots",
        7: "LoRA '../x': not a valid adapter name",
    }
    for group in groups:
        assert len({n for i in group for row in requests[i] for n, _ in row}) <= bank.slots


def test_bank_ignores_adapters_for_other_components(tmp_path: Path) -> None:
    files = _adapter_files(tmp_path / "loras")
    te_shapes = {f"lora.{TE_Q}.down": ["K", 4, 4], f"lora.{TE_Q}.up": ["K", 4, 4]}
    te_bank = _bank(tmp_path / "loras", component="text_encoder", shapes=te_shapes)
    assert te_bank.touches("te") and not te_bank.touches("a")
    groups, errors = te_bank.plan([[(("a", 1.0),)], [(("te", 0.5),)], [(("a", 1.0), ("te", 1.0))]])
    assert (groups, errors) == ([[0, 1, 2]], {})
    feeds = te_bank.feeds([(("a", 1.0),), (("te", 0.5),), (("a", 1.0), ("te", 1.0))])
    assert feeds["lora_rows"].tolist() == [1, 2]
    assert feeds["lora_slots"].tolist() == [[0], [0]] and feeds["lora_scales"].tolist() == [[0.5], [1.0]]
    np.testing.assert_array_equal(te_bank.down[TE_Q][0, :, :2], files["te"][f"text_encoder.{TE_Q}.lora_A.weight"].T)
    assert list(te_bank.held) == ["te"]
    unet_bank = _bank(tmp_path / "loras")
    assert not unet_bank.touches("te")
    assert unet_bank.feeds([(("te", 1.0),)])["lora_rows"].tolist() == []


def test_bank_rows(tmp_path: Path) -> None:
    bank = _bank(tmp_path)
    raw = np.array([[b'[["a", 0.5], ["b", -1]]'], [b""], ['[["c", 2]]']], dtype=np.object_)
    assert bank.rows(raw) == [(("a", 0.5), ("b", -1.0)), (), (("c", 2.0),)]
    with pytest.raises(ValueError):
        bank.rows(np.array([[b"[oops"]], dtype=np.object_))


@dataclass(frozen=True)
class _Request:
    id: int
    loras: bytes


def test_serve_answers_every_request_in_order(tmp_path: Path) -> None:
    _adapter_files(tmp_path / "loras")
    bank = _bank(tmp_path / "loras")
    requests = [
        _Request(0, b'[["a", 1.0]]'),
        _Request(1, b'[["bad", 1.0]]'),  # its header fits, its weights hold NaN: fails when loaded
        _Request(2, b'[["b", 0.5]]'),
        _Request(3, b"[oops"),
        _Request(4, b'[["ghost", 1.0]]'),
        _Request(5, b""),
        _Request(6, b'[["a", 0.25], ["bad", 1.0]]'),
    ]
    calls: list[tuple[list[int], list[int], list[list[float]]]] = []

    def run(members: list[_Request], feeds: dict[str, np.ndarray]) -> list[str]:
        calls.append(([r.id for r in members], feeds["lora_rows"].tolist(), feeds["lora_scales"].tolist()))
        return [f"ok {r.id}" for r in members]

    responses = lora_bank.serve(
        bank,
        requests,
        lambda r: np.array([[r.loras]], dtype=np.object_),
        run,
        lambda message: f"error: {message}",
    )
    assert len(responses) == len(requests)
    assert responses[0] == "ok 0"
    assert responses[1] == f"error: LoRA 'bad': layer {Q} of unet holds NaN or infinity"
    assert responses[2] == "ok 2"
    assert responses[3].startswith("error: malformed 'loras' input: ")
    assert responses[4] == "error: LoRA 'ghost': no file ghost.safetensors in the LoRA folder"
    assert responses[5] == "ok 5"
    assert responses[6] == f"error: LoRA 'bad': layer {Q} of unet holds NaN or infinity"
    # group 1 (a, bad) ran once without the requests naming bad; group 2 (b) after it
    assert calls == [([0, 5], [0], [[1.0]]), ([2], [0], [[0.5]])]
    assert "bad" not in bank.held and sorted(bank.held) == ["a", "b"]


@pytest.mark.parametrize(
    ("key", "method"),
    [
        ("lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a", "LoHa"),
        ("lora_unet_down_blocks_0_attentions_0_proj_in.lokr_w1", "LoKr"),
        ("lora_unet_down_blocks_0_resnets_0_conv1.lora_mid.weight", "LoCon"),
        ("unet.down_blocks.0.attentions.0.proj_in.lora_magnitude_vector", "DoRA"),
        ("lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale", "DoRA"),
        ("lora_unet_down_blocks_0_attentions_0_proj_in.diff", "full weight-difference"),
    ],
)
def test_variants_that_would_be_applied_in_part_are_refused(tmp_path: Path, key: str, method: str) -> None:
    """A LyCORIS, DoRA or weight-difference tensor beside plain LoRA ones: served as plain LoRA, the image would
    not be the one its author made, so the file is refused."""
    tensors = {**peft_layer("unet", Q, 2, 8, 8, 1), key: rand(2, 2, 2)}
    with pytest.raises(LoraFileError, match=method):
        parse_adapter(write_safetensors(tmp_path / "v.safetensors", tensors), "v")
