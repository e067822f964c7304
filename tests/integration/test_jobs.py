"""Issue 5: async jobs, signed webhooks, idempotency, cancel, progress, restart recovery, admission, Triton down.

Real gateways (in-process uvicorn or a `python -m gateway` subprocess) on the session's real Triton, real HTTP
on loopback; webhook receivers listen on 127.0.0.2, the one private host the test gateways may call out to.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import tritonclient.grpc as grpcclient
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from gateway.triton.server import TritonServer
from tests.helpers import data_uri, free_port, make_image, serving_http
from tests.integration.conftest import GatewayFactory, Repository, start_own_triton
from tests.integration.gateways import SubprocessGateway, start_gateway

pytestmark = pytest.mark.integration

IMAGE = data_uri(make_image(128, 128, seed=11))


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.2 that fails its first `fail_first` deliveries with a 500."""

    url: str
    fail_first: int = 0
    calls: list[tuple[dict[str, str], bytes, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def delivered(self) -> list[tuple[dict[str, str], bytes]]:
        with self.lock:
            return [(h, b) for h, b, status in self.calls if status == 200]

    def wait_for(self, count: int, timeout_s: float = 60.0) -> list[tuple[dict[str, str], bytes]]:
        deadline = time.monotonic() + timeout_s
        while len(self.delivered()) < count:
            assert time.monotonic() < deadline, f"{len(self.delivered())} of {count} webhooks arrived"
            time.sleep(0.05)
        return self.delivered()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(url="")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with state.lock:
                status = 500 if len(state.calls) < state.fail_first else 200
                state.calls.append((dict(self.headers.items()), body, status))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    with serving_http(Handler, "127.0.0.2") as base:
        state.url = f"{base}/hook"
        yield state


def body(**overrides: Any) -> dict[str, Any]:
    # `cache: false`: these tests run the model for every request (an identical seeded one would be answered
    # from the exact-result cache; test_priority.py tests that).
    return {"image": IMAGE, "prompt": "a harbour at night", "steps": 6, "seed": 5, "cache": False, **overrides}


def poll(url: str, headers: dict[str, str], until: set[str], timeout_s: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        job = httpx.get(url, headers=headers, timeout=30).json()
        if job["status"] in until:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def unet_inferences(triton: TritonServer, model: str = "imagen-v2_unet") -> int:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        return int(client.get_inference_statistics(model, as_json=True)["model_stats"][0].get("inference_count", 0))
    finally:
        client.close()


def test_async_job_with_signed_webhook(gateway: str, auth: dict[str, str], receiver: Receiver) -> None:
    response = httpx.post(f"{gateway}/v1/image-to-image", json=body(webhook_url=receiver.url), headers=auth, timeout=30)
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert accepted["status"] in {"queued", "processing"} and accepted["images"] == []
    assert response.headers["location"] == f"/v1/image-to-image/{accepted['id']}"
    job = poll(f"{gateway}{response.headers['location']}", auth, {"completed", "failed"})
    assert job["status"] == "completed" and len(job["images"]) == 1
    assert job["progress"]["step"] == job["progress"]["total_steps"] == job["effective_steps"]

    (headers, raw), *_ = receiver.wait_for(1)
    secret = httpx.get(f"{gateway}/v1/webhook-secret", headers=auth).json()["secret"]
    assert secret.startswith("whsec_")
    Webhook(secret).verify(raw, headers)  # Standard Webhooks, verified by its library
    assert headers["webhook-id"] == f"{accepted['id']}_completed"
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(raw + b" ", headers)  # a tampered body must not verify
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "b3RoZXI=").verify(raw, headers)
    delivered = json.loads(raw)
    assert delivered["id"] == accepted["id"] and delivered["status"] == "completed"
    assert delivered["images"] == job["images"]
    final = poll(f"{gateway}{response.headers['location']}", auth, {"completed"})
    assert final["webhook"]["status"] == "delivered" and len(final["webhook"]["attempts"]) == 1


def test_webhook_retried_until_the_receiver_accepts(gateway: str, auth: dict[str, str], receiver: Receiver) -> None:
    receiver.fail_first = 2
    response = httpx.post(f"{gateway}/v1/image-to-image", json=body(webhook_url=receiver.url), headers=auth)
    assert response.status_code == 202
    receiver.wait_for(1)
    assert [status for _, _, status in receiver.calls] == [500, 500, 200]
    url = f"{gateway}/v1/image-to-image/{response.json()['id']}"
    deadline = time.monotonic() + 10
    while (job := httpx.get(url, headers=auth).json())["webhook"]["status"] != "delivered":
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    assert [a["status_code"] for a in job["webhook"]["attempts"]] == [500, 500, 200]


def test_other_keys_cannot_see_a_job(make_gateway: GatewayFactory, auth: dict[str, str]) -> None:
    with make_gateway(api_keys=frozenset({"key-a-000000", "key-b-000000"})) as url:
        a, b = {"Authorization": "Bearer key-a-000000"}, {"Authorization": "Bearer key-b-000000"}
        job = httpx.post(f"{url}/v1/image-to-image", json=body(), headers={**a, "Prefer": "respond-async"}).json()
        assert httpx.get(f"{url}/v1/image-to-image/{job['id']}", headers=a).status_code == 200
        other = httpx.get(f"{url}/v1/image-to-image/{job['id']}", headers=b)
        assert other.status_code == 404 and other.json()["error"]["code"] == "not_found"
        assert httpx.post(f"{url}/v1/image-to-image/{job['id']}/cancel", headers=b).status_code == 404
        assert httpx.get(f"{url}/v1/image-to-image/{job['id']}").status_code == 401


def test_idempotency_key(gateway: str, auth: dict[str, str], triton: TritonServer) -> None:
    headers = {**auth, "Idempotency-Key": f"idem-{time.time_ns()}"}
    first = httpx.post(f"{gateway}/v1/image-to-image", json=body(steps=8), headers=headers, timeout=60)
    assert first.status_code == 200, first.text
    before = unet_inferences(triton)
    again = httpx.post(f"{gateway}/v1/image-to-image", json=body(steps=8), headers=headers, timeout=60)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert again.json()["images"] == first.json()["images"]
    assert unet_inferences(triton) == before, "a retried request must not run (or bill) twice"
    conflict = httpx.post(f"{gateway}/v1/image-to-image", json=body(steps=9), headers=headers, timeout=60)
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "idempotency_conflict"
    bad = httpx.post(f"{gateway}/v1/image-to-image", json=body(), headers={**auth, "Idempotency-Key": "x" * 300})
    assert bad.status_code == 400


def test_concurrent_idempotent_retries_run_once(gateway: str, auth: dict[str, str]) -> None:
    headers = {**auth, "Idempotency-Key": f"race-{time.time_ns()}", "Prefer": "respond-async"}

    async def race() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(
                *(client.post(f"{gateway}/v1/image-to-image", json=body(), headers=headers) for _ in range(4))
            )

    responses = asyncio.run(race())
    assert {r.status_code for r in responses} <= {200, 202}
    assert len({r.json()["id"] for r in responses}) == 1


def test_cancel_queued_and_running_jobs(
    make_gateway: GatewayFactory, auth: dict[str, str], triton: TritonServer
) -> None:
    with make_gateway(max_running_jobs=1) as url:
        headers = {**auth, "Prefer": "respond-async"}
        long = body(steps=150, strength=1.0, num_images=4)
        running = httpx.post(f"{url}/v1/image-to-image", json=long, headers=headers).json()
        queued = httpx.post(f"{url}/v1/image-to-image", json=long, headers=headers).json()
        assert queued["status"] == "queued" and queued["progress"]["queue_position"] == 1

        canceled = httpx.post(f"{url}/v1/image-to-image/{queued['id']}/cancel", headers=auth)
        assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
        assert canceled.json()["images"] == [] and canceled.json()["completed_at"]

        job = poll(f"{url}/v1/image-to-image/{running['id']}", auth, {"processing"})
        deadline = time.monotonic() + 60
        while (job := httpx.get(f"{url}/v1/image-to-image/{running['id']}", headers=auth).json())["progress"][
            "step"
        ] < 3:
            assert time.monotonic() < deadline, job
            time.sleep(0.02)
        stopped = httpx.post(f"{url}/v1/image-to-image/{running['id']}/cancel", headers=auth, timeout=60).json()
        assert stopped["status"] == "canceled" and 3 <= stopped["progress"]["step"] < 150
        after_cancel = unet_inferences(triton)
        time.sleep(0.5)
        assert unet_inferences(triton) == after_cancel, "no UNet step may be sent for a canceled job"
        again = httpx.post(f"{url}/v1/image-to-image/{running['id']}/cancel", headers=auth)
        assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"


def test_progress_polling_and_server_sent_events(gateway: str, auth: dict[str, str]) -> None:
    headers = {**auth, "Prefer": "respond-async"}
    job = httpx.post(f"{gateway}/v1/image-to-image", json=body(steps=40, strength=1.0), headers=headers).json()
    steps: list[int] = []
    statuses: list[str] = []
    with httpx.stream("GET", f"{gateway}/v1/image-to-image/{job['id']}/events", headers=auth, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                statuses.append(event["status"])
                steps.append(event["progress"]["step"])
    assert statuses[-1] == "completed"
    assert steps == sorted(steps) and steps[-1] == 40 and len(set(steps)) > 5, steps


def test_client_disconnect_stops_a_synchronous_job(
    make_gateway: GatewayFactory, auth: dict[str, str], triton: TritonServer
) -> None:
    with make_gateway() as url:
        before = unet_inferences(triton)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{url}/v1/image-to-image", json=body(steps=150, strength=1.0, num_images=4), headers=auth, timeout=1.0
            )
        time.sleep(1.0)  # the gateway notices within its poll interval and stops before the next step
        settled = unet_inferences(triton)
        time.sleep(1.0)
        assert unet_inferences(triton) == settled, "the job kept running after its client left"
        # Triton counts rows: 4 images x 2 (guidance) = 8 per step; the full job is 151 UNet calls (PNDM).
        assert (settled - before) / 8 < 150, "the job ran to the end"


def test_admission_limit_gives_503_with_retry_after_and_accepted_jobs_complete(
    make_gateway: GatewayFactory, auth: dict[str, str]
) -> None:
    with make_gateway(max_running_jobs=1, max_queued_jobs=2) as url:
        headers = {**auth, "Prefer": "respond-async"}
        responses = [httpx.post(f"{url}/v1/image-to-image", json=body(steps=30), headers=headers) for _ in range(6)]
        codes = [r.status_code for r in responses]
        assert 503 in codes and 202 in codes, codes
        for r in responses:
            if r.status_code == 503:
                assert r.json()["error"]["code"] == "overloaded" and int(r.headers["retry-after"]) >= 1
        for r in responses:
            if r.status_code == 202:
                assert poll(f"{url}/v1/image-to-image/{r.json()['id']}", auth, {"completed", "failed"})["status"] == (
                    "completed"
                )


# --- restart recovery: kill -9 the gateway with jobs queued, start it again ----------------------------------


def _start_gateway(port: int, triton: TritonServer, repository: Repository, folder: Path) -> SubprocessGateway:
    return start_gateway(
        triton,
        repository,
        folder,
        port=port,
        IMAGEN_MAX_RUNNING_JOBS="1",
        IMAGEN_API_KEYS="restart-key-0000-0123456789abcdef",
    )


def test_jobs_survive_a_killed_gateway(
    triton: TritonServer, repository: Repository, receiver: Receiver, tmp_path: Path
) -> None:
    port = free_port()
    auth = {"Authorization": "Bearer restart-key-0000-0123456789abcdef"}
    gateway = _start_gateway(port, triton, repository, tmp_path)
    ids = []
    try:
        for i in range(3):
            r = httpx.post(
                f"http://127.0.0.1:{port}/v1/image-to-image",
                json=body(steps=60, strength=1.0, seed=i, webhook_url=receiver.url),
                headers=auth,
            )
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        poll(f"http://127.0.0.1:{port}/v1/image-to-image/{ids[0]}", auth, {"processing", "completed"})
    finally:
        gateway.kill()  # no graceful shutdown: jobs stay queued/processing in the store
    gateway = _start_gateway(port, triton, repository, tmp_path)
    try:
        delivered = receiver.wait_for(3, timeout_s=120)
        assert {json.loads(b)["id"] for _, b in delivered} == set(ids)
        for job_id in ids:
            job = httpx.get(f"http://127.0.0.1:{port}/v1/image-to-image/{job_id}", headers=auth).json()
            assert job["status"] == "completed" and len(job["images"]) == 1
            assert httpx.get(job["images"][0]["url"]).status_code == 200
    finally:
        gateway.stop()


# --- Triton down and back ------------------------------------------------------------------------------------


@pytest.fixture
def own_triton(repository: Repository, tmp_path: Path) -> Iterator[TritonServer]:
    """A Triton of this test's own (the session one must stay up for the other tests)."""
    server = start_own_triton(repository.path, tmp_path / "triton.log")
    server.wait_ready(repository.manifests["imagen-v2"].models)
    yield server
    server.stop()


BACKEND_DOWN_BOUND_S = 5.0  # stated bound: with Triton down, a request fails within this time


def test_triton_down_gives_503_fast_and_recovers_without_restart(
    make_gateway: GatewayFactory, auth: dict[str, str], own_triton: TritonServer, repository: Repository
) -> None:
    with make_gateway(triton_url=own_triton.grpc_url, job_retries=1) as url:
        assert httpx.post(f"{url}/v1/image-to-image", json=body(), headers=auth, timeout=60).status_code == 200

        async def load(n: int) -> list[tuple[int, float, dict[str, Any]]]:
            async with httpx.AsyncClient(timeout=60) as client:

                async def one(i: int) -> tuple[int, float, dict[str, Any]]:
                    start = time.monotonic()
                    r = await client.post(f"{url}/v1/image-to-image", json=body(seed=i, steps=30), headers=auth)
                    return r.status_code, time.monotonic() - start, r.json()

                return await asyncio.gather(*(one(i) for i in range(n)))

        async def load_while_stopping() -> list[tuple[int, float, dict[str, Any]]]:
            task = asyncio.ensure_future(load(6))
            await asyncio.sleep(0.3)
            await asyncio.to_thread(own_triton.stop)
            return await task

        under_load = asyncio.run(load_while_stopping())
        assert all(code in (200, 503) for code, _, _ in under_load), under_load
        down = asyncio.run(load(4))
        for code, elapsed, payload in down:
            assert code == 503 and payload["error"]["code"] == "backend_unavailable", payload
            assert elapsed < BACKEND_DOWN_BOUND_S, elapsed
        assert httpx.get(f"{url}/readyz").status_code == 503
        # An async job during the outage is retried (job_retries=1), then fails with the backend's error.
        job = httpx.post(f"{url}/v1/image-to-image", json=body(), headers={**auth, "Prefer": "respond-async"}).json()
        failed = poll(f"{url}/v1/image-to-image/{job['id']}", auth, {"failed", "completed"}, timeout_s=30)
        assert failed["status"] == "failed" and failed["error"]["code"] == "backend_unavailable"

        own_triton.start()
        own_triton.wait_ready(repository.manifests["imagen-v2"].models)
        deadline = time.monotonic() + 30
        while (r := httpx.post(f"{url}/v1/image-to-image", json=body(), headers=auth, timeout=60)).status_code != 200:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.5)
        assert httpx.get(f"{url}/readyz").status_code == 200


def test_results_expire_with_their_images(make_gateway: GatewayFactory, auth: dict[str, str]) -> None:
    with make_gateway(retention_s=0.5) as url:
        job = httpx.post(f"{url}/v1/image-to-image", json=body(), headers=auth, timeout=60).json()
        image_url, input_url = job["images"][0]["url"], job["original_image"]["url"]
        assert httpx.get(image_url).status_code == 200
        deadline = time.monotonic() + 15
        while httpx.get(f"{url}/v1/image-to-image/{job['id']}", headers=auth).status_code != 404:
            assert time.monotonic() < deadline, "job not cleaned up"
            time.sleep(0.2)
        assert httpx.get(image_url).status_code == 404
        assert httpx.get(input_url, headers=auth).status_code == 404  # inputs are only ever served to their key
