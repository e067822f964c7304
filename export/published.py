"""The published configs of SD 1.5, SD 2.1 (768 px, v-prediction) and SDXL base 1.0, shipped so that a single-file
checkpoint exports with no hub access and no `--config` (export.checkpoint).

`config_folder(family, dir)` writes them as a diffusers folder without weights: model_index.json, each component's
config, the scheduler's and the CLIP tokenizers (their BPE vocabulary from export.clip_vocab). The models they
describe have the published parameter counts (tests/unit/test_published_configs.py counts them on the meta device).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from export.clip_vocab import write_clip_vocab
from export.tiny import CLIP_MAX_LENGTH

_SCALED_LINEAR = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}
_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
}
_CLIP_L = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "max_position_embeddings": CLIP_MAX_LENGTH,
    "vocab_size": 49408,
    "layer_norm_eps": 1e-05,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
_SD_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "norm_eps": 1e-05,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

# family -> component -> config (the tokenizers' pad tokens under "tokenizer*", the pipeline class under "pipeline")
PUBLISHED: dict[str, dict[str, Any]] = {
    "sd1": {
        "pipeline": "StableDiffusionPipeline",
        "unet": {**_SD_UNET, "sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8},
        "vae": {**_VAE, "sample_size": 512, "scaling_factor": 0.18215},
        "text_encoder": _CLIP_L,
        "tokenizer": "<|endoftext|>",
        "scheduler": {
            "_class_name": "PNDMScheduler",
            **_SCALED_LINEAR,
            "set_alpha_to_one": False,
            "skip_prk_steps": True,
            "steps_offset": 1,
        },
    },
    "sd2": {
        "pipeline": "StableDiffusionPipeline",
        "unet": {
            **_SD_UNET,
            "sample_size": 96,
            "cross_attention_dim": 1024,
            "attention_head_dim": [5, 10, 20, 20],
            "use_linear_projection": True,
            "upcast_attention": True,
        },
        "vae": {**_VAE, "sample_size": 768, "scaling_factor": 0.18215},
        # OpenCLIP ViT-H/14 without its last layer (SD 2.x conditions on the penultimate one), GELU.
        "text_encoder": {
            **_CLIP_L,
            "hidden_act": "gelu",
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_attention_heads": 16,
            "num_hidden_layers": 23,
            "projection_dim": 512,
        },
        "tokenizer": "!",
        "scheduler": {
            "_class_name": "DDIMScheduler",
            **_SCALED_LINEAR,
            "clip_sample": False,
            "set_alpha_to_one": False,
            "steps_offset": 1,
            "prediction_type": "v_prediction",
        },
    },
    "sdxl": {
        "pipeline": "StableDiffusionXLPipeline",
        "unet": {
            **_SD_UNET,
            "sample_size": 128,
            "block_out_channels": [320, 640, 1280],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "transformer_layers_per_block": [1, 2, 10],
            "attention_head_dim": [5, 10, 20],
            "cross_attention_dim": 2048,
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_embed_type_num_heads": 64,
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
        },
        "vae": {**_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        "text_encoder": _CLIP_L,
        # OpenCLIP ViT-bigG/14, with its projection (the pooled embedding SDXL conditions on).
        "text_encoder_2": {
            **_CLIP_L,
            "architectures": ["CLIPTextModelWithProjection"],
            "hidden_act": "gelu",
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_attention_heads": 20,
            "num_hidden_layers": 32,
            "projection_dim": 1280,
        },
        "tokenizer": "<|endoftext|>",
        "tokenizer_2": "!",
        "scheduler": {
            "_class_name": "EulerDiscreteScheduler",
            **_SCALED_LINEAR,
            "interpolation_type": "linear",
            "prediction_type": "epsilon",
            "steps_offset": 1,
            "timestep_spacing": "leading",
            "use_karras_sigmas": False,
        },
        "force_zeros_for_empty_prompt": True,
    },
}
# What each component's entry in model_index.json names.
_LIBRARIES = {"unet": "diffusers", "vae": "diffusers", "scheduler": "diffusers"}


def config_folder(family: str, folder: Path) -> Path:
    """Write `family`'s published configs and tokenizers into `folder` as a diffusers folder without weights."""
    spec = PUBLISHED[family]
    folder.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"_class_name": spec["pipeline"], "_diffusers_version": "0.39.0"}
    vocab, merges = write_clip_vocab(folder / ".vocab")
    for name, value in spec.items():
        if name in ("pipeline", "force_zeros_for_empty_prompt"):
            continue
        target = folder / name
        target.mkdir(exist_ok=True)
        if name.startswith("tokenizer"):
            for source in (vocab, merges):
                (target / source.name).write_bytes(source.read_bytes())
            config = {"model_max_length": CLIP_MAX_LENGTH, "pad_token": value, "bos_token": "<|startoftext|>"}
            (target / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|endoftext|>"}))
            index[name] = ["transformers", "CLIPTokenizer"]
        elif name.startswith("text_encoder"):
            (target / "config.json").write_text(json.dumps(value, indent=2))
            index[name] = ["transformers", value["architectures"][0]]
        else:
            file = "scheduler_config.json" if name == "scheduler" else "config.json"
            (target / file).write_text(json.dumps(value, indent=2))
            index[name] = [_LIBRARIES[name], value["_class_name"]]
    if "force_zeros_for_empty_prompt" in spec:
        index["force_zeros_for_empty_prompt"] = spec["force_zeros_for_empty_prompt"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


# `--tiny --arch A --size published`: the family each random layout's published configs come from.
ARCH_FAMILIES = {"sd": "sd1", "sd2": "sd2", "sdxl": "sdxl"}
# `--size` of a random pipeline at its family's published configs.
PUBLISHED_SIZE = "published"


def build_published_random(folder: Path, family: str, *, seed: int = 0, dtype: str = "float32") -> Path:
    """A random-weight pipeline at `family`'s published configs (SD 1.5, SD 2.1 768-v or SDXL base: the real
    depths and widths), built and written one module at a time so that only one is ever in memory (the SDXL
    UNet alone is 10 GB in fp32); `dtype` "float16" writes it as those models are published."""
    import torch

    from export.weights import build_module, save_module

    config_folder(family, folder)
    torch.manual_seed(seed)
    for name in PUBLISHED[family]:
        if name in ("unet", "vae") or name.startswith("text_encoder"):
            save_module(build_module(folder / name).to(getattr(torch, dtype)), folder / name)
    return folder
