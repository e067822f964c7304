"""Issue 10, item 2: decode work is bounded per image and runs on its own bounded pool, against the real gateway.

A progressive JPEG with thousands of scans (libjpeg-turbo issue 284) is ~400 kB and ~40 s of CPU to decode
(measured in tests/unit/test_codecs.py). The gateway (`python -m gateway`, a subprocess configured by IMAGEN_*)
must refuse it fast with 400 `invalid_image`, and image work must never stall job reads or health checks.

Every time bound here is a liveness bound with a generous margin on a shared 2-core machine, not a performance
claim: `/healthz` and `GET /v1/image-to-image/{id}` each answer within `ANSWER_WITHIN_S` (1 s) while image work
is hostile; the gateway's CPU per refused image stays under `CPU_PER_REFUSAL_S` (1 s; unguarded it is ~40 s).
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from gateway.triton.server import TritonServer
from tests.helpers import data_uri, make_image
from tests.integration import gateways
from tests.integration.conftest import Repository
from tests.integration.gateways import SubprocessGateway
from tests.unit.test_codecs import many_scan_jpeg

pytestmark = pytest.mark.integration

API_KEY = "hardening-decode-key-0000-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ANSWER_WITHIN_S = 1.0
CPU_PER_REFUSAL_S = 1.0
FLOOD_S = 3.0
SENDERS = 10
FINAL = {"completed", "failed", "canceled"}


def subprocess_gateway(
    triton: TritonServer, repository: Repository, folder: Path, **env: str
) -> AbstractContextManager[SubprocessGateway]:
    settings = {
        "IMAGEN_API_KEYS": API_KEY,
        "IMAGEN_LOG_LEVEL": "warning",
        # Only the image bounds are under test: the per-key request and work limits are switched off.
        "IMAGEN_RATE_LIMIT_PER_MINUTE": "0",
        "IMAGEN_WORK_PER_MINUTE": "0",
        "IMAGEN_MAX_ACTIVE_JOBS_PER_KEY": "0",
    }
    return gateways.subprocess_gateway(triton, repository, folder, **{**settings, **env})


def body(image: str, **overrides: Any) -> dict[str, Any]:
    return {"image": image, "prompt": "a quiet harbour", "steps": 2, "strength": 0.5, "seed": 3, **overrides}


def create_job(url: str) -> str:
    response = httpx.post(
        f"{url}/v1/image-to-image",
        json=body(data_uri(make_image(64, 64, seed=5))),
        headers={**AUTH, "Prefer": "respond-async"},
        timeout=30,
    )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def wait_final(url: str, job_id: str, timeout_s: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while (job := httpx.get(f"{url}/v1/image-to-image/{job_id}", headers=AUTH, timeout=10).json())[
        "status"
    ] not in FINAL:
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    return dict(job)


@dataclass
class Probe:
    """Polls `/healthz` and one job's `GET` in a thread; records every latency (a timeout counts as too slow)."""

    url: str
    job_id: str
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"healthz": [], "job": []})
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        targets = {"healthz": f"{self.url}/healthz", "job": f"{self.url}/v1/image-to-image/{self.job_id}"}
        with httpx.Client(headers=AUTH, timeout=ANSWER_WITHIN_S * 5) as client:
            while not self.stop.is_set():
                for name, target in targets.items():
                    started = time.perf_counter()
                    try:
                        status = client.get(target).status_code
                    except httpx.HTTPError as exc:
                        self.failures.append(f"{name}: {exc!r}")
                        continue
                    self.latencies[name].append(time.perf_counter() - started)
                    if status != 200:
                        self.failures.append(f"{name}: HTTP {status}")
                time.sleep(0.02)

    def assert_answered_in_time(self) -> None:
        assert not self.failures, self.failures[:5]
        for name, values in self.latencies.items():
            assert len(values) >= 5, f"{name} was polled only {len(values)} times"
            assert max(values) < ANSWER_WITHIN_S, f"{name}: slowest {max(values):.3f} s of {len(values)}"


def while_probing(url: str, job_id: str, flood: Callable[[], None]) -> Probe:
    probe = Probe(url, job_id)
    thread = threading.Thread(target=probe.run, daemon=True)
    thread.start()
    try:
        time.sleep(0.2)  # a few answers before the flood, so a slow start is not blamed on it
        flood()
        time.sleep(0.2)
    finally:
        probe.stop.set()
        thread.join(timeout=30)
    return probe


def senders(url: str, image: str, *, until: float | None) -> list[httpx.Response]:
    """`SENDERS` threads posting `image` at once (once each, or again and again until `until`)."""
    results: list[list[httpx.Response]] = [[] for _ in range(SENDERS)]
    start = threading.Barrier(SENDERS)

    def send(slot: int) -> None:
        with httpx.Client(headers=AUTH, timeout=60) as client:
            start.wait()
            while True:
                results[slot].append(client.post(f"{url}/v1/image-to-image", json=body(image)))
                if until is None or time.monotonic() > until:
                    return

    threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(SENDERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return [response for sent in results for response in sent]


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def test_many_scan_jpegs_are_refused_fast_while_jobs_and_health_answer(
    triton: TritonServer, repository: Repository, tmp_path: Path
) -> None:
    bomb = many_scan_jpeg(10_000)  # ~405 kB, ~40 s of CPU each without the guard
    image = f"data:image/jpeg;base64,{base64.b64encode(bomb).decode()}"
    with subprocess_gateway(triton, repository, tmp_path) as gw:
        job_id = create_job(gw.url)
        process = psutil.Process(gw.process.pid)
        cpu_before = cpu_seconds(process)
        responses: list[httpx.Response] = []

        def flood() -> None:
            responses.extend(senders(gw.url, image, until=time.monotonic() + FLOOD_S))

        probe = while_probing(gw.url, job_id, flood)
        cpu_used = cpu_seconds(process) - cpu_before
        assert len(responses) >= SENDERS
        for response in responses:
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["code"] == "invalid_image" and error["details"] == "JPEG has more than 100 scans", error
        probe.assert_answered_in_time()
        # Decoding even one of them would take ~40 s of CPU; the refusals all together stay far below that.
        assert cpu_used < CPU_PER_REFUSAL_S * len(responses), (cpu_used, len(responses))
        assert wait_final(gw.url, job_id)["status"] == "completed"
        print(
            f"\n{len(responses)} refused in {FLOOD_S:.0f} s with {cpu_used:.1f} s of gateway CPU; slowest healthz "
            f"{max(probe.latencies['healthz']):.3f} s, job GET {max(probe.latencies['job']):.3f} s"
        )


def test_image_work_has_its_own_bounded_pool_and_queue(
    triton: TritonServer, repository: Repository, tmp_path: Path
) -> None:
    """With the scan guard raised out of the way, 500-scan JPEGs (~2 s of CPU each) saturate a one-thread image
    pool with a queue of one: the requests beyond it get 503 `overloaded` with Retry-After at once, the accepted
    ones become jobs that complete, and job reads and health checks go on answering meanwhile."""
    image = f"data:image/jpeg;base64,{base64.b64encode(many_scan_jpeg(500)).decode()}"
    env = {"IMAGEN_IMAGE_THREADS": "1", "IMAGEN_IMAGE_QUEUE": "1", "IMAGEN_MAX_JPEG_SCANS": "100000"}
    with subprocess_gateway(triton, repository, tmp_path, **env) as gw:
        job_id = create_job(gw.url)
        responses: list[httpx.Response] = []

        def flood() -> None:
            responses.extend(senders(gw.url, image, until=None))

        probe = while_probing(gw.url, job_id, flood)
        codes = sorted(r.status_code for r in responses)
        assert len(codes) == SENDERS and set(codes) <= {200, 503}, codes
        overloaded = [r for r in responses if r.status_code == 503]
        # At most one decode runs and one more waits, each ~2 s, while all ten arrive within a fraction of that.
        assert len(overloaded) >= SENDERS // 2, codes
        for response in overloaded:
            assert response.json()["error"]["code"] == "overloaded", response.text
            assert int(response.headers["retry-after"]) >= 1
        for response in responses:
            if response.status_code == 200:  # synchronous: the decoded bomb was a valid image and ran
                assert response.json()["status"] == "completed", response.text
        probe.assert_answered_in_time()
        print(f"\ncodes {codes}; slowest healthz {max(probe.latencies['healthz']):.3f} s")
