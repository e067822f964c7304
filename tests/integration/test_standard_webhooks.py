"""Issue 13, Standard Webhooks, end to end: a real gateway on the session's Triton, real HTTP to a loopback
receiver on 127.0.0.2 that verifies every delivery with the `standardwebhooks` library, as a customer would.

A rotation is checked with redeliveries (the same `webhook-id`, signed anew, no inference needed): with both
secrets during the overlap, with the new one only after it (a short `webhook_secret_overlap_s`).
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.helpers import data_uri, make_image, serving_http
from tests.integration.conftest import GatewayFactory

pytestmark = pytest.mark.integration

IMAGE = data_uri(make_image(64, 64, seed=3))
OVERLAP_S = 3.0


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def job(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


@dataclass
class Receiver:
    url: str = ""
    deliveries: list[Delivery] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wait_for(self, count: int, timeout_s: float = 60.0) -> list[Delivery]:
        deadline = time.monotonic() + timeout_s
        while True:
            with self.lock:
                got = list(self.deliveries)
            if len(got) >= count:
                return got
            assert time.monotonic() < deadline, f"{len(got)} of {count} webhooks arrived"
            time.sleep(0.02)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with state.lock:
                state.deliveries.append(Delivery({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    with serving_http(Handler, "127.0.0.2") as base:
        state.url = f"{base}/hook"
        yield state


@pytest.fixture(scope="module")
def gateway(make_gateway: GatewayFactory) -> Iterator[str]:
    with make_gateway(webhook_secret_overlap_s=OVERLAP_S) as url:
        yield url


def submit(gateway: str, auth: dict[str, str], **fields: Any) -> dict[str, Any]:
    body = {"image": IMAGE, "prompt": "a lighthouse", "steps": 4, "strength": 0.5, "seed": 1, "cache": False, **fields}
    response = httpx.post(f"{gateway}/v1/image-to-image", json=body, headers=auth, timeout=30)
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    return job


def settled(gateway: str, auth: dict[str, str], job_id: str, timeout_s: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        job: dict[str, Any] = httpx.get(f"{gateway}/v1/image-to-image/{job_id}", headers=auth, timeout=10).json()
        if job["webhook"]["status"] != "pending":
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.02)


def secret_of(gateway: str, auth: dict[str, str]) -> dict[str, Any]:
    response = httpx.get(f"{gateway}/v1/webhook-secret", headers=auth, timeout=10)
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


def verifies(secret: str, delivery: Delivery) -> bool:
    try:
        Webhook(secret).verify(delivery.body, delivery.headers)
    except WebhookVerificationError:
        return False
    return True


def test_start_and_completed_events_arrive_when_asked_for_and_verify(
    gateway: str, auth: dict[str, str], receiver: Receiver
) -> None:
    secret = secret_of(gateway, auth)["secret"]
    assert secret.startswith("whsec_") and secret_of(gateway, auth)["secret"] == secret  # created once, then kept
    job = submit(gateway, auth, webhook_url=receiver.url, webhook_events=["start", "completed"])
    start, completed = receiver.wait_for(2)
    assert [start.id, completed.id] == [f"{job['id']}_start", f"{job['id']}_completed"]
    assert start.job["status"] == "processing" and completed.job["status"] == "completed"
    for delivery in (start, completed):
        assert Webhook(secret).verify(delivery.body, delivery.headers)["id"] == job["id"]
        assert delivery.headers["webhook-signature"].startswith("v1,")
    final = settled(gateway, auth, job["id"])
    assert final["webhook"]["status"] == "delivered" and len(final["webhook"]["attempts"]) == 1
    # `start` only: one event, no final one.
    only_start = submit(gateway, auth, webhook_url=receiver.url, webhook_events=["start"])
    settled(gateway, auth, only_start["id"])
    assert [d.id for d in receiver.wait_for(3)[2:]] == [f"{only_start['id']}_start"]
    time.sleep(0.3)
    assert len(receiver.deliveries) == 3


def test_rotation_signs_with_both_secrets_during_the_overlap_then_the_new_one(
    gateway: str, auth: dict[str, str], receiver: Receiver
) -> None:
    old = secret_of(gateway, auth)["secret"]
    job = submit(gateway, auth, webhook_url=receiver.url)
    [first] = receiver.wait_for(1)
    assert verifies(old, first)
    settled(gateway, auth, job["id"])

    rotated = httpx.post(f"{gateway}/v1/webhook-secret/rotate", headers=auth, timeout=10)
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()["secret"]
    assert new.startswith("whsec_") and new != old and secret_of(gateway, auth)["secret"] == new
    expires = datetime.fromisoformat(rotated.json()["previous_expires_at"]).timestamp()
    assert 0 < expires - time.time() <= OVERLAP_S

    redeliver = f"{gateway}/v1/image-to-image/{job['id']}/webhook/redeliver"
    response = httpx.post(redeliver, headers=auth, timeout=10)
    assert response.status_code == 202 and response.json()["webhook"]["status"] == "pending", response.text
    second = receiver.wait_for(2)[1]
    assert second.id == first.id == f"{job['id']}_completed", "a redelivery keeps the webhook-id"
    # The same event: the job as it ended (only its `webhook` record, the delivery history, has grown).
    assert {**second.job, "webhook": None} == {**first.job, "webhook": None}
    assert len(second.headers["webhook-signature"].split(" ")) == 2
    assert verifies(new, second) and verifies(old, second), "both secrets sign during the overlap"

    time.sleep(max(0.0, expires - time.time()) + 0.1)
    assert secret_of(gateway, auth)["previous_expires_at"] is None
    assert httpx.post(redeliver, headers=auth, timeout=10).status_code == 202
    third = receiver.wait_for(3)[2]
    assert third.id == first.id and int(third.headers["webhook-timestamp"]) >= int(first.headers["webhook-timestamp"])
    assert verifies(new, third) and not verifies(old, third), "the old secret stops signing after the overlap"
    final = settled(gateway, auth, job["id"])
    assert [a["status_code"] for a in final["webhook"]["attempts"]] == [204, 204, 204]


def test_redeliver_refusals(gateway: str, auth: dict[str, str]) -> None:
    missing = httpx.post(f"{gateway}/v1/image-to-image/img_transform_nope/webhook/redeliver", headers=auth)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    body = {"image": IMAGE, "prompt": "a lighthouse", "steps": 4, "strength": 0.5}
    plain = httpx.post(f"{gateway}/v1/image-to-image", json=body, headers=auth, timeout=60).json()  # no webhook
    refused = httpx.post(f"{gateway}/v1/image-to-image/{plain['id']}/webhook/redeliver", headers=auth)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "nothing_to_redeliver", refused.text
    bad = httpx.post(
        f"{gateway}/v1/image-to-image", json={**body, "webhook_events": ["output"]}, headers=auth, timeout=10
    )
    assert bad.status_code == 400 and bad.json()["error"]["message"] == "Invalid field 'webhook_events'"
