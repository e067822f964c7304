"""Numerical check of exported components against the torch modules they came from, in the units that matter.

onnxruntime and torch differ only in the order of summation for fp32 graphs, and that difference grows with depth
and width: the SD 2.1 (768 px) VAE decoder differs by up to 5e-4, a tiny one by 1e-6. A fixed absolute tolerance
either fails real models or passes broken tiny ones, so each component is measured in its consumer's unit:

- the VAE decoder in levels of 255 after decoding (the gateway maps [-1, 1] to 0..255, 127.5 levels per unit):
  at most DECODER_MAX_LEVELS, so no pixel moves by more than that (5e-4 is 0.06 levels);
- the UNet, the text encoders and the VAE encoder relative to the output's scale: max |onnx - torch| divided by
  max |torch| at most SCALE_RTOL (fp32 summation noise stays orders of magnitude under it at every size, and a
  wrong graph or weight is off by percent, not per mille).

Components are checked one at a time, right after each is exported: the torch module runs first and its weights
are released before the onnxruntime session loads (arena and memory patterns off), so the check holds one copy of
one component's weights, and inputs of at most CHECK_LATENT latents keep the activations small.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.lora import empty_lora_feeds_for
from export.onnx_export import vae_scale_factor

# The tiny test models' absolute bound (observed ~1e-6): the tests hold it, the export does not use it.
FP32_ATOL = 1e-4
# One level of 255 in the decoder's [-1, 1] output.
LEVELS_PER_UNIT = 127.5
DECODER_MAX_LEVELS = 0.5
SCALE_RTOL = 1e-3
# The check's latent size, at most: 32 (256 px for SD) exercises every weight; at SD 1.5's 64 the UNet's attention
# alone needs gigabytes on CPU, more than its weights.
CHECK_LATENT = 32


@dataclass(frozen=True)
class ComponentCheck:
    component: str
    max_abs_error: float
    error: float  # in `unit`
    tolerance: float
    unit: str

    @property
    def within_tolerance(self) -> bool:
        return self.error <= self.tolerance

    def describe(self) -> str:
        return (
            f"{self.component}: ONNX output differs from torch by {self.error:.3g} {self.unit} "
            f"(tolerance {self.tolerance:g}; max abs {self.max_abs_error:.2e})"
        )


def measure(component: str, onnx_out: Mapping[str, np.ndarray], torch_out: Mapping[str, np.ndarray]) -> ComponentCheck:
    """The worst output of `component` in its unit (module docstring)."""
    errors = {r: float(np.max(np.abs(onnx_out[r] - torch_out[r]))) for r in torch_out}
    max_abs = max(errors.values())
    if component == "vae_decoder":
        return ComponentCheck(component, max_abs, max_abs * LEVELS_PER_UNIT, DECODER_MAX_LEVELS, "levels of 255")
    tiny = float(np.finfo(np.float32).tiny)  # an all-zero output: its scale is not zero
    relative = max(error / max(float(np.max(np.abs(torch_out[r]))), tiny) for r, error in errors.items())
    return ComponentCheck(component, max_abs, relative, SCALE_RTOL, "of the output's scale")


def _inputs(pipeline: Any, batch: int, latent_hw: tuple[int, int], seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Random inputs for every component, of the shapes the gateway sends."""
    rng = np.random.default_rng(seed)
    h, w = latent_hw
    factor = vae_scale_factor(pipeline.vae.config)
    tokenizer = pipeline.tokenizer or pipeline.tokenizer_2
    max_len = tokenizer.model_max_length
    unet_cfg = pipeline.unet.config
    unet_in = int(unet_cfg.in_channels)  # the latents, or (inpainting) latents + mask + masked-image latents
    latent_ch = int(pipeline.vae.config.latent_channels)
    ids = rng.integers(0, tokenizer.vocab_size, (batch, max_len), dtype=np.int64)
    unet = {
        "sample": rng.standard_normal((batch, unet_in, h, w)).astype(np.float32),
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
    with torch.inference_mode():
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


def check_component(
    pipeline: Any,
    component: str,
    path: Path,
    *,
    batch: int = 2,
    seed: int = 0,
    before_onnx: Callable[[], None] | None = None,
) -> ComponentCheck:
    """Run one ONNX component and its torch module on the same random inputs (batch rows at distinct timesteps),
    in its unit (module docstring). `before_onnx` runs between the two: the export releases the module's weights
    there, so the torch module and the onnxruntime session are never in memory together."""
    import onnxruntime as ort

    from export.repository import served_outputs

    latent = min(int(pipeline.unet.config.sample_size), CHECK_LATENT)
    feeds = _inputs(pipeline, batch, (latent, latent), seed)[component]
    torch_out = _torch_outputs(pipeline, component, feeds)
    if before_onnx is not None:
        before_onnx()
    roles = served_outputs(pipeline, component)
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False  # what the call allocates goes back before the next component loads
    options.enable_mem_pattern = False
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    # A graph with LoRA branches gets no adapter row: it must then be the module without them.
    feeds = {**feeds, **empty_lora_feeds_for({i.name: list(i.shape) for i in session.get_inputs()})}
    onnx_out = dict(zip(roles, session.run(list(roles.values()), feeds), strict=True))
    del session
    gc.collect()
    return measure(component, onnx_out, torch_out)


def check_components(
    pipeline: Any, onnx_paths: Mapping[str, Path], *, batch: int = 2, seed: int = 0
) -> list[ComponentCheck]:
    """`check_component` for each of `onnx_paths`, the modules kept."""
    return [check_component(pipeline, c, p, batch=batch, seed=seed) for c, p in onnx_paths.items()]
