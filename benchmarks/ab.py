"""`python -m benchmarks ab --variant NAME:IMAGEN_X=v[,IMAGEN_Y=w] ...`: one gateway setting against another.

Each variant starts the harness's service (Triton + gateway, the tiny model unless `--model`) with those gateway
settings, warms it, and runs closed-loop load at `--concurrency`; variants alternate over `--rounds` rounds
(A B A B ...) so drift on a shared machine hits all of them alike. Per variant it prints the median images/s
and gateway CPU ms per image, with the per-stage CPU, and writes them as JSON (`--output`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks import pinning
from benchmarks.client import LoadGenerator
from benchmarks.config import PORT_BASE, WORK_DIR, Workload
from benchmarks.cpu import ProcessCpu, run_cpu, scrape_stages, subtract
from benchmarks.models import ensure_model
from benchmarks.runner import summarize
from benchmarks.systems.service import Service
from benchmarks.workload import request_body

CPU_BUDGET_SETTING = "IMAGEN_TRITON_CPU_BUDGET"  # e.g. --variant off:IMAGEN_TRITON_CPU_BUDGET=0


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, assignments = text.partition(":")
    env = {}
    for item in filter(None, assignments.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("IMAGEN_"):
            raise argparse.ArgumentTypeError(f"{item!r}: use IMAGEN_NAME=value")
        env[key] = value
    if not name:
        raise argparse.ArgumentTypeError(f"{text!r}: name the variant (NAME:IMAGEN_X=v)")
    return name, env


def measure(args: argparse.Namespace, name: str, env: dict[str, str], loadgen: LoadGenerator) -> dict[str, Any]:
    files = ensure_model(args.model, threads=args.threads, queue_delay_us=500, max_batch=16, root=WORK_DIR)
    body_file = WORK_DIR / args.model / "body-ab.json"
    body_file.write_text(json.dumps(request_body(Workload(steps=args.steps, strength=0.5), files.name)))
    log_dir = WORK_DIR / args.model / "logs-ab"
    log_dir.mkdir(parents=True, exist_ok=True)
    # The harness starts Triton itself: the CPU budget setting goes to its server, not to the gateway.
    budget = env.get(CPU_BUDGET_SETTING)
    with Service(
        files,
        port_base=args.port_base,
        threads=args.threads,
        log_dir=log_dir,
        gateway_env={k: v for k, v in env.items() if k != CPU_BUDGET_SETTING},
        cpu_budget=None if budget is None else int(budget),
    ) as service:
        cpu = ProcessCpu(service.gateway_pid, service.triton_pid, files.triton_models(), loadgen.process.pid)
        c = args.concurrency
        loadgen.run(op="closed", url=service.url, body_file=str(body_file), concurrency=c, requests=2 * c)
        before, stages_before = cpu.snapshot(), scrape_stages(service.base_url)
        run = summarize(
            loadgen.run(op="closed", url=service.url, body_file=str(body_file), concurrency=c, requests=args.requests)
        )
        stages_after, after = scrape_stages(service.base_url), cpu.snapshot()
    figures = run_cpu(
        subtract(after, before),
        subtract(stages_after[0], stages_before[0]),
        stages_after[1] - stages_before[1],
        run["completed"],
    )
    out = {"variant": name, "env": env, "images_per_s": run["images_per_s"], "errors": run["errors"], **figures}
    print(
        f"{name}: {run['images_per_s']:.2f} img/s, gateway {figures['gateway_cpu_ms_per_image']:.1f} ms/image "
        f"({(figures['gateway_cpu_share'] or 0) * 100:.1f} %), errors {run['errors']}",
        flush=True,
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks ab", description=__doc__.splitlines()[0])
    parser.add_argument("--variant", type=parse_variant, action="append", required=True, help="NAME:IMAGEN_X=v,...")
    parser.add_argument("--model", default="tiny", choices=("tiny", "medium"))
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--steps", type=int, default=8, help="steps (strength 0.5)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--port-base", type=int, default=PORT_BASE + 80)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    os.environ.update(pinning.pinned_env(args.threads))
    runs: dict[str, list[dict[str, Any]]] = {}
    with LoadGenerator(args.threads) as loadgen:
        for _ in range(args.rounds):
            for name, env in args.variant:
                runs.setdefault(name, []).append(measure(args, name, env, loadgen))
    summary = {}
    for name, rs in runs.items():
        stages = sorted({s for r in rs for s in r["stage_cpu_ms_per_image"]})
        summary[name] = {
            "images_per_s": statistics.median(r["images_per_s"] for r in rs),
            "gateway_cpu_ms_per_image": statistics.median(r["gateway_cpu_ms_per_image"] for r in rs),
            "gateway_cpu_share": statistics.median(r["gateway_cpu_share"] or 0 for r in rs),
            "stage_cpu_ms_per_image": {
                s: statistics.median(r["stage_cpu_ms_per_image"].get(s, 0.0) for r in rs) for s in stages
            },
        }
        row = summary[name]
        top = sorted(row["stage_cpu_ms_per_image"].items(), key=lambda kv: -kv[1])
        print(
            f"== {name}: {row['images_per_s']:.2f} img/s, gateway {row['gateway_cpu_ms_per_image']:.1f} ms/image "
            f"({row['gateway_cpu_share'] * 100:.1f} %); " + ", ".join(f"{s} {ms:.1f}" for s, ms in top)
        )
    if args.output is not None:
        args.output.write_text(json.dumps({"runs": runs, "summary": summary, "argv": sys.argv}, indent=1))
    return 0
