"""The async HTTP load generator, run in its own process so its CPU use is not the server's.

`python -m benchmarks.loadgen` reads one JSON command per stdin line and answers one JSON line on stdout:
  {"op": "closed", "url": ..., "body_file": ..., "concurrency": C, "requests": N}
      closed loop: C workers, each sends its next request when the previous one returns, N in all;
  {"op": "open", "url": ..., "body_file": ..., "rate": R, "requests": N, "seed": S}
      open loop: N requests at Poisson arrivals of rate R/s; latency counts from the scheduled arrival, so a
      server that falls behind is charged for the wait (no coordinated omission);
  {"op": "sequential", "url": ..., "body_file": ..., "requests": N}
      N requests one after another on ONE kept-alive connection that persists across commands (the transport
      probe sends one request per command and reads Triton's statistics in between);
  {"op": "quit"}.
The answer: {"latencies_s": [...], "errors": E, "error_samples": [...], "wall_s": W, "completed": N}.
A command may carry "headers" (e.g. an Authorization header), sent with every request.

`benchmarks.load` (`python -m benchmarks load --url ...`) calls `closed_loop` and `open_loop` in-process with the
same arguments plus `on_done`, a callback told about every finished request (for its progress bar and status
counts), and `timeout_s`.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

_bodies: dict[str, bytes] = {}

# on_done(ok, latency_s or None, HTTP status or None when no response came)
OnDone = Callable[[bool, float | None, int | None], None]
DEFAULT_TIMEOUT_S = 900.0


def _body(path: str) -> bytes:
    if path not in _bodies:
        _bodies[path] = Path(path).read_bytes()
    return _bodies[path]


async def _one(
    client: httpx.AsyncClient,
    url: str,
    body: bytes,
    start: float,
    out: dict[str, Any],
    headers: dict[str, str] | None = None,
    on_done: OnDone | None = None,
) -> None:
    status: int | None = None
    try:
        response = await client.post(url, content=body, headers={"content-type": "application/json", **(headers or {})})
        status = response.status_code
        ok = response.status_code == 200 and len(response.json().get("images", [])) >= 1
        if not ok:
            out["errors"] += 1
            if len(out["error_samples"]) < 3:
                out["error_samples"].append(f"{response.status_code}: {response.text[:200]}")
    except Exception as exc:  # a load generator records failures, it does not stop on them
        out["errors"] += 1
        if len(out["error_samples"]) < 3:
            out["error_samples"].append(f"{type(exc).__name__}: {exc}")
        if on_done is not None:
            on_done(False, None, status)
        return
    latency = time.perf_counter() - start
    if ok:
        out["latencies_s"].append(latency)
    if on_done is not None:
        on_done(ok, latency if ok else None, status)


async def closed_loop(
    url: str,
    body: bytes,
    concurrency: int,
    requests: int,
    *,
    headers: dict[str, str] | None = None,
    on_done: OnDone | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    out: dict[str, Any] = {"latencies_s": [], "errors": 0, "error_samples": []}
    remaining = requests
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout_s)) as client:

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await _one(client, url, body, time.perf_counter(), out, headers, on_done)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        out["wall_s"] = time.perf_counter() - began
    out["completed"] = len(out["latencies_s"])
    return out


async def open_loop(
    url: str,
    body: bytes,
    rate: float,
    requests: int,
    seed: int,
    *,
    headers: dict[str, str] | None = None,
    on_done: OnDone | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    out: dict[str, Any] = {"latencies_s": [], "errors": 0, "error_samples": []}
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout_s)) as client:
        began = time.perf_counter()
        arrival, tasks = began, []
        for _ in range(requests):
            arrival += rng.expovariate(rate)
            delay = arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(client, url, body, arrival, out, headers, on_done)))
        await asyncio.gather(*tasks)
        out["wall_s"] = time.perf_counter() - began
    out["completed"] = len(out["latencies_s"])
    return out


_persistent: dict[str, httpx.AsyncClient] = {}


async def sequential(url: str, body: bytes, requests: int, headers: dict[str, str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"latencies_s": [], "errors": 0, "error_samples": []}
    if url not in _persistent:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        _persistent[url] = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(900.0))
    began = time.perf_counter()
    for _ in range(requests):
        await _one(_persistent[url], url, body, time.perf_counter(), out, headers)
    out["wall_s"] = time.perf_counter() - began
    out["completed"] = len(out["latencies_s"])
    return out


async def handle(command: dict[str, Any]) -> dict[str, Any]:
    body = _body(command["body_file"])
    headers = command.get("headers")
    if command["op"] == "sequential":
        return await sequential(command["url"], body, int(command["requests"]), headers)
    if command["op"] == "closed":
        return await closed_loop(
            command["url"], body, int(command["concurrency"]), int(command["requests"]), headers=headers
        )
    if command["op"] == "open":
        return await open_loop(
            command["url"],
            body,
            float(command["rate"]),
            int(command["requests"]),
            int(command.get("seed", 0)),
            headers=headers,
        )
    raise ValueError(f"unknown op {command['op']!r}")


def main() -> int:
    with asyncio.Runner() as runner:  # one event loop for the process, so persistent clients stay usable
        return _serve(runner)


def _serve(runner: asyncio.Runner) -> int:
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        if command.get("op") == "quit":
            break
        try:
            result = runner.run(handle(command))
        except Exception as exc:
            result = {"fatal": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
