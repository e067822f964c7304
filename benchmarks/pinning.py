"""Thread pinning, applied identically to every system and recorded in the results.

Every compute engine gets `threads` intra-op threads and 1 inter-op thread:
  - Triton's models: exported with `--intra-op-threads threads` (the `intra_op_threads` config parameter);
  - the ORT peer and the limit: `SessionOptions.intra_op_num_threads = threads`, `inter_op_num_threads = 1`;
  - the torch peer: `torch.set_num_threads(threads)`, `torch.set_num_interop_threads(1)`;
  - every process we start: OMP_NUM_THREADS / MKL_NUM_THREADS / OPENBLAS_NUM_THREADS = threads.
"""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path
from typing import Any


def pinned_env(threads: int, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def ort_session_options(threads: int, *, profile_prefix: str | None = None, optimize: bool = True) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return options


def pin_torch(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set in this process
        torch.set_num_interop_threads(1)


def record(threads: int) -> dict[str, Any]:
    return {
        "intra_op_threads": threads,
        "inter_op_threads": 1,
        "omp_num_threads": threads,
        "cpu_count": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "applied_to": ["triton models (config intra_op_threads)", "ort peer", "limit sessions", "torch peer"],
    }


def host_facts() -> dict[str, Any]:
    """Where a run ran, recorded with its results: host, CPU model and count, Python, platform."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "hostname": platform.node(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
