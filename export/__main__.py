"""`python -m export`: a diffusers folder (or a random-weight `--tiny` one) -> Triton model repository.

Exit codes: 0 done, 2 bad input (missing folder, wrong layout, bad flag, unwritable output), with a one-line
message and the repository left as it was.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from export.errors import ExportError
from export.lora import DEFAULT_LORA_RANK, LoraShape
from export.pipeline import DEFAULT_REPOSITORY, ExportRequest, run_export
from export.published import ARCH_FAMILIES, PUBLISHED_SIZE
from export.repository import BACKENDS, RUNTIMES, ServingOptions
from export.tiny import ARCHS, SCHEDULERS, SIZES

# The scheduler a `--tiny --turbo` pipeline gets unless --scheduler names one: SD-/SDXL-Turbo's own.
TURBO_SCHEDULER = "euler_ancestral"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model-dir", type=Path, help="local diffusers Stable Diffusion 1.x/2.x or SDXL folder (from model_index.json)"
    )
    source.add_argument("--tiny", action="store_true", help="build a random-weight pipeline and export it")
    source.add_argument(
        "--checkpoint",
        type=Path,
        help="a single-file SD 1.x/2.x or SDXL checkpoint in the original layout (.safetensors; .ckpt with "
        "--allow-pickle), read with its family's published configs (SD 1.5, SD 2.1 768-v, SDXL base) or --config's",
    )
    parser.add_argument(
        "--config", type=Path, help="--checkpoint: a diffusers folder with the model's configs and tokenizers instead"
    )
    parser.add_argument(
        "--allow-pickle", action="store_true", help="--checkpoint: read a pickle .ckpt (loading a pickle can run code)"
    )
    parser.add_argument(
        "--size",
        choices=[*sorted(SIZES), PUBLISHED_SIZE],
        default="tiny",
        help="random pipeline size (--tiny); published: the --arch family's published configs (SD 1.5, SD 2.1 "
        "768-v, SDXL base) with their scheduler",
    )
    parser.add_argument("--seed", type=int, default=0, help="weights seed (--tiny)")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None, help="scheduler (--tiny; pndm)")
    parser.add_argument(
        "--arch",
        choices=ARCHS,
        default=None,
        help="random pipeline layout (--tiny; default sd), or a --checkpoint's family when its keys should not decide",
    )
    parser.add_argument(
        "--turbo",
        action="store_true",
        help="a distilled model (SD-/SDXL-Turbo style): turbo defaults; --tiny: trailing euler_ancestral",
    )
    parser.add_argument(
        "--inpainting",
        action="store_true",
        help="--tiny: a dedicated inpainting UNet (9 input channels: latents, mask, masked-image latents); a "
        "--model-dir's is read from its UNet config",
    )
    parser.add_argument("--name", default="imagen-v2", help="API model name served (default: imagen-v2)")
    parser.add_argument("--output", type=Path, default=DEFAULT_REPOSITORY, help="Triton model repository")
    parser.add_argument("--backend", choices=BACKENDS, default="python", help="Triton backend to configure")
    parser.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="onnxruntime",
        help="python backend: what runs the models, onnxruntime (ONNX) or torch (the diffusers modules, no ONNX: "
        "fp16, CUDA graphs and channels-last on CUDA, fp32 on CPU)",
    )
    parser.add_argument(
        "--no-cuda-graphs", action="store_true", help="torch runtime: run the UNet eagerly on CUDA (no CUDA graphs)"
    )
    parser.add_argument("--torch-compile", action="store_true", help="torch runtime: torch.compile the UNet")
    parser.add_argument(
        "--triton-priority-levels",
        action="store_true",
        help="give every dynamic batcher 3 priority levels, so Triton serves a job's calls by its priority across "
        "gateways (off: measured to cost the tiny model 40%% of its throughput on Triton 2.51 on CPU)",
    )
    parser.add_argument("--fp16", action="store_true", help="fp16 ONNX weights and compute (GPU targets)")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument(
        "--max-queue-delay-us", type=int, default=500, help="UNet dynamic batcher queue delay (others: 0)"
    )
    parser.add_argument("--instances", type=int, default=1, help="model instances per component")
    parser.add_argument("--intra-op-threads", type=int, default=0, help="onnxruntime threads (0: its default)")
    arena = parser.add_mutually_exclusive_group()
    arena.add_argument(
        "--no-cpu-mem-arena",
        dest="cpu_mem_arena",
        action="store_false",
        help="python backend: no onnxruntime CPU arena (slower, but gives a batch's peak memory back after each call)",
    )
    arena.add_argument(  # the default now; still accepted for the scripts that asked for it
        "--cpu-mem-arena", dest="cpu_mem_arena", action="store_true", help=argparse.SUPPRESS
    )
    parser.set_defaults(cpu_mem_arena=ServingOptions.cpu_mem_arena)
    parser.add_argument(
        "--mem-pattern",
        action="store_true",
        help="python backend: onnxruntime memory patterns on (off by default: slower and more memory held on CPU)",
    )
    parser.add_argument(
        "--lora-slots",
        type=int,
        default=0,
        help="per-request LoRA: the UNet and text encoders get low-rank branches over this many adapter slots "
        "per model instance (0: none, the graphs as without LoRA)",
    )
    parser.add_argument(
        "--lora-rank", type=int, default=DEFAULT_LORA_RANK, help="--lora-slots: the highest adapter rank served"
    )
    parser.add_argument("--no-validate", action="store_true", help="skip the ONNX-vs-torch check")
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="python backend: time the UNet and the VAE halves on this host at 1, 2, 4, 8 rows (up to "
        "--max-batch-size) and write the batch policy measured into their configs and the manifest",
    )
    parser.add_argument(
        "--trt-cache-dir",
        default=ServingOptions.trt_cache_dir,
        help="TensorRT timing/engine caches as Triton's container sees them (tensorrt, onnxruntime backends)",
    )
    parser.add_argument(
        "--no-ort-tensorrt", action="store_true", help="onnxruntime backend: no TensorRT execution accelerator"
    )
    args = parser.parse_args(argv)
    if not args.tiny and (args.size != "tiny" or args.seed != 0 or args.scheduler is not None):
        parser.error("--size, --seed and --scheduler only apply to --tiny")
    if args.inpainting and not args.tiny:
        parser.error("--inpainting only applies to --tiny (a folder's UNet config says whether it inpaints)")
    if args.inpainting and args.size == PUBLISHED_SIZE:
        parser.error("--inpainting builds the random tiny/small layouts, not --size published")
    if args.model_dir is not None and args.arch is not None:
        parser.error("--arch only applies to --tiny and --checkpoint (a folder's layout is read from model_index.json)")
    if args.checkpoint is None and (args.config is not None or args.allow_pickle):
        parser.error("--config and --allow-pickle only apply to --checkpoint")
    if args.tiny and args.arch is None:
        args.arch = "sd"
    if args.scheduler is None:
        args.scheduler = TURBO_SCHEDULER if args.turbo else "pndm"
    for flag in ("max_batch_size", "instances"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.max_queue_delay_us < 0 or args.intra_op_threads < 0:
        parser.error("--max-queue-delay-us and --intra-op-threads must be >= 0")
    if args.calibrate and args.backend != "python":
        parser.error("--calibrate times the python runner's onnxruntime session: --backend python only")
    if args.runtime == "torch":
        if args.backend != "python":
            parser.error("--runtime torch is the python backend's runner: --backend python only")
        if args.fp16:
            parser.error("--fp16 converts the ONNX weights; the torch runtime computes in fp16 on CUDA by itself")
        if args.calibrate:
            parser.error("--calibrate times onnxruntime sessions; it does not apply to --runtime torch")
    elif args.no_cuda_graphs or args.torch_compile:
        parser.error("--no-cuda-graphs and --torch-compile only apply to --runtime torch")
    if args.lora_slots < 0 or args.lora_rank < 1:
        parser.error("--lora-slots must be >= 0 and --lora-rank >= 1")
    if args.lora_slots and args.backend != "python":
        parser.error(
            "--lora-slots: the LoRA bank lives in the python runner (--backend python, with either --runtime); "
            "see docs/lora.md for TensorRT"
        )
    if not args.trt_cache_dir.startswith("/"):
        parser.error("--trt-cache-dir must be an absolute path (as Triton's container sees it)")
    return args


def peak_rss_gb() -> float:
    """This process's peak resident memory (what an export needs of the host; `/usr/bin/time -v` agrees)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    request = ExportRequest(
        model_dir=args.model_dir,
        checkpoint=args.checkpoint,
        checkpoint_config=args.config,
        allow_pickle=args.allow_pickle,
        tiny_size=args.size if args.tiny else None,
        tiny_seed=args.seed,
        tiny_scheduler=args.scheduler,
        tiny_arch=args.arch if args.tiny else "sd",
        tiny_inpainting=args.inpainting,
        checkpoint_family=ARCH_FAMILIES[args.arch] if args.checkpoint is not None and args.arch else None,
        turbo=args.turbo,
        name=args.name,
        repository=args.output,
        options=ServingOptions(
            backend=args.backend,
            runtime=args.runtime,
            cuda_graphs=not args.no_cuda_graphs,
            torch_compile=args.torch_compile,
            triton_priority_levels=args.triton_priority_levels,
            max_batch_size=args.max_batch_size,
            max_queue_delay_us=args.max_queue_delay_us,
            instances=args.instances,
            intra_op_threads=args.intra_op_threads,
            cpu_mem_arena=args.cpu_mem_arena,
            mem_pattern=args.mem_pattern,
            trt_cache_dir=args.trt_cache_dir,
            ort_tensorrt=not args.no_ort_tensorrt,
        ),
        fp16=args.fp16,
        lora=LoraShape(args.lora_slots, args.lora_rank) if args.lora_slots else None,
        validate=not args.no_validate,
        calibrate=args.calibrate,
    )
    try:
        manifest = run_export(request)
    except ExportError as exc:
        print(f"export: error: {exc}", file=sys.stderr)
        return 2
    kind = (" turbo" if manifest["turbo"] else "") + (" inpainting" if manifest["inpainting"] else "")
    print(
        f"exported {manifest['name']!r} ({manifest['family']}{kind}, "
        f"{manifest['backend']} backend, {manifest['runtime']} runtime, {manifest['dtype']}, "
        f"{manifest['native_resolution']}px native) into {args.output}; peak RSS {peak_rss_gb():.2f} GB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
