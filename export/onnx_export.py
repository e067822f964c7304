"""ONNX export of the pipeline components (four for SD 1.x/2.x, five for SDXL) through optimum's exporter.

optimum does the job for the text encoder and the VAE halves. For the UNet we keep optimum but swap its ONNX
config: optimum declares `timestep` as a rank-0 scalar, so every sample of a batch must share one denoising step.
We declare it `[batch]` (per-sample), which lets Triton's dynamic batcher merge UNet calls of requests that are at
different steps. Names and layout stay optimum's, so the folder also loads in `ORTStableDiffusionImg2ImgPipeline`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from export.errors import ExportError

COMPONENTS: tuple[str, ...] = ("text_encoder", "vae_encoder", "unet", "vae_decoder")
# SDXL adds its second text encoder; a refiner has only that one (no `text_encoder`).
SDXL_COMPONENTS: tuple[str, ...] = ("text_encoder", "text_encoder_2", "vae_encoder", "unet", "vae_decoder")
VAE_COMPONENTS: tuple[str, ...] = ("vae_encoder", "vae_decoder")
ONNX_OPSET = 17


def is_sdxl(pipeline: Any) -> bool:
    return getattr(pipeline, "text_encoder_2", None) is not None


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


def load_pipeline(model_dir: Path) -> Any:
    """Load a local diffusers img2img pipeline (no hub access, no safety checker), SDXL when the folder is one."""
    import diffusers

    from export.layout import detect_family

    try:
        if detect_family(model_dir) == "sdxl":
            return diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(
                model_dir, add_watermarker=False, local_files_only=True
            )
        return diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(
            model_dir,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            local_files_only=True,
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"cannot load the diffusers pipeline in {model_dir}: {exc}") from exc


def export_onnx(pipeline: Any, out_dir: Path) -> dict[str, Path]:
    """Export the components (fp32) into `out_dir/<component>/model.onnx`; returns their paths."""
    from optimum.exporters.onnx import onnx_export_from_model
    from optimum.exporters.utils import _get_submodels_for_export_diffusion

    # optimum adds SDXL's facts (aesthetic score, projection width) to the UNet config while it collects the
    # submodels; our UNet config must see them too, so collect first.
    _get_submodels_for_export_diffusion(pipeline)

    onnx_export_from_model(
        pipeline,
        out_dir,
        task="image-to-image",
        opset=ONNX_OPSET,
        custom_onnx_configs={"unet": _per_sample_unet_config(pipeline.unet.config, "fp32")},
        # We validate ourselves (export.validate), against the same torch modules, with stated tolerances.
        do_validation=False,
    )
    paths = {name: out_dir / name / "model.onnx" for name in pipeline_components(pipeline)}
    missing = [name for name, path in paths.items() if not path.is_file()]
    if missing:
        raise ExportError(f"the ONNX export produced no model for: {', '.join(missing)}")
    return paths


def fp16_components(pipeline: Any, components: tuple[str, ...]) -> tuple[str, ...]:
    """The components converted by `--fp16`: for SDXL, all but the VAE when its config says `force_upcast`
    (SDXL's VAE overflows in fp16; diffusers' SDXL pipelines then run it in fp32, and so do we: its two halves
    stay fp32). SD's pipelines ignore `force_upcast` (AutoencoderKL's default is True), so SD converts all."""
    if is_sdxl(pipeline) and pipeline.vae.config.get("force_upcast", False):
        return tuple(c for c in components if c not in VAE_COMPONENTS)
    return components


def copy_component(src: Path, dst_dir: Path) -> Path:
    """Copy one exported `model.onnx` (and its external-data file, if any) into `dst_dir`."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    for file in src.parent.iterdir():
        if file.name == src.name or file.name.startswith(src.name + "_data") or file.suffix == ".data":
            shutil.copy2(file, dst_dir / file.name)
    return dst_dir / src.name
