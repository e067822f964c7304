"""ONNX export of the pipeline components (four for SD 1.x/2.x, five for SDXL) with optimum's ONNX configs, one
component at a time.

optimum's configs give each graph's inputs, outputs, dynamic axes and dummy inputs. For the UNet we swap its
config: optimum declares `timestep` as a rank-0 scalar, so every sample of a batch must share one denoising step.
We declare it `[batch]` (per-sample), which lets Triton's dynamic batcher merge UNet calls of requests that are at
different steps. Names and layout stay optimum's, so the folder also loads in `ORTStableDiffusionImg2ImgPipeline`.

Memory: an export holds one component's weights at a time (export.pipeline releases each module once exported
and checked), the VAE halves share one copy, and a large graph's weights are streamed into its external-data
file, so the SD 1.5 export peaks under twice its UNet's fp32 weights.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from export.errors import ExportError, one_line
from export.lora import LoraShape, lora_components, strip_wrapper_prefix, wrap_for_export
from export.weights import SAFETENSORS_DTYPE_NAMES

COMPONENTS: tuple[str, ...] = ("text_encoder", "vae_encoder", "unet", "vae_decoder")
# SDXL adds its second text encoder; a refiner has only that one (no `text_encoder`).
SDXL_COMPONENTS: tuple[str, ...] = ("text_encoder", "text_encoder_2", "vae_encoder", "unet", "vae_decoder")
VAE_COMPONENTS: tuple[str, ...] = ("vae_encoder", "vae_decoder")
ONNX_OPSET = 17
# Each external tensor starts at a multiple of this: onnxruntime can then map it from the file in place (it needs
# page alignment, 4 KiB on x86-64; 64 KiB also covers Windows' allocation granularity).
EXTERNAL_DATA_ALIGNMENT = 64 * 1024
COPY_CHUNK = 16 * 1024 * 1024
# The latent size graphs are traced at, at most (export_component): 256 px for SD.
TRACE_LATENT = 32


def is_sdxl(pipeline: Any) -> bool:
    return getattr(pipeline, "text_encoder_2", None) is not None


def vae_scale_factor(vae_config: Any) -> int:
    """Pixels per latent along each side: the VAE halves its input once per block but the last."""
    return int(2 ** (len(vae_config.block_out_channels) - 1))


def pipeline_components(pipeline: Any) -> tuple[str, ...]:
    """The ONNX components this pipeline exports to, in the manifest's order."""
    if not is_sdxl(pipeline):
        return COMPONENTS
    return tuple(c for c in SDXL_COMPONENTS if c != "text_encoder" or pipeline.text_encoder is not None)


def _per_sample_unet_config(unet_config: Any, float_dtype: str) -> Any:
    """optimum's UNet ONNX config with a `[batch]` timestep input (see the module docstring)."""
    from optimum.exporters.onnx.model_configs import UNetOnnxConfig
    from optimum.utils.input_generators import DummyTimestepInputGenerator

    # optimum ships no type information, so its classes are Any to mypy.
    class PerSampleTimestepGenerator(DummyTimestepInputGenerator):  # type: ignore[misc]
        def generate(
            self, input_name: str, framework: str = "pt", int_dtype: str = "int64", float_dtype: str = "fp32"
        ) -> Any:
            if input_name == "timestep":
                # Distinct values per sample, so the trace cannot mistake the timestep for a broadcast scalar.
                return self.random_float_tensor(
                    [self.batch_size], max_value=1000, framework=framework, dtype=float_dtype
                )
            return super().generate(input_name, framework, int_dtype, float_dtype)

    class PerSampleTimestepUNetOnnxConfig(UNetOnnxConfig):  # type: ignore[misc]  # optimum is untyped
        DUMMY_INPUT_GENERATOR_CLASSES = tuple(
            PerSampleTimestepGenerator if cls is DummyTimestepInputGenerator else cls
            for cls in UNetOnnxConfig.DUMMY_INPUT_GENERATOR_CLASSES
        )

        @property
        def inputs(self) -> dict[str, dict[int, str]]:
            inputs: dict[str, dict[int, str]] = super().inputs
            inputs["timestep"] = {0: "batch_size"}
            return inputs

    return PerSampleTimestepUNetOnnxConfig(unet_config, task="semantic-segmentation", float_dtype=float_dtype)


def stored_dtype(model_dir: Path) -> str:
    """The dtype the folder's UNet weights are stored in ("float32", "float16", "bfloat16"), from its
    safetensors header; "float32" when there is none, or it mixes dtypes."""
    from safetensors import safe_open

    files = sorted((model_dir / "unet").glob("*.safetensors"))
    if not files:
        return "float32"
    with safe_open(str(files[0]), framework="pt") as handle:
        dtypes = {handle.get_slice(key).get_dtype() for key in handle.keys()}  # noqa: SIM118  # not iterable
    stored = {name: dtype for dtype, name in SAFETENSORS_DTYPE_NAMES.items()}
    return stored.get(dtypes.pop(), "float32") if len(dtypes) == 1 else "float32"


def load_pipeline(model_dir: Path, *, as_stored: bool = False) -> Any:
    """Load a local diffusers img2img pipeline (no hub access, no safety checker), SDXL when the folder is one.

    In fp32 (the ONNX graphs are exported in fp32), or with `as_stored` in the dtype the weights are stored in
    (SDXL is published in fp16): each module is then cast to fp32 when its turn comes (`to_export_dtype`), so
    the export never holds the whole pipeline in fp32. Weights already in the loaded dtype stay mapped from their
    files, read as each component is exported."""
    import diffusers
    import torch

    from export.layout import detect_family

    dtype = getattr(torch, stored_dtype(model_dir) if as_stored else "float32")
    try:
        if detect_family(model_dir) == "sdxl":
            return diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(
                model_dir, add_watermarker=False, local_files_only=True, torch_dtype=dtype
            )
        return diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(
            model_dir,
            torch_dtype=dtype,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            local_files_only=True,
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"cannot load the diffusers pipeline in {model_dir}: {exc}") from exc


def _submodel(pipeline: Any, component: str) -> Any:
    """The module optimum exports as `component`, prepared as its `_get_submodels_for_export_diffusion` prepares
    it, except that the VAE halves are shallow copies sharing the VAE's weights (optimum deep-copies the VAE twice,
    two more copies of its weights in memory)."""
    from optimum.exporters.utils import _get_diffusers_submodel_type

    if component.startswith("text_encoder"):
        encoder = getattr(pipeline, component)
        if is_sdxl(pipeline):  # SDXL conditions on the penultimate hidden state
            encoder.config.output_hidden_states = True
            encoder.text_model.config.output_hidden_states = True
        encoder.config.export_model_type = _get_diffusers_submodel_type(encoder)
        return encoder
    if component == "unet":
        unet = pipeline.unet
        unet.config.requires_aesthetics_score = getattr(pipeline.config, "requires_aesthetics_score", False)
        unet.config.time_cond_proj_dim = getattr(unet.config, "time_cond_proj_dim", None)
        projecting = pipeline.text_encoder_2 if is_sdxl(pipeline) else pipeline.text_encoder
        unet.config.text_encoder_projection_dim = projecting.config.projection_dim
        unet.config.export_model_type = _get_diffusers_submodel_type(unet)
        return unet
    half = copy.copy(pipeline.vae)  # a new instance over the same submodules and parameters
    if component == "vae_encoder":  # the distribution's parameters, from which the gateway samples
        half.forward = lambda sample: {"latent_parameters": half.encode(x=sample)["latent_dist"].parameters}
    else:
        half.forward = lambda latent_sample: half.decode(z=latent_sample)
    return half


def _onnx_config(component: str, module: Any) -> Any:
    """optimum's ONNX config for `component` (the UNet's with a per-sample timestep)."""
    import optimum.exporters.onnx.model_configs  # noqa: F401  # registers the diffusers configs with TasksManager
    from optimum.exporters.tasks import TasksManager

    if component == "unet":
        return _per_sample_unet_config(module.config, "fp32")
    task, model_type = ("feature-extraction", None)
    if component.startswith("vae"):
        task, model_type = "semantic-segmentation", component.replace("_", "-")
    constructor = TasksManager.get_exporter_config_constructor(
        model=module, exporter="onnx", library_name="diffusers", task=task, model_type=model_type
    )
    config = constructor(module.config, int_dtype="int64", float_dtype="fp32")
    if "text_embeds" in config.outputs:  # SDXL's pooled, projected text: [batch, projection_dim]

        class PooledTextOnnxConfig(type(config)):  # type: ignore[misc]  # optimum is untyped
            """optimum declares `text_embeds` with a sequence axis it does not have ([batch, 1280], not
            [batch, 77]); torch writes the declared name into the graph, so we declare only the batch axis."""

            @property
            def outputs(self) -> dict[str, dict[int, str]]:
                outputs: dict[str, dict[int, str]] = super().outputs
                outputs["text_embeds"] = {0: "batch_size"}
                return outputs

        config.__class__ = PooledTextOnnxConfig
    return config


def _trace_sized(pipeline: Any, component: str, dummy: dict[str, Any]) -> dict[str, Any]:
    """optimum's dummy images and latents at most TRACE_LATENT latents wide: it makes them at the native size, and
    tracing SD 2.1's UNet at 96x96 latents needed 5 GB for attention alone. The graph's spatial axes are dynamic,
    so the size traced at does not change it (the real-size tests serve at the native size)."""
    cap = TRACE_LATENT
    if component == "vae_encoder":  # its input is the image
        cap *= vae_scale_factor(pipeline.vae.config)
    return {k: v[..., :cap, :cap].contiguous() if getattr(v, "ndim", 0) == 4 else v for k, v in dummy.items()}


def export_component(pipeline: Any, component: str, out_dir: Path, lora: LoraShape | None = None) -> Path:
    """Export one component (fp32) to `out_dir/<component>/model.onnx`, its weights in one external-data file
    when the graph is over protobuf's 2 GB; returns the path. With `lora`, the UNet and text encoders get their
    per-row LoRA branches and inputs (export.lora); without, the graph is exactly as before.

    This is optimum's `export_pytorch` (its configs give the inputs, outputs, dynamic axes and dummy inputs)
    without its last step: for a large graph it loads every weight back into memory to write them into one file,
    which doubled the export's peak. `merge_external_data` streams them instead.
    """
    import torch

    module = _submodel(pipeline, component)
    config = _onnx_config(component, module)
    path = out_dir / component / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    for key, value in (config.values_override or {}).items():
        setattr(module.config, key, value)
    dummy = config.rename_ambiguous_inputs(config.generate_dummy_inputs(framework="pt"))
    dummy = _trace_sized(pipeline, component, dummy)
    module.eval()
    undo = None
    try:
        with torch.no_grad(), config.patch_model_for_export(module, model_kwargs={}):
            inputs = config.ordered_inputs(module)
            traced, args, names, axes = module, (dummy,), list(inputs), dict(inputs)
            if lora is not None and component in lora_components(COMPONENTS + SDXL_COMPONENTS):
                traced, args, names, lora_axes, undo = wrap_for_export(module, component, dummy, names, lora)
                axes = {**axes, **lora_axes}
            torch.onnx.export(
                traced,
                args,
                f=str(path),
                input_names=names,
                output_names=list(config.outputs),
                dynamic_axes={**axes, **config.outputs},
                do_constant_folding=True,
                opset_version=ONNX_OPSET,
                dynamo=False,  # the TorchScript exporter, as optimum uses (torch >= 2.9 defaults to dynamo)
            )
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ExportError(f"{component}: the ONNX export failed: {one_line(exc)}") from exc
    finally:
        if undo is not None:  # the module is checked against the graph next: as it was, without branches
            undo()
    if undo is not None:
        strip_wrapper_prefix(path)
    merge_external_data(path)
    return path


def _graph_tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto of a graph: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _graph_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _graph_tensors(subgraph)


def merge_external_data(path: Path) -> None:
    """Gather the external-data files torch writes for a graph over 2 GB (one per tensor) into one
    `<model>.onnx_data`, a tensor at a time, each at an offset aligned for onnxruntime to map it; a graph that
    holds its weights inline is left as it is."""
    import onnx

    if all(file == path for file in path.parent.iterdir()):  # weights inline: reading them would copy them
        return
    model = onnx.load(str(path), load_external_data=False)
    tensors = [t for t in _graph_tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL]
    if not tensors:
        return
    merged = path.with_name(path.name + "_data")
    sources: set[Path] = set()
    with merged.open("wb") as out:
        for tensor in tensors:
            info = {entry.key: entry.value for entry in tensor.external_data}
            source = path.parent / info["location"]
            sources.add(source)
            out.write(b"\0" * (-out.tell() % EXTERNAL_DATA_ALIGNMENT))
            offset = out.tell()
            with source.open("rb") as src:
                src.seek(int(info.get("offset", 0)))
                length = int(info["length"]) if "length" in info else None
                copied = _copy(src, out, length)
            del tensor.external_data[:]
            for key, value in (("location", merged.name), ("offset", str(offset)), ("length", str(copied))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
    onnx.save(model, str(path))
    for source in sources - {merged}:
        source.unlink()


def _copy(src: BinaryIO, out: BinaryIO, length: int | None) -> int:
    """Copy `length` bytes (None: to the end) in bounded chunks; returns the count."""
    copied = 0
    while length is None or copied < length:
        chunk = src.read(COPY_CHUNK if length is None else min(COPY_CHUNK, length - copied))
        if not chunk:
            break
        out.write(chunk)
        copied += len(chunk)
    if length is not None and copied != length:
        raise ExportError(f"{src.name}: external data ends after {copied} of {length} bytes")
    return copied


def to_export_dtype(pipeline: Any, module: str) -> None:
    """Cast a module loaded `as_stored` to fp32, the dtype of the ONNX graphs and of the check."""
    import torch

    getattr(pipeline, module).to(torch.float32)


def release_weights(pipeline: Any, module: str) -> None:
    """Drop a module's weights once its last component is exported and checked (the module becomes a meta-device
    shell: its config stays, for the manifest), so the export holds one component's weights at a time."""
    getattr(pipeline, module).to("meta")


def module_of(component: str) -> str:
    """The pipeline module a component is exported from (both VAE halves come from `vae`)."""
    return "vae" if component in VAE_COMPONENTS else component


def fp16_components(pipeline: Any, components: tuple[str, ...]) -> tuple[str, ...]:
    """The components converted by `--fp16`: for SDXL, all but the VAE when its config says `force_upcast`
    (SDXL's VAE overflows in fp16; diffusers' SDXL pipelines then run it in fp32, and so do we: its two halves
    stay fp32). SD's pipelines ignore `force_upcast` (AutoencoderKL's default is True), so SD converts all."""
    if is_sdxl(pipeline) and pipeline.vae.config.get("force_upcast", False):
        return tuple(c for c in components if c not in VAE_COMPONENTS)
    return components


def move_component(src: Path, dst_dir: Path) -> Path:
    """Move one exported `model.onnx` (and its external-data file, if any) into `dst_dir`: a rename on one
    filesystem, so an SDXL export does not need its weights' size twice on disk."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    for file in src.parent.iterdir():
        if file.name == src.name or file.name.startswith(src.name + "_data") or file.suffix == ".data":
            shutil.move(file, dst_dir / file.name)
    return dst_dir / src.name
