"""Writing a module as a diffusers/transformers folder entry with its weights streamed into one safetensors file.

`save_pretrained` serializes a whole shard in memory (a second copy of the weights), and a sharded folder loads
by copying every shard; one file written a tensor at a time costs nothing beyond the module, and loads mapped
(export.onnx_export.load_pipeline), so the export reads each component's weights only when its turn comes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# safetensors' names of the dtypes a Stable Diffusion module holds.
SAFETENSORS_DTYPE_NAMES = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "uint8": "U8",
    "bool": "BOOL",
}
HEADER_ALIGNMENT = 8  # safetensors pads its JSON header to a multiple of 8 bytes
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"


def write_safetensors(state: dict[str, Any], path: Path, metadata: dict[str, str] | None = None) -> Path:
    """`state` (name -> torch tensor) as one safetensors file, written a tensor at a time."""
    import torch

    tensors = {name: tensor.detach() for name, tensor in state.items()}
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        dtype = SAFETENSORS_DTYPE_NAMES[str(tensor.dtype).removeprefix("torch.")]
        header[name] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % HEADER_ALIGNMENT)
    with path.open("wb") as out:
        out.write(len(encoded).to_bytes(8, "little"))
        out.write(encoded)
        for tensor in tensors.values():
            out.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return path


def build_module(folder: Path) -> Any:
    """A diffusers model or transformers text encoder from a folder's `config.json` alone, with freshly made
    weights: random, or, under `torch.device("meta")`, none (a shell to assign a checkpoint's tensors into)."""
    import diffusers
    import transformers

    config = json.loads((folder / "config.json").read_text())
    if "_class_name" in config:  # diffusers
        model_class = getattr(diffusers, config["_class_name"])
        return model_class.from_config(model_class.load_config(folder))
    model_class = getattr(transformers, config["architectures"][0])
    return model_class(model_class.config_class.from_pretrained(folder))


def save_module(module: Any, folder: Path) -> Path:
    """A diffusers model or transformers text encoder as its folder: its config and one streamed weights file."""
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(module, "save_config"):  # diffusers
        module.save_config(folder)
        weights = DIFFUSERS_WEIGHTS
    else:
        module.config.save_pretrained(folder)
        weights = TRANSFORMERS_WEIGHTS
    return write_safetensors(module.state_dict(), folder / weights)
