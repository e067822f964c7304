"""`python -m gateway` as a user runs it: exports the demo into an empty repository, starts Triton and the
gateway, serves the spec's example, and stops both cleanly on Ctrl-C (SIGINT)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from gateway.settings import PROJECT_ROOT
from tests.helpers import SPEC_EXAMPLE, data_uri, free_port, make_image
from tests.integration.conftest import Repository

pytestmark = pytest.mark.integration


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _launcher_argv(repo: Path, port: int, http_port: int, grpc_port: int, metrics_port: int) -> list[str]:
    return [
        sys.executable, "-m", "gateway", "--allow-anonymous", "--model-repository", str(repo), "--port", str(port),
        "--triton-http-port", str(http_port), "--triton-grpc-port", str(grpc_port),
        "--triton-metrics-port", str(metrics_port),
    ]  # fmt: skip


def test_launcher_exports_demo_serves_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    port, http_port, grpc_port, metrics_port = (free_port() for _ in range(4))
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEN_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["IMAGEN_STORAGE_DIR"] = str(tmp_path / "images")
    env["IMAGEN_JOBS_DB"] = str(tmp_path / "jobs.sqlite3")
    log_path = tmp_path / "launcher.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            _launcher_argv(repo, port, http_port, grpc_port, metrics_port),
            cwd=PROJECT_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 240
        while "gateway: ready" not in log_path.read_text():
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.5)
        output = log_path.read_text()
        assert f"http://127.0.0.1:{port}/v1/image-to-image" in output
        assert {p.name for p in repo.glob("*.pipeline.json")} == {"imagen-v2.pipeline.json", "imagen-v3.pipeline.json"}

        body = {
            "image": data_uri(make_image(256, 256, fmt="JPEG"), "image/jpeg"),
            **SPEC_EXAMPLE,
        }
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/image-to-image",
            json=body,
            headers={"Authorization": "Bearer YOUR_API_KEY"},
            timeout=120,
        )
        assert response.status_code == 200, response.text
        assert len(response.json()["images"]) == 2
        assert _port_open(grpc_port)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert code == 0, log_path.read_text()
    assert "stopping Triton" in log_path.read_text()
    assert not _port_open(port) and not _port_open(grpc_port) and not _port_open(http_port)


def test_launcher_refuses_to_start_without_keys(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEN_")}
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "--model-repository", str(tmp_path)],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "no API keys configured" in result.stderr and "--allow-anonymous" in result.stderr


def test_sigterm_during_startup_stops_triton_too(tmp_path: Path, repository: Repository) -> None:
    """docker stop / systemd send SIGTERM, possibly while Triton is still loading: nothing may outlive us."""
    port, http_port, grpc_port, metrics_port = (free_port() for _ in range(4))
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEN_")}
    env.update(PYTHONUNBUFFERED="1", IMAGEN_JOBS_DB=str(tmp_path / "jobs.sqlite3"))
    log_path = tmp_path / "launcher.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            _launcher_argv(repository.path, port, http_port, grpc_port, metrics_port),
            cwd=PROJECT_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while "starting Triton" not in log_path.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.1)
    while not _port_open(http_port):  # Triton is up (its models may still be loading)
        assert time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0, log_path.read_text()
    assert "stopping Triton" in log_path.read_text()
    assert not _port_open(http_port) and not _port_open(grpc_port)
