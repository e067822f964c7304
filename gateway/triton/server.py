"""Find, start and stop the bundled Triton server (the `nvidia-pytriton` wheel's `tritonserver` binary).

The wheel ships Triton with the Python backend only; its stub is built per Python version and must sit in the
backend folder, and the binary needs the wheel's private libraries and Python's libpython on the loader path.
This module owns that recipe so the launcher, the tests and the benchmarks start Triton the same way.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import TracebackType

# Triton's rate-limiter resource the exported CPU instances ask for, one per intra-op thread (export/repository.py).
CPU_THREADS_RESOURCE = "cpu_threads"
_CPU_THREADS_ASK = re.compile(rf'name: "{CPU_THREADS_RESOURCE}" global: true count: (\d+)')


def cpu_budget_args(budget: int, repository: Path) -> list[str]:
    """tritonserver flags that keep the models' onnxruntime threads within `budget` cores (0: no flags, no limit).

    With `--rate-limit=execution_count`, an execution starts only when the `cpu_threads` its instance asks for
    are free, so components sharing the host never run more threads than it has cores. Triton refuses to load an
    instance that asks for more than the budget (tritonserver 2.51: "Resource count for "cpu_threads" is
    limited to N which will prevent scheduling..."): a model exported on a bigger host (intra-op threads 0 means
    all of the export host's cores) would not load, so the budget is raised to the largest ask in the repository.
    That instance then runs alone, which is what all-cores threads need anyway.
    """
    if budget <= 0:
        return []
    asks = [
        int(count)
        for config in sorted(repository.glob("*/config.pbtxt"))
        for count in _CPU_THREADS_ASK.findall(config.read_text("utf-8", errors="replace"))
    ]
    return ["--rate-limit=execution_count", f"--rate-limit-resource={CPU_THREADS_RESOURCE}:{max([budget, *asks])}"]


class TritonNotFound(RuntimeError):
    """The bundled Triton server is not installed in this environment."""


class TritonStartError(RuntimeError):
    """Triton exited or did not become ready in time."""


@dataclass(frozen=True)
class TritonDistribution:
    binary: Path
    python_backend: Path
    stub: Path
    libs: Path


def find_distribution() -> TritonDistribution:
    """Locate the binary, Python backend and stub in the installed `nvidia-pytriton` wheel, without importing it."""
    try:
        dist = metadata.distribution("nvidia-pytriton")
    except metadata.PackageNotFoundError as exc:
        raise TritonNotFound(
            "nvidia-pytriton is not installed: `pip install --no-deps nvidia-pytriton==0.7.0`"
        ) from exc
    root = Path(str(dist.locate_file("pytriton"))) / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    found = TritonDistribution(
        binary=root / "bin" / "tritonserver",
        python_backend=root / "backends" / "python",
        stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
        libs=Path(str(dist.locate_file("nvidia_pytriton.libs"))),
    )
    for path in (found.binary, found.python_backend, found.stub):
        if not path.exists():
            raise TritonNotFound(f"the nvidia-pytriton wheel lacks {path}")
    return found


def _prepare_backends(dist: TritonDistribution, into: Path) -> Path:
    """A backend folder whose python backend holds the stub for this interpreter."""
    python_dir = into / "python"
    shutil.copytree(dist.python_backend, python_dir, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(dist.stub, python_dir / "triton_python_backend_stub")
    return into


# What tritonserver and its model stubs get from the gateway's environment: an allow-list, so the gateway's secrets
# (IMAGEN_API_KEYS, the webhook secret, AWS_* credentials, the job database's URL, proxy URLs with passwords)
# never reach a model process. The names: the basics of a process (home, user, locale, time zone, temporary
# folder), Python's output switches (PYTHONPATH is not one: the gateway's path must not leak into the model
# runtime), an offline Hugging Face cache, and the knobs of the runtimes the models use (CUDA, the NVIDIA
# container runtime, cuDNN/cuBLAS, OpenMP/MKL/OpenBLAS threads, onnxruntime, PyTorch, allocators). PATH and
# LD_LIBRARY_PATH are inherited and extended (`_environment`).
INHERITED_ENV = frozenset(
    {
        "PATH",
        "LD_LIBRARY_PATH",
        "LD_PRELOAD",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "TMP",
        "TEMP",
        "PYTHONUNBUFFERED",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONIOENCODING",
        "PYTHONUTF8",
        "PYTHONHASHSEED",
        "HF_HOME",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "XDG_CACHE_HOME",
        "TRITON_CACHE_DIR",
        "GLIBC_TUNABLES",
        "IMAGEN_LORA_DIR",  # the LoRA adapters' folder the runners read (model_repository/python_backend/model.py)
    }
)
INHERITED_ENV_PREFIXES = (
    "LC_",
    "CUDA_",
    "NVIDIA_",
    "CUDNN_",
    "CUBLAS_",
    "CUBLASLT_",
    "NCCL_",
    "OMP_",
    "KMP_",
    "GOMP_",
    "MKL_",
    "OPENBLAS_",
    "ORT_",
    "TORCH_",
    "TORCHINDUCTOR_",
    "PYTORCH_",
    "MALLOC_",
)


def _inherited(name: str) -> bool:
    return name in INHERITED_ENV or name.startswith(INHERITED_ENV_PREFIXES)


def _environment(
    dist: TritonDistribution, python_env: Path | None, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """tritonserver's whole environment: the allow-listed part of `environ` (the gateway's own by default), the
    model runtime's `bin` first on PATH (the stub's embedded Python finds its environment through it) and the
    loader paths the binary needs."""
    env = {name: value for name, value in (os.environ if environ is None else environ).items() if _inherited(name)}
    bin_dir = python_env / "bin" if python_env is not None else Path(sys.executable).parent
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", os.defpath)])
    lib_dirs = [str(sysconfig.get_config_var("LIBDIR")), str(dist.libs)]
    if env.get("LD_LIBRARY_PATH"):
        lib_dirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(lib_dirs)
    return env


def _with_lora_dir(env: dict[str, str], lora_dir: Path | None) -> dict[str, str]:
    return env if lora_dir is None else {**env, "IMAGEN_LORA_DIR": str(Path(lora_dir).absolute())}


def _get(url: str, timeout: float = 1.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - only our http:// Triton URLs
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return 0


class TritonServer:
    """One `tritonserver` process on loopback ports; use as a context manager or start()/stop().

    `python_env` is the virtual environment the Python-backend models run in. nvidia-pytriton 0.7's stub is
    built against the numpy 1.x ABI (numpy 2 arrays cross it corrupted), so models run in their own small env
    (numpy<2 + onnxruntime, `requirements/triton-runtime.txt`), apart from the gateway's.
    """

    def __init__(
        self,
        repository: Path,
        *,
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        address: str = "127.0.0.1",
        model_control_mode: str = "none",
        log_file: Path | None = None,
        python_env: Path | None = None,
        cpu_budget: int = 0,
        extra_args: Iterable[str] = (),
        lora_dir: Path | None = None,
    ) -> None:
        self.repository = Path(repository).absolute()
        self.lora_dir = lora_dir  # the runners' IMAGEN_LORA_DIR (None: theirs, `loras/` beside the repository)
        self.address = address
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.model_control_mode = model_control_mode
        self.log_file = log_file
        self.python_env = python_env
        self.cpu_budget = cpu_budget
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def http_url(self) -> str:
        return f"http://{self.address}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.address}:{self.grpc_port}"

    def _environment(self, dist: TritonDistribution) -> dict[str, str]:
        return _with_lora_dir(_environment(dist, self.python_env), self.lora_dir)

    def start(self) -> None:
        dist = find_distribution()
        self._workdir = tempfile.TemporaryDirectory(prefix="tritonserver-")
        backends = _prepare_backends(dist, Path(self._workdir.name) / "backends")
        args = [
            str(dist.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            f"--model-control-mode={self.model_control_mode}",
            f"--http-address={self.address}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.address}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.address}",
            f"--metrics-port={self.metrics_port}",
            "--allow-sagemaker=false",
            "--allow-vertex-ai=false",
            "--exit-on-error=false",
            "--log-verbose=0",
            *cpu_budget_args(self.cpu_budget, self.repository),
            *self.extra_args,
        ]
        if self.model_control_mode == "explicit":
            args.append("--load-model=*")
        log = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115 - lives with the process
        self.process = subprocess.Popen(  # noqa: S603 - the tritonserver binary of the installed package, no shell
            args, env=self._environment(dist), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def is_live(self) -> bool:
        return _get(f"{self.http_url}/v2/health/live") == 200

    def model_ready(self, model: str) -> bool:
        return _get(f"{self.http_url}/v2/models/{model}/ready") == 200

    def wait_ready(self, models: Iterable[str] = (), timeout_s: float = 120.0) -> None:
        """Block until the server is live and every named model is ready; raise if it exits or times out."""
        pending = list(models)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise TritonStartError(f"tritonserver exited with code {self.process.returncode}{self._log_hint()}")
            if self.is_live():
                pending = [m for m in pending if not self.model_ready(m)]
                if not pending:
                    return
            time.sleep(0.25)
        raise TritonStartError(
            f"tritonserver not ready after {timeout_s:.0f} s; waiting for {pending}{self._log_hint()}"
        )

    def _log_hint(self) -> str:
        return f" (see {self.log_file})" if self.log_file else ""

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (Triton drains in-flight requests), then SIGKILL the process group if it lingers."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
