"""Start a server process on loopback, wait for it to answer, stop it (by its own process group only)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from benchmarks.config import PROJECT_ROOT
from benchmarks.pinning import pinned_env


class ServerProcess:
    def __init__(
        self,
        args: list[str],
        *,
        ready_url: str,
        log: Path,
        threads: int,
        timeout_s: float = 300.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.ready_url = ready_url
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, *args],
                cwd=PROJECT_ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**pinned_env(threads), **(env or {})},
                start_new_session=True,
            )
        self._wait(timeout_s)

    def _wait(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with code {self.process.returncode}; see {self.log}")
            try:
                with urllib.request.urlopen(self.ready_url, timeout=2) as response:  # noqa: S310 (our http://127.0.0.1 URL)
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout_s:.0f} s; see {self.log}")

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
