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
    tokenizer = pipeline.tokenizer or pipeline.tokenizer_2
    max_len = tokenizer.model_max_length
    unet_cfg = pipeline.unet.config
    latent_ch = unet_cfg.in_channels
    ids = rng.integers(0, tokenizer.vocab_size, (batch, max_len), dtype=np.int64)
    unet = {
        "sample": rng.standard_normal((batch, latent_ch, h, w)).astype(np.float32),
        "timestep": rng.uniform(0, 999, batch).astype(np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, max_len, unet_cfg.cross_attention_dim)).astype(np.float32),
    }
    if unet_cfg.get("addition_embed_type") == "text_time":  # SDXL: pooled text and the time ids
        pooled = int(pipeline.text_encoder_2.config.projection_dim)
        n_ids = (unet_cfg.projection_class_embeddings_input_dim - pooled) // unet_cfg.addition_time_embed_dim
        unet["text_embeds"] = rng.standard_normal((batch, pooled)).astype(np.float32)
        unet["time_ids"] = rng.uniform(0, 1024, (batch, n_ids)).round().astype(np.float32)
    return {
        "text_encoder": {"input_ids": ids},
        "text_encoder_2": {"input_ids": ids},
        "vae_encoder": {"sample": rng.uniform(-1, 1, (batch, 3, h * factor, w * factor)).astype(np.float32)},
        "unet": unet,
        "vae_decoder": {"latent_sample": rng.standard_normal((batch, latent_ch, h, w)).astype(np.float32)},
    }


def _torch_outputs(pipeline: Any, component: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The torch modules' values of the outputs the gateway reads, by manifest role."""
    import torch

    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        if component.startswith("text_encoder"):
            encoder = getattr(pipeline, component)
            if getattr(pipeline, "text_encoder_2", None) is None:
                return {"last_hidden_state": encoder(t["input_ids"])[0].numpy()}
            out = encoder(t["input_ids"], output_hidden_states=True)
            roles = {"hidden_states": out.hidden_states[-2].numpy()}
            if component == "text_encoder_2":
                roles["text_embeds"] = out.text_embeds.numpy()
            return roles
        if component == "vae_encoder":
            return {"latent_parameters": pipeline.vae.encode(t["sample"]).latent_dist.parameters.numpy()}
        if component == "unet":
            added = {k: t.pop(k) for k in ("text_embeds", "time_ids") if k in t}
            kwargs = {"added_cond_kwargs": added} if added else {}
            return {
                "out_sample": pipeline.unet(
                    t["sample"], t["timestep"], t["encoder_hidden_states"], **kwargs
                ).sample.numpy()
            }
        return {"sample": pipeline.vae.decode(t["latent_sample"]).sample.numpy()}


def check_components(
    pipeline: Any, onnx_paths: Mapping[str, Path], *, batch: int = 2, seed: int = 0
) -> list[ComponentCheck]:
    """Run each ONNX component and its torch module on the same random inputs; report the max abs error."""
    import onnxruntime as ort

    from export.repository import served_outputs

    latent = pipeline.unet.config.sample_size
    all_inputs = _inputs(pipeline, batch, (latent, latent), seed)
    checks = []
    for component, path in onnx_paths.items():
        feeds = all_inputs[component]
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        roles = served_outputs(pipeline, component)
        onnx_out = dict(zip(roles, session.run(list(roles.values()), feeds), strict=True))
        torch_out = _torch_outputs(pipeline, component, feeds)
        checks.append(
            ComponentCheck(
                component,
                max(float(np.max(np.abs(onnx_out[r] - torch_out[r]))) for r in roles),
                all(np.allclose(onnx_out[r], torch_out[r], rtol=FP32_RTOL, atol=FP32_ATOL) for r in roles),
            )
        )
    return checks
