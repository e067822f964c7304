"""Transport cost: what the gateway and the Triton hop add per request, isolated from model compute.

Two measurements, both sequential (one request in flight, so nothing queues behind anything else):

1. Triton hop, per call: `bench_identity` (a Python-backend model that returns its input) called through the
   gateway's own client code (`gateway.engine.TritonEngine`, tritonclient gRPC aio) with a tensor the size of one
   UNet call's inputs. Reported: client latency p50/p99, Triton's server-side time for it, and the difference
   (= gRPC + protobuf serialization + client, per call).
2. Gateway overhead, per request: a real image-to-image request through the gateway, minus the Triton-side time of
   that same request (sum over the four models of the delta of Triton's cumulative `success` ns, read before and
   after the request; Triton's `success` time covers queue + input copy + compute + output copy). The rest is
   ours: HTTP + JSON + base64 + image decode/resize + tokenizing + numpy scheduler + one gRPC round trip per Triton
   call + PNG encode + storage write + response, plus the load generator's own HTTP client.
   The Triton-side part also reports its queue time separately: at one request in flight that is the dynamic
   batcher's `max_queue_delay` wait, a Triton setting, not gateway code.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import numpy as np

from benchmarks.client import LoadGenerator
from benchmarks.systems.service import IDENTITY_MODEL, Service, diff


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def identity_probe(service: Service, floats: int, calls: int) -> dict[str, Any]:
    from gateway.triton.client import TritonEngine

    x = np.random.default_rng(0).standard_normal((1, 1, floats), dtype=np.float32)

    async def calls_of(n: int) -> list[float]:
        engine = TritonEngine(service.grpc_url, timeout_s=60)
        try:
            latencies = []
            for _ in range(n):
                began = time.perf_counter()
                await engine.infer(IDENTITY_MODEL, {"x": x}, ["y"])
                latencies.append(time.perf_counter() - began)
            return latencies
        finally:
            await engine.close()

    asyncio.run(calls_of(5))  # warm-up, outside the statistics window
    before = service.stats([IDENTITY_MODEL])
    latencies = asyncio.run(calls_of(calls))
    server = diff(service.stats([IDENTITY_MODEL]), before)[IDENTITY_MODEL]
    server_ms = server.success_ns / max(server.success_count, 1) / 1e6
    client_ms = [s * 1e3 for s in latencies]
    return {
        "bytes": floats * 4,
        "calls": calls,
        "client_ms_p50": _pct(client_ms, 50),
        "client_ms_p99": _pct(client_ms, 99),
        "server_ms_mean": server_ms,
        "transport_ms_p50": _pct(client_ms, 50) - server_ms,
        "transport_ms_p99": _pct(client_ms, 99) - server_ms,
    }


def gateway_overhead(
    service: Service, loadgen: LoadGenerator, body_file: str, requests: int, *, fresh: int = 3, warmup: int = 2
) -> dict[str, Any]:
    fresh_runs = [
        loadgen.run(op="closed", url=service.url, body_file=body_file, concurrency=1, requests=1) for _ in range(fresh)
    ]
    # warm-up, opens the connection
    loadgen.run(op="sequential", url=service.url, body_file=body_file, requests=max(warmup, 1))
    overhead, triton_ms, queue_ms, latency_ms, calls = [], [], [], [], []
    for _ in range(requests):
        before = service.stats()
        result = loadgen.run(op="sequential", url=service.url, body_file=body_file, requests=1)
        delta = diff(service.stats(), before)
        if result["errors"] or not result["latencies_s"]:
            continue
        latency = result["latencies_s"][0] * 1e3
        server = sum(s.success_ns for s in delta.values()) / 1e6
        latency_ms.append(latency)
        triton_ms.append(server)
        queue_ms.append(sum(s.queue_ns for s in delta.values()) / 1e6)
        overhead.append(latency - server)
        calls.append(sum(s.success_count for s in delta.values()))
    return {
        "requests": len(overhead),
        "triton_calls_per_request": statistics.median(calls) if calls else None,
        "latency_ms_p50": _pct(latency_ms, 50),
        "triton_ms_p50": _pct(triton_ms, 50),
        "triton_queue_ms_p50": _pct(queue_ms, 50),
        "overhead_ms_p50": _pct(overhead, 50),
        "overhead_ms_p99": _pct(overhead, 99),
        "overhead_ms_min": min(overhead) if overhead else None,
        "overhead_ms_max": max(overhead) if overhead else None,
        # For comparison: the same request from a client that opens a new connection (httpx, `fresh` in a row).
        "fresh_connection_latency_ms_p50": _pct([s * 1e3 for f in fresh_runs for s in f["latencies_s"]], 50),
        "method": "sequential requests on one kept-alive connection; overhead = client latency - sum over the "
        "four Triton models of the delta of Triton's success ns for that request",
    }
