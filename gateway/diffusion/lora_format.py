"""LoRA adapter files as users hold them: `.safetensors` in the diffusers/PEFT layout or kohya's (AUTOMATIC1111's).

One module for both sides of a call: the gateway reads a file's header to list it and to check a request against
a model (rank, layers, family) before any work; the Triton runner reads the tensors into its bank. So it needs
nothing but numpy and the standard library (it is copied beside the runner, `model.py`, at export).

Every key is mapped to (component, layer): the component as the export names it (`unet`, `text_encoder`,
`text_encoder_2`), the layer as diffusers names the module inside it (`down_blocks.0.attentions.0.
transformer_blocks.0.attn1.to_q`, `text_model.encoder.layers.0.self_attn.q_proj`). Layouts read:
- diffusers/PEFT: `unet.<layer>.lora_A.weight` / `lora_B` (also `lora.down`/`lora.up`, `lora_down`/`lora_up`,
  and the old attention-processor form `...attn1.processor.to_q_lora.down.weight`); `text_encoder.`,
  `text_encoder_2.`; alpha from `<layer>.alpha` keys or the `lora_adapter_metadata` diffusers writes (PEFT's
  `lora_alpha`, `alpha_pattern`, `use_rslora`), else alpha = rank.
- kohya: `lora_unet_<layer with _>.lora_down.weight` / `lora_up`, `.alpha`; `lora_te_` (SD), `lora_te1_` and
  `lora_te2_` (SDXL); SDXL UNet names in the original (SGM) layout, `input_blocks_4_1_...`, mapped to diffusers'.
The scale a layer applies is `alpha / rank` (`alpha / sqrt(rank)` with rsLoRA), times the request's `scale`.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SUFFIX = ".safetensors"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# safetensors' own bound on the JSON header.
MAX_HEADER_BYTES = 100 * 1024 * 1024
METADATA_KEY = "__metadata__"
DIFFUSERS_METADATA = "lora_adapter_metadata"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# Families a file can be made for, and their names in messages.
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sd": "SD 1.x/2.x"}
# The cross-attention width (the input of `attn2.to_k`) of each published family.
CROSS_ATTENTION_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}

# (component prefix, ...) of each layout.
_DIFFUSERS_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
_KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
_PARTS = {
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "lora.down.weight": "down",
    "lora.up.weight": "up",
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "alpha": "alpha",
}
# Key fragments of the LoRA variants this reader does not apply (LyCORIS' LoHa, LoKr and LoCon's Tucker middle,
# DoRA's magnitudes, full weight differences): a file holding them is refused rather than served in part.
_UNSUPPORTED = {
    re.compile(r"\.hada_"): "LoHa",
    re.compile(r"\.lokr_"): "LoKr",
    re.compile(r"\.lora_mid\."): "LoCon (Tucker)",
    re.compile(r"lora_magnitude_vector"): "DoRA",
    re.compile(r"\.dora_scale$"): "DoRA",
    re.compile(r"\.diff(_b)?$"): "full weight-difference",
}
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


class LoraFileError(ValueError):
    """The file cannot be used: unreadable, corrupt, of an unknown layout, or not for the model asked."""


@dataclass(frozen=True)
class Tensor:
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int


@dataclass(frozen=True)
class Layer:
    """One adapted layer: its tensors' keys, rank and features (in, out)."""

    down: str
    up: str
    alpha_key: str | None
    rank: int
    fan_in: int
    fan_out: int


@dataclass(frozen=True)
class Adapter:
    """A file's header, read and mapped: what the listing shows and a request is checked against."""

    name: str
    path: Path
    size_bytes: int
    fingerprint: tuple[int, int]  # (mtime_ns, size): a changed file is read again
    layout: str  # "diffusers" or "kohya"
    family: str | None  # "sd1", "sd2", "sdxl", or None when the file does not tell
    # component -> layer (diffusers names; kohya's flat names as written, resolved against a model later)
    layers: Mapping[str, Mapping[str, Layer]]
    tensors: Mapping[str, Tensor] = field(repr=False)
    metadata: Mapping[str, str] = field(repr=False)

    @property
    def rank(self) -> int:
        return max((layer.rank for layers in self.layers.values() for layer in layers.values()), default=0)

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(c for c in COMPONENTS if self.layers.get(c))


def fingerprint(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


def adapter_path(folder: Path, name: str) -> Path:
    return folder / f"{name}{SUFFIX}"


def read_header(path: Path) -> tuple[dict[str, Tensor], dict[str, str], int]:
    """The tensors (absolute byte ranges, checked against the file's size) and metadata of a safetensors file."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) != 8:
                raise LoraFileError("not a safetensors file (shorter than its header length)")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise LoraFileError("not a safetensors file (its header length is past the end of the file)")
            raw = handle.read(length)
    except OSError as exc:
        raise LoraFileError(f"cannot read the file: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise LoraFileError("not a safetensors file (its header is not JSON)") from exc
    if not isinstance(header, dict):
        raise LoraFileError("not a safetensors file (its header is not a JSON object)")
    metadata = header.pop(METADATA_KEY, None) or {}
    if not isinstance(metadata, dict):
        raise LoraFileError("corrupt safetensors header (__metadata__ is not an object)")
    base = 8 + length
    tensors: dict[str, Tensor] = {}
    for key, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise LoraFileError(f"corrupt safetensors header at {key!r}") from exc
        if dtype not in _DTYPES:
            raise LoraFileError(f"tensor {key!r} has dtype {dtype}; LoRA weights must be F32, F16, BF16 or F64")
        expected = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize
        if not (0 <= start <= end and end - start == expected and base + end <= size):
            raise LoraFileError(f"corrupt file: tensor {key!r} does not fit its bytes (truncated?)")
        tensors[key] = Tensor(dtype, shape, base + int(start), base + int(end))
    return tensors, {str(k): str(v) for k, v in metadata.items()}, size


def _split_key(key: str) -> tuple[str, str, str, str] | None:
    """(layout, component, layer as written, part) of a LoRA key, or None for a key of no LoRA layout."""
    processor = _PROCESSOR.search(key)
    if processor:  # diffusers' old attention-processor LoRA: `...attn1.processor.to_q_lora.down.weight`
        projection = "to_out.0" if processor.group(1) == "to_out" else processor.group(1)
        key = f"{key[: processor.start()]}.{projection}.lora.{processor.group(2)}.weight"
    found = next(((suffix, part) for suffix, part in _PARTS.items() if key.endswith("." + suffix)), None)
    if found is None:
        return None
    suffix, part = found
    stem = key[: -len(suffix) - 1].replace(".default", "")
    for prefix, component in _KOHYA_PREFIXES.items():
        if stem.startswith(prefix):
            return "kohya", component, stem[len(prefix) :], part
    for prefix, component in _DIFFUSERS_PREFIXES.items():
        if stem.startswith(prefix):
            return "diffusers", component, stem[len(prefix) :], part
    return None


def _matrix_dims(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, columns) of a linear's weight, or of a 1x1 convolution's [out, in, 1, 1]."""
    if len(shape) == 2:
        return shape[0], shape[1]
    if len(shape) == 4 and shape[2:] == (1, 1):
        return shape[0], shape[1]
    raise LoraFileError(f"a LoRA weight of shape {list(shape)} (only linear and 1x1 convolution layers are served)")


def parse_adapter(path: Path, name: str) -> Adapter:
    """Read and map a file's header (no weights). Raises LoraFileError naming what is wrong."""
    tensors, metadata, size = read_header(path)
    for key in tensors:
        method = next((m for marker, m in _UNSUPPORTED.items() if marker.search(key)), None)
        if method is not None:  # served as plain LoRA it would give another image: refused, not half-applied
            raise LoraFileError(f"it holds {method} weights ({key!r}); only plain LoRA (down/up, alpha) is served")
    grouped: dict[tuple[str, str, str], dict[str, str]] = {}
    layouts: set[str] = set()
    for key in tensors:
        split = _split_key(key)
        if split is None:
            continue
        layout, component, layer, part = split
        layouts.add(layout)
        grouped.setdefault((layout, component, layer), {})[part] = key
    if not grouped:
        raise LoraFileError("no LoRA weights found (neither the diffusers/PEFT nor the kohya layout)")
    if len(layouts) > 1:
        raise LoraFileError("the file mixes the diffusers and kohya layouts")
    layers: dict[str, dict[str, Layer]] = {}
    for (_, component, layer_name), keys in grouped.items():
        if "down" not in keys or "up" not in keys:
            raise LoraFileError(f"layer {layer_name!r} of {component} has only one of its two LoRA matrices")
        rank, fan_in = _matrix_dims(tensors[keys["down"]].shape)
        fan_out, up_rank = _matrix_dims(tensors[keys["up"]].shape)
        if up_rank != rank:
            raise LoraFileError(f"layer {layer_name!r} of {component}: its matrices disagree on the rank")
        layers.setdefault(component, {})[layer_name] = Layer(
            keys["down"], keys["up"], keys.get("alpha"), rank, fan_in, fan_out
        )
    return Adapter(
        name=name,
        path=path,
        size_bytes=size,
        fingerprint=fingerprint(path),
        layout=layouts.pop(),
        family=_family(layers, metadata),
        layers=layers,
        tensors=tensors,
        metadata=metadata,
    )


def _family(layers: Mapping[str, Mapping[str, Layer]], metadata: Mapping[str, str]) -> str | None:
    """What the file says it is for: kohya's and modelspec's metadata, SDXL's second encoder or original UNet
    names, else the cross-attention width of a published family; None when nothing tells."""
    declared = (metadata.get("ss_base_model_version", "") + " " + metadata.get("modelspec.architecture", "")).lower()
    if "sdxl" in declared or "stable-diffusion-xl" in declared:
        return "sdxl"
    if "sd_v2" in declared or "stable-diffusion-v2" in declared:
        return "sd2"
    if "sd_v1" in declared or "stable-diffusion-v1" in declared:
        return "sd1"
    if layers.get("text_encoder_2") or any(
        n.startswith(("input_blocks", "middle_block", "output_blocks")) for n in layers.get("unet", {})
    ):
        return "sdxl"
    for name, layer in layers.get("unet", {}).items():
        if name.replace("_", ".").endswith("attn2.to.k") and layer.fan_in in CROSS_ATTENTION_FAMILY:
            return CROSS_ATTENTION_FAMILY[layer.fan_in]
    return None


def families_match(file_family: str | None, base: str) -> bool:
    if file_family is None:
        return True
    if base == "sd":  # an SD model of unpublished width: only SDXL files are surely not for it
        return file_family != "sdxl"
    return file_family == base


def _sgm_aliases(layer: str, layers_per_block: int) -> str | None:
    """SDXL's original (SGM) name of a diffusers UNet layer, as kohya writes it, or None outside attentions."""
    match = re.match(r"^(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.(.*)$", layer)
    if match:
        kind, block, index, rest = match.group(1), int(match.group(2)), int(match.group(3)), match.group(4)
        per = layers_per_block + 1  # each down block ends in a downsampler; each up block has one layer more
        if kind == "down_blocks":
            return f"input_blocks.{1 + block * per + index}.1.{rest}"
        return f"output_blocks.{block * per + index}.1.{rest}"
    if layer.startswith("mid_block.attentions.0."):
        return "middle_block.1." + layer[len("mid_block.attentions.0.") :]
    return None


def layer_names(component: str, targets: Mapping[str, Any], layers_per_block: int) -> dict[str, str]:
    """Every name a file may give a target layer (diffusers' own, kohya's flat ones, SGM's) -> the target."""
    names: dict[str, str] = {}
    for layer in targets:
        names[layer] = layer
        names[layer.replace(".", "_")] = layer
        if component == "unet":
            sgm = _sgm_aliases(layer, layers_per_block)
            if sgm is not None:
                names[sgm.replace(".", "_")] = layer
                names[sgm] = layer
    return names


@dataclass(frozen=True)
class Fit:
    """A file resolved against one model: component -> target layer -> the file's layer."""

    layers: Mapping[str, Mapping[str, Layer]]


def fit_adapter(
    adapter: Adapter,
    targets: Mapping[str, Mapping[str, tuple[int, int]]],
    *,
    rank: int,
    layers_per_block: int,
    base: str,
    components: tuple[str, ...] | None = None,
) -> Fit:
    """Resolve `adapter` against a model's branch targets (component -> layer -> (in, out)) and bank rank `rank`.
    Raises LoraFileError for another family, a layer the model has no branch on, features that differ, or a rank
    above the bank's. With `components` (a runner's bank of one component), a file that adapts none of them fits
    with no layers: the bank leaves it alone."""
    if not families_match(adapter.family, base):
        raise LoraFileError(
            f"made for {FAMILY_NAMES[adapter.family or 'sd']}, but the model is {FAMILY_NAMES.get(base, base)}"
        )
    resolved: dict[str, dict[str, Layer]] = {}
    for component, layers in adapter.layers.items():
        if components is not None and component not in components:
            continue
        if component not in targets:
            raise LoraFileError(f"it adapts {component}, which this model has no LoRA branches on")
        names = layer_names(component, targets[component], layers_per_block)
        unknown = [n for n in layers if n not in names]
        if unknown:
            shown = ", ".join(sorted(unknown)[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
            raise LoraFileError(
                f"it adapts {component} layers this model has no LoRA branch on ({shown}); served: the attention, "
                "feed-forward and 1x1 projection layers of the UNet's transformers and the text encoders' "
                "attention and MLP (no LoCon/LyCORIS convolutions)"
            )
        for written, layer in layers.items():
            target = names[written]
            want_in, want_out = targets[component][target]
            if (layer.fan_in, layer.fan_out) != (want_in, want_out):
                raise LoraFileError(
                    f"layer {target} of {component} is {layer.fan_in}->{layer.fan_out} in the file and "
                    f"{want_in}->{want_out} in the model: not made for this model"
                )
            if layer.rank > rank:
                raise LoraFileError(f"its rank {layer.rank} is above this model's LoRA rank {rank} (--lora-rank)")
            resolved.setdefault(component, {})[target] = layer
    if not resolved and components is None:
        raise LoraFileError("it adapts none of this model's components")
    return Fit(resolved)


def _alpha_settings(adapter: Adapter, component: str) -> tuple[float | None, dict[str, float], bool]:
    """(lora_alpha, alpha_pattern, use_rslora) of a component from diffusers' PEFT metadata, if written."""
    raw = adapter.metadata.get(DIFFUSERS_METADATA)
    if not raw:
        return None, {}, False
    try:
        config = json.loads(raw)
    except ValueError as exc:
        raise LoraFileError(f"its {DIFFUSERS_METADATA} metadata is not JSON") from exc
    alpha = config.get(f"{component}.lora_alpha")
    pattern = config.get(f"{component}.alpha_pattern") or {}
    return (
        None if alpha is None else float(alpha),
        {str(k): float(v) for k, v in pattern.items()},
        bool(config.get(f"{component}.use_rslora", False)),
    )


def _read(handle: Any, tensor: Tensor) -> np.ndarray:
    handle.seek(tensor.start)
    data = handle.read(tensor.end - tensor.start)
    if len(data) != tensor.end - tensor.start:
        raise LoraFileError("corrupt file: it ended inside a tensor (truncated?)")
    array = np.frombuffer(data, dtype=_DTYPES[tensor.dtype])
    if tensor.dtype == "BF16":  # bfloat16 is the upper half of a float32
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32).reshape(tensor.shape)


def load_weights(adapter: Adapter, fit: Fit) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """component -> layer -> (down [in, r], up [r, out] times alpha/r): the bank's layout (A and B transposed),
    the layer's scale folded into `up`. Raises LoraFileError when the file changed or is corrupt."""
    if fingerprint(adapter.path) != adapter.fingerprint:
        raise LoraFileError("the file changed while it was read")
    weights: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    with adapter.path.open("rb") as handle:
        for component, layers in fit.layers.items():
            alpha, pattern, rslora = _alpha_settings(adapter, component)
            for target, layer in layers.items():
                down = _read(handle, adapter.tensors[layer.down]).reshape(layer.rank, layer.fan_in)
                up = _read(handle, adapter.tensors[layer.up]).reshape(layer.fan_out, layer.rank)
                layer_alpha = alpha
                if layer.alpha_key is not None:
                    layer_alpha = float(_read(handle, adapter.tensors[layer.alpha_key]).reshape(-1)[0])
                for key, value in pattern.items():
                    if re.fullmatch(rf"(.*\.)?{key}", target):
                        layer_alpha = value
                denominator = math.sqrt(layer.rank) if rslora else layer.rank
                scale = 1.0 if layer_alpha is None else layer_alpha / denominator
                if not (np.all(np.isfinite(down)) and np.all(np.isfinite(up)) and math.isfinite(scale)):
                    raise LoraFileError(f"layer {target} of {component} holds NaN or infinity")
                weights.setdefault(component, {})[target] = (
                    np.ascontiguousarray(down.T),
                    np.ascontiguousarray(up.T * np.float32(scale)),
                )
    return weights


def scan_folder(folder: Path) -> list[tuple[str, Path]]:
    """(name, path) of every adapter file in `folder` with a servable name, sorted; none when it is missing."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return []
    found = []
    for entry in entries:
        if entry.name.endswith(SUFFIX) and entry.is_file():
            name = entry.name[: -len(SUFFIX)]
            if NAME_PATTERN.match(name):
                found.append((name, Path(entry.path)))
    return found
