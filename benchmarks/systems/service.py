"""This service: real Triton (bundled binary) + the gateway in its own process, and Triton's statistics.

Triton also loads a second, temporary repository holding `bench_identity` (a Python-backend model that returns
its input), used by the transport probe; the gateway never sees it (it serves only manifests of the main one).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.config import TRITON_ENV
from benchmarks.models import ModelFiles
from benchmarks.systems.processes import ServerProcess

IDENTITY_MODEL = "bench_identity"

_IDENTITY_CONFIG = f"""name: "{IDENTITY_MODEL}"
backend: "python"
max_batch_size: 64
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ -1, -1 ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ -1, -1 ] }} ]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""

_IDENTITY_MODEL = """import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [
            pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("y", pb_utils.get_input_tensor_by_name(r, "x").as_numpy())]
            )
            for r in requests
        ]
"""


def write_identity_repository(root: Path) -> Path:
    model = root / IDENTITY_MODEL
    (model / "1").mkdir(parents=True, exist_ok=True)
    (model / "config.pbtxt").write_text(_IDENTITY_CONFIG)
    (model / "1" / "model.py").write_text(_IDENTITY_MODEL)
    return root


@dataclass
class ModelStats:
    """Cumulative counters of one Triton model (or the difference of two snapshots)."""

    success_count: int = 0
    success_ns: int = 0
    queue_ns: int = 0
    compute_ns: int = 0  # compute_input + compute_infer + compute_output
    inference_count: int = 0  # samples (batch rows) inferred
    execution_count: int = 0  # model executions (batches)
    batches: dict[int, int] = field(default_factory=dict)  # batch size (rows) -> executions

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> ModelStats:
        stats = entry.get("inference_stats", {})

        def ns(key: str) -> int:
            return int(stats.get(key, {}).get("ns", 0))

        return cls(
            success_count=int(stats.get("success", {}).get("count", 0)),
            success_ns=ns("success"),
            queue_ns=ns("queue"),
            compute_ns=ns("compute_input") + ns("compute_infer") + ns("compute_output"),
            inference_count=int(entry.get("inference_count", 0)),
            execution_count=int(entry.get("execution_count", 0)),
            batches={
                int(b["batch_size"]): int(b.get("compute_infer", {}).get("count", 0))
                for b in entry.get("batch_stats", [])
            },
        )

    def __sub__(self, other: ModelStats) -> ModelStats:
        return ModelStats(
            success_count=self.success_count - other.success_count,
            success_ns=self.success_ns - other.success_ns,
            queue_ns=self.queue_ns - other.queue_ns,
            compute_ns=self.compute_ns - other.compute_ns,
            inference_count=self.inference_count - other.inference_count,
            execution_count=self.execution_count - other.execution_count,
            batches={
                size: n - other.batches.get(size, 0)
                for size, n in self.batches.items()
                if n - other.batches.get(size, 0) > 0
            },
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "requests": self.success_count,
            "request_ns": self.success_ns,
            "queue_ns": self.queue_ns,
            "compute_ns": self.compute_ns,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "mean_batch": self.inference_count / self.execution_count if self.execution_count else None,
            "batches": {str(k): v for k, v in sorted(self.batches.items())},
        }


def diff(after: dict[str, ModelStats], before: dict[str, ModelStats]) -> dict[str, ModelStats]:
    return {name: after[name] - before.get(name, ModelStats()) for name in after}


class Service:
    """Triton + gateway for one model; a context manager."""

    def __init__(
        self,
        files: ModelFiles,
        *,
        port_base: int,
        threads: int,
        log_dir: Path,
        gateway_env: dict[str, str] | None = None,
        cpu_budget: int | None = None,
    ) -> None:
        """`cpu_budget`: Triton's CPU budget in cores (None: `threads`, as the gateway's launcher does; 0: none)."""
        from gateway.triton.server import TritonServer

        self.files = files
        self.threads = threads
        self.gateway_port = port_base
        self._identity_dir = tempfile.TemporaryDirectory(prefix="bench-identity-")
        identity_repo = write_identity_repository(Path(self._identity_dir.name))
        self.triton = TritonServer(
            files.repository,
            http_port=port_base + 1,
            grpc_port=port_base + 2,
            metrics_port=port_base + 3,
            python_env=TRITON_ENV,
            log_file=log_dir / f"triton-{files.size}.log",
            extra_args=[f"--model-repository={identity_repo}"],
            # The run's thread budget is the host's: components never run more threads than that at once, as
            # the gateway's bundled server does by default (IMAGEN_TRITON_CPU_BUDGET).
            cpu_budget=threads if cpu_budget is None else cpu_budget,
        )
        self.log_dir = log_dir
        self.gateway_env = dict(gateway_env or {})  # extra IMAGEN_* settings (A/B measurements of one setting)
        self.gateway: ServerProcess | None = None
        self._client: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}/v1/image-to-image"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def gateway_pid(self) -> int:
        if self.gateway is None:
            raise RuntimeError("the gateway is not running")
        return self.gateway.pid

    @property
    def triton_pid(self) -> int:
        if self.triton.process is None:
            raise RuntimeError("Triton is not running")
        return self.triton.process.pid

    @property
    def grpc_url(self) -> str:
        return self.triton.grpc_url

    def start(self) -> None:
        self.triton.start()
        self.triton.wait_ready([*self.files.triton_models(), IDENTITY_MODEL], timeout_s=300)
        self.gateway = ServerProcess(
            [
                "-m",
                "gateway",
                "--allow-anonymous",
                "--no-export-demo",
                "--model-repository",
                str(self.files.repository),
                "--port",
                str(self.gateway_port),
                "--triton-url",
                self.triton.grpc_url,
                "--storage-dir",
                str(self.log_dir / "images"),
                "--log-level",
                "warning",
            ],
            ready_url=f"http://127.0.0.1:{self.gateway_port}/readyz",
            log=self.log_dir / f"gateway-{self.files.size}.log",
            threads=self.threads,
            # A load generator is one client: no per-key rate limit; a fresh job store per run.
            env={
                "IMAGEN_RATE_LIMIT_PER_MINUTE": "0",
                "IMAGEN_JOBS_DB": str(self.log_dir / f"jobs-{self.files.size}-{os.getpid()}.sqlite3"),
                "IMAGEN_MAX_QUEUED_JOBS": "4096",
                # The load repeats one seeded request, and every one must run the model (what is measured): the
                # exact-result cache would answer the repeats (`benchmarks priority` turns it on to measure it).
                "IMAGEN_RESULT_CACHE": "0",
                **self.gateway_env,
            },
        )

    def stats(self, models: Iterable[str] | None = None) -> dict[str, ModelStats]:
        import tritonclient.grpc as grpcclient

        if self._client is None:
            self._client = grpcclient.InferenceServerClient(self.triton.grpc_url)
        wanted = list(models) if models is not None else self.files.triton_models()
        raw = self._client.get_inference_statistics(model_name="", as_json=True)
        by_name = {entry["name"]: entry for entry in raw.get("model_stats", [])}
        return {name: ModelStats.from_json(by_name.get(name, {})) for name in wanted}

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
            self.gateway = None
        if self._client is not None:
            self._client.close()
            self._client = None
        self.triton.stop()
        self._identity_dir.cleanup()

    def __enter__(self) -> Service:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
