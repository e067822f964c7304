"""Single-file Stable Diffusion checkpoints: the original (LDM/SGM) layout that AUTOMATIC1111, ComfyUI and model
sharing sites use, one `.safetensors` (or pickle `.ckpt`) holding the UNet, the VAE and the text encoder(s).

Reading converts the file into a diffusers folder one component at a time, with diffusers' single-file conversion
against a diffusers folder's configs and tokenizers (`--config`), or the published ones of the family the file's
keys name (export.published), with no hub access; the export then reads that folder as any other.
Writing (`write_checkpoint`) is the inverse mapping, from a diffusers pipeline's modules to the original names:
the tests write their single files with it from random pipelines.

The family is told by the text encoders' keys: SD 1.x has OpenAI CLIP under `cond_stage_model.transformer`, SD 2.x
OpenCLIP under `cond_stage_model.model`, SDXL both under `conditioner.embedders.{0,1}`.
"""

from __future__ import annotations

import gc
import json
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from export.errors import ExportError, one_line
from export.published import config_folder
from export.weights import build_module, save_module

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT_PREFIXES = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")
# One key each family's file has (and the others do not).
FAMILY_KEYS = {
    "sdxl": SDXL_TEXT_PREFIXES[1] + "positional_embedding",
    "sd2": SD2_TEXT_PREFIX + "positional_embedding",
    "sd1": SD1_TEXT_PREFIX + "text_model.embeddings.position_embedding.weight",
}
OPEN_CLIP_PREFIXES = (SD2_TEXT_PREFIX, SDXL_TEXT_PREFIXES[1])  # the text encoders held in OpenCLIP's layout
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# The UNet's first convolution: its input channels tell an inpainting file (9) from an ordinary one (4).
CONV_IN_KEY = UNET_PREFIX + "input_blocks.0.0.weight"
SD2_INPAINTING_SIZE = 512  # stable-diffusion-2-inpainting's native size (the 512 px base, epsilon prediction)
VAE_FACTOR = 8  # the published VAEs' down-sampling: UNet sample_size = pixels / 8

_RESNET_UNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
_RESNET_VAE = {"conv_shortcut": "nin_shortcut"}
_ATTENTION_VAE = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}  # fmt: skip


def family_of_keys(keys: Iterable[str]) -> str | None:
    """ "sd1", "sd2" or "sdxl" from a checkpoint's keys; None when it holds no Stable Diffusion text encoder."""
    present = set(keys)
    return next((family for family, key in FAMILY_KEYS.items() if key in present), None)


def checkpoint_keys(path: Path, *, allow_pickle: bool) -> list[str]:
    """The tensor names in a single file, refusing what cannot be read safely or at all (one-line ExportError)."""
    if not path.is_file():
        raise ExportError(f"checkpoint not found: {path}")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ExportError(
                f"{path} is a pickle, and loading a pickle can run code: convert it to .safetensors, or pass "
                "--allow-pickle if you trust its source"
            )
        import torch

        try:
            state = torch.load(path, map_location="meta", weights_only=True)
        except Exception as exc:  # any unpickling failure: truncated, not a checkpoint, forbidden globals
            raise ExportError(f"cannot read the checkpoint {path}: {type(exc).__name__}") from exc
        state = state.get("state_dict", state) if isinstance(state, dict) else {}
        return [str(k) for k in state]
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except Exception as exc:  # safetensors' SafetensorError and OSError alike: truncated, not safetensors
        raise ExportError(f"cannot read the checkpoint {path}: not a complete .safetensors file") from exc


def checkpoint_family(path: Path, *, allow_pickle: bool, family: str | None = None) -> str:
    """ "sd1", "sd2" or "sdxl" for a single file, or a one-line ExportError for one that is unreadable, unsafe to
    read, or not one of theirs: what the export checks before any work. A `family` given (`--arch`) is taken as
    it is, once the file is known to be readable; a file that does not fit it fails in the conversion."""
    keys = checkpoint_keys(path, allow_pickle=allow_pickle)
    family = family or family_of_keys(keys)
    if family is None:
        raise ExportError(
            f"{path} is not an SD 1.x, 2.x or SDXL checkpoint: none of their text encoders is in it (another "
            "architecture, or not a model)"
        )
    return family


# Each component's keys in a family's file.
_MODEL_PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX}
COMPONENT_PREFIXES: dict[str, dict[str, str]] = {
    "sd1": {"text_encoder": SD1_TEXT_PREFIX, **_MODEL_PREFIXES},
    "sd2": {"text_encoder": SD2_TEXT_PREFIX, **_MODEL_PREFIXES},
    "sdxl": {"text_encoder": SDXL_TEXT_PREFIXES[0], "text_encoder_2": SDXL_TEXT_PREFIXES[1], **_MODEL_PREFIXES},
}
# Files of a --config folder that are weights (not copied: the single file's weights replace them).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx", ".onnx_data", ".h5")


@contextmanager
def _tensors(path: Path) -> Iterator[tuple[list[str], Callable[[str], Any]]]:
    """A single file's keys and a reader of one tensor, without loading the others: safetensors maps the file,
    and a pickle is opened with torch's mmap (weights only, so no code runs)."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        import torch

        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        state = state.get("state_dict", state)
        yield [str(k) for k in state], state.__getitem__
        return
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        yield list(handle.keys()), handle.get_tensor


def _load_component(component: str, state: dict[str, Any], config_dir: Path) -> Any:
    """One diffusers/transformers module from its original-layout weights: diffusers' single-file key conversion,
    assigned into a module built on the meta device, so the module's weights are the file's own (mapped, in the
    file's dtype: nothing is copied until it is written)."""
    import torch
    from diffusers.loaders import single_file_utils as convert

    with torch.device("meta"):
        module = build_module(config_dir / component)
    if component == "unet":
        weights = convert.convert_ldm_unet_checkpoint(state, module.config)
    elif component == "vae":
        weights = convert.convert_ldm_vae_checkpoint(state, module.config)
    else:
        open_clip = next((p for p in OPEN_CLIP_PREFIXES if p + "positional_embedding" in state), None)
        if open_clip is not None:
            weights = convert.convert_open_clip_checkpoint(module, state, prefix=open_clip)
        else:
            weights = convert.convert_ldm_clip_checkpoint(state)
        if not hasattr(module, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
            weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    expected = set(module.state_dict())
    missing = sorted(expected - set(weights))
    if missing:
        raise ValueError(f"its {component} lacks {len(missing)} weights of the config's, e.g. {missing[0]}")
    module.load_state_dict({k: v for k, v in weights.items() if k in expected}, assign=True)
    return module


def convert_checkpoint(path: Path, family: str, config_dir: Path | None, out_dir: Path) -> Path:
    """Write a single file of `family` (checkpoint_family) as a diffusers folder in `out_dir`, one component at a
    time (its tensors read, converted, written and released before the next), with `config_dir`'s configs and
    tokenizers, or, without one, the family's published ones (export.published: SD 1.5, SD 2.1 768-v, SDXL base
    1.0). The export then reads the folder as any other: the whole model is never in memory at once."""
    published, named = config_dir is None, config_dir
    if config_dir is None:
        config_dir = config_folder(family, out_dir)
    else:
        shutil.copytree(config_dir, out_dir, ignore=shutil.ignore_patterns(*(f"*{s}" for s in WEIGHT_SUFFIXES)))
        config_dir = out_dir  # the copy: fit_unet_inputs may widen its UNet config
    try:
        with _tensors(path) as (keys, read):
            fit_unet_inputs(out_dir, family, keys, read, published=published)
            for component, prefix in COMPONENT_PREFIXES[family].items():
                state = {key: read(key) for key in keys if key.startswith(prefix)}
                module = _load_component(component, state, config_dir)
                del state
                save_module(module, out_dir / component)
                del module
                gc.collect()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        configs = f"the configs in {named}" if named else f"the published {family} configs"
        raise ExportError(f"cannot load {path} with {configs}: {one_line(exc)}") from exc
    return out_dir


def fit_unet_inputs(
    folder: Path, family: str, keys: Iterable[str], read: Callable[[str], Any], *, published: bool
) -> None:
    """Widen `folder`'s UNet config to an inpainting file's UNet (a `conv_in` over 2 x latents + 1 channels:
    latents, mask and masked-image latents), which the family's configs (or an ordinary `--config`) describe at
    the latents' width; the export then finds an inpainting model, as it would in a diffusers folder.

    diffusers' single-file loader tells inpainting files the same way. SD 2's published inpainting model is the
    512 px base with epsilon prediction (`stable-diffusion-2-inpainting`), not the 768-v model whose configs
    export.published ships, so its published configs are moved to those too.
    """
    if CONV_IN_KEY not in set(keys):
        return
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    channels = int(read(CONV_IN_KEY).shape[1])
    if channels == config["in_channels"] or channels != 2 * config["out_channels"] + 1:
        return  # not an inpainting UNet: a mismatch fails the conversion with the loader's own message
    config["in_channels"] = channels
    if published and family == "sd2":
        config["sample_size"] = SD2_INPAINTING_SIZE // VAE_FACTOR
        _update_json(folder / "vae" / "config.json", sample_size=SD2_INPAINTING_SIZE)
        _update_json(folder / "scheduler" / "scheduler_config.json", prediction_type="epsilon")
    config_path.write_text(json.dumps(config, indent=2))


def _update_json(path: Path, **values: Any) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}, indent=2))


def load_checkpoint(path: Path, family: str, config_dir: Path | None) -> Any:
    """The img2img pipeline of a single file (`convert_checkpoint` into a temporary folder, then loaded; its
    weights stay mapped from the removed files, which Linux keeps until they are unmapped)."""
    from export.onnx_export import load_pipeline

    with tempfile.TemporaryDirectory(prefix="checkpoint-") as tmp:
        return load_pipeline(convert_checkpoint(path, family, config_dir, Path(tmp) / "diffusers"))


# -- writing: diffusers names -> original names ----------------------------------------------------------------


def _unet_prefixes(config: Any) -> dict[str, tuple[str, dict[str, str]]]:
    """diffusers module prefix -> (original prefix, renames inside it)."""
    per_block = int(config.layers_per_block) + 1  # an input block per layer and one downsampler (or upsampler)
    blocks = len(config.down_block_types)
    names: dict[str, tuple[str, dict[str, str]]] = {
        "time_embedding.linear_1": ("time_embed.0", {}),
        "time_embedding.linear_2": ("time_embed.2", {}),
        "add_embedding.linear_1": ("label_emb.0.0", {}),
        "add_embedding.linear_2": ("label_emb.0.2", {}),
        "conv_in": ("input_blocks.0.0", {}),
        "conv_norm_out": ("out.0", {}),
        "conv_out": ("out.2", {}),
        "mid_block.resnets.0": ("middle_block.0", _RESNET_UNET),
        "mid_block.attentions.0": ("middle_block.1", {}),
        "mid_block.resnets.1": ("middle_block.2", _RESNET_UNET),
    }
    for i in range(blocks):
        for j in range(per_block - 1):
            names[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{1 + i * per_block + j}.0", _RESNET_UNET)
            names[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{1 + i * per_block + j}.1", {})
        names[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{(i + 1) * per_block}.0.op", {})
        for j in range(per_block):
            names[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{i * per_block + j}.0", _RESNET_UNET)
            names[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{i * per_block + j}.1", {})
        position = 2 if "CrossAttn" in config.up_block_types[i] else 1
        names[f"up_blocks.{i}.upsamplers.0"] = (f"output_blocks.{i * per_block + per_block - 1}.{position}", {})
    return names


def _vae_prefixes(config: Any) -> dict[str, tuple[str, dict[str, str]]]:
    blocks = len(config.block_out_channels)
    layers = int(config.layers_per_block)
    names: dict[str, tuple[str, dict[str, str]]] = {}
    for part in ("encoder", "decoder"):
        names[f"{part}.conv_norm_out"] = (f"{part}.norm_out", {})
        names[f"{part}.mid_block.resnets.0"] = (f"{part}.mid.block_1", _RESNET_VAE)
        names[f"{part}.mid_block.resnets.1"] = (f"{part}.mid.block_2", _RESNET_VAE)
        names[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", _ATTENTION_VAE)
    for i in range(blocks):
        for j in range(layers):
            names[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", _RESNET_VAE)
        names[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", {})
        up = blocks - 1 - i  # the original decoder numbers its levels from the lowest resolution up
        for j in range(layers + 1):
            names[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{up}.block.{j}", _RESNET_VAE)
        names[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{up}.upsample.conv", {})
    return names


def _rename(key: str, prefixes: Mapping[str, tuple[str, dict[str, str]]]) -> str:
    """`key` under the longest diffusers prefix it starts with, renamed; unchanged when none matches."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in prefixes:
            target, inner = prefixes[prefix]
            rest = ".".join(parts[cut:])
            for old, new in inner.items():
                if rest == old or rest.startswith(old + "."):
                    rest = new + rest[len(old) :]
                    break
            return f"{target}.{rest}"
    return key


def _open_clip(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """A transformers CLIP text model's weights in OpenCLIP's layout (SD 2.x, SDXL's second encoder)."""
    import torch

    out: dict[str, Any] = {}
    fused: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        name = key.removeprefix("text_model.")
        if name == "embeddings.position_ids":
            continue
        if name == "embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = value
        elif name == "embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = value
        elif name.startswith("final_layer_norm."):
            out[prefix + "ln_final." + name.split(".", 1)[1]] = value
        elif name == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif match := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", name):
            layer, which, kind = match.groups()
            fused.setdefault(f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}", {})[which] = value
        elif match := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", name):
            layer, rest = match.groups()
            for old, new in _OPEN_CLIP_LAYER.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old) :]
                    break
            out[f"{prefix}transformer.resblocks.{layer}.{rest}"] = value
        else:
            raise ExportError(f"no OpenCLIP name for the text encoder weight {key}")
    for key, parts in fused.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def original_state_dict(pipeline: Any, family: str) -> dict[str, Any]:
    """Every weight of an SD 1.x ("sd1"), 2.x ("sd2": its text encoder in OpenCLIP's layout) or SDXL pipeline
    under its original name."""
    state: dict[str, Any] = {}
    unet_names = _unet_prefixes(pipeline.unet.config)
    for key, value in pipeline.unet.state_dict().items():
        state[UNET_PREFIX + _rename(key, unet_names)] = value
    vae_names = _vae_prefixes(pipeline.vae.config)
    for key, value in pipeline.vae.state_dict().items():
        renamed = _rename(key, vae_names)
        if ".mid.attn_1." in renamed and renamed.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # the original VAE attention's projections are 1x1 convolutions
        state[VAE_PREFIX + renamed] = value
    text = pipeline.text_encoder.state_dict() if pipeline.text_encoder is not None else {}
    text = {k: v for k, v in text.items() if not k.endswith("position_ids")}
    if family == "sdxl":
        state.update({SDXL_TEXT_PREFIXES[0] + k: v for k, v in text.items()})
        state.update(_open_clip(pipeline.text_encoder_2.state_dict(), SDXL_TEXT_PREFIXES[1]))
    elif family == "sd2":
        state.update(_open_clip(text, SD2_TEXT_PREFIX))
    else:
        state.update({SD1_TEXT_PREFIX + k: v for k, v in text.items()})
    return state


def write_checkpoint(pipeline: Any, family: str, path: Path) -> Path:
    """`pipeline` as one original-layout `.safetensors` file."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in original_state_dict(pipeline, family).items()}
    save_file(state, str(path))
    return path
