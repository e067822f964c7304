"""Issue 22: the bundled Triton and its model stubs get an allow-listed environment, never the gateway's secrets.

No Triton is started: the environment is built as `TritonServer.start` builds it, and `start` itself runs with
`subprocess.Popen` replaced, so the test sees exactly the environment the process would get."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.triton import server
from gateway.triton.server import TritonDistribution, TritonServer

SECRETS = {
    "IMAGEN_API_KEYS": "key-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "IMAGEN_WEBHOOK_SECRET": "whsec_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
    "IMAGEN_JOBS_DB": "postgresql://imagen:hunter2@db.internal/jobs",
    "IMAGEN_S3_SECRET_ACCESS_KEY": "s3-secret",
    "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "aws-secret",
    "AWS_SESSION_TOKEN": "aws-session",
    "DATABASE_URL": "postgresql://u:p@db/x",
    "PGPASSWORD": "pg-secret",
    "HF_TOKEN": "hf_secret",
    "HTTPS_PROXY": "http://user:pass@proxy:3128",
    "http_proxy": "http://user:pass@proxy:3128",
    "PYTHONPATH": "/app/gateway-only",
    "VIRTUAL_ENV": "/app/.venv",
}
NEEDED = {
    "HOME": "/home/imagen",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "TMPDIR": "/srv/imagen/tmp",
    "CUDA_VISIBLE_DEVICES": "0",
    "NVIDIA_VISIBLE_DEVICES": "all",
    "OMP_NUM_THREADS": "2",
    "MKL_NUM_THREADS": "2",
    "HF_HUB_OFFLINE": "1",
}


def _dist(tmp_path: Path) -> TritonDistribution:
    return TritonDistribution(
        binary=tmp_path / "bin" / "tritonserver",
        python_backend=tmp_path / "backends" / "python",
        stub=tmp_path / "stub",
        libs=tmp_path / "libs",
    )


def _gateway_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {**SECRETS, **NEEDED, "PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": "/opt/cuda/lib64"}.items():
        monkeypatch.setenv(name, value)


def _check(env: dict[str, str], tmp_path: Path, python_env: Path | None) -> None:
    for name in SECRETS:
        assert name not in env, f"{name} reaches tritonserver"
    for value in SECRETS.values():
        assert not [k for k, v in env.items() if value in v], f"a secret's value reaches tritonserver: {value}"
    assert not [k for k in env if k.startswith("IMAGEN_") or k.startswith("AWS_")]
    for name, value in NEEDED.items():
        assert env[name] == value, name
    bin_dir = python_env / "bin" if python_env is not None else Path(sys.executable).parent
    assert env["PATH"].split(os.pathsep) == [str(bin_dir), "/usr/bin", "/bin"]
    libs = env["LD_LIBRARY_PATH"].split(os.pathsep)
    assert str(tmp_path / "libs") in libs and libs[-1] == "/opt/cuda/lib64"
    assert all(server._inherited(name) for name in env), sorted(env)


def test_the_environment_is_an_allow_list(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _gateway_environment(monkeypatch)
    _check(server._environment(_dist(tmp_path), tmp_path / "runtime-env"), tmp_path, tmp_path / "runtime-env")
    _check(server._environment(_dist(tmp_path), None), tmp_path, None)
    # An explicit environment is read instead of the process's.
    explicit = server._environment(_dist(tmp_path), None, {"IMAGEN_API_KEYS": "k", "HOME": "/h", "PATH": "/p"})
    assert "IMAGEN_API_KEYS" not in explicit and explicit["HOME"] == "/h"


def test_start_hands_tritonserver_only_the_allow_list(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _gateway_environment(monkeypatch)
    started: list[dict[str, Any]] = []

    class FakePopen:
        def __init__(self, args: list[str], **kwargs: Any) -> None:
            started.append(kwargs)
            self.pid = -1

        def poll(self) -> int:
            return 0

    monkeypatch.setattr(server, "find_distribution", lambda: _dist(tmp_path))
    monkeypatch.setattr(server, "_prepare_backends", lambda dist, into: into)
    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    triton = TritonServer(tmp_path / "repository", python_env=tmp_path / "runtime-env")
    triton.start()
    triton.stop()
    (kwargs,) = started
    _check(kwargs["env"], tmp_path, tmp_path / "runtime-env")
