"""Run every system on every model of a config, in order, one at a time, and collect raw per-run figures."""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import pinning
from benchmarks.client import LoadGenerator
from benchmarks.config import WORK_DIR, BenchConfig, ModelPlan
from benchmarks.cpu import ProcessCpu, run_cpu, scrape_stages, subtract
from benchmarks.flops import flops_per_image, matmul_peak
from benchmarks.models import COMPONENTS, ModelFiles, ensure_model
from benchmarks.systems.limit import Limit
from benchmarks.systems.processes import ServerProcess
from benchmarks.systems.service import Service, diff
from benchmarks.systems.transport import gateway_overhead, identity_probe
from benchmarks.workload import request_body
from gateway.diffusion.sampling import img2img_effective_steps


class Progress:
    """One line per step on stderr: elapsed time, step k/N, what runs, and the last figure."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self.began = time.monotonic()

    def step(self, label: str, detail: str = "") -> None:
        self.done += 1
        self.show(label, detail)

    def show(self, label: str, detail: str = "") -> None:
        if self.enabled:
            elapsed = time.monotonic() - self.began
            width = 24
            filled = int(width * min(self.done, self.total) / max(self.total, 1))
            bar = "#" * filled + "." * (width - filled)
            print(
                f"[{int(elapsed) // 60:02d}:{int(elapsed) % 60:02d}] [{bar}] {self.done}/{self.total} {label}"
                f"{'  ' + detail if detail else ''}",
                flush=True,
            )


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """One load run -> images/s and latency percentiles (seconds)."""
    lat = np.asarray(result["latencies_s"]) if result["latencies_s"] else np.asarray([math.nan])
    return {
        "images_per_s": result["completed"] / result["wall_s"] if result["wall_s"] > 0 else 0.0,
        "p50_s": float(np.percentile(lat, 50)),
        "p95_s": float(np.percentile(lat, 95)),
        "p99_s": float(np.percentile(lat, 99)),
        "completed": result["completed"],
        "errors": result["errors"],
        "error_samples": result.get("error_samples", []),
        "wall_s": result["wall_s"],
        "latencies_s": result["latencies_s"],
        # The machine is shared: the 1-minute load average after each run flags runs disturbed by others.
        "loadavg_1m": os.getloadavg()[0],
    }


def triton_metrics(delta: dict[str, Any], unet_model: str) -> dict[str, Any]:
    unet = delta[unet_model]
    request_ns = sum(s.success_ns for s in delta.values())
    return {
        "mean_unet_batch": unet.inference_count / unet.execution_count if unet.execution_count else None,
        "queue_share": sum(s.queue_ns for s in delta.values()) / request_ns if request_ns else None,
        "unet_queue_share": unet.queue_ns / unet.success_ns if unet.success_ns else None,
        "models": {name: s.as_json() for name, s in delta.items()},
    }


def count_steps(config: BenchConfig) -> int:
    n = 0
    for plan in config.models:
        n += 3  # export check, flops, service start
        repeats = plan.repeats or config.repeats
        n += len(plan.concurrency) * repeats + 1 + 2  # closed runs, poisson, transport
        n += 1  # limit
        n += 2 * (1 + len(plan.peer_concurrency) * repeats) if config.peers else 0  # peers
    return n + 1  # matmul peak


def run_model(
    plan: ModelPlan,
    config: BenchConfig,
    loadgen: LoadGenerator,
    progress: Progress,
    work_dir: Path,
) -> dict[str, Any]:
    threads = config.threads
    files: ModelFiles = ensure_model(
        plan.size,
        threads=threads,
        queue_delay_us=config.max_queue_delay_us,
        max_batch=plan.max_batch_size or config.max_batch_size,
        root=work_dir,
    )
    files.manifest()
    progress.step(f"{plan.size}: models ready", str(files.repository))
    wl = plan.workload
    effective_steps = img2img_effective_steps(wl.steps, wl.strength)
    flops = flops_per_image(files, wl.image_side, effective_steps, wl.guidance_scale > 1.0)
    progress.step(f"{plan.size}: FLOPs counted", f"{flops['total'] / 1e9:.2f} GFLOP/image")
    body_file = work_dir / plan.size / "body.json"
    body_file.write_text(json.dumps(request_body(wl, files.name)))
    log_dir = work_dir / plan.size / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {
        "size": plan.size,
        "model": files.name,
        "plan": {
            "concurrency": plan.concurrency,
            "requests_per_level": plan.requests_per_level,
            "peer_requests": plan.peer_requests,
            "peer_concurrency": plan.peer_concurrency,
        },
        "workload": {**wl.__dict__, "effective_steps": effective_steps},
        "work_shapes": flops["work_shapes"],
        "flops": flops,
        "systems": {},
    }

    def closed(url: str, c: int, n: int) -> dict[str, Any]:
        return loadgen.run(op="closed", url=url, body_file=str(body_file), concurrency=c, requests=n)

    # --- this service -------------------------------------------------------------------------------------
    service_runs: dict[str, list[dict[str, Any]]] = {}
    batches_per_run: list[tuple[str, dict[str, dict[int, int]], int]] = []
    # The limit replays each service run right after it, with the service idle (its processes sleep), so both see
    # the same machine: on a shared host, minutes apart, other work would decide which of the two is faster.
    limit = Limit(files, threads=threads, input_side=wl.image_side, calls=plan.limit_calls or config.limit_calls)
    # The same model work per image for the limit's free-batch schedule: rows per image of each component.
    guided = 2 if wl.guidance_scale > 1.0 else 1
    rows_per_image = {"text_encoder": guided, "vae_encoder": 1, "unet": effective_steps * guided, "vae_decoder": 1}
    limit_runs: dict[str, list[dict[str, Any]]] = {}
    unet_model = f"{files.name}_unet"
    repeats = plan.repeats or config.repeats
    warmup = plan.warmup_requests or config.warmup_requests
    with Service(files, port_base=config.port_base, threads=threads, log_dir=log_dir) as service:
        progress.step(f"{plan.size}: service up", f"gateway {service.url}, triton {service.grpc_url}")
        cpu = ProcessCpu(service.gateway_pid, service.triton_pid, files.triton_models(), loadgen.process.pid)
        for c in plan.concurrency:
            # Warm-up, not counted: c requests (every batch size up to c has run), or the plan's own count.
            closed(service.url, c, max(plan.warmup_requests or max(c, config.warmup_requests), 1))
            for r in range(repeats):
                before, cpu_before, stages_before = service.stats(), cpu.snapshot(), scrape_stages(service.base_url)
                run = summarize(closed(service.url, c, max(plan.requests_per_level, c)))
                stages_after, cpu_after = scrape_stages(service.base_url), cpu.snapshot()
                delta = diff(service.stats(), before)
                run.update(triton_metrics(delta, unet_model))
                run["cpu"] = run_cpu(
                    subtract(cpu_after, cpu_before),
                    subtract(stages_after[0], stages_before[0]),
                    stages_after[1] - stages_before[1],
                    run["completed"],
                )
                run["resident_gib"] = cpu.resident_gib()
                service_runs.setdefault(str(c), []).append(run)
                batches = {comp: delta[f"{files.name}_{comp}"].batches for comp in COMPONENTS}
                batches_per_run.append((str(c), batches, run["completed"]))
                limit_runs.setdefault(str(c), []).append(
                    limit.replay(batches, run["completed"], in_flight=c, rows_per_image=rows_per_image)
                )
                limit.release()
                progress.step(
                    f"{plan.size}: service c={c} repeat {r + 1}/{repeats}",
                    f"{run['images_per_s']:.2f} img/s, p50 {run['p50_s'] * 1e3:.0f} ms, "
                    f"unet batch {run['mean_unet_batch'] or 0:.1f}, gateway CPU "
                    f"{run['cpu']['gateway_cpu_ms_per_image']:.0f} ms/image "
                    f"({(run['cpu']['gateway_cpu_share'] or 0) * 100:.0f} %), errors {run['errors']}; limit "
                    f"{limit_runs[str(c)][-1]['images_per_s'] or 0:.2f} img/s ({limit_runs[str(c)][-1]['schedule']})",
                )
        best = max(statistics.median(r["images_per_s"] for r in runs) for runs in service_runs.values())
        rate = max(best * plan.poisson_rate_fraction, 1e-3)
        before = service.stats()
        poisson = summarize(
            loadgen.run(
                op="open", url=service.url, body_file=str(body_file), rate=rate, requests=plan.poisson_requests, seed=1
            )
        )
        poisson.update(triton_metrics(diff(service.stats(), before), unet_model))
        poisson["rate_per_s"] = rate
        progress.step(
            f"{plan.size}: service open loop {rate:.2f}/s",
            f"{poisson['images_per_s']:.2f} img/s, p99 {poisson['p99_s'] * 1e3:.0f} ms",
        )
        s = flops["work_shapes"]
        unet_floats = 2 * s["channels"] * s["latent_h"] * s["latent_w"] + 2 * s["text_len"] * s["hidden"] + 2
        identity = identity_probe(service, unet_floats, config.transport_calls)
        progress.step(
            f"{plan.size}: identity call direct to Triton",
            f"p50 {identity['client_ms_p50']:.2f} ms, transport p50 {identity['transport_ms_p50']:.2f} ms",
        )
        overhead = gateway_overhead(
            service, loadgen, str(body_file), plan.overhead_requests, fresh=plan.overhead_fresh, warmup=warmup
        )
        progress.step(f"{plan.size}: gateway overhead", f"p50 {overhead['overhead_ms_p50']:.1f} ms per request")
    out["systems"]["service"] = {"closed": service_runs, "open": poisson}
    out["transport"] = {"identity_direct": identity, "gateway": overhead}

    # --- the limit: replayed above, after each service run ----------------------------------------------------
    out["systems"]["limit"] = {
        "closed": limit_runs,
        "batch_timings": {f"{comp}@{b} {setting.label}": t for (comp, b, setting), t in limit.timings.items()},
        "max_batch": limit.max_batch,
    }
    del limit
    progress.step(f"{plan.size}: limit replayed", f"{len(batches_per_run)} runs")

    # --- the peers: one request at a time ------------------------------------------------------------------
    peers = (("torch", "naive", files.diffusers_dir), ("ort", "ort_peer", files.ort_dir)) if config.peers else ()
    for kind, system, model_dir in peers:
        port = config.port_base + 10 + (0 if kind == "torch" else 1)
        with ServerProcess(
            [
                "-m",
                "benchmarks.systems.peer_server",
                "--kind",
                kind,
                "--model-dir",
                str(model_dir),
                "--manifest",
                str(files.manifest_path),
                "--port",
                str(port),
                "--threads",
                str(threads),
            ],
            ready_url=f"http://127.0.0.1:{port}/",
            log=log_dir / f"peer-{kind}.log",
            threads=threads,
        ):
            url = f"http://127.0.0.1:{port}/v1/image-to-image"
            closed(url, 1, max(warmup, 1))
            progress.step(f"{plan.size}: {system} up and warm")
            runs: dict[str, list[dict[str, Any]]] = {}
            for c in plan.peer_concurrency:
                for r in range(repeats):
                    run = summarize(closed(url, c, max(plan.peer_requests, c)))
                    runs.setdefault(str(c), []).append(run)
                    progress.step(
                        f"{plan.size}: {system} c={c} repeat {r + 1}/{repeats}",
                        f"{run['images_per_s']:.2f} img/s, p50 {run['p50_s'] * 1e3:.0f} ms, errors {run['errors']}",
                    )
        out["systems"][system] = {"closed": runs}
    return out


def run(config: BenchConfig, *, work_dir: Path = WORK_DIR, progress: bool = True) -> dict[str, Any]:
    os.environ.update(pinning.pinned_env(config.threads))  # inherited by Triton, the gateway and the peers
    bar = Progress(count_steps(config), enabled=progress)
    began = time.time()
    peak = matmul_peak(config.threads)
    bar.step("large-matmul peak", f"{peak['flops_per_s'] / 1e9:.1f} GFLOP/s")
    results: dict[str, Any] = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(began)),
        "machine": machine_info(),
        "config": config.as_json(),
        "pinning": pinning.record(config.threads),
        "matmul_peak": peak,
        "models": {},
    }
    with LoadGenerator(config.threads) as loadgen:
        for plan in config.models:
            results["models"][plan.size] = run_model(plan, config, loadgen, bar, work_dir)
    results["duration_s"] = time.time() - began
    return results


def machine_info() -> dict[str, Any]:
    import onnxruntime
    import torch

    return {**pinning.host_facts(), "onnxruntime": onnxruntime.__version__, "torch": torch.__version__}
