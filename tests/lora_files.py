"""Random-weight LoRA adapter files for the tests and the benchmark, made here with PEFT on a diffusers folder and
saved by diffusers (`save_lora_weights`: the diffusers/PEFT layout, with PEFT's config as metadata), and the same
adapter rewritten in kohya's layout (`lora_unet_*`, `lora_te*_`, per-layer `alpha`; SDXL's UNet under its original
SGM names), as AUTOMATIC1111 users hold them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _peft_layers(module: Any, targets: tuple[str, ...], rank: int, alpha: int, seed: int) -> tuple[dict[str, Any], Any]:
    """PEFT LoRA layers on `module` (random A and B, so the adapter changes the output), as diffusers saves them."""
    import torch
    from peft import LoraConfig, get_peft_model_state_dict

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False)
    torch.manual_seed(seed)
    module.add_adapter(config, adapter_name="made")
    layers = get_peft_model_state_dict(module, adapter_name="made")
    module.delete_adapters("made") if hasattr(module, "delete_adapters") else module.delete_adapter("made")
    return {k: v.detach().clone() for k, v in layers.items()}, config


def make_adapter(
    model_dir: Path,
    out_file: Path,
    *,
    seed: int,
    rank: int = 4,
    alpha: int = 8,
    unet: bool = True,
    text_encoders: bool = False,
) -> Path:
    """A diffusers/PEFT LoRA for the pipeline in `model_dir` (SDXL when it is one): the UNet's transformer
    layers, and with `text_encoders` the text encoder(s)' attention and MLP too."""
    import diffusers
    from peft.utils import get_peft_model_state_dict  # noqa: F401  # imported for its side effect on diffusers

    from export.onnx_export import load_pipeline

    pipe = load_pipeline(model_dir)
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    kwargs: dict[str, Any] = {}
    if unet:
        layers, config = _peft_layers(pipe.unet, UNET_TARGETS, rank, alpha, seed)
        kwargs["unet_lora_layers"] = layers
        kwargs["unet_lora_adapter_metadata"] = _metadata(config)
    if text_encoders:
        for i, name in enumerate(("text_encoder", "text_encoder_2") if sdxl else ("text_encoder",)):
            layers, config = _peft_layers(getattr(pipe, name), TEXT_TARGETS, rank, alpha, seed + 100 + i)
            kwargs[f"{name}_lora_layers"] = layers
            kwargs[f"{name}_lora_adapter_metadata"] = _metadata(config)
    saver = diffusers.StableDiffusionXLPipeline if sdxl else diffusers.StableDiffusionPipeline
    out_file.parent.mkdir(parents=True, exist_ok=True)
    saver.save_lora_weights(str(out_file.parent), weight_name=out_file.name, **kwargs)
    return out_file


def _metadata(config: Any) -> dict[str, Any]:
    """PEFT's config as diffusers' training scripts save it beside the weights (what its loader reads back)."""
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}


def _sgm(layer: str, layers_per_block: int) -> str:
    match = re.match(r"^(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.(.*)$", layer)
    if match:
        block, index, rest = int(match.group(2)), int(match.group(3)), match.group(4)
        per = layers_per_block + 1
        if match.group(1) == "down_blocks":
            return f"input_blocks.{1 + block * per + index}.1.{rest}"
        return f"output_blocks.{block * per + index}.1.{rest}"
    return layer.replace("mid_block.attentions.0.", "middle_block.1.")


def to_kohya(src: Path, dst: Path, *, layers_per_block: int, sgm: bool = False, family: str | None = None) -> Path:
    """`src` (diffusers/PEFT layout, as `make_adapter` writes it) rewritten in kohya's layout: flat names, the
    rank-and-alpha of PEFT's metadata as a per-layer `alpha` tensor, SDXL's UNet under SGM names with `sgm`."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118  # not iterable
        metadata = json.loads((handle.metadata() or {}).get("lora_adapter_metadata", "{}"))
    sdxl = any(k.startswith("text_encoder_2.") for k in tensors) or sgm
    prefixes = {
        "unet": "lora_unet_",
        "text_encoder": "lora_te1_" if sdxl else "lora_te_",
        "text_encoder_2": "lora_te2_",
    }
    out: dict[str, Any] = {}
    for key, value in tensors.items():
        component, _, rest = key.partition(".")
        layer, _, part = rest.rpartition(".lora_")
        if component == "unet" and sgm:
            layer = _sgm(layer, layers_per_block)
        flat = prefixes[component] + layer.replace(".", "_")
        out[f"{flat}.{'lora_down' if part.startswith('A') else 'lora_up'}.weight"] = value.contiguous()
        alpha = float(metadata.get(f"{component}.lora_alpha", value.shape[0]))
        out[f"{flat}.alpha"] = torch.tensor(alpha)
    info = {"ss_network_module": "networks.lora"}
    if family is not None:
        info["ss_base_model_version"] = family
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst), metadata=info)
    return dst
