"""Random-weight Stable Diffusion (1.x/2.x layout) and SDXL pipelines built from the real diffusers/transformers
classes.

`tiny` is the model of the demo and of every test (a UNet step takes milliseconds); `medium` has SD-like depth
and widths for honest benchmarks (about 29M UNet parameters, 0.2-0.5 s per step at 64x64 latents on 2 cores);
`large` is Stable Diffusion 1.5's architecture at full size (its published UNet, CLIP ViT-L and VAE configs) at
256 px, `sd15` the same at its published 512 px.
Both are saved as an ordinary diffusers folder, which is then exported through the same code path as a real model.
`arch="sd2"` builds SD 2.x's layout: its text encoder as OpenCLIP's (GELU, "!" padding, written in OpenCLIP's
layout to a single file), a linear-projection UNet and a v-prediction scheduler. `arch="sdxl"` builds SDXL's
layout at the same sizes: two CLIP text encoders (the second with a projection, whose pooled output conditions
the UNet), a `text_time` UNet, and tokenizer_2 padding with "!" as SDXL's does.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
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
    attention_head_dim: int | tuple[int, ...]  # diffusers' name; the heads per block (SD 1.5: 8, SDXL: 5/10/20)
    sample_size: int
    text_hidden: int
    text_layers: int
    text_heads: int
    vae_channels: tuple[int, ...]
    vae_groups: int
    unet_layers_per_block: int = 1
    vae_layers_per_block: int = 1
    text_intermediate: int | None = None  # the CLIP MLP's width (None: 4 x text_hidden)
    # SDXL's second text encoder (OpenCLIP ViT-bigG in the published model: 1280 wide, GELU); None: as the first.
    text_hidden_2: int | None = None
    text_heads_2: int | None = None
    text_intermediate_2: int | None = None
    text_act_2: str = "quick_gelu"
    time_embed_dim: int = 8  # SDXL's features per add_time_id (published: 256)


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
        unet_layers_per_block=2,
    ),
    # Stable Diffusion 1.5's published configs (its UNet, CLIP ViT-L/14 text encoder and VAE), random weights:
    # ~860M UNet parameters. Building it takes minutes and ~12 GB of memory.
    "large": TinySpec(
        unet_channels=(320, 640, 1280, 1280),
        unet_down=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        unet_up=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        unet_groups=32,
        attention_head_dim=8,
        sample_size=32,  # the published 64 (512 px) halved: runs at 256 px; the weights have the same shapes
        text_hidden=768,
        text_layers=12,
        text_heads=12,
        vae_channels=(128, 256, 512, 512),
        vae_groups=32,
        unet_layers_per_block=2,
        vae_layers_per_block=2,
        text_intermediate=3072,
    ),
}
# Real widths and conditioning dimensions at a cost CI can pay (one UNet layer per block, two text layers,
# 128 px): SD 1.5's 768-wide text encoder and cross-attention, SDXL's 768- and 1280-wide encoders
# (cross-attention 2048, the added embedding 6 x 256 + 1280 = 2816 wide), attention heads of 64 (64 and 128
# channels, 1 and 2 heads). A mix-up of any two of these dimensions fails to export or to serve.
SIZES["widths"] = TinySpec(
    unet_channels=(64, 128),
    unet_down=("CrossAttnDownBlock2D", "DownBlock2D"),
    unet_up=("UpBlock2D", "CrossAttnUpBlock2D"),
    unet_groups=32,
    attention_head_dim=(1, 2),
    sample_size=16,
    text_hidden=768,
    text_layers=2,  # SDXL serves the penultimate hidden state: after one real layer, not the embeddings
    text_heads=12,
    text_intermediate=3072,
    vae_channels=(8, 16, 16, 16),
    vae_groups=8,
    text_hidden_2=1280,
    text_heads_2=20,
    text_intermediate_2=5120,
    text_act_2="gelu",
    time_embed_dim=256,
)
# The same at its published size, 512 px (64x64 latents): what the GPU device runs measure (scripts/gpu_check.py,
# scripts/gpu_serve_check.py).
SIZES["sd15"] = replace(SIZES["large"], sample_size=64)

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
    # SD-Turbo / SDXL-Turbo ship this one: ancestral Euler on trailing timesteps, for 1-4 steps without guidance.
    "euler_ancestral": {
        "_class_name": "EulerAncestralDiscreteScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "steps_offset": 1,
        "timestep_spacing": "trailing",
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


ARCHS = ("sd", "sd2", "sdxl")
SDXL_TIME_IDS = 6  # original size (2) + crop offset (2) + target size (2)
LATENT_CHANNELS = 4
INPAINT_IN_CHANNELS = 2 * LATENT_CHANNELS + 1  # latents, mask, masked-image latents (diffusers' inpaint UNets)


def _text_config(spec: TinySpec, *, second: bool = False, hidden_act: str | None = None, **extra: Any) -> Any:
    """The first text encoder's config, or with `second` SDXL's second one (its own widths where given)."""
    from transformers import CLIPTextConfig

    hidden = (spec.text_hidden_2 if second else None) or spec.text_hidden
    intermediate = (spec.text_intermediate_2 if second else None) or spec.text_intermediate or hidden * 4
    return CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=(spec.text_heads_2 if second else None) or spec.text_heads,
        hidden_act=hidden_act or (spec.text_act_2 if second else "quick_gelu"),
        max_position_embeddings=CLIP_MAX_LENGTH,
        vocab_size=49408,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        **extra,
    )


def build_random_pipeline(
    out_dir: Path,
    *,
    size: str = "tiny",
    seed: int = 0,
    scheduler: str = "pndm",
    arch: str = "sd",
    inpainting: bool = False,
) -> Path:
    """Build a random-weight img2img pipeline (`arch` "sd", "sd2" or "sdxl"), deterministic from `seed`; save it.

    `inpainting`: a dedicated inpainting UNet, 9 input channels (latents, mask, masked-image latents), saved as
    diffusers' inpaint pipeline. Its wider conv_in draws more numbers from the seed, so the VAE and text encoders
    built after it differ from the 4-channel build's (the 4-channel weights stay as they were)."""
    import diffusers
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    spec = SIZES[size]
    sdxl, sd2 = arch == "sdxl", arch == "sd2"
    torch.manual_seed(seed)
    # SDXL's cross-attention sees both encoders' hidden states side by side; its added embedding takes the six
    # time ids and the second encoder's pooled (projected) output.
    pooled = spec.text_hidden_2 or spec.text_hidden  # the second encoder's projection: as wide as it is
    sdxl_unet = (
        {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": spec.time_embed_dim,
            "projection_class_embeddings_input_dim": spec.time_embed_dim * SDXL_TIME_IDS + pooled,
            "use_linear_projection": True,
        }
        if sdxl
        else {"use_linear_projection": True}
        if sd2
        else {}
    )
    unet = diffusers.UNet2DConditionModel(
        sample_size=spec.sample_size,
        in_channels=INPAINT_IN_CHANNELS if inpainting else LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        layers_per_block=spec.unet_layers_per_block,
        block_out_channels=spec.unet_channels,
        down_block_types=spec.unet_down,
        up_block_types=spec.unet_up,
        cross_attention_dim=spec.text_hidden + (pooled if sdxl else 0),
        attention_head_dim=spec.attention_head_dim,
        norm_num_groups=spec.unet_groups,
        **sdxl_unet,
    )
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(spec.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(spec.vae_channels),
        block_out_channels=spec.vae_channels,
        latent_channels=LATENT_CHANNELS,
        layers_per_block=spec.vae_layers_per_block,
        norm_num_groups=spec.vae_groups,
        sample_size=spec.sample_size * 2 ** (len(spec.vae_channels) - 1),
    )
    # SD 2.x's OpenCLIP text encoder uses GELU (and its single-file layout is OpenCLIP's: export.checkpoint).
    text_encoder = CLIPTextModel(_text_config(spec, hidden_act="gelu") if sd2 else _text_config(spec))
    text_encoder_2 = (
        CLIPTextModelWithProjection(_text_config(spec, second=True, projection_dim=pooled)) if sdxl else None
    )
    with tempfile.TemporaryDirectory() as vocab_dir:
        vocab, merges = write_clip_vocab(Path(vocab_dir))

        def tokenizer(pad: str) -> Any:
            return CLIPTokenizer(
                vocab_file=str(vocab), merges_file=str(merges), model_max_length=CLIP_MAX_LENGTH, pad_token=pad
            )

        sched_config = dict(SCHEDULERS[scheduler])
        sched_cls = getattr(diffusers, sched_config.pop("_class_name"))
        if sd2:  # SD 2.x's 768 px models predict v
            sched_config["prediction_type"] = "v_prediction"
        # For mypy, diffusers' TYPE_CHECKING re-exports resolve to its placeholder "dummy" classes (no methods);
        # at run time this is the real pipeline class, a DiffusionPipeline with save_pretrained.
        pipe: Any
        if sdxl:
            xl_class = (
                diffusers.StableDiffusionXLInpaintPipeline if inpainting else diffusers.StableDiffusionXLImg2ImgPipeline
            )
            pipe = xl_class(
                vae=vae,
                text_encoder=text_encoder,
                text_encoder_2=text_encoder_2,
                tokenizer=tokenizer("<|endoftext|>"),
                tokenizer_2=tokenizer("!"),  # SDXL's second tokenizer pads with "!" (id 0)
                unet=unet,
                scheduler=sched_cls(**sched_config),
                add_watermarker=False,
            )
        else:
            sd_class = (
                diffusers.StableDiffusionInpaintPipeline if inpainting else diffusers.StableDiffusionImg2ImgPipeline
            )
            pipe = sd_class(
                vae=vae,
                text_encoder=text_encoder,
                tokenizer=tokenizer("!" if sd2 else "<|endoftext|>"),  # SD 2.x's pads with "!", CLIP's with the end
                unet=unet,
                scheduler=sched_cls(**sched_config),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        pipe.save_pretrained(out_dir)
    return out_dir
