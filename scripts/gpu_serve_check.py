"""Device run (issue 19): the torch runtime served through Triton on one GPU, against diffusers at batch 1.

On the lent GPU machine (scripts/gpu-serve-check.sh installs the carried wheels first), in a few minutes:

1. build an SD 1.5-shaped random-weight pipeline (the published configs, `export.tiny` size `sd15`; `--tiny`: the
   test model) and export it with `--runtime torch` (no ONNX);
2. start the bundled Triton on it, every model on the GPU (fp16, CUDA graphs for the UNet), and call each
   component once;
3. drive the UNet through Triton as the gateway does, one guided step (2 rows) per call with its own timestep,
   from 1, 4, 16 and 32 concurrent images, each at its own point of a STEPS-step schedule: images/s, per-step
   latency, and the batch sizes Triton formed;
4. run the same work through diffusers' own pipeline at batch 1 (prompt embeddings given, latents out: the UNet
   loop and its scheduler);
5. write one JSON: the levels, service/diffusers at each, and the fraction of the GPU's dense fp16 peak the UNet
   reached (FLOPs of one row counted by torch's FlopCounterMode at the size served).

The JSON is rewritten after every stage, so a run cut short leaves what it measured. If Triton cannot start, the
JSON says why and the run times the torch runtime's batched execution directly instead (`direct`). `--device cpu
--tiny` runs the same code here in a minute: the test of this script (tests/integration/test_gpu_serve_check.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "model_repository" / "python_backend"))

import torch_runtime  # noqa: E402 - the runner's module, as the export copies it beside model.py
from gpu_check import Run, environment  # noqa: E402 - scripts/ is not a package

LEVELS = (1, 4, 16, 32)
# Denoising steps per image (the UNet calls of one image); an image's rows are its guided pair.
STEPS = 20
GUIDED_ROWS = 2
GUIDANCE_SCALE = 7.5
# How long each concurrency level is measured, after one untimed round of steps (seconds).
LEVEL_S = {"cuda": 10.0, "cpu": 2.0}
# The dynamic loader's words (in Triton's log) when a Python-backend stub cannot start: libpython not found, say.
STUB_LOAD_ERROR = "error while loading shared libraries"
# Dense fp16 tensor-core peak by GPU name (the vendors' datasheets; SXM unless named), TFLOP/s.
FP16_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0}


def fp16_peak(name: str) -> float | None:
    """TFLOP/s for a GPU name, the most specific entry first; None for an unknown one (or a CPU)."""
    for key in sorted(FP16_PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return FP16_PEAK_TFLOPS[key]
    return None


class HttpTriton:
    """Triton's HTTP/REST inference with the binary tensor extension, over httpx: the driver where the gateway's
    gRPC client (tritonclient) is not installed. Same `infer` as gateway.triton.client.TritonEngine."""

    DATATYPES: ClassVar[dict[np.dtype[Any], str]] = {
        np.dtype(np.float32): "FP32",
        np.dtype(np.float16): "FP16",
        np.dtype(np.int64): "INT64",
    }
    DTYPES: ClassVar[dict[str, np.dtype[Any]]] = {name: dtype for dtype, name in DATATYPES.items()}

    def __init__(self, url: str, timeout_s: float) -> None:
        import httpx

        self.client = httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=httpx.Limits(max_connections=64))

    async def infer(
        self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        arrays = {name: np.ascontiguousarray(a) for name, a in inputs.items()}
        header = {
            "inputs": [
                {
                    "name": name,
                    "shape": list(a.shape),
                    "datatype": self.DATATYPES[a.dtype],
                    "parameters": {"binary_data_size": a.nbytes},
                }
                for name, a in arrays.items()
            ],
            "outputs": [{"name": name, "parameters": {"binary_data": True}} for name in outputs],
        }
        head = json.dumps(header).encode()
        response = await self.client.post(
            f"/v2/models/{model}/infer",
            content=head + b"".join(a.tobytes() for a in arrays.values()),
            headers={"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"},
        )
        if response.status_code != 200:
            raise RuntimeError(f"{model}: HTTP {response.status_code}: {response.text[:300]}")
        body = response.content
        size = int(response.headers.get("Inference-Header-Content-Length", len(body)))
        meta, offset, result = json.loads(body[:size]), size, {}
        for out in meta["outputs"]:
            length = int(out["parameters"]["binary_data_size"])
            dtype = self.DTYPES[out["datatype"]]
            result[out["name"]] = np.frombuffer(body[offset : offset + length], dtype=dtype).reshape(out["shape"])
            offset += length
        return result

    async def close(self) -> None:
        await self.client.aclose()


def make_client(server: Any, choice: str, timeout_s: float) -> tuple[Any, str]:
    """The gateway's own gRPC client where its dependencies are installed (`auto`, `gateway`), else HTTP."""
    if choice in ("auto", "gateway"):
        try:
            from gateway.triton.client import TritonEngine

            return TritonEngine(server.grpc_url, timeout_s=timeout_s), "gateway (gRPC)"
        except ImportError as exc:
            if choice == "gateway":
                raise
            return HttpTriton(server.http_url, timeout_s), f"http (the gateway's client needs {exc.name})"
    return HttpTriton(server.http_url, timeout_s), "http"


def unet_rows(manifest: Mapping[str, Any], latent: int, timestep: float, rng: np.random.Generator) -> dict[str, Any]:
    """One guided step's UNet inputs as the gateway sends them: 2 rows, one timestep each ([2, 1])."""
    arrays: dict[str, np.ndarray] = {}
    for name, spec in manifest["components"]["unet"]["inputs"].items():
        if name == "timestep":
            arrays[name] = np.full((GUIDED_ROWS, 1), timestep, dtype=np.float32)
            continue
        shape = [GUIDED_ROWS] + [latent if d == -1 else d for d in spec["shape"][1:]]
        arrays[name] = rng.standard_normal(shape).astype(np.float32)
    return arrays


def batch_counts(stats: Mapping[str, Any]) -> dict[int, int]:
    """Executions by batch size (rows) from Triton's model statistics."""
    model = stats["model_stats"][0]
    return {int(b["batch_size"]): int(b["compute_infer"].get("count", 0)) for b in model.get("batch_stats", [])}


async def drive_level(
    client: Any, model: str, manifest: Mapping[str, Any], latent: int, concurrency: int, seconds: float
) -> dict[str, Any]:
    """`concurrency` images stepping through the UNet at once for `seconds` (after one untimed round)."""
    timesteps = np.linspace(999, 1, STEPS)
    rng = np.random.default_rng(concurrency)
    feeds = [unet_rows(manifest, latent, 0.0, rng) for _ in range(concurrency)]
    latencies: list[float] = []
    steps_done = 0
    stop = 0.0

    async def image(k: int, timed: bool) -> None:
        nonlocal steps_done
        step = (k * STEPS) // concurrency  # each image at its own point of the schedule: its own timestep
        while True:
            feed = dict(feeds[k], timestep=np.full((GUIDED_ROWS, 1), timesteps[step % STEPS], dtype=np.float32))
            t0 = time.perf_counter()
            await client.infer(model, feed, ["out_sample"])
            if not timed:
                return
            # A step that ends after `stop` counts too: the level's time runs until the last one ends (a step
            # longer than the window, as on a loaded CPU, would otherwise leave the level with no steps at all).
            latencies.append(time.perf_counter() - t0)
            steps_done += 1
            step += 1
            if time.perf_counter() > stop:
                return

    await asyncio.gather(*(image(k, timed=False) for k in range(concurrency)))  # warm: connections, graphs
    stop = time.perf_counter() + seconds
    start = time.perf_counter()
    await asyncio.gather(*(image(k, timed=True) for k in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {
        "concurrency": concurrency,
        "seconds": round(elapsed, 3),
        "unet_calls": steps_done,
        "images_per_s": round(steps_done / STEPS / elapsed, 4),
        "rows_per_s": round(steps_done * GUIDED_ROWS / elapsed, 2),
        "step_ms_median": round(1000 * statistics.median(latencies), 3) if latencies else None,
        "step_ms_p90": round(1000 * float(np.percentile(latencies, 90)), 3) if latencies else None,
    }


def unet_flops_per_row(unet: Any, latent: int, device: str, dtype: Any) -> float:
    """FLOPs of one UNet row at `latent` (torch's FlopCounterMode: matmuls, convolutions, attention)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    config = unet.config
    sample = torch.randn(1, int(config.in_channels), latent, latent, device=device, dtype=dtype)
    states = torch.randn(1, 77, int(config.cross_attention_dim), device=device, dtype=dtype)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        unet(sample, torch.tensor([500.0], device=device), states)
    return float(counter.get_total_flops())


def diffusers_baseline(model_dir: Path, args: argparse.Namespace, latent: int, run: Run) -> dict[str, Any]:
    """The same work through diffusers' own pipeline at batch 1: STEPS guided UNet steps an image (prompt
    embeddings given, latents out, so the text encoder and the VAE are not in the time)."""
    import diffusers
    import torch

    dtype = torch.float16 if args.device == "cuda" else torch.float32
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        model_dir, safety_checker=None, feature_extractor=None, requires_safety_checker=False, torch_dtype=dtype
    ).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    hidden = int(pipe.text_encoder.config.hidden_size)
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 77, hidden, generator=g).to(args.device, dtype)
    negative = torch.randn(1, 77, hidden, generator=g).to(args.device, dtype)
    size = latent * pipe.vae_scale_factor

    def one() -> None:
        pipe(
            prompt_embeds=embeds,
            negative_prompt_embeds=negative,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE_SCALE,
            height=size,
            width=size,
            output_type="latent",
        )
        if args.device == "cuda":
            torch.cuda.synchronize()

    one()  # warm-up: kernels picked, memory pooled
    times: list[float] = []
    deadline = time.perf_counter() + LEVEL_S[args.device]
    while time.perf_counter() < deadline or len(times) < 2:
        t0 = time.perf_counter()
        one()
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    flops = unet_flops_per_row(pipe.unet, latent, args.device, dtype)
    attention = type(next(iter(pipe.unet.attn_processors.values()))).__name__
    run.result["unet_flops_per_row"] = flops
    return {
        "batch": 1,
        "images": len(times),
        "images_per_s": round(1 / seconds, 4),
        "step_ms_median": round(1000 * seconds / STEPS, 3),
        "dtype": str(dtype).removeprefix("torch."),
        "attention": attention,
    }


def direct_levels(repo: Path, manifest: Mapping[str, Any], args: argparse.Namespace, latent: int) -> list[Any]:
    """Triton could not serve: the torch runtime's UNet timed directly, each level as one batch of all its
    images' rows (what a perfect dynamic batcher would form), per-sample timesteps, CUDA graphs as served."""
    import torch

    version = repo / manifest["components"]["unet"]["model"] / "1"
    kind = "GPU" if args.device == "cuda" else "CPU"
    params = {"component": "unet", "cuda_graphs": "1"}
    settings = torch_runtime.TorchSettings.of(params, kind, "0", GUIDED_ROWS * max(args.levels))
    component = torch_runtime.TorchComponent(settings, version / torch_runtime.WEIGHTS_DIR, ["out_sample"])
    rng = np.random.default_rng(0)
    levels = []
    for concurrency in args.levels:
        rows = [unet_rows(manifest, latent, float(t), rng) for t in np.linspace(999, 1, concurrency)]
        feeds = {name: torch.from_numpy(np.concatenate([r[name] for r in rows])) for name in rows[0]}
        component.run(feeds)  # capture
        times: list[float] = []
        deadline = time.perf_counter() + LEVEL_S[args.device]
        while time.perf_counter() < deadline or len(times) < 3:
            t0 = time.perf_counter()
            component.run(feeds)
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        seconds = statistics.median(times)
        levels.append(
            {
                "concurrency": concurrency,
                "images_per_s": round(concurrency / STEPS / seconds, 4),
                "rows_per_s": round(concurrency * GUIDED_ROWS / seconds, 2),
                "step_ms_median": round(1000 * seconds, 3),
                "batch_rows": concurrency * GUIDED_ROWS,
            }
        )
    return levels


def summarize(run: Run, device_name: str | None) -> None:
    """service/diffusers at each level and the UNet's fraction of the fp16 peak (where both are known)."""
    result = run.result
    base = (result.get("diffusers") or {}).get("images_per_s")
    flops = result.get("unet_flops_per_row")
    peak = fp16_peak(device_name or "")
    result["fp16_peak_tflops"] = peak
    levels = (result.get("service") or {}).get("levels") or (result.get("direct") or {}).get("levels") or []
    for level in levels:
        level["service_over_diffusers"] = round(level["images_per_s"] / base, 3) if base else None
        achieved = level["rows_per_s"] * flops if flops else None
        level["unet_tflops"] = round(achieved / 1e12, 2) if achieved else None
        level["fraction_of_fp16_peak"] = round(achieved / (peak * 1e12), 4) if achieved and peak else None
    result["summary"] = {
        str(level["concurrency"]): {
            k: level.get(k)
            for k in ("images_per_s", "step_ms_median", "service_over_diffusers", "fraction_of_fp16_peak")
        }
        for level in levels
    }


async def serve_levels(server: Any, manifest: Mapping[str, Any], args: argparse.Namespace, run: Run) -> None:
    """Stages 2 and 3 through the started Triton: each component once, the UNet's captures, then the levels."""
    client, kind = make_client(server, args.client, timeout_s=120.0)
    section: dict[str, Any] = {"client": kind, "levels": []}
    run.result["service"] = section
    latent = run.result["latent"]
    try:
        components = {}
        rng = np.random.default_rng(0)
        for component, spec in manifest["components"].items():
            inputs = {}
            for name, tensor in spec["inputs"].items():
                size = latent * manifest["vae_scale_factor"] if component == "vae_encoder" else latent
                shape = [1] + [size if d == -1 else d for d in tensor["shape"][1:]]
                if name == "timestep":
                    shape = [1, 1]
                dtype = np.int64 if tensor["datatype"] == "INT64" else np.float32
                inputs[name] = (
                    np.ones(shape, dtype=dtype) if dtype == np.int64 else rng.standard_normal(shape).astype(dtype)
                )
            outputs = [t["name"] for t in spec["outputs"].values()]
            t0 = time.perf_counter()
            result = await client.infer(spec["model"], inputs, outputs)
            components[component] = {
                "first_call_ms": round(1000 * (time.perf_counter() - t0), 2),
                "outputs": {name: list(result[name].shape) for name in outputs},
                "finite": bool(all(np.isfinite(result[name]).all() for name in outputs)),
            }
        section["components"] = components
        run.save()
        model = manifest["components"]["unet"]["model"]
        # One call at each batch size the runtime captures a CUDA graph for, so no level pays for a capture.
        warm = {}
        for rows in torch_runtime.graph_batches(int(manifest["components"]["unet"]["max_batch_size"])):
            pairs = [unet_rows(manifest, latent, float(t), rng) for t in np.linspace(999, 1, max(1, rows // 2))]
            feed = {name: np.concatenate([p[name] for p in pairs])[:rows] for name in pairs[0]}
            t0 = time.perf_counter()
            await client.infer(model, feed, ["out_sample"])
            warm[str(rows)] = round(1000 * (time.perf_counter() - t0), 2)
        section["first_call_ms_by_rows"] = warm
        run.save()
        for concurrency in args.levels:
            if run.left() <= 0:
                section.setdefault("skipped_levels", []).append(concurrency)
                continue
            before = batch_counts(await asyncio.to_thread(_stats, server, model))
            level = await drive_level(client, model, manifest, latent, concurrency, LEVEL_S[args.device])
            after = batch_counts(await asyncio.to_thread(_stats, server, model))
            formed = {b: after.get(b, 0) - before.get(b, 0) for b in sorted(after)}
            level["batches_formed"] = {str(b): n for b, n in formed.items() if n > 0}
            executions = sum(formed.values())
            level["mean_batch_rows"] = (
                round(sum(b * n for b, n in formed.items()) / executions, 2) if executions else None
            )
            section["levels"].append(level)
            run.save()
    finally:
        await client.close()


def runtime_lines(log_file: Path | None) -> list[str]:
    """The torch runtime's lines in Triton's log: each instance's device, dtype and graphs, and any fallback."""
    if log_file is None or not log_file.is_file():
        return []
    lines = log_file.read_text(errors="replace").splitlines()
    # Triton quotes each message ('I1207 ... model.py:104] "imagen torch runtime: ..."'): the closing quote goes.
    prefix = torch_runtime.LOG_PREFIX
    return [line.split(prefix, 1)[1].strip().removesuffix('"') for line in lines if prefix in line]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def unavailable_models(server: Any) -> dict[str, str]:
    """Models Triton could not load, with its reason (POST /v2/repository/index: state UNAVAILABLE)."""
    import urllib.request

    url = f"{server.http_url}/v2/repository/index"
    request = urllib.request.Request(url, data=b"{}", method="POST")  # noqa: S310 - our loopback Triton
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        index: list[dict[str, Any]] = json.loads(response.read())
    return {m["name"]: str(m.get("reason", "")) for m in index if m.get("state") == "UNAVAILABLE"}


def wait_models(server: Any, models: list[str], timeout_s: float, log_file: Path) -> None:
    """server.wait_ready, ended as soon as the wait cannot succeed: a Python-backend stub that cannot start (a library
    it links missing, libpython among them: Triton then waits on the dead stub for minutes, never live) or a model
    Triton could not load (with --exit-on-error=false it goes live without it)."""
    from gateway.triton.server import TritonStartError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            server.wait_ready(models, timeout_s=min(2.0, max(0.0, deadline - time.monotonic())))
            return
        except TritonStartError:
            if server.process is None or server.process.poll() is not None:
                raise
        log = log_file.read_text(errors="replace") if log_file.is_file() else ""
        broken = [line.strip() for line in log.splitlines() if STUB_LOAD_ERROR in line]
        if broken:
            raise TritonStartError(f"a Python-backend stub cannot start: {broken[0]}")
        if server.is_live():  # live: the repository's load is over, so UNAVAILABLE is final
            failed = {name: reason for name, reason in unavailable_models(server).items() if name in models}
            if failed:
                raise TritonStartError("; ".join(f"{name}: {reason[:500]}" for name, reason in failed.items()))
        if time.monotonic() >= deadline:
            pending = [name for name in models if not server.model_ready(name)]
            raise TritonStartError(f"tritonserver not ready after {timeout_s:.0f} s; waiting for {pending}")


def _stats(server: Any, model: str) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(f"{server.http_url}/v2/models/{model}/stats", timeout=10) as response:  # noqa: S310
        stats: dict[str, Any] = json.loads(response.read())
    return stats


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the test model (the CPU test of this script)")
    parser.add_argument("--out", type=Path, default=Path("gpu-serve-check.json"))
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)), help="concurrent images to drive")
    parser.add_argument("--budget-s", type=float, default=240, help="start no new level after this")
    parser.add_argument("--client", choices=("auto", "gateway", "http"), default="auto")
    parser.add_argument("--workdir", type=Path, help="keep the pipeline, repository and Triton log here")
    parser.add_argument("--carried", type=Path, help="a JSON of the carried wheels' sizes (from the .sh)")
    parser.add_argument("--no-triton", action="store_true", help="time the runtime directly (the fallback)")
    args = parser.parse_args(argv)
    args.levels = [int(level) for level in args.levels.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_serve_check: error: no CUDA device visible to torch", file=sys.stderr)
        return 2
    from datetime import UTC, datetime

    meta: dict[str, Any] = {
        "check": "gpu-serve-check",
        "version": 1,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "tiny": args.tiny,
        "steps_per_image": STEPS,
        "rows_per_step": GUIDED_ROWS,
        "levels": args.levels,
        "environment": environment(args.device),
        "carried": json.loads(args.carried.read_text()) if args.carried and args.carried.is_file() else None,
        "stages": {},
    }
    run = Run(args.out, args.budget_s, meta)
    run.save()
    with tempfile.TemporaryDirectory(prefix="gpu-serve-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        return _run(run, args, work)


def _stage(run: Run, name: str, t0: float) -> None:
    run.result["stages"][name] = round(time.monotonic() - t0, 2)
    run.save()


def _run(run: Run, args: argparse.Namespace, work: Path) -> int:
    from export.pipeline import ExportRequest, run_export
    from export.repository import ServingOptions
    from export.tiny import build_random_pipeline
    from gateway.triton.server import TritonNotFound, TritonServer, TritonStartError

    t0 = time.monotonic()
    model_dir = build_random_pipeline(work / "diffusers", size="tiny" if args.tiny else "sd15", seed=0)
    _stage(run, "build_s", t0)
    t0 = time.monotonic()
    repo = work / "models"
    options = ServingOptions(runtime="torch", max_batch_size=GUIDED_ROWS * max(args.levels), max_queue_delay_us=2000)
    manifest = run_export(
        ExportRequest(model_dir=model_dir, repository=repo, name="gpu", options=options), progress=False
    )
    run.result["latent"] = int(manifest["native_resolution"]) // int(manifest["vae_scale_factor"])
    run.result["resolution"] = int(manifest["native_resolution"])
    _stage(run, "export_s", t0)
    device_name = run.result["environment"].get("gpu")
    triton: dict[str, Any] = {"status": "not started"}
    run.result["triton"] = triton
    server = None
    if args.no_triton:
        triton.update(status="skipped", reason="--no-triton")
    else:
        t0 = time.monotonic()
        log_file = work / "tritonserver.log"
        server = TritonServer(
            repo,
            http_port=free_port(),
            grpc_port=free_port(),
            metrics_port=free_port(),
            python_env=Path(sys.prefix),
            log_file=log_file,
        )
        try:
            server.start()
            models = [c["model"] for c in manifest["components"].values()]
            wait_models(server, models, max(60.0, run.left()), log_file)
            triton.update(status="ready", models=len(manifest["components"]), instances=runtime_lines(log_file))
        except (TritonNotFound, TritonStartError, OSError) as exc:
            tail = log_file.read_text(errors="replace").splitlines()[-15:] if log_file.is_file() else []
            triton.update(status="failed", reason=f"{type(exc).__name__}: {exc}", log_tail=tail)
            server.stop()
            server = None
        _stage(run, "triton_start_s", t0)
    try:
        if server is not None:
            t0 = time.monotonic()
            asyncio.run(serve_levels(server, manifest, args, run))
            _stage(run, "service_s", t0)
    except Exception as exc:  # the run still writes what it has, and says what broke
        run.result["service_error"] = f"{type(exc).__name__}: {exc}"
        run.save()
    finally:
        if server is not None:
            triton["instances"] = runtime_lines(server.log_file)  # with any "CUDA graphs off" of the levels
            server.stop()
    if server is None or not (run.result.get("service") or {}).get("levels"):
        t0 = time.monotonic()
        run.result["direct"] = {"why": triton.get("reason") or run.result.get("service_error")}
        run.result["direct"]["levels"] = direct_levels(repo, manifest, args, run.result["latent"])
        _stage(run, "direct_s", t0)
    t0 = time.monotonic()  # the baseline runs even past the budget: without it there is no ratio
    run.result["diffusers"] = diffusers_baseline(model_dir, args, run.result["latent"], run)
    _stage(run, "diffusers_s", t0)
    summarize(run, device_name)
    run.save()
    print(json.dumps(run.result["summary"], indent=1))
    print(f"gpu_serve_check: wrote {args.out} in {run.result['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
