"""`python -m gateway --workers N`: refused on SQLite (one process), and with a shared store the CLI reaches the
worker processes through the environment, which is all `gateway.asgi:create_app_from_env` reads."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from uvicorn.importer import import_from_string

import gateway.__main__ as launcher
import gateway.asgi
from gateway.settings import PROJECT_ROOT, Settings

POSTGRES = "postgresql://imagen:secret@db.example:5432/imagen"


@pytest.fixture
def clean_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """os.environ without IMAGEN_*, restored afterwards (the launcher writes the workers' variables into it);
    the SIGTERM handler main() installs is restored too."""
    saved = dict(os.environ)
    saved_sigterm = signal.getsignal(signal.SIGTERM)
    for name in [n for n in os.environ if n.startswith("IMAGEN_")]:
        del os.environ[name]
    os.environ["IMAGEN_STORAGE_DIR"] = str(tmp_path / "images")
    try:
        yield os.environ  # type: ignore[misc]
    finally:
        os.environ.clear()
        os.environ.update(saved)
        signal.signal(signal.SIGTERM, saved_sigterm)


def _run_launcher(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEN_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=PROJECT_ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--workers", "2"], {}),
        ([], {"IMAGEN_WORKERS": "3"}),
    ],
    ids=["cli", "env"],
)
def test_several_workers_on_sqlite_are_refused_in_one_line(tmp_path: Path, args: list[str], env: dict) -> None:
    env = {**env, "IMAGEN_JOBS_DB": str(tmp_path / "jobs.sqlite3"), "IMAGEN_STORAGE_DIR": str(tmp_path / "img")}
    result = _run_launcher([*args, "--allow-anonymous", "--model-repository", str(tmp_path / "models")], env)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gateway: error: --workers ")
    assert "PostgreSQL" in lines[0] or "postgresql://" in lines[0]
    assert "SQLite" in lines[0]
    assert result.stdout == ""  # refused before anything else: no export, no Triton
    assert not (tmp_path / "models").exists()
    assert not (tmp_path / "jobs.sqlite3").exists()


def test_default_sqlite_store_is_refused_too(tmp_path: Path) -> None:
    result = _run_launcher(["--workers", "2", "--allow-anonymous"], {"IMAGEN_STORAGE_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "postgresql://" in result.stderr


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_workers_must_be_a_positive_integer(tmp_path: Path, value: str) -> None:
    result = _run_launcher(["--workers", value, "--allow-anonymous"], {"IMAGEN_STORAGE_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert "--workers" in result.stderr


def test_workers_from_env_below_one_is_refused(clean_env: dict, capsys: pytest.CaptureFixture[str]) -> None:
    clean_env["IMAGEN_WORKERS"] = "0"
    assert launcher.main(["--allow-anonymous"]) == 2
    assert "IMAGEN_WORKERS must be 1 or more" in capsys.readouterr().err


def test_shared_job_store_recognises_postgres_urls_only() -> None:
    assert launcher.shared_job_store(POSTGRES)
    assert launcher.shared_job_store(Path(POSTGRES))  # Path() folds '//' into '/': the scheme still shows
    assert launcher.shared_job_store("postgres://db/imagen")
    assert launcher.shared_job_store("POSTGRESQL://db/imagen")
    assert not launcher.shared_job_store(Path("/var/lib/imagen/jobs/jobs.sqlite3"))
    assert not launcher.shared_job_store("jobs.sqlite3")
    assert not launcher.shared_job_store("/srv/postgresql/jobs.sqlite3")


def test_cli_environment_converts_given_flags_only() -> None:
    import argparse

    args = argparse.Namespace(
        port=9000, host=None, allow_anonymous=True, export_demo=False, model_repository=Path("/m"), workers=2, x=1
    )
    assert launcher.cli_environment(args) == {
        "IMAGEN_PORT": "9000",
        "IMAGEN_ALLOW_ANONYMOUS": "1",
        "IMAGEN_EXPORT_DEMO": "0",
        "IMAGEN_MODEL_REPOSITORY": "/m",
        "IMAGEN_WORKERS": "2",
    }


def test_the_cli_reaches_the_workers_app_factory_through_the_environment(
    tmp_path: Path, clean_env: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """main() with --workers 2 on PostgreSQL: uvicorn gets the factory import string and N; a worker building its
    app from the environment at that moment (as a spawned process would) gets the launcher's settings."""
    clean_env["IMAGEN_JOBS_DB"] = POSTGRES
    clean_env["IMAGEN_LOG_LEVEL"] = "warning"  # env and CLI mixed: both reach the worker
    keys = tmp_path / "keys.txt"
    keys.write_text("# keys\nkey-one-0123456789abcdefghijklmnop\n")
    clean_env["IMAGEN_API_KEYS_FILE"] = str(keys)
    repo = tmp_path / "models"
    monkeypatch.setattr(launcher, "load_manifests", lambda path: {"imagen-v2": object()})
    parent: dict[str, Any] = {}

    class FakeSocket:
        def close(self) -> None:
            parent["socket_closed"] = True

    class FakeMultiprocess:
        """uvicorn's supervisor: records the config each worker would get, starts nothing."""

        def __init__(self, config: Any, sockets: list[Any]) -> None:
            parent.update(
                app=config.app,
                factory=config.factory,
                workers=config.workers,
                host=config.host,
                port=config.port,
                log_level=config.log_level,
                env=dict(os.environ),
            )

        def run(self) -> None:
            parent["ran"] = True

    monkeypatch.setattr(launcher, "Multiprocess", FakeMultiprocess)
    monkeypatch.setattr(uvicorn.Config, "bind_socket", lambda self: FakeSocket())
    argv = [
        "--workers", "2", "--port", "9123", "--host", "0.0.0.0", "--model-repository", str(repo),
        "--triton-url", "triton-a:8001,triton-b:8001", "--public-base-url", "https://imagen.example",
        "--no-export-demo",
    ]  # fmt: skip
    assert launcher.main(argv) == 0

    assert parent["app"] == "gateway.asgi:create_app_from_env"
    assert parent["factory"] is True
    assert parent["workers"] == 2 and parent["ran"] and parent["socket_closed"]
    assert (parent["host"], parent["port"], parent["log_level"]) == ("0.0.0.0", 9123, "warning")
    env = parent["env"]
    assert env["IMAGEN_WORKERS"] == "2"
    assert env["IMAGEN_PORT"] == "9123"
    assert env["IMAGEN_TRITON_URL"] == "triton-a:8001,triton-b:8001"
    assert env["IMAGEN_EXPORT_DEMO"] == "0"
    assert env["IMAGEN_JOBS_DB"] == POSTGRES

    # What each worker does: import the factory by its string and call it with the environment it inherited.
    factory = import_from_string(parent["app"])
    assert factory is gateway.asgi.create_app_from_env
    built: list[Settings] = []
    app: Any = object()

    def fake_create_app(settings: Settings) -> Any:
        built.append(settings)
        return app

    monkeypatch.setattr(gateway.asgi, "create_app", fake_create_app)
    monkeypatch.setattr(os, "environ", env)
    access = logging.getLogger(gateway.asgi.UVICORN_ACCESS_LOGGER)
    monkeypatch.setattr(access, "disabled", False)
    assert factory() is app
    assert access.disabled  # issue 22: uvicorn's access log would write image capability paths
    (worker,) = built
    assert worker.port == 9123
    assert worker.host == "0.0.0.0"
    assert worker.workers == 2
    assert worker.model_repository == repo
    assert worker.triton_url == "triton-a:8001,triton-b:8001"
    assert worker.public_base_url == "https://imagen.example"
    assert worker.export_demo is False
    assert worker.log_level == "warning"
    assert worker.api_keys == frozenset({"key-one-0123456789abcdefghijklmnop"})
    assert launcher.shared_job_store(worker.jobs_db)


def test_one_worker_keeps_the_in_process_server(clean_env: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default (1) never takes the multi-process path, SQLite included."""
    monkeypatch.setattr(launcher, "load_manifests", lambda path: {"imagen-v2": object()})
    served: list[Settings] = []

    async def fake_serve(settings: Settings) -> None:
        served.append(settings)

    monkeypatch.setattr(launcher, "serve", fake_serve)
    monkeypatch.setattr(launcher, "serve_workers", lambda *a: pytest.fail("multi-process path taken"))
    assert launcher.main(["--allow-anonymous", "--triton-url", "t:8001"]) == 0
    assert served[0].workers == 1
    assert not launcher.shared_job_store(served[0].jobs_db)


def test_a_setting_that_cannot_reach_the_workers_is_refused(
    clean_env: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Were a flag not to map onto an IMAGEN_* variable, the workers would run without it: refused, named."""
    clean_env["IMAGEN_JOBS_DB"] = POSTGRES
    monkeypatch.setattr(launcher, "cli_environment", lambda args: {})
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("started"))
    assert launcher.main(["--workers", "2", "--port", "9124", "--allow-anonymous"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach worker processes" in err
    assert "port" in err and "workers" in err


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("gateway.internal", False)],
)  # fmt: skip
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert launcher.is_loopback_host(host) is loopback


def test_anonymous_access_on_a_public_address_is_refused_unless_forced(
    clean_env: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 22, point 4: --allow-anonymous on 0.0.0.0 would serve the shared anonymous user to the network."""
    monkeypatch.setattr(launcher, "load_manifests", lambda path: {"imagen-v2": object()})
    served: list[Settings] = []

    async def fake_serve(settings: Settings) -> None:
        served.append(settings)

    monkeypatch.setattr(launcher, "serve", fake_serve)
    assert launcher.main(["--allow-anonymous", "--host", "0.0.0.0", "--triton-url", "t:8001"]) == 2
    assert "anonymous access on 0.0.0.0" in capsys.readouterr().err and not served
    assert (
        launcher.main(["--allow-anonymous", "--host", "0.0.0.0", "--allow-anonymous-public", "--triton-url", "t:8001"])
        == 0
    )
    clean_env["IMAGEN_ALLOW_ANONYMOUS_PUBLIC"] = "1"
    assert launcher.main(["--allow-anonymous", "--host", "0.0.0.0", "--triton-url", "t:8001"]) == 0
    assert [s.allow_anonymous_public for s in served] == [True, True]
