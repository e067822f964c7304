"""`python -m benchmarks [--quick] [--models tiny,medium,large]`: run every system, write JSON + markdown + plots.

`python -m benchmarks load --url URL [...]`: the same load generator against any running service (`benchmarks.load`).

`python -m benchmarks lora [--quick]`: what the per-row LoRA branches cost the UNet (`benchmarks.lora`).

`python -m benchmarks priority [--quick]`: priorities under bulk load, wait estimates, the result cache
(`benchmarks.priority`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from dataclasses import replace
from pathlib import Path

from benchmarks.config import (
    DEFAULT_SIZES,
    MODEL_SIZES,
    PROJECT_ROOT,
    RESULTS_DIR,
    WORK_DIR,
    BenchConfig,
    full_config,
    quick_config,
)

# The manual's benchmarks page: each run rewrites its results block (report.write, between the markers).
DOCS_PAGE = PROJECT_ROOT / "docs" / "benchmarks.md"


def parse(argv: list[str]) -> tuple[argparse.Namespace, BenchConfig]:
    """The harness's options and the run they ask for (exits 2 on a bad option)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__.splitlines()[0],
        epilog="python -m benchmarks load --help: benchmark a running deployment (closed-loop sweep + Poisson).",
    )
    parser.add_argument("--quick", action="store_true", help="fewer levels/requests/repeats (< 10 min on 2 cores)")
    parser.add_argument(
        "--models",
        default=",".join(DEFAULT_SIZES),
        help=f"comma-separated sizes, of {', '.join(MODEL_SIZES)} (default %(default)s; large: Stable Diffusion 1.5's "
        "shapes, random weights, ~12 GB to build, roughly a minute per image on 2 cores)",
    )
    parser.add_argument("--threads", type=int, help="intra-op threads for every system (default: CPU count)")
    parser.add_argument("--repeats", type=int, help="repeats per figure (default: 2 quick, 3 full)")
    parser.add_argument("--port-base", type=int, help="first of the loopback ports used (default 19400)")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR, help="results folder")
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR, help="exported models, logs (git-ignored)")
    parser.add_argument("--no-readme", action="store_true", help="do not update the table in docs/benchmarks.md")
    parser.add_argument("--no-peers", action="store_true", help="this service and its limit only (no torch/ORT peers)")
    args = parser.parse_args(argv)
    sizes = tuple(s.strip() for s in args.models.split(",") if s.strip())
    if not sizes or any(s not in MODEL_SIZES for s in sizes):
        parser.error(f"--models takes a comma-separated list of {', '.join(MODEL_SIZES)}")
    config = (quick_config if args.quick else full_config)(sizes)
    overrides = {k: v for k, v in (("threads", args.threads), ("repeats", args.repeats),
                                   ("port_base", args.port_base)) if v is not None}  # fmt: skip
    config = replace(config, **overrides, peers=not args.no_peers)
    return args, config


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["load"]:  # a subcommand; everything else is the harness, as before
        from benchmarks import load

        return load.main(argv[1:])
    if argv[:1] == ["arena"]:  # onnxruntime's CPU memory options on one UNet (benchmarks/arena.py)
        from benchmarks import arena

        return arena.main(argv[1:])
    if argv[:1] == ["lora"]:  # what the per-row LoRA branches cost the UNet (benchmarks/lora.py)
        from benchmarks import lora

        return lora.main(argv[1:])
    if argv[:1] == ["priority"]:  # priorities, wait estimates and the result cache (benchmarks/priority.py)
        from benchmarks import priority

        return priority.main(argv[1:])
    if argv[:1] == ["ab"]:  # one gateway setting against another (benchmarks/ab.py)
        from benchmarks import ab

        return ab.main(argv[1:])
    args, config = parse(argv)

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from benchmarks import report, runner

    results = runner.run(config, work_dir=args.work_dir)
    raw = args.work_dir / "last-run-raw.json"  # kept even if the report step fails
    raw.write_text(json.dumps(results, default=str))
    written = report.write(results, args.output, readme=None if args.no_readme else DOCS_PAGE)
    for kind, path in written.items():
        print(f"wrote {kind}: {path}")
    print()
    print(report.markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
