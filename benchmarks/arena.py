"""`python -m benchmarks arena --onnx UNET.onnx`: onnxruntime's CPU memory options on one UNet, time and memory.

Each option runs in a fresh process (so its resident memory is its own): one session with the service's settings
(intra-op threads, inter-op 1, no spinning), then for each batch size a warm-up call and `--calls` timed calls.
Per option it reports seconds per row at each batch size, the resident memory after the largest batch (what a
Triton stub keeps between calls) and the peak. The options, each a documented onnxruntime setting:

  off        no CPU arena: every call's activations are returned to the system allocator after the call;
  on         the arena (onnxruntime's default): the largest call's peak stays reserved for the process's life;
  on-shrink  the arena, shrunk after every call (run option `memory.enable_memory_arena_shrinkage`);
  on-same    the arena growing by exactly what is asked (`arena_extend_strategy` kSameAsRequested), not by powers
             of two;
  on-nopattern  the arena without memory patterns (`enable_mem_pattern` off): no per-shape pre-planned block.

Results (median per-row seconds, GiB) go to stdout as a table and to `--output` as JSON (docs/benchmarks.md
"CPU memory: the arena" has the committed figures).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

OPTIONS = ("off", "on", "on-shrink", "on-same", "on-nopattern")
GIB = 2**30
KIB_PER_GIB = 2**20  # ru_maxrss is in KiB on Linux
SAME_AS_REQUESTED = 1  # OrtArenaCfg's arena_extend_strategy: 0 kNextPowerOfTwo, 1 kSameAsRequested
ORT_DEFAULT = -1  # OrtArenaCfg: keep onnxruntime's default for this field
TEXT_LENGTH = 77  # CLIP's token window


def measure(onnx: Path, option: str, threads: int, batches: list[int], calls: int, latent: int) -> dict[str, Any]:
    """One option in this process (the caller runs it in a fresh one)."""
    import numpy as np
    import onnxruntime as ort
    import psutil

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_cpu_mem_arena = option != "off"
    run_options = None
    if option == "on-nopattern":
        options.enable_mem_pattern = False
    if option == "on-shrink":
        run_options = ort.RunOptions()
        run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    if option == "on-same":
        config = ort.OrtArenaCfg(0, SAME_AS_REQUESTED, ORT_DEFAULT, ORT_DEFAULT)
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, config)
        options.add_session_config_entry("session.use_env_allocators", "1")
    session = ort.InferenceSession(str(onnx), options, providers=["CPUExecutionProvider"])
    shapes = {i.name: i.shape for i in session.get_inputs()}
    rng = np.random.default_rng(0)
    process = psutil.Process()
    out: dict[str, Any] = {"option": option, "threads": threads, "latent": latent, "per_row_s": {}, "calls": calls}
    out["rss_after_load_gib"] = process.memory_info().rss / GIB
    for batch in batches:
        channels, width = shapes["sample"][1], shapes["encoder_hidden_states"][2]
        feeds = {
            "sample": rng.standard_normal((batch, channels, latent, latent), dtype=np.float32),
            "timestep": rng.uniform(0, 999, batch).astype(np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, TEXT_LENGTH, width), dtype=np.float32),
        }
        session.run(None, feeds, run_options)  # warm-up
        samples = []
        for _ in range(calls):
            began = time.perf_counter()
            session.run(None, feeds, run_options)
            samples.append(time.perf_counter() - began)
        out["per_row_s"][str(batch)] = statistics.median(samples) / batch
    out["rss_after_largest_gib"] = process.memory_info().rss / GIB
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KIB_PER_GIB
    return out


def markdown(results: list[dict[str, Any]]) -> str:
    batches = list(results[0]["per_row_s"]) if results else []
    head = "| option | " + " | ".join(f"s/row at {b}" for b in batches) + " | RSS after largest (GiB) | peak (GiB) |"
    rule = "|---|" + "---:|" * (len(batches) + 2)
    rows = [
        f"| {r['option']} | "
        + " | ".join(f"{r['per_row_s'][b]:.3f}" for b in batches)
        + f" | {r['rss_after_largest_gib']:.2f} | {r['peak_rss_gib']:.2f} |"
        for r in results
    ]
    return "\n".join([head, rule, *rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks arena", description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, required=True, help="a UNet model.onnx (sample, timestep, hidden)")
    parser.add_argument("--options", default=",".join(OPTIONS), help=f"comma-separated, of {', '.join(OPTIONS)}")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads")
    parser.add_argument("--batches", default="1,2", help="comma-separated batch sizes, largest last")
    parser.add_argument("--latent", type=int, default=64, help="latent side (64: a 512 px image)")
    parser.add_argument("--calls", type=int, default=2, help="timed calls per batch size (after one warm-up)")
    parser.add_argument("--rounds", type=int, default=1, help="run every option this many times, interleaved")
    parser.add_argument("--output", type=Path, help="write the JSON here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one option in this process
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    if args.one:
        print(json.dumps(measure(args.onnx, args.one, args.threads, batches, args.calls, args.latent)))
        return 0
    options = [o for o in args.options.split(",") if o]
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        parser.error(f"unknown options: {', '.join(unknown)}")
    results: list[dict[str, Any]] = []
    for round_ in range(args.rounds):
        for option in options:
            print(f"[arena] round {round_ + 1}/{args.rounds}: {option} ...", file=sys.stderr, flush=True)
            line = subprocess.run(
                [sys.executable, "-m", "benchmarks", "arena", "--onnx", str(args.onnx), "--one", option,
                 "--threads", str(args.threads), "--batches", args.batches, "--calls", str(args.calls),
                 "--latent", str(args.latent)],
                check=True, capture_output=True, text=True,
            ).stdout.strip().splitlines()[-1]  # fmt: skip
            results.append(json.loads(line))
    best: dict[str, dict[str, Any]] = {}
    for r in results:  # per option, the fastest round (the machine may be shared)
        key = r["option"]
        if key not in best or sum(r["per_row_s"].values()) < sum(best[key]["per_row_s"].values()):
            best[key] = r
    summary = [best[o] for o in options]
    print(markdown(summary))
    if args.output:
        args.output.write_text(json.dumps({"onnx": str(args.onnx), "runs": results, "best": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
