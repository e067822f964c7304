"""Device check: what step-level batching can reach on one GPU, for an SD 1.5-shaped model, in a few minutes.

Measures, with random weights in diffusers' Stable Diffusion 1.5 shapes (UNet: 320/640/1280/1280 channels, 2
layers per block, 768-wide cross attention; VAE: 128/256/512/512), at 512 px (64x64 latents), fp16, PyTorch's
SDPA attention:

- the UNet at 1, 2, 4, 8 and 16 rows, each row with its own timestep (as Triton's dynamic batcher merges
  requests at different steps): time per call, per row, and the per-row speed-up over one row;
- the VAE decoder at the same batches;
- fp16 against fp32 outputs on the same weights and inputs;
- the exported component (ONNX through onnxruntime's TensorRT or CUDA provider) at the same batches, where
  onnxruntime-gpu is installed; skipped with the reason otherwise.

Needs torch (CUDA build for `--device cuda`) and diffusers (plus its small dependencies); onnx and onnxruntime
for the exported part. Writes one JSON (docs/gpu.md, "GPU device check", explains it), rewritten after
every section, so a run cut short still leaves what it measured. `--tiny --device cpu` runs the same code on toy
sizes in seconds (the test of this script). Stops measuring new batches once `--budget-s` is spent.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROWS = (1, 2, 4, 8, 16)
TEXT_LENGTH = 77
# diffusers' UNet2DConditionModel / AutoencoderKL configs of runwayml/stable-diffusion-v1-5 (the dims only).
SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SD15_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
}
TINY_UNET: dict[str, Any] = {
    **SD15_UNET,
    "sample_size": 8,
    "layers_per_block": 1,
    "block_out_channels": (32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
}
TINY_VAE: dict[str, Any] = {
    **SD15_VAE,
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 16,
}


class Run:
    """The JSON being built, its file, and the time budget."""

    def __init__(self, out: Path, budget_s: float, meta: dict[str, Any]) -> None:
        self.out, self.deadline, self.start = out, time.monotonic() + budget_s, time.monotonic()
        self.result: dict[str, Any] = meta

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        self.result["elapsed_s"] = round(time.monotonic() - self.start, 2)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".partial")
        tmp.write_text(json.dumps(self.result, indent=2) + "\n")
        tmp.replace(self.out)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Any, device: str, warmup: int, iters: int) -> dict[str, float]:
    """Median and min wall time of `fn()` in ms, the device synchronized around each call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) * 1000)
    return {"ms_median": round(statistics.median(samples), 4), "ms_min": round(min(samples), 4), "iters": iters}


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """Per row: ms per row, and the per-row speed-up over one row ((t1 / 1) / (tN / N))."""
    base = next((r["ms_median"] for r in rows if r["rows"] == 1), None)
    for r in rows:
        r["ms_per_row"] = round(r["ms_median"] / r["rows"], 4)
        r["per_row_speedup"] = round(base / r["ms_per_row"], 3) if base else None


def compare(ref: Any, got: Any) -> dict[str, float | int]:
    """fp16 output against the fp32 one: max and mean abs error, the max relative to max |fp32|, non-finite count."""
    import torch

    ref, got = ref.float(), got.float()
    err = (got - ref).abs()
    finite = torch.isfinite(got)
    scale = float(ref.abs().max())
    return {
        "max_abs": float(err[finite].max()) if bool(finite.any()) else float("nan"),
        "mean_abs": float(err[finite].mean()) if bool(finite.any()) else float("nan"),
        "max_abs_fp32": scale,
        "max_rel_to_max": float(err[finite].max()) / scale if scale and bool(finite.any()) else float("nan"),
        "non_finite": int((~finite).sum()),
    }


def unet_inputs(rows: int, latent: int, hidden: int, device: str, dtype: Any, seed: int = 0) -> tuple[Any, ...]:
    import torch

    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(rows, 4, latent, latent, generator=g)
    timestep = torch.linspace(981, 1, rows) if rows > 1 else torch.tensor([500.0])  # one per row, all distinct
    hidden_states = torch.randn(rows, TEXT_LENGTH, hidden, generator=g)
    return sample.to(device, dtype), timestep.to(device, torch.float32), hidden_states.to(device, dtype)


def check_unet(run: Run, args: argparse.Namespace, dtype: Any) -> Any:
    import diffusers
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0

    config = TINY_UNET if args.tiny else SD15_UNET
    torch.manual_seed(0)
    unet32 = diffusers.UNet2DConditionModel(**config).eval()
    unet32.set_attn_processor(AttnProcessor2_0())  # torch's scaled_dot_product_attention
    unet = copy.deepcopy(unet32).to(args.device, dtype)
    latent, hidden = int(config["sample_size"]), int(config["cross_attention_dim"])
    section: dict[str, Any] = {
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "parameters": sum(p.numel() for p in unet.parameters()),
        "dtype": str(dtype).removeprefix("torch."),
        "attention": type(next(iter(unet.attn_processors.values()))).__name__,
        "latent": [latent, latent],
        "rows": [],
    }
    run.result["unet"] = section
    with torch.inference_mode():
        for rows in args.rows:
            if run.left() <= 0:
                section.setdefault("skipped_rows", []).append(rows)
                continue
            feeds = unet_inputs(rows, latent, hidden, args.device, dtype)
            section["rows"].append(
                {"rows": rows, **time_call(lambda f=feeds: unet(*f), args.device, args.warmup, args.iters)}
            )
            add_speedups(section["rows"])
            run.save()
        # Per-sample timesteps: one call of 2 rows equals the 2 rows run one by one (up to fp16 batching noise).
        sample, timestep, states = unet_inputs(2, latent, hidden, args.device, dtype)
        batched = unet(sample, timestep, states).sample
        separate = torch.cat([unet(sample[i : i + 1], timestep[i : i + 1], states[i : i + 1]).sample for i in (0, 1)])
        section["batched_vs_separate_max_abs"] = float((batched.float() - separate.float()).abs().max())
        shared = unet(sample, timestep[:1].expand(2).contiguous(), states).sample
        section["per_sample_timestep_changes_row_1"] = float((shared[1].float() - batched[1].float()).abs().max())
        # fp16 vs fp32, same weights and inputs (fp32 on the same device).
        ref_model = unet32.to(args.device)
        ref = ref_model(*unet_inputs(2, latent, hidden, args.device, torch.float32)).sample
        run.result.setdefault("fp16_vs_fp32", {})["unet"] = compare(ref, batched)
        unet32.to("cpu")
    run.save()
    return unet32


def check_vae_decoder(run: Run, args: argparse.Namespace, dtype: Any) -> None:
    import diffusers
    import torch

    config = TINY_VAE if args.tiny else SD15_VAE
    torch.manual_seed(0)
    vae32 = diffusers.AutoencoderKL(**config).eval()
    vae32.encoder = None  # the decoder is what is measured
    vae = copy.deepcopy(vae32).to(args.device, dtype)
    latent = int(config["sample_size"]) // 2 ** (len(config["block_out_channels"]) - 1)
    section: dict[str, Any] = {
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "dtype": str(dtype).removeprefix("torch."),
        "latent": [latent, latent],
        "rows": [],
    }
    run.result["vae_decoder"] = section
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for rows in args.rows:
            if run.left() <= 0:
                section.setdefault("skipped_rows", []).append(rows)
                continue
            z = torch.randn(rows, 4, latent, latent, generator=g).to(args.device, dtype)
            section["rows"].append(
                {"rows": rows, **time_call(lambda z=z: vae.decode(z), args.device, args.warmup, args.iters)}
            )
            add_speedups(section["rows"])
            run.save()
        z = torch.randn(1, 4, latent, latent, generator=g)
        got = vae.decode(z.to(args.device, dtype)).sample
        ref = vae32.to(args.device).decode(z.to(args.device)).sample
        run.result.setdefault("fp16_vs_fp32", {})["vae_decoder"] = compare(ref, got)
    run.save()


def check_exported(run: Run, args: argparse.Namespace, unet32: Any) -> None:
    """The UNet exported to ONNX, run by onnxruntime with its best provider for the device, at the same rows."""
    section: dict[str, Any] = {"component": "unet", "rows": []}
    run.result["exported"] = section
    try:
        import onnxruntime as ort
        import torch
    except ImportError as exc:
        section.update(status="skipped", reason=f"not installed: {exc.name}")
        return
    available = ort.get_available_providers()
    wanted = (
        ["TensorrtExecutionProvider", "CUDAExecutionProvider"] if args.device == "cuda" else ["CPUExecutionProvider"]
    )
    providers = [p for p in wanted if p in available]
    section["available_providers"] = available
    if not providers:
        section.update(status="skipped", reason=f"onnxruntime {ort.__version__} has none of {wanted}")
        run.save()
        return
    if run.left() <= 0:
        section.update(status="skipped", reason="time budget spent")
        return
    config = TINY_UNET if args.tiny else SD15_UNET
    latent, hidden = int(config["sample_size"]), int(config["cross_attention_dim"])
    model = unet32.to("cpu").float() if args.device == "cpu" else copy.deepcopy(unet32).to(args.device).half()
    dtype = torch.float32 if args.device == "cpu" else torch.float16
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "unet.onnx"
        example = unet_inputs(2, latent, hidden, args.device, dtype)
        names = ["sample", "timestep", "encoder_hidden_states"]
        torch.onnx.export(
            model,
            example,
            str(path),
            input_names=names,
            output_names=["out_sample"],
            dynamic_axes={n: {0: "rows"} for n in [*names, "out_sample"]},
            opset_version=17,
            dynamo=False,
        )
        options: list[dict[str, str]] = [
            {"trt_fp16_enable": "1", "trt_engine_cache_enable": "1", "trt_engine_cache_path": tmp}
            if p == "TensorrtExecutionProvider"
            else {}
            for p in providers
        ]
        session = ort.InferenceSession(str(path), providers=providers, provider_options=options)
        section.update(status="ok", providers=session.get_providers(), dtype=str(dtype).removeprefix("torch."))
        with torch.inference_mode():
            for rows in args.rows:
                if run.left() <= 0:
                    section.setdefault("skipped_rows", []).append(rows)
                    continue
                feeds = {
                    n: t.cpu().numpy()
                    for n, t in zip(names, unet_inputs(rows, latent, hidden, "cpu", dtype), strict=True)
                }
                timing = time_call(lambda f=feeds: session.run(None, f), "cpu", args.warmup, args.iters)
                section["rows"].append({"rows": rows, **timing})
                add_speedups(section["rows"])
                run.save()
    run.save()


def environment(device: str) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "device": device}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env |= {
            "gpu": props.name,
            "compute_capability": f"{props.major}.{props.minor}",
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),  # type: ignore[no-untyped-call]
        }
    else:
        env["cpu"] = platform.processor() or platform.machine()
    for module in ("diffusers", "transformers", "huggingface_hub", "numpy", "onnx", "onnxruntime", "tensorrt"):
        try:
            env[module] = __import__(module).__version__
        except ImportError:
            env[module] = None
    return env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (the CPU test of this script)")
    parser.add_argument("--out", type=Path, default=Path("gpu-check.json"))
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="batches to time, in UNet rows")
    parser.add_argument("--iters", type=int, default=10, help="timed calls per batch (after warm-up)")
    parser.add_argument("--warmup", type=int, help="untimed calls per batch first (default 3, --tiny 1)")
    parser.add_argument("--budget-s", type=float, default=360, help="stop timing new batches after this")
    parser.add_argument("--no-export", action="store_true", help="skip the exported-component part")
    args = parser.parse_args(argv)
    args.rows = [int(r) for r in args.rows.split(",")]
    if args.warmup is None:
        args.warmup = 1 if args.tiny else 3
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device visible to torch", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references stay fp32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    dtype = torch.float16
    meta = {
        "check": "gpu-check",
        "version": 1,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017 - Python 3.10 too
        "tiny": args.tiny,
        "environment": environment(args.device),
    }
    run = Run(args.out, args.budget_s, meta)
    run.save()
    unet32 = check_unet(run, args, dtype)
    check_vae_decoder(run, args, dtype)
    if args.no_export:
        run.result["exported"] = {"status": "skipped", "reason": "--no-export"}
    else:
        check_exported(run, args, unet32)
    run.save()
    print(json.dumps({k: run.result[k] for k in ("unet", "vae_decoder") if k in run.result}, indent=1)[:4000])
    print(f"gpu_check: wrote {args.out} in {run.result['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
