"""`python -m benchmarks lora`: what the per-row LoRA branches cost the UNet, against the export without them.

For each size (`--models`, default tiny and medium) it builds the random benchmark pipeline once, exports its UNet
twice, with K slots of rank R (`export.lora.LoraShape`, default 8 x 16) and without, writes one random rank-R
adapter (tests/lora_files.py) and fills a `LoraBank` (the Triton runner's, model_repository/python_backend/
lora_bank.py) over the slotted graph. It then times one UNet call of `--rows` rows at the model's native latent
size, per-row timesteps, random text states, three ways:

  a  plain     the export without slots;
  b  no-lora   the slotted export, no row with an adapter (the bank's feeds for rows without adapters: P = 0);
  c  lora      the slotted export, every row with the adapter at scale 1.

After a warm-up the three are interleaved (a, b, c, a, b, c, ...) so that drift on a shared machine hits them
alike; it reports the median seconds per row of each and the ratios b/a and c/a. Sessions are built with the
python runner's `session_options` and the parameters the export writes (`SERVED_PARAMS`), as the service runs
them. It also reports the bank's memory (UNet and, unless `--no-text-encoder`, the text encoder) and the nodes
the branches add to each graph.

Results go to stdout (markdown) and to `--output` as `<date>-lora[-quick].{json,md}` (docs/benchmarks.md,
"LoRA branches: cost", has the committed figures).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.config import PROJECT_ROOT, RESULTS_DIR, WORK_DIR

SIZES = ("tiny", "medium")
VARIANTS = ("plain", "no_lora", "lora")  # a, b, c
TEXT_LENGTH = 77  # CLIP's token window
ADAPTER = "bench"
# What the export writes into a python-backend config.pbtxt (export/repository.py), read by model.py's
# `session_options`: intra-op threads 0 (onnxruntime's default, the cores), no spinning, the arena without
# memory patterns.
SERVED_PARAMS = {"intra_op_threads": "0", "allow_spinning": "0", "cpu_mem_arena": "1", "mem_pattern": "0"}
# Timed rounds (one call of each variant a round) when --repeats is not given: a tiny call is milliseconds, a
# medium one about a second a row.
DEFAULT_REPEATS = {"full": {"tiny": 200, "medium": 20}, "quick": {"tiny": 20, "medium": 4}}
DEFAULT_WARMUP = {"full": 3, "quick": 1}
LORA_BANK_SOURCE = PROJECT_ROOT / "model_repository" / "python_backend" / "lora_bank.py"


def _host() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu = found.group(1).strip() if found else cpu
    except OSError:  # not Linux
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()}


def _lora_bank_module() -> Any:
    """The runner's lora_bank.py as a module (it lives beside model.py, outside any package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("imagen_lora_bank", LORA_BANK_SOURCE)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {LORA_BANK_SOURCE}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["imagen_lora_bank"] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def graph_inputs(onnx: Path) -> dict[str, list[Any]]:
    """name -> shape (ints, or a symbolic name) of a graph's inputs, without reading its weights."""
    import onnx as onnx_lib

    model = onnx_lib.load(str(onnx), load_external_data=False)
    return {
        i.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in i.type.tensor_type.shape.dim]
        for i in model.graph.input
    }


def op_counts(onnx: Path) -> Counter[str]:
    """Nodes of a graph by op type (the top level; the exported UNet has no subgraphs)."""
    import onnx as onnx_lib

    return Counter(n.op_type for n in onnx_lib.load(str(onnx), load_external_data=False).graph.node)


def _bank(banks: Any, component: str, onnx: Path, slots: int, folder: Path, layers_per_block: int) -> Any:
    from gateway.diffusion import lora_format

    shapes = {k: v for k, v in graph_inputs(onnx).items() if k.startswith(banks.BANK_PREFIX)}
    return banks.LoraBank(
        lora_format, component, shapes, slots=slots, folder=folder, layers_per_block=layers_per_block, base="sd"
    )


def prepare(size: str, work: Path, slots: int, rank: int, text_encoder: bool, log: Any) -> dict[str, Any]:
    """Build the pipeline, export the UNet with and without slots (and the text encoder with), write the
    adapter; returns the paths and the model's shapes."""
    from export.lora import LoraShape
    from export.onnx_export import export_component, load_pipeline
    from export.tiny import build_random_pipeline
    from tests.lora_files import make_adapter

    if work.exists():
        shutil.rmtree(work)  # every run exports from the current code
    began = time.perf_counter()
    diffusers_dir = build_random_pipeline(work / "diffusers", size=size, seed=0)
    pipeline = load_pipeline(diffusers_dir)
    unet_config = pipeline.unet.config
    shape = LoraShape(slots, rank)
    log(f"[lora] {size}: exporting the UNet without slots ...")
    plain = export_component(pipeline, "unet", work / "plain")
    log(f"[lora] {size}: exporting the UNet with {slots} slots of rank {rank} ...")
    slotted = export_component(pipeline, "unet", work / "slotted", lora=shape)
    text = export_component(pipeline, "text_encoder", work / "slotted", lora=shape) if text_encoder else None
    del pipeline
    adapter = make_adapter(diffusers_dir, work / "loras" / f"{ADAPTER}.safetensors", seed=1, rank=rank, alpha=rank)
    return {
        "plain": plain,
        "slotted": slotted,
        "text_encoder": text,
        "loras": adapter.parent,
        "sample_size": int(unet_config.sample_size),
        "layers_per_block": int(unet_config.layers_per_block),
        "prepare_s": time.perf_counter() - began,
    }


def measure(
    size: str, work: Path, *, slots: int, rank: int, rows: int, repeats: int, warmup: int, text_encoder: bool, log: Any
) -> dict[str, Any]:
    """One size: the three variants' per-row seconds, the ratios, the bank's memory and the nodes added."""
    import numpy as np
    import onnxruntime as ort

    from export.repository import python_runner

    made = prepare(size, work, slots, rank, text_encoder, log)
    banks = _lora_bank_module()
    unet_bank = _bank(banks, "unet", made["slotted"], slots, made["loras"], made["layers_per_block"])
    runner = python_runner()
    options = runner.session_options(dict(SERVED_PARAMS))
    providers = ["CPUExecutionProvider"]
    sessions = {
        "plain": ort.InferenceSession(str(made["plain"]), options, providers=providers),
        "slotted": ort.InferenceSession(str(made["slotted"]), options, providers=providers),
    }
    inputs = {i.name: i for i in sessions["plain"].get_inputs()}
    latent = made["sample_size"]
    channels = int(inputs["sample"].shape[1])
    width = int(inputs["encoder_hidden_states"].shape[2])
    time_dtype = np.float32 if inputs["timestep"].type == "tensor(float)" else np.int64
    rng = np.random.default_rng(0)
    base = {
        "sample": rng.standard_normal((rows, channels, latent, latent), dtype=np.float32),
        "timestep": rng.uniform(0, 999, rows).astype(time_dtype),  # per row, as the service batches them
        "encoder_hidden_states": rng.standard_normal((rows, TEXT_LENGTH, width), dtype=np.float32),
    }
    feed_seconds: dict[str, float] = {}
    extra: dict[str, dict[str, Any]] = {"plain": {}}
    for variant, batch_rows in (("no_lora", [()] * rows), ("lora", [((ADAPTER, 1.0),)] * rows)):
        extra[variant] = unet_bank.feeds(batch_rows)  # the first call with the adapter loads it into a slot
        samples = []
        for _ in range(20):  # what the runner pays per call to build the feeds (the adapter held)
            began = time.perf_counter()
            unet_bank.feeds(batch_rows)
            samples.append(time.perf_counter() - began)
        feed_seconds[variant] = statistics.median(samples)

    def call(variant: str) -> float:
        session = sessions["plain" if variant == "plain" else "slotted"]
        feeds = {**base, **extra[variant]}
        began = time.perf_counter()
        session.run(["out_sample"], feeds)
        return time.perf_counter() - began

    effect = float(
        np.abs(
            sessions["slotted"].run(["out_sample"], {**base, **extra["lora"]})[0]
            - sessions["plain"].run(["out_sample"], base)[0]
        ).max()
    )
    log(f"[lora] {size}: {warmup} warm-up and {repeats} timed rounds of {rows} rows ...")
    for _ in range(warmup):
        for variant in VARIANTS:
            call(variant)
    seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(repeats):
        for variant in VARIANTS:
            seconds[variant].append(call(variant))
    per_row = {v: statistics.median(s) / rows for v, s in seconds.items()}
    quartiles = {
        v: [q / rows for q in statistics.quantiles(s, n=4)] if len(s) > 1 else None for v, s in seconds.items()
    }

    plain_ops, slotted_ops = op_counts(made["plain"]), op_counts(made["slotted"])
    added = {
        op: slotted_ops[op] - plain_ops.get(op, 0)
        for op in sorted(slotted_ops)
        if slotted_ops[op] != plain_ops.get(op, 0)
    }
    memory: dict[str, Any] = {
        "unet": {"layers": len(unet_bank.down), "bank_bytes": int(unet_bank.nbytes)},
    }
    if made["text_encoder"] is not None:
        text_bank = _bank(banks, "text_encoder", made["text_encoder"], slots, made["loras"], made["layers_per_block"])
        memory["text_encoder"] = {"layers": len(text_bank.down), "bank_bytes": int(text_bank.nbytes)}
    return {
        "size": size,
        "rows": rows,
        "latent": latent,
        "repeats": repeats,
        "warmup": warmup,
        "per_row_s": per_row,
        "per_row_quartiles_s": quartiles,
        "samples_s": seconds,
        "ratios": {
            "no_lora/plain": per_row["no_lora"] / per_row["plain"],
            "lora/plain": per_row["lora"] / per_row["plain"],
        },
        # Less sensitive to a shared machine: the median of each round's own ratio (its calls are adjacent), and
        # the ratio of the fastest calls (the least disturbed).
        "paired_ratios": {
            f"{v}/plain": statistics.median(x / p for x, p in zip(seconds[v], seconds["plain"], strict=True))
            for v in ("no_lora", "lora")
        },
        "min_per_row_s": {v: min(s) / rows for v, s in seconds.items()},
        "feeds_s": feed_seconds,
        "adapter_effect_max_abs": effect,
        "bank": memory,
        "nodes": {"plain": sum(plain_ops.values()), "slotted": sum(slotted_ops.values()), "added_by_op": added},
        "prepare_s": made["prepare_s"],
    }


def markdown(results: dict[str, Any]) -> str:
    """The tables: per-row seconds and ratios, then the bank's memory."""
    shape = results["lora"]
    host = results["host"]
    lines = [
        f"UNet, {results['runs'][0]['rows'] if results['runs'] else '-'} rows a call, K = {shape['slots']} slots of "
        f"rank R = {shape['rank']}; {host['cpu']}, {host['cores']} cores; medians of interleaved calls.",
        "",
        "| model | latent | rounds | a: no slots (s/row) | b: slots, no adapter | c: slots, 1 adapter a row "
        "| b/a | c/a | b/a, c/a paired | b/a, c/a fastest |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in results["runs"]:
        s, r, p, m = run["per_row_s"], run["ratios"], run["paired_ratios"], run["min_per_row_s"]
        lines.append(
            f"| {run['size']} | {run['latent']}x{run['latent']} | {run['repeats']} | {s['plain']:.4f} | "
            f"{s['no_lora']:.4f} | {s['lora']:.4f} | {r['no_lora/plain']:.3f} | {r['lora/plain']:.3f} | "
            f"{p['no_lora/plain']:.3f}, {p['lora/plain']:.3f} | "
            f"{m['no_lora'] / m['plain']:.3f}, {m['lora'] / m['plain']:.3f} |"
        )
    lines += [
        "",
        "b/a and c/a: ratios of the medians; paired: the median of each round's own ratio; fastest: of the "
        "fastest calls.",
    ]
    lines += [
        "",
        "| model | component | branched layers | bank (MiB) | nodes without / with slots |",
        "|---|---|---:|---:|---|",
    ]
    for run in results["runs"]:
        for component, bank in run["bank"].items():
            nodes = f"{run['nodes']['plain']} / {run['nodes']['slotted']}" if component == "unet" else ""
            lines.append(
                f"| {run['size']} | {component} | {bank['layers']} | {bank['bank_bytes'] / 2**20:.2f} | {nodes} |"
            )
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], output: Path) -> dict[str, Path]:
    output.mkdir(parents=True, exist_ok=True)
    stem = f"{results['started_at'][:10]}-lora{'-quick' if results['mode'] == 'quick' else ''}"
    paths = {"json": output / f"{stem}.json", "markdown": output / f"{stem}.md"}
    paths["json"].write_text(json.dumps(results, indent=1) + "\n")
    paths["markdown"].write_text(f"# LoRA branches: cost ({results['started_at'][:10]})\n\n{markdown(results)}")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks lora", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (tiny 20, medium 4; full: 200 and 20)")
    parser.add_argument("--models", default=",".join(SIZES), help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--rows", type=int, default=2, help="batch rows a call (default %(default)s)")
    parser.add_argument("--repeats", type=int, help="timed rounds for every size (default: by size, see --quick)")
    parser.add_argument("--warmup", type=int, help="untimed rounds first (default 3, quick 1)")
    parser.add_argument("--slots", type=int, default=8, help="K, the bank's slots (default %(default)s)")
    parser.add_argument("--rank", type=int, default=16, help="R, the branches' rank (default %(default)s)")
    parser.add_argument("--no-text-encoder", action="store_true", help="skip the text encoder's bank (its export)")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR, help="results folder")
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR, help="exported models (git-ignored)")
    args = parser.parse_args(argv)
    sizes = [s.strip() for s in args.models.split(",") if s.strip()]
    if not sizes or any(s not in SIZES for s in sizes):
        parser.error(f"--models takes a comma-separated list of {', '.join(SIZES)}")
    if args.rows < 1 or (args.repeats is not None and args.repeats < 1) or args.slots < 1 or args.rank < 1:
        parser.error("--rows, --repeats, --slots and --rank take positive numbers")
    mode = "quick" if args.quick else "full"
    warmup = DEFAULT_WARMUP[mode] if args.warmup is None else args.warmup

    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    results: dict[str, Any] = {
        "kind": "lora",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": mode,
        "host": _host(),
        "lora": {"slots": args.slots, "rank": args.rank},
        "session_params": SERVED_PARAMS,
        "runs": [],
    }
    for size in sizes:
        repeats = args.repeats or DEFAULT_REPEATS[mode][size]
        results["runs"].append(
            measure(
                size,
                args.work_dir / "lora" / size,
                slots=args.slots,
                rank=args.rank,
                rows=args.rows,
                repeats=repeats,
                warmup=warmup,
                text_encoder=not args.no_text_encoder,
                log=log,
            )
        )
    written = write(results, args.output)
    for kind, path in written.items():
        print(f"wrote {kind}: {path}")
    print()
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
