"""A real PostgreSQL for the tests: one server per session (pgserver's wheel), a fresh database per test.

Import the fixtures into a test module (`from tests.fixtures_postgres import pg_server, pg_url`). Never
skipped: the server comes from the `pgserver` wheel (PostgreSQL 16, runs as root through a system user it
creates), and only if that fails from Debian's `postgresql` package binaries (`/usr/lib/postgresql/*/bin`),
with a warning saying so. Durability is switched off (fsync, synchronous_commit, full_page_writes): the data
is thrown away, and `CREATE DATABASE` per test stays in the milliseconds.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

log = logging.getLogger(__name__)

_FAST = ("ALTER SYSTEM SET fsync = off", "ALTER SYSTEM SET synchronous_commit = off",
         "ALTER SYSTEM SET full_page_writes = off", "SELECT pg_reload_conf()")  # fmt: skip
_names = itertools.count(1)


class PgCluster:
    """One PostgreSQL data directory and its server: `url(database)`, `stop()`, `start()`, `cleanup()`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pgdata = root / "pgdata"
        self._debian_bin: Path | None = None
        self._server: Any = None
        self._socket_dir = root / "socket"
        self._uri: str | None = None
        self.engine = ""
        self.start()

    # -- lifecycle --

    def start(self) -> None:
        if self._debian_bin is None:
            try:
                self._start_pgserver()
                self.engine = "pgserver"
                return
            except Exception as exc:  # the wheel cannot run here: the distribution's server, loudly
                warnings.warn(f"pgserver failed ({exc!r}); falling back to Debian's postgresql", stacklevel=2)
                self._debian_bin = _debian_bin()
                shutil.rmtree(self.pgdata, ignore_errors=True)
        self._start_debian()
        self.engine = f"debian ({self._debian_bin})"

    def stop(self) -> None:
        if self._debian_bin is not None:
            self._as_postgres([str(self._debian_bin / "pg_ctl"), "-D", str(self.pgdata), "-m", "fast", "-w", "stop"])
            return
        server, self._server = self._server, None
        if server is not None:
            server.cleanup()  # cleanup_mode="stop": stops the server, keeps the data

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        assert self._uri is not None
        return self._uri.replace("/postgres?", f"/{database}?", 1)

    # -- engines --

    def _start_pgserver(self) -> None:
        self.pgdata.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset, /tmp/runtime-<uid> used instead
            from pgserver.postgres_server import get_server

            server = get_server(self.pgdata, cleanup_mode="stop")
        self._server = server
        if self._uri is None:
            self._uri = server.get_uri()
            _configure(self._uri)

    def _start_debian(self) -> None:
        assert self._debian_bin is not None
        bin_dir = self._debian_bin
        for path in (self.root, self.pgdata, self._socket_dir):
            path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:  # initdb and postgres refuse root: run them as the package's `postgres` user
            shutil.chown(self.root, "postgres")
            for path in (self.pgdata, self._socket_dir):
                shutil.chown(path, "postgres")
            self.root.chmod(0o755)
        if not (self.pgdata / "PG_VERSION").exists():
            self._as_postgres([str(bin_dir / "initdb"), "-D", str(self.pgdata), "-U", "postgres", "--auth=trust"])
        self._as_postgres(
            [str(bin_dir / "pg_ctl"), "-D", str(self.pgdata), "-l", str(self.root / "log"), "-w",
             "-o", f"-k {self._socket_dir} -h ''", "start"]
        )  # fmt: skip
        if self._uri is None:
            self._uri = f"postgresql://postgres@/postgres?host={self._socket_dir}"
            _configure(self._uri)

    def _as_postgres(self, argv: list[str]) -> None:
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        subprocess.run(argv, check=True, capture_output=True, timeout=60)


def _debian_bin() -> Path:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not candidates:
        raise RuntimeError(
            "no PostgreSQL for the tests: pgserver failed and Debian's `postgresql` package is not installed"
        )
    return candidates[-1].parent


def _configure(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in _FAST:
            conn.execute(statement.encode())


def create_database(cluster: PgCluster) -> tuple[str, str]:
    """A fresh, empty database: (name, url)."""
    name = f"imagen_test_{os.getpid()}_{next(_names)}"
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
    return name, cluster.url(name)


def drop_database(cluster: PgCluster, name: str) -> None:
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@contextlib.contextmanager
def private_cluster() -> Iterator[PgCluster]:
    """A server of its own, for a test that stops it."""
    cluster = PgCluster(Path(tempfile.mkdtemp(prefix="imagen-pg-")))
    try:
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgCluster]:
    with private_cluster() as cluster:
        log.info("test PostgreSQL from %s at %s", cluster.engine, cluster.url())
        yield cluster


@pytest.fixture
def pg_url(pg_server: PgCluster) -> Iterator[str]:
    """The URL of a fresh database, dropped after the test."""
    name, url = create_database(pg_server)
    yield url
    drop_database(pg_server, name)
