"""Write one pipeline into a Triton model repository: its component models (four for SD, five for SDXL) plus
the pipeline manifest.

Everything is written into a staging folder beside the repository first, then moved in with renames, manifest
last: a Triton polling the repository never sees a half-written model, and the gateway (which reads only the
manifest) never sees a pipeline whose models are not all in place.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

from export.errors import ExportError
from export.lora import BANK_PREFIX as LORA_BANK_PREFIX
from export.lora import CALL_INPUTS as LORA_CALL_INPUTS
from export.lora import LORA_INPUT, MAX_PER_REQUEST, LoraShape, bank_targets
from export.lora import ROWS as LORA_ROWS
from export.onnx_export import COMPONENTS, is_sdxl, move_component, pipeline_components, vae_scale_factor
from export.tensorrt import write_tensorrt_parts

# 2 added SDXL (`family`, `text_encoders`, `sdxl`) and distilled defaults (`turbo`); a version-1 manifest is an SD
# one and still loads.
MANIFEST_VERSION = 2
MANIFEST_SUFFIX = ".pipeline.json"
BACKENDS = ("python", "onnxruntime", "tensorrt")
# What the python backend's runner computes with: the ONNX graph in onnxruntime, or the diffusers modules in
# PyTorch (export.torch_models, model_repository/python_backend/torch_runtime.py).
RUNTIMES = ("onnxruntime", "torch")
# The backends whose instances run onnxruntime threads on the CPU cores (a TensorRT plan's work is on the GPU).
CPU_THREADED_BACKENDS = ("python", "onnxruntime")
# Triton's rate-limiter resource for CPU cores: the name the server's `--rate-limit-resource` budgets
# (gateway.triton.server.CPU_THREADS_RESOURCE, kept equal by tests/unit/test_export_args.py).
CPU_THREADS_RESOURCE = "cpu_threads"
# With `--triton-priority-levels`, every model's dynamic batcher has three priority levels, served level 1
# first: the gateway sends a job's priority 2, 1, 0 (interactive, normal, bulk) as 1, 2, 3, so an interactive
# job's UNet steps overtake queued bulk ones in Triton's queue; a request without a level gets 2, normal. Off by
# default: on Triton 2.51 (the bundled server, CPU) the levels cost the tiny benchmark model 40 % of its
# throughput at 8 concurrent requests (6.1 against 11.0 images/s; the UNet's queue time 197 against 99 ms a
# request) and stalled steps of interactive requests ~500 ms (docs/benchmarks.md, "Priorities"). Without them
# the gateway still pauses lower priorities at step boundaries, and Triton ignores the priority it is sent.
# Copies of gateway.triton.client.PRIORITY_LEVELS and triton_priority(DEFAULT_PRIORITY): this package cannot
# import the gateway (tests/unit/test_export_args.py holds them equal).
PRIORITY_LEVELS = 3
DEFAULT_PRIORITY_LEVEL = 2
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PYTHON_MODEL_SOURCE = Path(__file__).resolve().parent.parent / "model_repository" / "python_backend" / "model.py"
# Copied beside model.py in a model with LoRA slots: its bank, and the adapter-file reader the gateway also uses.
LORA_RUNNER_SOURCES = (
    PYTHON_MODEL_SOURCE.with_name("lora_bank.py"),
    Path(__file__).resolve().parent.parent / "gateway" / "diffusion" / "lora_format.py",
)
# The published families' cross-attention widths: what an adapter file made for one of them has too.
CROSS_ATTENTION_BASE = {768: "sd1", 1024: "sd2"}

# onnx.TensorProto's element type names.
_ONNX_TO_TRITON = {"FLOAT": "FP32", "FLOAT16": "FP16", "INT64": "INT64", "INT32": "INT32"}

# Which outputs each component serves (the gateway needs no others), in the manifest's role -> name form.
_SERVED_OUTPUTS = {
    "text_encoder": ("last_hidden_state",),
    "vae_encoder": ("latent_parameters",),
    "unet": ("out_sample",),
    "vae_decoder": ("sample",),
}

# diffusers' defaults for the img2img request (steps, guidance, strength), and for distilled ("turbo") models:
# SDXL-Turbo's model card runs img2img with 2 steps at strength 0.5 (one denoising step) and no guidance.
DEFAULTS = {"steps": 30, "guidance_scale": 7.5, "strength": 0.7}
TURBO_DEFAULTS = {"steps": 2, "guidance_scale": 0.0, "strength": 0.5}
# SDXL img2img's `aesthetic_score` / `negative_aesthetic_score` defaults (used when the refiner's config asks).
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5
# An inpainting model (a 9-channel UNet) is run at strength 1.0: the masked area starts from pure noise.
INPAINT_STRENGTH = 1.0


def request_defaults(*, turbo: bool, inpainting: bool) -> dict[str, float]:
    """The manifest's request defaults: diffusers' img2img ones or the turbo ones, at strength 1.0 to inpaint."""
    defaults: dict[str, float] = dict(TURBO_DEFAULTS if turbo else DEFAULTS)
    if inpainting:
        defaults["strength"] = INPAINT_STRENGTH
    return defaults


def unet_channels(pipeline: Any) -> tuple[int, int, bool]:
    """(latent channels, UNet input channels, inpainting) from the model's configs.

    The latents are the VAE's; the UNet takes them alone (img2img), or with the mask and the masked image's
    latents beside them (a dedicated inpainting UNet, diffusers' `in_channels == 9`: 2 * latents + 1).
    """
    latent = int(pipeline.vae.config.latent_channels)
    unet_in = int(pipeline.unet.config.in_channels)
    if unet_in not in (latent, 2 * latent + 1):
        raise ExportError(
            f"the UNet takes {unet_in} input channels: expected the VAE's {latent} latent channels (img2img) or "
            f"{2 * latent + 1} (inpainting: latents, mask, masked-image latents)"
        )
    return latent, unet_in, unet_in == 2 * latent + 1


def penultimate_hidden_state(text_encoder: Any) -> str:
    """optimum's name for `hidden_states[-2]` (hidden_states.0 is the embeddings), what SDXL conditions on."""
    return f"hidden_states.{int(text_encoder.config.num_hidden_layers) - 1}"


def served_outputs(pipeline: Any, component: str) -> dict[str, str]:
    """role -> ONNX output name of what the gateway reads from `component`."""
    if is_sdxl(pipeline) and component in ("text_encoder", "text_encoder_2"):
        roles = {"hidden_states": penultimate_hidden_state(getattr(pipeline, component))}
        if component == "text_encoder_2":
            roles["text_embeds"] = "text_embeds"  # the pooled, projected output: SDXL's `add_text_embeds`
        return roles
    return {name: name for name in _SERVED_OUTPUTS[component]}


@dataclass(frozen=True)
class ServingOptions:
    """Triton knobs set from CLI flags."""

    backend: str = "python"
    runtime: str = "onnxruntime"  # the python backend's runner: onnxruntime or torch (RUNTIMES)
    max_batch_size: int = 16
    max_queue_delay_us: int = 500
    instances: int = 1
    intra_op_threads: int = 0
    # The python runner's onnxruntime CPU arena, without memory patterns: the fastest setting measured, and the
    # one that holds least with the arena (`python -m benchmarks arena`, the 512 px benchmark UNet on 2 cores at
    # 2 rows: 0.93 s a row and 3.4 GiB held, against 1.34 s and 5.6 GiB with patterns, 1.38 s and 0.4 GiB with no
    # arena). The arena keeps the largest batch's peak for the life of the process, so the batch bound is what
    # bounds it: a calibrated max_batch_size (`--calibrate`) keeps the batches, and so the hold, to what pays here.
    cpu_mem_arena: bool = True
    mem_pattern: bool = False
    # TensorRT caches (plans' timing cache, onnxruntime's TensorRT engines), as Triton's container sees them:
    # on the models volume, beside the repository /data/models (docker/compose.yaml, docker/k8s).
    trt_cache_dir: str = "/data/trt-cache"
    # `onnxruntime` backend: add the TensorRT execution accelerator (used on GPU instances only).
    ort_tensorrt: bool = True
    # The torch runtime on CUDA: the UNet replayed from CUDA graphs (per batch size and shape), and torch.compile.
    cuda_graphs: bool = True
    torch_compile: bool = False
    # Triton priority levels in every dynamic batcher (`PRIORITY_LEVELS`): measured costly on Triton 2.51, off.
    triton_priority_levels: bool = False

    @property
    def served_by(self) -> str:
        """What computes the models: the python runner's runtime, else the backend (onnxruntime, tensorrt)."""
        return self.runtime if self.backend == "python" else self.backend


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # with the batch dim as -1

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def cpu_threads(options: ServingOptions) -> int:
    """The cores one execution of an instance occupies: its intra-op threads, where 0 (onnxruntime's default)
    means every core of the host; the export's host stands for the serving one (the bundled server raises its
    budget to the largest ask, gateway.triton.server.cpu_budget_args, so no model is refused for it)."""
    return options.intra_op_threads or os.cpu_count() or 1


def model_name(pipeline_name: str, component: str) -> str:
    return f"{pipeline_name}_{component}"


def validate_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise ExportError(f"invalid --name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
    return name


def tensor_specs(onnx_path: Path, text_length: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Input and output tensor specs of an ONNX model, from its graph alone (no weights read); symbolic dims
    become -1, the text axis is fixed."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph

    def spec(value: Any) -> TensorSpec:
        dims = []
        for i, d in enumerate(value.type.tensor_type.shape.dim):
            if i == 0:
                dims.append(-1)
            elif d.dim_param == "sequence_length":
                dims.append(text_length)
            else:
                dims.append(d.dim_value if d.HasField("dim_value") else -1)
        element = onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type)
        return TensorSpec(value.name, _ONNX_TO_TRITON[element], tuple(dims))

    initializers = {t.name for t in graph.initializer}  # old exporters list weights as inputs too
    inputs = [spec(v) for v in graph.input if v.name not in initializers]
    return inputs, [spec(v) for v in graph.output]


def _pbtxt_tensor(spec: TensorSpec) -> str:
    dims = list(spec.shape[1:])
    datatype = "STRING" if spec.datatype == "BYTES" else spec.datatype  # Triton's config calls BYTES STRING
    reshape = ""
    if not dims:  # a per-sample scalar: Triton wants dims [1]; reshape hands the model the ONNX rank-1 [batch]
        dims, reshape = [1], " reshape: { shape: [ ] }"
    # `loras` is optional: a client that sends none (not the gateway, which always does, so that requests with and
    # without adapters batch together: Triton batches only requests with the same inputs) asks for no adapter.
    optional = " optional: true" if spec.name == LORA_INPUT else ""
    shape = ", ".join(map(str, dims))
    return f'  {{ name: "{spec.name}" data_type: TYPE_{datatype} dims: [ {shape} ]{reshape}{optional} }}'


def render_dynamic_batching(
    max_queue_delay_us: int, preferred_batch_size: Sequence[int] = (), *, priority_levels: bool = False
) -> str:
    """The config's `dynamic_batching` line: the queue delay, the preferred batch when one was measured, and the
    priority levels when asked for (`PRIORITY_LEVELS`); `--calibrate` rewrites the line with this too, keeping
    what the export chose."""
    preferred = (
        f"preferred_batch_size: [ {', '.join(map(str, preferred_batch_size))} ] " if preferred_batch_size else ""
    )
    levels = (
        f" priority_levels: {PRIORITY_LEVELS} default_priority_level: {DEFAULT_PRIORITY_LEVEL}"
        if priority_levels
        else ""
    )
    return f"dynamic_batching {{ {preferred}max_queue_delay_microseconds: {max_queue_delay_us}{levels} }}"


def render_config(
    name: str,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    options: ServingOptions,
    onnx_file: str,
    *,
    torch_params: Mapping[str, str] | None = None,
    lora_params: Mapping[str, str] | None = None,
) -> str:
    """config.pbtxt for one component, for the python (onnxruntime or torch runtime), the native onnxruntime or
    the tensorrt_plan backend. `torch_params`: the torch runtime's per-component `parameters` (component, dtype);
    `lora_params`: a component with LoRA branches (its bank's slots, component, family)."""
    lines = [f'name: "{name}"']
    if options.backend == "python":
        lines.append('backend: "python"')
    elif options.backend == "tensorrt":  # the plan is built where Triton runs: export.trt_build
        lines += ['platform: "tensorrt_plan"', 'default_model_filename: "model.plan"']
    else:
        lines += ['backend: "onnxruntime"', f'default_model_filename: "{onnx_file}"']
    lines.append(f"max_batch_size: {options.max_batch_size}")
    lines.append("input [\n" + ",\n".join(_pbtxt_tensor(s) for s in inputs) + "\n]")
    lines.append("output [\n" + ",\n".join(_pbtxt_tensor(s) for s in outputs) + "\n]")
    # Only the UNet, called once per denoising step by every request in flight, gains from waiting for company;
    # the other components still batch whatever is queued when an instance frees up, with no added delay.
    delay = options.max_queue_delay_us if name.endswith("_unet") else 0
    lines.append(render_dynamic_batching(delay, priority_levels=options.triton_priority_levels))
    # KIND_AUTO: GPU instances when Triton sees a GPU (the native backend then attaches CUDA, and the python
    # runner picks onnxruntime-gpu's CUDA provider), CPU instances otherwise.
    kind = "KIND_GPU" if options.backend == "tensorrt" else "KIND_AUTO"  # a plan runs on a GPU only
    # onnxruntime instances (both runners) run their intra-op threads on the host's cores: each execution holds
    # that many of Triton's global `cpu_threads`, so a server started with `--rate-limit=execution_count` (and a
    # budget of cores) runs at once only the executions whose threads fit the cores. Without the flag it is inert.
    resource = f'{{ name: "{CPU_THREADS_RESOURCE}" global: true count: {cpu_threads(options)} }}'
    limiter = f" rate_limiter {{ resources [ {resource} ] }}" if options.backend in CPU_THREADED_BACKENDS else ""
    lines.append(f"instance_group [ {{ count: {options.instances} kind: {kind}{limiter} }} ]")
    # `cpu_mem_arena` (ServingOptions): with it, the largest batch's peak stays held for the life of the process
    # (the 512 px benchmark UNet stub grew to 11 GiB and was OOM-killed beside a second copy of the model).
    params = (
        {
            "runtime": "torch",
            **(torch_params or {}),
            "intra_op_threads": str(options.intra_op_threads),
            "cuda_graphs": "1" if options.cuda_graphs else "0",
            "torch_compile": "1" if options.torch_compile else "0",
        }
        if options.served_by == "torch"
        else {
            "onnx_file": onnx_file,
            "intra_op_threads": str(options.intra_op_threads),
            "allow_spinning": "0",
            "cpu_mem_arena": "1" if options.cpu_mem_arena else "0",
            "mem_pattern": "1" if options.mem_pattern else "0",
        }
        if options.backend == "python"
        else {"intra_op_thread_count": str(options.intra_op_threads)}
        if options.backend == "onnxruntime"
        else {}
    )
    for key, value in {**params, **(lora_params or {})}.items():
        lines.append(f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}')
    return "\n".join(lines) + "\n"


_CONFIG_PARAMETER = re.compile(r'parameters \{ key: "(\w+)" value: \{ string_value: "([^"]*)" \} \}')


def config_parameters(config: str) -> dict[str, str]:
    """The `parameters` of a config.pbtxt as `render_config` writes them: what the python runner reads."""
    return dict(_CONFIG_PARAMETER.findall(config))


def python_runner() -> ModuleType:
    """The python backend's model.py as a module (it imports outside Triton), for its `session_options`: whoever
    times a model as it is served (export.calibrate, the benchmark's limit) builds sessions with it."""
    spec = importlib.util.spec_from_file_location("imagen_python_runner", PYTHON_MODEL_SOURCE)
    if spec is None or spec.loader is None:
        raise ExportError(f"cannot load the python runner {PYTHON_MODEL_SOURCE}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_manifest(
    name: str,
    pipeline: Any,
    specs: Mapping[str, tuple[list[TensorSpec], list[TensorSpec]]],
    options: ServingOptions,
    *,
    dtype: str,
    tokenizer_file: str,
    source: str,
    turbo: bool = False,
    vae_dtype: str | None = None,
    lora: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The pipeline manifest: everything the gateway needs, read from the model's own configs."""
    vae_cfg, unet_cfg = pipeline.vae.config, pipeline.unet.config
    latent_channels, unet_in_channels, inpainting = unet_channels(pipeline)
    pixels_per_latent = vae_scale_factor(vae_cfg)
    unet_downsamples = len(unet_cfg.down_block_types) - 1
    # The traced UNet has fixed up-sampling sizes, so latents must divide by every UNet down-sampling.
    grid = pixels_per_latent * 2**unet_downsamples
    components = {}
    for component in pipeline_components(pipeline):
        inputs, outputs = specs[component]
        by_name = {s.name: s for s in outputs}
        components[component] = {
            "model": model_name(name, component),
            "inputs": {s.name: s.as_json() for s in inputs},
            "outputs": {role: by_name[out].as_json() for role, out in served_outputs(pipeline, component).items()},
            # The most rows Triton takes in one call to this model (config.pbtxt; `--calibrate` may lower the
            # UNet's): the gateway splits a call with more. Absent in older manifests: no splitting.
            "max_batch_size": options.max_batch_size,
        }
    scheduler = {"_class_name": type(pipeline.scheduler).__name__, **dict(pipeline.scheduler.config)}
    first_text = "text_encoder" if getattr(pipeline, "text_encoder", None) is not None else "text_encoder_2"
    manifest: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "name": name,
        "source": source,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "backend": options.backend,
        "runtime": options.served_by,
        "dtype": dtype,
        "native_resolution": int(unet_cfg.sample_size) * pixels_per_latent,
        "vae_scale_factor": pixels_per_latent,
        "grid": grid,
        "latent_channels": latent_channels,  # the VAE's
        # The UNet's `sample` width: the latents, or (inpainting) latents + mask + masked-image latents.
        "unet_in_channels": unet_in_channels,
        "inpainting": inpainting,
        "scaling_factor": float(vae_cfg.scaling_factor),
        "shift_factor": None if vae_cfg.get("shift_factor") is None else float(vae_cfg.shift_factor),
        "max_batch_size": options.max_batch_size,
        "text": {
            "max_length": int(getattr(pipeline, first_text.replace("text_encoder", "tokenizer")).model_max_length),
            "hidden_size": int(getattr(pipeline, first_text).config.hidden_size),
            "tokenizer": tokenizer_file,
        },
        "components": components,
        "scheduler": json.loads(json.dumps(scheduler, default=list)),
        "defaults": request_defaults(turbo=turbo, inpainting=inpainting),
        "family": "sdxl" if is_sdxl(pipeline) else "sd",
        "turbo": turbo,
        "vae_dtype": vae_dtype or dtype,
    }
    if lora is not None:
        manifest["lora"] = dict(lora)
    if is_sdxl(pipeline):
        manifest["text_encoders"] = [
            {
                "component": c,
                "tokenizer": tokenizer_path(name, c),
                "hidden_size": int(getattr(pipeline, c).config.hidden_size),
            }
            for c in ("text_encoder", "text_encoder_2")
            if c in components
        ]
        manifest["sdxl"] = {
            "force_zeros_for_empty_prompt": bool(pipeline.config.force_zeros_for_empty_prompt),
            "requires_aesthetics_score": bool(pipeline.config.requires_aesthetics_score),
            "aesthetic_score": AESTHETIC_SCORE,
            "negative_aesthetic_score": NEGATIVE_AESTHETIC_SCORE,
        }
    return manifest


def lora_base(pipeline: Any) -> str:
    """The family an adapter file must be made for: `sdxl`, `sd1`/`sd2` by the UNet's cross-attention width (a
    published family's), else `sd` (an SD model of unpublished width: any SD 1.x/2.x file of its shapes fits)."""
    if is_sdxl(pipeline):
        return "sdxl"
    return CROSS_ATTENTION_BASE.get(int(pipeline.unet.config.cross_attention_dim), "sd")


def tokenizer_path(name: str, text_component: str) -> str:
    """Where a text encoder's tokenizer JSON lives, relative to the repository (beside its model)."""
    return f"{model_name(name, text_component)}/tokenizer.json"


def write_tokenizer(pipeline: Any, out_file: Path, attribute: str = "tokenizer") -> None:
    """Save a `tokenizers` JSON with SD's padding/truncation baked in, so the gateway needs no transformers."""
    from transformers import CLIPTokenizerFast

    slow = getattr(pipeline, attribute)
    with _tmpdir(out_file.parent) as tmp:
        slow.save_pretrained(tmp)
        fast = CLIPTokenizerFast.from_pretrained(tmp)
    backend = fast.backend_tokenizer
    length = int(slow.model_max_length)
    backend.enable_truncation(max_length=length)
    backend.enable_padding(length=length, pad_id=int(slow.pad_token_id), pad_token=str(slow.pad_token))
    out_file.parent.mkdir(parents=True, exist_ok=True)
    backend.save(str(out_file))


@contextmanager
def _tmpdir(parent: Path) -> Iterator[Path]:
    path = parent / f".tmp-{uuid.uuid4().hex}"
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def stage_pipeline(
    staging: Path,
    name: str,
    pipeline: Any,
    onnx_paths: Mapping[str, Path] | None,
    options: ServingOptions,
    *,
    dtype: str,
    source: str,
    turbo: bool = False,
    vae_dtype: str | None = None,
    lora: LoraShape | None = None,
) -> dict[str, Any]:
    """Write the model folders and the manifest into `staging`; returns the manifest. `onnx_paths` is None for
    the torch runtime, which serves the modules' own weights (export.torch_models)."""
    text_length = int((pipeline.tokenizer or pipeline.tokenizer_2).model_max_length)
    specs: dict[str, tuple[list[TensorSpec], list[TensorSpec]]] = {}
    lora_targets: dict[str, dict[str, tuple[int, int]]] = {}
    base = lora_base(pipeline)
    for component in pipeline_components(pipeline):
        model_dir = staging / model_name(name, component)
        served = served_outputs(pipeline, component)
        if onnx_paths is None:
            from export.torch_models import cuda_dtype, torch_lora_inputs, torch_tensor_specs, write_torch_component

            write_torch_component(pipeline, component, model_dir / "1")
            inputs, outputs = torch_tensor_specs(pipeline, component, text_length, served)
            onnx_file_name = ""
            torch_params = {"component": component, "cuda_dtype": cuda_dtype(pipeline, component)}
            # LoRA: the inputs the ONNX graph would have (made into `loras` below), and the bank's rank, which the
            # runner reads from the ONNX graph's inputs otherwise.
            if lora is not None and (lora_inputs := torch_lora_inputs(pipeline, component, lora, model_dir / "1")):
                inputs += lora_inputs
                torch_params["lora_rank"] = str(lora.rank)
        else:
            onnx_file = move_component(onnx_paths[component], model_dir / "1")
            inputs, outputs = tensor_specs(onnx_file, text_length)
            served_names = set(served.values())
            outputs = [s for s in outputs if s.name in served_names]
            onnx_file_name, torch_params = onnx_file.name, None
        lora_params = None
        if lora is not None and any(s.name == LORA_ROWS for s in inputs):
            # The graph's LoRA inputs are the runner's to bind; Triton (and the gateway) see one per-row `loras`.
            lora_targets[component], _ = bank_targets({s.name: list(s.shape) for s in inputs})
            inputs = [s for s in inputs if s.name not in LORA_CALL_INPUTS and not s.name.startswith(LORA_BANK_PREFIX)]
            inputs.append(TensorSpec(LORA_INPUT, "BYTES", (-1, 1)))
            lora_params = {
                "lora_component": component,
                "lora_slots": str(lora.slots),
                "lora_layers_per_block": str(pipeline.unet.config.layers_per_block),
                "lora_base": base,
            }
        specs[component] = (inputs, outputs)
        config = render_config(
            model_name(name, component),
            inputs,
            outputs,
            options,
            onnx_file_name,
            torch_params=torch_params,
            lora_params=lora_params,
        )
        (model_dir / "config.pbtxt").write_text(config)
        if options.backend == "python":
            shutil.copy2(PYTHON_MODEL_SOURCE, model_dir / "1" / "model.py")
            for runner_file in LORA_RUNNER_SOURCES if lora_params else ():
                shutil.copy2(runner_file, model_dir / "1" / runner_file.name)
    texts = [c for c in pipeline_components(pipeline) if c.startswith("text_encoder")]
    for text in texts:
        write_tokenizer(pipeline, staging / tokenizer_path(name, text), text.replace("text_encoder", "tokenizer"))
    manifest = build_manifest(
        name,
        pipeline,
        specs,
        options,
        dtype=dtype,
        tokenizer_file=tokenizer_path(name, texts[0]),
        source=source,
        turbo=turbo,
        vae_dtype=vae_dtype,
        lora=None
        if lora is None
        else {
            **lora.as_json(),
            "max_per_request": min(MAX_PER_REQUEST, lora.slots),
            "layers_per_block": int(pipeline.unet.config.layers_per_block),
            "base": base,
            "targets": {c: {layer: list(dims) for layer, dims in t.items()} for c, t in lora_targets.items()},
        },
    )
    (staging / f"{name}{MANIFEST_SUFFIX}").write_text(json.dumps(manifest, indent=2) + "\n")
    if options.backend in ("tensorrt", "onnxruntime"):
        write_tensorrt_parts(staging, manifest, options)
    return manifest


def install_pipeline(staging: Path, repository: Path, name: str, components: tuple[str, ...] = COMPONENTS) -> None:
    """Move a staged pipeline into the repository: each model folder by rename, then the manifest.

    A model being replaced is renamed aside first and deleted after, so it is never seen half-written; if a
    rename fails midway, the models already moved are put back and the repository is as it was.
    """
    trash = staging / ".replaced"
    moved: list[str] = []
    try:
        repository.mkdir(parents=True, exist_ok=True)
        trash.mkdir(exist_ok=True)
        for component in components:
            model = model_name(name, component)
            target = repository / model
            if target.exists():
                os.rename(target, trash / model)
            os.rename(staging / model, target)
            moved.append(model)
        manifest = f"{name}{MANIFEST_SUFFIX}"
        os.replace(staging / manifest, repository / manifest)
    except OSError as exc:
        for model in moved:
            shutil.rmtree(repository / model, ignore_errors=True)
        for old in trash.iterdir() if trash.exists() else ():
            os.rename(old, repository / old.name)
        raise ExportError(f"cannot write into the repository {repository}: {exc.strerror}") from exc


@contextmanager
def staging_area(repository: Path, name: str) -> Iterator[Path]:
    """A fresh staging folder beside `repository` (same filesystem, so installing is a rename).

    Creating it is also the writability check, done before any expensive work; it is always removed after.
    """
    if repository.exists() and not repository.is_dir():
        raise ExportError(f"the output repository {repository} is not a directory")
    staging = repository.parent / f".{repository.name}.staging-{name}-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir(parents=True)
    except OSError as exc:
        raise ExportError(f"the output repository {repository} is not writable: {exc.strerror}") from exc
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def list_manifests(repository: Path) -> list[Path]:
    return sorted(repository.glob(f"*{MANIFEST_SUFFIX}"))


def write_variant(
    repository: Path, base: str, name: str, *, scheduler: Mapping[str, Any], turbo: bool
) -> dict[str, Any]:
    """Serve `base`'s installed models under a second name with another scheduler and defaults (no new models).

    What a distilled configuration changes at serving time is only the schedule and the defaults, so a second
    manifest over the same Triton models is enough when the weights are shared (the tests' tiny turbo model).
    """
    validate_name(name)
    base_path = repository / f"{base}{MANIFEST_SUFFIX}"
    try:
        manifest: dict[str, Any] = json.loads(base_path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read the pipeline {base!r} in {repository}: {exc}") from exc
    manifest.update(
        name=name,
        source=f"variant of {base}",
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        scheduler=dict(scheduler),
        turbo=turbo,
        defaults=request_defaults(turbo=turbo, inpainting=bool(manifest.get("inpainting", False))),
    )
    target = repository / f"{name}{MANIFEST_SUFFIX}"
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, target)
    return manifest
