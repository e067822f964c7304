"""The export's side of the torch runtime (`--runtime torch`): each component's module saved for the python
runner's PyTorch runtime (model_repository/python_backend/torch_runtime.py), and the Triton tensors it serves.

No ONNX is written for this runtime. The tensors are those the ONNX export declares (optimum's names, a
per-sample `timestep`, the text axis fixed), derived here from the modules' configs, so one manifest and one
gateway serve either runtime; tests/integration/test_torch_runtime.py holds the two equal for SD and SDXL.

With LoRA slots (`--lora-slots`) the UNet and text encoders declare the LoRA inputs their ONNX graphs would
(export.lora), which `export.repository.stage_pipeline` turns into the one per-row `loras` input, config parameters
and manifest targets as for ONNX; the runner puts export/lora.py's branches (copied as lora_branches.py) on the
module when it loads it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from export.errors import ExportError
from export.lora import (
    CALL_INPUTS,
    ROWS,
    SCALES,
    SLOTS,
    LoraShape,
    bank_input,
    branch_targets,
    lora_components,
)
from export.onnx_export import VAE_COMPONENTS, fp16_components
from export.repository import PYTHON_MODEL_SOURCE, TensorSpec

# The runner's module and where it reads a component's weights (torch_runtime.WEIGHTS_DIR), in the version folder.
TORCH_RUNTIME_SOURCE = PYTHON_MODEL_SOURCE.with_name("torch_runtime.py")
WEIGHTS_DIR = "torch"
# The LoRA branches the runner puts on the module (torch_runtime.LORA_BRANCHES_FILE): export/lora.py itself.
LORA_BRANCHES_SOURCE = Path(__file__).resolve().with_name("lora.py")
LORA_BRANCHES_FILE = "lora_branches.py"


def torch_tensor_specs(
    pipeline: Any, component: str, text_length: int, served: dict[str, str]
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, served outputs) as `export.repository.tensor_specs` reads them from the ONNX graph: the batch and
    the spatial axes -1, the text axis `text_length`."""
    unet = pipeline.unet.config
    vae = pipeline.vae.config
    if component.startswith("text_encoder"):
        config = getattr(pipeline, component).config
        inputs = [TensorSpec("input_ids", "INT64", (-1, text_length))]
        outputs = [
            TensorSpec(name, "FP32", (-1, int(config.projection_dim)))
            if name == "text_embeds"
            else TensorSpec(name, "FP32", (-1, text_length, int(config.hidden_size)))
            for name in served.values()
        ]
        return inputs, outputs
    if component == "vae_encoder":
        image = TensorSpec("sample", "FP32", (-1, int(vae.in_channels), -1, -1))
        return [image], [TensorSpec("latent_parameters", "FP32", (-1, 2 * int(vae.latent_channels), -1, -1))]
    if component == "vae_decoder":
        latent = TensorSpec("latent_sample", "FP32", (-1, int(vae.latent_channels), -1, -1))
        return [latent], [TensorSpec("sample", "FP32", (-1, int(vae.out_channels), -1, -1))]
    inputs = [
        TensorSpec("sample", "FP32", (-1, int(unet.in_channels), -1, -1)),
        TensorSpec("timestep", "FP32", (-1,)),  # per sample: the point of our UNet export (export.onnx_export)
        TensorSpec("encoder_hidden_states", "FP32", (-1, text_length, int(unet.cross_attention_dim))),
    ]
    if unet.get("addition_embed_type") == "text_time":  # SDXL: the pooled text and the time ids
        pooled = int(pipeline.text_encoder_2.config.projection_dim)
        time_ids = (int(unet.projection_class_embeddings_input_dim) - pooled) // int(unet.addition_time_embed_dim)
        inputs += [TensorSpec("text_embeds", "FP32", (-1, pooled)), TensorSpec("time_ids", "FP32", (-1, time_ids))]
    return inputs, [TensorSpec("out_sample", "FP32", (-1, int(unet.out_channels), -1, -1))]


def torch_lora_inputs(pipeline: Any, component: str, shape: LoraShape, version_dir: Path) -> list[TensorSpec]:
    """For a component LoRA branches go on (the UNet, the text encoders): the LoRA inputs its ONNX graph with
    branches declares (the per-call rows, slots and scales, each targeted layer's bank halves), and lora_branches.py
    beside the runner. None for the others."""
    if component not in lora_components((component,)):
        return []
    targets = branch_targets(getattr(pipeline, component), component)
    if not targets:
        raise ExportError(f"{component} has no layer a LoRA targets")
    shutil.copy2(LORA_BRANCHES_SOURCE, version_dir / LORA_BRANCHES_FILE)
    call = {ROWS: ("INT64", (-1,)), SLOTS: ("INT64", (-1, -1)), SCALES: ("FP32", (-1, -1))}
    specs = [TensorSpec(name, *call[name]) for name in CALL_INPUTS]
    for layer, (fan_in, fan_out) in targets.items():
        specs.append(TensorSpec(bank_input(layer, "down"), "FP32", (-1, fan_in, shape.rank)))
        specs.append(TensorSpec(bank_input(layer, "up"), "FP32", (-1, shape.rank, fan_out)))
    return specs


def cuda_dtype(pipeline: Any, component: str) -> str:
    """What the runner computes `component` in on CUDA: fp16, but fp32 for a `force_upcast` SDXL VAE, as
    diffusers runs it (the same rule as the fp16 ONNX, export.onnx_export.fp16_components)."""
    return "float16" if component in fp16_components(pipeline, (component,)) else "float32"


def write_torch_component(pipeline: Any, component: str, version_dir: Path) -> None:
    """The module's config.json and safetensors into `version_dir/torch`, and the runner's torch_runtime.py.

    Both VAE halves are served from the one VAE (each drops the half it does not run when it loads): the second
    half's folder hard-links the first's files, so the weights are on disk once.
    """
    target = version_dir / WEIGHTS_DIR
    version_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(TORCH_RUNTIME_SOURCE, version_dir / TORCH_RUNTIME_SOURCE.name)
    sibling = _written_vae(version_dir, component)
    if sibling is not None:
        target.mkdir(parents=True)
        for file in sibling.iterdir():
            _link_or_copy(file, target / file.name)
        return
    module = pipeline.vae if component in VAE_COMPONENTS else getattr(pipeline, component)
    try:
        module.save_pretrained(target, safe_serialization=True)
    except OSError as exc:
        raise ExportError(f"cannot write the {component} weights into {target}: {exc.strerror}") from exc
    for file in target.iterdir():  # the savers write some files 0600; Triton may run as another user
        file.chmod(0o644)


def _written_vae(version_dir: Path, component: str) -> Path | None:
    """The other VAE half's weights folder, when it was written already (`<name>_vae_encoder/1/torch`)."""
    if component not in VAE_COMPONENTS:
        return None
    model_dir = version_dir.parent
    prefix = model_dir.name.removesuffix(component)
    for other in VAE_COMPONENTS:
        folder = model_dir.parent / f"{prefix}{other}" / version_dir.name / WEIGHTS_DIR
        if other != component and folder.is_dir():
            return folder
    return None


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links not allowed: a copy serves the same
        shutil.copy2(source, target)
