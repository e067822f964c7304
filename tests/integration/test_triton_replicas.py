"""Two real Triton replicas behind one gateway (`IMAGEN_TRITON_URL="a,b"`): both serve under load, `kill -9` of one
mid-load fails no request (its calls move to the other), and it is used again once it is back on the same ports.

The gateway runs in-process (uvicorn in a thread) with `make_triton(settings)` as its engine; Triton's own
inference statistics, read from each replica with tritonclient, say which replica ran what.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from gateway.app import create_app
from gateway.settings import Settings
from gateway.triton.pool import TritonPool, make_triton
from gateway.triton.server import TritonServer
from tests.helpers import ThreadedUvicorn, data_uri, free_port, make_image
from tests.integration.conftest import API_KEY, Repository, start_own_triton

pytestmark = pytest.mark.integration

IMAGE = data_uri(make_image(128, 128, seed=21))
AUTH = {"Authorization": f"Bearer {API_KEY}"}
PIPELINE = "imagen-v2"
LOAD_CLIENTS = 4
TRITON_READY_S = 180.0
PHASE_S = 120.0  # bound on each phase of the scenario
REQUESTS_AFTER_KILL = 12


def body(seed: int) -> dict[str, Any]:
    return {"image": IMAGE, "prompt": "a lighthouse in fog", "model": PIPELINE, "steps": 6, "seed": seed}


def new_triton(repository: Repository, log_file: Path, ports: tuple[int, int, int] | None = None) -> TritonServer:
    return start_own_triton(repository.path, log_file, ports=ports)


def kill_9(server: TritonServer) -> None:
    assert server.process is not None
    os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait(timeout=30)


def unet_executions(server: TritonServer, model: str) -> int:
    """Triton's execution count of the model on this replica since it started (0 when it does not answer)."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        stats = client.get_inference_statistics(model, as_json=True, client_timeout=5.0)
    except InferenceServerException:
        return 0
    finally:
        client.close()
    return sum(int(e.get("execution_count", 0) or 0) for e in stats.get("model_stats", []))


@pytest.fixture
def replicas(repository: Repository, tmp_path: Path) -> Iterator[list[TritonServer]]:
    """Two Tritons of this test's own; the list is the test's to change (a replica restarted), all stopped after."""
    servers = [new_triton(repository, tmp_path / f"triton-{name}.log") for name in ("a", "b")]
    try:
        for server in servers:
            server.wait_ready(repository.manifests[PIPELINE].models, timeout_s=TRITON_READY_S)
        yield servers
    finally:
        for server in servers:
            server.stop()


@contextmanager
def pool_gateway(repository: Repository, folder: Path, triton_url: str) -> Iterator[tuple[str, TritonPool]]:
    port = free_port()
    settings = Settings(
        host="127.0.0.1",
        port=port,
        model_repository=repository.path,
        triton_url=triton_url,
        triton_timeout_s=30.0,
        triton_health_interval_s=0.5,
        storage_dir=folder / "images",
        jobs_db=folder / "jobs.sqlite3",
        api_keys=frozenset({API_KEY}),
        rate_limit_per_minute=0,
    )
    pool = make_triton(settings)
    app = create_app(settings, engine=cast(Any, pool))
    app.state.metrics.watch_triton_replicas(pool.replica_metrics)
    server = ThreadedUvicorn(app, port)
    server.start()
    try:
        deadline = time.monotonic() + 60
        while httpx.get(f"{server.url}/readyz", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "gateway not ready"
            time.sleep(0.2)
        yield server.url, pool
    finally:
        server.stop()


Result = tuple[float, int, str]  # (time done, status, error text)


async def run_load(url: str, stop: asyncio.Event, results: list[Result]) -> None:
    async with httpx.AsyncClient(timeout=60) as client:

        async def worker(w: int) -> None:
            i = 0
            while not stop.is_set():
                r = await client.post(f"{url}/v1/image-to-image", json=body(w * 10_000 + i), headers=AUTH)
                results.append((time.monotonic(), r.status_code, "" if r.status_code == 200 else r.text[:500]))
                i += 1

        await asyncio.gather(*(worker(w) for w in range(LOAD_CLIENTS)))


async def until(condition: Callable[[], Any], what: str, load: asyncio.Task[None], timeout_s: float = PHASE_S) -> None:
    """Wait, bounded, for a (blocking) condition, checked in a thread; fail early if the load died."""
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(condition):
        if load.done():
            load.result()
            raise AssertionError(f"load ended before: {what}")
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        await asyncio.sleep(0.2)


def test_kill_one_replica_under_load(replicas: list[TritonServer], repository: Repository, tmp_path: Path) -> None:
    a, b = replicas
    unet = repository.manifests[PIPELINE].unet.model
    with pool_gateway(repository, tmp_path, f"{a.grpc_url},{b.grpc_url}") as (url, pool):

        async def scenario() -> tuple[list[Result], float, int]:
            stop, results = asyncio.Event(), list[Result]()
            load = asyncio.create_task(run_load(url, stop, results))
            try:
                # 1. Both replicas serve the load.
                await until(
                    lambda: len(results) >= 4 and unet_executions(a, unet) > 0 and unet_executions(b, unet) > 0,
                    "both replicas ran UNet batches",
                    load,
                )
                # 2. kill -9 one of them mid-load; the load goes on.
                b_before = unet_executions(b, unet)
                await asyncio.to_thread(kill_9, a)
                killed_at, done_at_kill = time.monotonic(), len(results)
                await until(lambda: len(results) >= done_at_kill + REQUESTS_AFTER_KILL, "requests after the kill", load)
                assert unet_executions(b, unet) > b_before
            finally:
                stop.set()
                await asyncio.wait_for(load, PHASE_S)
            return results, killed_at, b_before

        results, killed_at, _ = asyncio.run(scenario())
        failed = [r for r in results if r[1] != 200]
        assert not failed, failed
        assert sum(1 for done, _, _ in results if done > killed_at) >= REQUESTS_AFTER_KILL
        assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200  # b serves every model
        assert not pool.replicas[a.grpc_url].live

        # 3. The killed replica comes back on the same ports: it is put back and used again.
        restarted = new_triton(repository, tmp_path / "triton-a2.log", (a.http_port, a.grpc_port, a.metrics_port))
        replicas[0] = restarted
        a.stop()  # the killed one's leftovers (its work folder)
        restarted.wait_ready(repository.manifests[PIPELINE].models, timeout_s=TRITON_READY_S)
        deadline = time.monotonic() + PHASE_S
        seed = 0
        while unet_executions(restarted, unet) == 0:
            assert time.monotonic() < deadline, "the restarted replica got no calls"
            r = httpx.post(f"{url}/v1/image-to-image", json=body(900_000 + seed), headers=AUTH, timeout=60)
            assert r.status_code == 200, r.text
            seed += 1
        assert pool.replicas[a.grpc_url].live

        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        for server in (a, b):
            assert f'imagen_triton_replica_calls_total{{replica="{server.grpc_url}"}}' in metrics
        assert f'imagen_triton_replica_healthy{{replica="{b.grpc_url}"}} 1.0' in metrics
