"""Random-weight Stable Diffusion pipelines built from the real diffusers/transformers classes.

`tiny` is the model of the demo and of every test (a UNet step takes milliseconds); `medium` has SD-like depth
and widths for honest benchmarks (about 29M UNet parameters, 0.2-0.5 s per step at 64x64 latents on 2 cores).
Both are saved as an ordinary diffusers folder, which is then exported through the same code path as a real model.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.clip_vocab import write_clip_vocab

# The CLIP text window of every Stable Diffusion 1.x/2.x model.
CLIP_MAX_LENGTH = 77


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a random-weight pipeline."""

    unet_channels: tuple[int, ...]
    unet_down: tuple[str, ...]
    unet_up: tuple[str, ...]
    unet_groups: int
    attention_head_dim: int
    sample_size: int
    text_hidden: int
    text_layers: int
    text_heads: int
    vae_channels: tuple[int, ...]
    vae_groups: int


SIZES: dict[str, TinySpec] = {
    "tiny": TinySpec(
        unet_channels=(32, 64),
        unet_down=("CrossAttnDownBlock2D", "DownBlock2D"),
        unet_up=("UpBlock2D", "CrossAttnUpBlock2D"),
        unet_groups=32,
        attention_head_dim=8,
        sample_size=16,
        text_hidden=32,
        text_layers=2,
        text_heads=4,
        vae_channels=(8, 16, 16, 16),
        vae_groups=8,
    ),
    "medium": TinySpec(
        unet_channels=(96, 192, 384),
        unet_down=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        unet_up=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        unet_groups=32,
        attention_head_dim=8,
        sample_size=64,
        text_hidden=384,
        text_layers=6,
        text_heads=6,
        vae_channels=(32, 64, 64, 64),
        vae_groups=32,
    ),
}

# The two demo pipelines differ in weights and in scheduler, so `model` visibly matters.
SCHEDULERS: dict[str, dict[str, Any]] = {
    "pndm": {
        "_class_name": "PNDMScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
    },
    "euler": {
        "_class_name": "EulerDiscreteScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "steps_offset": 1,
        "timestep_spacing": "leading",
    },
    "ddim": {
        "_class_name": "DDIMScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "clip_sample": False,
        "steps_offset": 1,
    },
}


def build_random_pipeline(out_dir: Path, *, size: str = "tiny", seed: int = 0, scheduler: str = "pndm") -> Path:
    """Build a random-weight StableDiffusionImg2ImgPipeline, deterministic from `seed`, and save it to `out_dir`."""
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    spec = SIZES[size]
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=spec.sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=2 if size == "medium" else 1,
        block_out_channels=spec.unet_channels,
        down_block_types=spec.unet_down,
        up_block_types=spec.unet_up,
        cross_attention_dim=spec.text_hidden,
        attention_head_dim=spec.attention_head_dim,
        norm_num_groups=spec.unet_groups,
    )
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(spec.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(spec.vae_channels),
        block_out_channels=spec.vae_channels,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=spec.vae_groups,
        sample_size=spec.sample_size * 2 ** (len(spec.vae_channels) - 1),
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=spec.text_hidden,
            intermediate_size=spec.text_hidden * 4,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=spec.text_heads,
            max_position_embeddings=CLIP_MAX_LENGTH,
            vocab_size=49408,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    with tempfile.TemporaryDirectory() as vocab_dir:
        vocab, merges = write_clip_vocab(Path(vocab_dir))
        tokenizer = CLIPTokenizer(
            vocab_file=str(vocab),
            merges_file=str(merges),
            model_max_length=CLIP_MAX_LENGTH,
            pad_token="<|endoftext|>",  # noqa: S106 - CLIP's padding token, not a password
        )
        sched_config = dict(SCHEDULERS[scheduler])
        sched_cls = getattr(diffusers, sched_config.pop("_class_name"))
        pipe = diffusers.StableDiffusionImg2ImgPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=sched_cls(**sched_config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        # For mypy, diffusers' TYPE_CHECKING re-exports resolve to its placeholder "dummy" classes (no methods);
        # at run time this is the real pipeline class, a DiffusionPipeline with save_pretrained.
        pipe.save_pretrained(out_dir)  # type: ignore[attr-defined]
    return out_dir
