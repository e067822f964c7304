"""TensorRT for GPU deployments: native `tensorrt_plan` models, and the TensorRT provider of the onnxruntime backend.

`--backend tensorrt`: per component, the fp16 ONNX the plan is built from (`1/model.onnx`, fp32 inputs and
outputs so the gateway sends what it always sends), a `platform: "tensorrt_plan"` config.pbtxt, and the build
recipe `plan.build.json` with the exact `trtexec` command. The plan itself (`1/model.plan`) is built by
`python -m export.trt_build` where Triton runs (a plan is tied to its TensorRT version and GPU architecture).

`--backend onnxruntime`: the config gets the TensorRT execution accelerator (fp16, engine and timing caches on
the models volume), with the same optimization profile, so onnxruntime builds one engine per model at load.

Both profiles come from the manifest alone, for whatever components it has, so the gateway's contract is the
only input: the batch range is 1..max_batch_size rows (with classifier-free guidance a UNet row is half an image:
max_batch_size = 16 serves 8 guided images per execution), and the image sides range over what the gateway sends
(`fit_to_grid`: the longer side is the native resolution, the shorter one any multiple of the grid below it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from export.errors import ExportError
from export.onnx_export import VAE_COMPONENTS
from export.trt_build import RECIPE_FILE, RECIPE_VERSION, SAVE_ENGINE, TIMING_CACHE

if TYPE_CHECKING:
    from export.repository import ServingOptions

PLAN_FILE = "model.plan"
ONNX_FILE = "model.onnx"
TIMING_CACHE_FILE = "timing.cache"
_PROTOBUF_LIMIT = 1_800_000_000  # protobuf's 2 GiB ceiling, with margin: larger models use external data
_CAST_TO_FLOAT, _FLOAT16 = 1, 10  # onnx.TensorProto.FLOAT, FLOAT16


@dataclass(frozen=True)
class InputProfile:
    """One input's TensorRT optimization-profile shapes, batch dimension included."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def side_range(manifest: Mapping[str, Any]) -> tuple[int, int]:
    """(smallest, largest) image side in pixels the gateway sends: `fit_to_grid`'s range for this manifest."""
    native, grid = int(manifest["native_resolution"]), int(manifest["grid"])
    longest = max(grid, (2 * native + grid) // (2 * grid) * grid)  # the native side rounded to the grid, halves up
    return grid, longest


def profile(manifest: Mapping[str, Any], component: str, max_batch_size: int) -> list[InputProfile]:
    """The one optimization profile of a component: batch 1..max_batch_size (opt at the top: the dynamic
    batcher fills executions under load), fixed dims as they are, image sides over `side_range`, largest at opt.

    A -1 dim after the batch is an image side of an NCHW tensor: pixel-sized for the VAE encoder (its RGB input),
    latent-sized for every other model (the UNet's `sample`, latents alone or, inpainting, latents + mask +
    masked-image latents; the decoder's `latent_sample`).
    """
    lo_px, hi_px = side_range(manifest)
    factor = int(manifest["vae_scale_factor"])
    profiles = []
    for spec in manifest["components"][component]["inputs"].values():
        shape = [int(d) for d in spec["shape"]]
        lo, hi = [1], [max_batch_size]
        for axis, dim in enumerate(shape[1:], start=1):
            if dim >= 0:
                lo.append(dim)
                hi.append(dim)
                continue
            if len(shape) != 4 or axis < 2 or shape[1] < 0:
                raise ExportError(f"{component}.{spec['name']}: no TensorRT shape range for a dynamic dim {axis}")
            scale = 1 if component == "vae_encoder" else factor
            lo.append(lo_px // scale)
            hi.append(hi_px // scale)
        profiles.append(InputProfile(spec["name"], tuple(lo), tuple(hi), tuple(hi)))
    return profiles


def _shapes(profiles: list[InputProfile], which: str) -> str:
    return ",".join(f"{p.name}:{'x'.join(map(str, getattr(p, which)))}" for p in profiles)


def trtexec_argv(profiles: list[InputProfile], timing_cache: str, *, fp16: bool = True) -> list[str]:
    """The trtexec command, run in the model folder: fp16 kernels (unless `fp16` is off: a `force_upcast` VAE),
    one profile, a shared timing cache."""
    return [
        "trtexec",
        f"--onnx=1/{ONNX_FILE}",
        f"{SAVE_ENGINE}1/{PLAN_FILE}",
        f"--minShapes={_shapes(profiles, 'min')}",
        f"--optShapes={_shapes(profiles, 'opt')}",
        f"--maxShapes={_shapes(profiles, 'max')}",
        *(["--fp16"] if fp16 else []),
        f"{TIMING_CACHE}{timing_cache}",
    ]


def ort_tensorrt_block(
    profiles: list[InputProfile], engine_cache: str, timing_cache_dir: str, *, fp16: bool = True
) -> str:
    """The onnxruntime backend's TensorRT execution accelerator (Triton's onnxruntime_backend README keys)."""
    params = {
        "precision_mode": "FP16" if fp16 else "FP32",
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": engine_cache,
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": timing_cache_dir,
        "trt_profile_min_shapes": _shapes(profiles, "min"),
        "trt_profile_opt_shapes": _shapes(profiles, "opt"),
        "trt_profile_max_shapes": _shapes(profiles, "max"),
    }
    body = "\n".join(f'    parameters {{ key: "{k}" value: "{v}" }}' for k, v in params.items())
    return (
        "optimization { execution_accelerators {\n"
        '  gpu_execution_accelerator : [ {\n    name : "tensorrt"\n' + body + "\n  } ]\n}}\n"
    )


def _load(path: Path) -> Any:
    import onnx

    return onnx.load(str(path), load_external_data=True)


def _save(model: Any, path: Path) -> None:
    import onnx

    external = path.with_name(path.name + "_data")
    if external.exists():
        external.unlink()
    large = model.ByteSize() > _PROTOBUF_LIMIT
    onnx.save_model(model, str(path), save_as_external_data=large, location=external.name if large else None)


def prune_outputs(model: Any, keep: set[str]) -> None:
    """Drop the graph outputs the gateway never reads (the text encoder's pooled output) and the nodes and
    weights only they need: TensorRT then neither builds nor runs them."""
    graph = model.graph
    for output in [o for o in graph.output if o.name not in keep]:
        graph.output.remove(output)
    if any(a.type in (5, 10) for n in graph.node for a in n.attribute):  # GRAPH/GRAPHS: outer-scope reads
        return
    needed = set(keep)
    live = []
    for node in reversed(graph.node):  # ONNX graphs are topologically sorted
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(i for i in node.input if i)
    for node in [n for n in graph.node if n not in live]:
        graph.node.remove(node)
    for init in [t for t in graph.initializer if t.name not in needed]:
        graph.initializer.remove(init)


def separate_consumed_outputs(model: Any) -> None:
    """Give each graph output that nodes also read (SDXL's `hidden_states.N` of a text encoder that also serves
    `text_embeds`) an Identity of its own: the converter keeps outputs fp32, and the later layers reading the
    same tensor would get fp32 beside their fp16 weights (onnxruntime refuses "bound to different types")."""
    from onnx import helper

    graph = model.graph
    read = {i for n in graph.node for i in n.input}
    for output in graph.output:
        if output.name not in read:
            continue
        inner = f"{output.name}.inner"
        for node in graph.node:
            node.output[:] = [inner if o == output.name else o for o in node.output]
            node.input[:] = [inner if i == output.name else i for i in node.input]
        graph.node.append(helper.make_node("Identity", [inner], [output.name], name=f"{output.name}.identity"))


def convert_fp16(path: Path, keep: set[str]) -> None:
    """Prune `path` to the served outputs, then convert it to fp16 in place with onnxconverter-common,
    inputs and outputs kept fp32.

    Shape inference runs on the file (`infer_shapes_path`: no 2 GiB limit) so the converter knows every
    tensor's type. One repair: a `Cast(to=FLOAT)` inside the graph (the UNet's timestep projection) keeps
    `to=FLOAT` while the converter marks its output fp16; it is pointed at FLOAT16 to match.
    """
    from onnx.shape_inference import infer_shapes_path
    from onnxconverter_common.float16 import convert_float_to_float16  # type: ignore[import-untyped]

    model = _load(path)
    prune_outputs(model, keep)
    separate_consumed_outputs(model)
    _save(model, path)
    inferred = path.with_name(path.stem + ".inferred.onnx")
    try:
        infer_shapes_path(str(path), str(inferred))
        model = _load(inferred)
    finally:
        inferred.unlink(missing_ok=True)
    model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.output]}
    for node in model.graph.node:
        if node.op_type == "Cast" and types.get(node.output[0]) == _FLOAT16:
            for attr in node.attribute:
                if attr.name == "to" and attr.i == _CAST_TO_FLOAT:
                    attr.i = _FLOAT16
    _save(model, path)


def write_tensorrt_parts(staging: Path, manifest: Mapping[str, Any], options: ServingOptions) -> None:
    """After the manifest: per component it lists, the fp16 ONNX + build recipe (`tensorrt` backend), or the
    TensorRT execution accelerator appended to config.pbtxt (`onnxruntime` backend)."""
    cache_dir = str(options.trt_cache_dir).rstrip("/")
    for component, entry in manifest["components"].items():
        model_dir = staging / entry["model"]
        profiles = profile(manifest, component, options.max_batch_size)
        # A `force_upcast` VAE (SDXL's overflows in fp16) is served fp32, as the manifest's `vae_dtype` says.
        fp16 = not (component in VAE_COMPONENTS and manifest.get("vae_dtype") == "float32")
        if options.backend == "tensorrt" and fp16:
            # Served tensor names (SDXL's outputs are keyed by role, e.g. "hidden_states" -> "hidden_states.31").
            convert_fp16(model_dir / "1" / ONNX_FILE, {spec["name"] for spec in entry["outputs"].values()})
        if options.backend == "tensorrt":
            recipe = {
                "recipe_version": RECIPE_VERSION,
                "model": entry["model"],
                "onnx": f"1/{ONNX_FILE}",
                "plan": f"1/{PLAN_FILE}",
                "max_batch_size": options.max_batch_size,
                "profile": {p.name: {"min": p.min, "opt": p.opt, "max": p.max} for p in profiles},
                "argv": trtexec_argv(profiles, f"{cache_dir}/{TIMING_CACHE_FILE}", fp16=fp16),
            }
            (model_dir / RECIPE_FILE).write_text(json.dumps(recipe, indent=2) + "\n")
        elif options.backend == "onnxruntime" and options.ort_tensorrt:
            block = ort_tensorrt_block(profiles, f"{cache_dir}/ort/{entry['model']}", f"{cache_dir}/ort", fp16=fp16)
            config = model_dir / "config.pbtxt"
            config.write_text(config.read_text() + block)
