"""`python -m gateway` subprocesses on the session's Triton, each with its own job store and storage folder.

For tests that need a gateway of their own settings, or one they can kill (-9) and start again on the same
folder (the same job store).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from gateway.settings import PROJECT_ROOT
from gateway.triton.server import TritonServer
from tests.helpers import free_port
from tests.integration.conftest import Repository

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


@dataclass
class SubprocessGateway:
    url: str
    jobs_db: Path
    log_file: Path
    process: subprocess.Popen[bytes]

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except OSError as exc:
            return f"(no gateway log: {exc})"

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, jobs stay queued/processing in the store."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT_S)


def start_gateway(
    triton: TritonServer,
    repository: Repository,
    folder: Path,
    *,
    port: int | None = None,
    triton_url: str | None = None,
    **env_overrides: str,
) -> SubprocessGateway:
    """Start a gateway configured through IMAGEN_* variables only, and wait until `/healthz` answers.

    `triton_url` (e.g. "a:1,b:2", several replicas) replaces the session Triton's address on the command line."""
    port = port or free_port()
    folder.mkdir(parents=True, exist_ok=True)
    jobs_db = folder / "jobs.sqlite3"
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEN_")}
    env.update(
        IMAGEN_JOBS_DB=str(jobs_db),
        IMAGEN_STORAGE_DIR=str(folder / "images"),
        IMAGEN_WEBHOOK_BACKOFF_S="0.05",
        IMAGEN_OUTBOUND_ALLOW="127.0.0.2",  # the tests' webhook receivers listen there
    )
    env.update(env_overrides)
    log_file = folder / f"gateway-{time.time_ns()}.log"
    command = [sys.executable, "-m", "gateway", "--triton-url", triton_url or triton.grpc_url, "--port", str(port)]
    with open(log_file, "wb") as log:
        process = subprocess.Popen(
            [*command, "--model-repository", str(repository.path)],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    gateway = SubprocessGateway(f"http://127.0.0.1:{port}", jobs_db, log_file, process)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            if httpx.get(f"{gateway.url}/healthz", timeout=1).status_code == 200:
                return gateway
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            gateway.stop()
            pytest.fail(f"gateway subprocess did not start:\n{gateway.log_tail()}")
        time.sleep(0.1)


@contextmanager
def subprocess_gateway(
    triton: TritonServer, repository: Repository, folder: Path, **env_overrides: str
) -> Iterator[SubprocessGateway]:
    gateway = start_gateway(triton, repository, folder, **env_overrides)
    try:
        yield gateway
    finally:
        gateway.stop()
