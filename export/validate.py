"""Numerical check of exported components against the torch modules they came from.

For fp32 exports onnxruntime and torch differ only in the order of summation. On the tiny model the maximum
absolute error stays under FP32_ATOL = 1e-4 (observed ~1e-6; the tests hold that). Deeper models accumulate
more (the medium VAE decoder reaches ~2e-4 on outputs of magnitude ~1), so the export's own check is
`np.allclose`-style: |onnx - torch| <= FP32_ATOL + FP32_RTOL * |torch| element-wise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FP32_ATOL = 1e-4
FP32_RTOL = 1e-3


@dataclass(frozen=True)
class ComponentCheck:
    component: str
    max_abs_error: float
    within_tolerance: bool  # allclose(onnx, torch, rtol=FP32_RTOL, atol=FP32_ATOL)


def _inputs(pipeline: Any, batch: int, latent_hw: tuple[int, int], seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Random inputs for every component, of the shapes the gateway sends."""
    rng = np.random.default_rng(seed)
    h, w = latent_hw
    factor = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
    max_len = pipeline.tokenizer.model_max_length
    hidden = pipeline.text_encoder.config.hidden_size
    latent_ch = pipeline.unet.config.in_channels
    return {
        "text_encoder": {"input_ids": rng.integers(0, pipeline.tokenizer.vocab_size, (batch, max_len), dtype=np.int64)},
        "vae_encoder": {"sample": rng.uniform(-1, 1, (batch, 3, h * factor, w * factor)).astype(np.float32)},
        "unet": {
            "sample": rng.standard_normal((batch, latent_ch, h, w)).astype(np.float32),
            "timestep": rng.uniform(0, 999, batch).astype(np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, max_len, hidden)).astype(np.float32),
        },
        "vae_decoder": {"latent_sample": rng.standard_normal((batch, latent_ch, h, w)).astype(np.float32)},
    }


def _torch_outputs(pipeline: Any, component: str, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
    import torch

    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    out: np.ndarray  # the pipeline is untyped (Any): name the type its torch modules' outputs convert to
    with torch.no_grad():
        if component == "text_encoder":
            out = pipeline.text_encoder(t["input_ids"])[0].numpy()
        elif component == "vae_encoder":
            out = pipeline.vae.encode(t["sample"]).latent_dist.parameters.numpy()
        elif component == "unet":
            out = pipeline.unet(t["sample"], t["timestep"], t["encoder_hidden_states"]).sample.numpy()
        else:
            out = pipeline.vae.decode(t["latent_sample"]).sample.numpy()
    return out


def check_components(
    pipeline: Any, onnx_paths: Mapping[str, Path], *, batch: int = 2, seed: int = 0
) -> list[ComponentCheck]:
    """Run each ONNX component and its torch module on the same random inputs; report the max abs error."""
    import onnxruntime as ort

    latent = pipeline.unet.config.sample_size
    all_inputs = _inputs(pipeline, batch, (latent, latent), seed)
    checks = []
    for component, path in onnx_paths.items():
        feeds = all_inputs[component]
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        onnx_out = session.run(None, feeds)[0]
        torch_out = _torch_outputs(pipeline, component, feeds)
        checks.append(
            ComponentCheck(
                component,
                float(np.max(np.abs(onnx_out - torch_out))),
                bool(np.allclose(onnx_out, torch_out, rtol=FP32_RTOL, atol=FP32_ATOL)),
            )
        )
    return checks
