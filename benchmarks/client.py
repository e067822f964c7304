"""The harness's handle on the load-generator process (`benchmarks.loadgen`)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from benchmarks.config import PROJECT_ROOT
from benchmarks.pinning import pinned_env


class LoadGenerator:
    def __init__(self, threads: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.loadgen"],
            cwd=PROJECT_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=pinned_env(threads),
        )

    def run(self, **command: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the load generator exited")
        result = json.loads(line)
        if "fatal" in result:
            raise RuntimeError(f"load generator: {result['fatal']}")
        return result

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.process.stdin.flush()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
