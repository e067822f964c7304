"""Session fixtures: tiny pipelines exported by our own export code, the real Triton server, the real gateway.

`imagen-v2` is exported from a saved diffusers folder (`--model-dir`, kept for the diffusers reference tests), with
LoRA slots; `imagen-v3` goes through the CLI's `--tiny` path, without. Both are what the demo serves. `imagen-xl`
is a tiny SDXL with LoRA slots (from a saved folder, for the SDXL reference tests); `imagen-xl-turbo` serves the
same Triton models with the turbo scheduler and defaults (a second manifest, no second copy of the models).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from export.lora import LoraShape
from export.pipeline import ExportRequest, run_export
from export.repository import write_variant
from export.tiny import SCHEDULERS, build_random_pipeline
from gateway.app import create_app
from gateway.diffusion.manifest import PipelineManifest, load_manifests
from gateway.settings import PROJECT_ROOT, Settings
from gateway.triton.server import TritonServer
from tests.helpers import ThreadedUvicorn, free_port

API_KEY = "test-key-0123456789-0123456789abcdef"
# The session's imagen-v2 and imagen-xl have LoRA slots (so every test of theirs runs the branches' graph with no
# adapter row); imagen-v3 has none (the graph without branches). Few slots: the eviction test fills them.
LORA_SLOTS = LoraShape(slots=4, rank=8)
TRITON_ENV = PROJECT_ROOT / ".venv-triton"


def start_own_triton(
    repository: Path, log_file: Path, *, cpu_budget: int = 0, ports: tuple[int, int, int] | None = None
) -> TritonServer:
    """A started Triton of a test's own beside the session one, on loopback (free ports, or `ports` to come back
    on a stopped one's): several Tritons on one host each need the Python backend's shared-memory regions of
    their own. The caller waits for its models and stops it."""
    http_port, grpc_port, metrics_port = ports or (free_port(), free_port(), free_port())
    server = TritonServer(
        repository,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        python_env=TRITON_ENV,
        log_file=log_file,
        cpu_budget=cpu_budget,
        extra_args=[f"--backend-config=python,shm-region-prefix-name=imagen_{grpc_port}_{time.time_ns()}_"],
    )
    server.start()
    return server


@dataclass(frozen=True)
class Repository:
    path: Path
    diffusers_dirs: dict[str, Path]
    manifests: dict[str, PipelineManifest]


@pytest.fixture(scope="session")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Repository:
    root = tmp_path_factory.mktemp("repo")
    repo = root / "models"
    v2_source = build_random_pipeline(root / "diffusers-imagen-v2", size="tiny", seed=0, scheduler="pndm")
    # test_export.test_each_onnx_component_matches_torch runs the export's own check on these graphs (and more
    # strictly): skipping it here saves its torch and onnxruntime runs at start-up.
    run_export(
        ExportRequest(model_dir=v2_source, repository=repo, name="imagen-v2", validate=False, lora=LORA_SLOTS),
        progress=False,
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "export",
            "--tiny",
            "--seed",
            "1",
            "--scheduler",
            "euler",
            "--name",
            "imagen-v3",
            "--output",
            str(repo),
        ],
        check=True,
        cwd=PROJECT_ROOT,
        capture_output=True,
    )
    xl_source = build_random_pipeline(root / "diffusers-imagen-xl", size="tiny", seed=2, scheduler="euler", arch="sdxl")
    # The session's SDXL is checked against torch by test_export; skipping the export's own check saves time.
    run_export(
        ExportRequest(model_dir=xl_source, repository=repo, name="imagen-xl", validate=False, lora=LORA_SLOTS),
        progress=False,
    )
    write_variant(repo, "imagen-xl", "imagen-xl-turbo", scheduler=SCHEDULERS["euler_ancestral"], turbo=True)
    return Repository(
        path=repo,
        diffusers_dirs={"imagen-v2": v2_source, "imagen-xl": xl_source, "imagen-xl-turbo": xl_source},
        manifests=load_manifests(repo),
    )


@pytest.fixture(scope="session")
def module_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second model repository of the session Triton, empty at its start: a test module exports models of its
    own into it and loads them with Triton's repository API (explicit model control), which costs only their
    loading (no Triton of its own to start and stop), and unloads them when done. Neither `repository` nor the
    Tritons other tests start on it see them."""
    path = tmp_path_factory.mktemp("module-models") / "models"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def triton(
    repository: Repository, module_models: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonServer]:
    log_file = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    server = TritonServer(
        repository.path,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        python_env=TRITON_ENV,
        log_file=log_file,
        cpu_budget=Settings().triton_cpu_budget,  # as the launcher starts it: the rate limiter on
        # Every model of `repository` loaded at start, as without model control; `module_models` on demand.
        model_control_mode="explicit",
        extra_args=[f"--model-repository={module_models}"],
    )
    server.start()
    try:
        server.wait_ready([m for manifest in repository.manifests.values() for m in manifest.models])
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def gateway_settings(
    repository: Repository, triton: TritonServer, tmp_path_factory: pytest.TempPathFactory
) -> Settings:
    port = free_port()
    return Settings(
        host="127.0.0.1",
        port=port,
        model_repository=repository.path,
        triton_url=triton.grpc_url,
        storage_dir=tmp_path_factory.mktemp("images"),
        jobs_db=tmp_path_factory.mktemp("jobs") / "jobs.sqlite3",
        api_keys=frozenset({API_KEY}),
        allow_anonymous=False,
        fetch_timeout_s=5.0,
        outbound_allow=("127.0.0.2",),
        webhook_backoff_s=0.05,
        webhook_max_attempts=4,
        rate_limit_per_minute=0,  # the error-table tests send bursts; the limiter has its own test
    )


@pytest.fixture(scope="session")
def gateway(gateway_settings: Settings) -> Iterator[str]:
    server = ThreadedUvicorn(create_app(gateway_settings), gateway_settings.port)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


GatewayFactory = Callable[..., AbstractContextManager[str]]


@pytest.fixture(scope="session")
def make_gateway(gateway_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> GatewayFactory:
    """A fresh gateway (own port, job store and storage) on the session's Triton, with settings overridden."""

    @contextmanager
    def factory(**overrides: Any) -> Iterator[str]:
        port = free_port()
        folder = tmp_path_factory.mktemp("gw")
        settings = replace(
            gateway_settings,
            port=port,
            storage_dir=folder / "images",
            jobs_db=folder / "jobs.sqlite3",
            **overrides,
        )
        server = ThreadedUvicorn(create_app(settings), port)
        server.start()
        try:
            yield server.url
        finally:
            server.stop()

    return factory
