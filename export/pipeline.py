"""The export recipe, stage by stage, shared by `--model-dir` and `--tiny` (which only adds a first stage)."""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from export.errors import ExportError
from export.layout import check_layout
from export.lora import LoraShape
from export.onnx_export import (
    export_component,
    fp16_components,
    load_pipeline,
    module_of,
    pipeline_components,
    release_weights,
    to_export_dtype,
)
from export.repository import (
    ServingOptions,
    install_pipeline,
    served_outputs,
    stage_pipeline,
    staging_area,
    unet_channels,
    validate_name,
)
from export.validate import check_component

DEFAULT_REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository" / "models"


@dataclass(frozen=True)
class ExportRequest:
    model_dir: Path | None
    repository: Path
    name: str = "imagen-v2"
    tiny_size: str | None = None
    tiny_seed: int = 0
    tiny_scheduler: str = "pndm"
    tiny_arch: str = "sd"
    tiny_inpainting: bool = False  # a 9-channel (inpainting) UNet; the export reads it from the UNet's config
    turbo: bool = False  # a distilled model: turbo defaults in /v1/models (steps 2, no guidance)
    options: ServingOptions = field(default_factory=ServingOptions)
    fp16: bool = False
    lora: LoraShape | None = None  # --lora-slots/--lora-rank: per-row LoRA branches (export.lora)
    validate: bool = True
    calibrate: bool = False  # time the UNet and VAEs on this host and write their batch policy (export.calibrate)
    # A single-file checkpoint (export.checkpoint) read with `checkpoint_config`'s (a diffusers folder's) configs.
    checkpoint: Path | None = None
    checkpoint_config: Path | None = None
    checkpoint_family: str | None = None  # "sd1", "sd2" or "sdxl" as given (--arch); None: from the file's keys
    allow_pickle: bool = False


def _quiet() -> None:
    """The torch/ONNX tracer warnings are expected for diffusers models and bury the progress bar."""
    warnings.filterwarnings("ignore")
    for name in ("optimum", "diffusers", "transformers", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def run_export(request: ExportRequest, *, progress: bool = True) -> dict[str, Any]:
    """Export one pipeline into the repository atomically; returns its manifest."""
    from diffusers.utils import logging as diffusers_logging

    _quiet()
    diffusers_logging.disable_progress_bar()
    name = validate_name(request.name)
    if request.model_dir is not None:
        check_layout(request.model_dir)
    family = None
    if request.checkpoint is not None:
        from export.checkpoint import checkpoint_family

        family = checkpoint_family(  # before any work
            request.checkpoint, allow_pickle=request.allow_pickle, family=request.checkpoint_family
        )
        if request.checkpoint_config is not None:
            check_layout(request.checkpoint_config, weights=False)
    repository = request.repository.absolute()
    stages: list[tuple[str, Callable[[dict[str, Any]], None]]] = []
    state: dict[str, Any] = {}
    # The work folder sits beside the staging area, on its filesystem: the ONNX files move into it by rename.
    with (
        staging_area(repository, name) as staging,
        tempfile.TemporaryDirectory(prefix=f"{staging.name}.work-", dir=staging.parent) as work,
    ):
        work_dir = Path(work)
        if request.tiny_size is not None:

            def build(s: dict[str, Any]) -> None:
                from export.published import ARCH_FAMILIES, PUBLISHED_SIZE, build_published_random
                from export.tiny import build_random_pipeline

                if request.tiny_size == PUBLISHED_SIZE:
                    family = ARCH_FAMILIES[request.tiny_arch]
                    s["model_dir"] = build_published_random(work_dir / "diffusers", family, seed=request.tiny_seed)
                else:
                    s["model_dir"] = build_random_pipeline(
                        work_dir / "diffusers",
                        size=request.tiny_size or "tiny",
                        seed=request.tiny_seed,
                        scheduler=request.tiny_scheduler,
                        arch=request.tiny_arch,
                        inpainting=request.tiny_inpainting,
                    )
                what = f"{request.tiny_size} {request.tiny_arch}" + (" inpainting" if request.tiny_inpainting else "")
                scheduler = "" if request.tiny_size == PUBLISHED_SIZE else f", {request.tiny_scheduler}"
                s["source"] = f"random {what} (seed {request.tiny_seed}{scheduler})"

            stages.append((f"build {request.tiny_size} pipeline", build))
        elif request.checkpoint is not None and family is not None:
            checkpoint, checkpoint_config = request.checkpoint, request.checkpoint_config

            def convert(s: dict[str, Any]) -> None:
                from export.checkpoint import convert_checkpoint

                s["model_dir"] = convert_checkpoint(checkpoint, family, checkpoint_config, work_dir / "diffusers")

            state["source"] = str(request.checkpoint)
            stages.append(("convert single file to diffusers", convert))
        else:
            state["model_dir"] = request.model_dir
            state["source"] = str(request.model_dir)

        def load(s: dict[str, Any]) -> None:
            # For ONNX, each module goes to fp32 in its own stage (export_stage); the torch runtime writes fp32.
            s["pipeline"] = load_pipeline(s["model_dir"], as_stored=request.options.served_by != "torch")
            unet_channels(s["pipeline"])  # an unknown UNet input width fails before any export work

        def export_stage(component: str, later: tuple[str, ...]) -> Callable[[dict[str, Any]], None]:
            """Export one component, check it, and release its module's weights when no later component needs
            them (before the check's onnxruntime session loads: export.validate.check_component)."""

            def stage(s: dict[str, Any]) -> None:
                pipeline, module = s["pipeline"], module_of(component)
                to_export_dtype(pipeline, module)
                path = export_component(pipeline, component, work_dir / "onnx", request.lora)
                s.setdefault("onnx", {})[component] = path
                last_use = all(module_of(c) != module for c in later)
                release = (lambda: release_weights(pipeline, module)) if last_use else None
                if request.validate:
                    check = check_component(pipeline, component, path, before_onnx=release)
                    if not check.within_tolerance:
                        raise ExportError(check.describe())
                elif release is not None:
                    release()

            return stage

        plan_label = "plan the ONNX export"

        def plan_components(s: dict[str, Any]) -> None:
            components = pipeline_components(s["pipeline"])
            at = stages.index((plan_label, plan_components)) + 1
            for i, component in enumerate(components):
                label = f"export {component}" + (" and check" if request.validate else "")
                stages.insert(at + i, (label, export_stage(component, components[i + 1 :])))

        def fp16(s: dict[str, Any]) -> None:
            # onnxconverter-common, after pruning to the served outputs (export.tensorrt.convert_fp16): onnxruntime's
            # own converter (onnxruntime.transformers.float16) turned the UNet's Resize scales into fp16, an ONNX
            # model that onnxruntime refuses to load. A `force_upcast` VAE stays fp32, as diffusers runs it
            # (fp16_components).
            from export.tensorrt import convert_fp16

            converted = fp16_components(s["pipeline"], tuple(s["onnx"]))
            for component in converted:
                convert_fp16(s["onnx"][component], set(served_outputs(s["pipeline"], component).values()))

        def write(s: dict[str, Any]) -> None:
            half = request.fp16 or request.options.backend == "tensorrt"  # TensorRT plans are fp16
            vae_dtype = None  # the pipeline's dtype
            if half:  # but a `force_upcast` VAE stays fp32, in the fp16 ONNX and in the plans alike
                vae_half = "vae_decoder" in fp16_components(s["pipeline"], tuple(s["onnx"]))
                vae_dtype = "float16" if vae_half else "float32"
            s["manifest"] = stage_pipeline(
                staging,
                name,
                s["pipeline"],
                s.get("onnx"),  # none for the torch runtime: it serves the modules' weights
                request.options,
                dtype="float16" if half else "float32",
                source=s["source"],
                turbo=request.turbo,
                vae_dtype=vae_dtype,
                lora=request.lora,
            )

        def calibrate(s: dict[str, Any]) -> None:
            from export.calibrate import calibrate as measure_batching

            measure_batching(staging, s["manifest"], request.options.max_batch_size, report=tqdm.write)

        def install(s: dict[str, Any]) -> None:
            install_pipeline(staging, repository, name, pipeline_components(s["pipeline"]))

        stages.append(("load diffusers pipeline", load))
        if request.options.served_by != "torch":  # the torch runtime serves the modules themselves: no ONNX
            # One stage per component, known once the pipeline is loaded: each exported and checked in turn.
            stages.append((plan_label, plan_components))
            # TensorRT plans are fp16: export.tensorrt converts (and prunes) each model's ONNX in the write stage.
            if request.fp16 and request.options.backend != "tensorrt":
                stages.append(("convert to fp16", fp16))
        stages.append(("write Triton models", write))
        if request.calibrate:  # before installing: a polling Triton only ever sees the calibrated config
            stages.append(("calibrate batching", calibrate))
        stages.append(("install into repository", install))
        with tqdm(total=len(stages), desc=f"export {name}", unit="stage", disable=not progress, leave=True) as bar:
            done = 0
            while done < len(stages):  # a stage may add stages (plan_components)
                label, stage = stages[done]
                bar.total = len(stages)
                bar.set_postfix_str(label)
                stage(state)
                done += 1
                bar.update()
    manifest: dict[str, Any] = state["manifest"]
    return manifest
