"""Hardening, fairness between keys, against the real gateway over HTTP: a per-key cap on queued + running
jobs (429 `too_many_jobs`), fair claiming (start-time fair queuing on work: a key that was idle is next in line,
not behind another key's backlog) and the per-key work budget in UNet samples (429 `rate_limited`,
`Retry-After` from the request's cost).

Bounds are liveness bounds with generous margins, not performance claims: every job is waited for at most
120 s; with one worker slot, key B's job finishes after at most ONE job of key A that was created before it
(the one already running when B asked), where FIFO would put all of A's queued jobs ahead of it.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from tests.helpers import data_uri, make_image
from tests.integration.conftest import GatewayFactory

pytestmark = pytest.mark.integration

KEY_A, KEY_B = "fair-key-a-0123456789", "fair-key-b-0123456789"
CAP = 4
# A job long enough (UNet steps with guidance) that A's queue cannot drain while the test posts.
SLOW = {"image": data_uri(make_image(64, 64)), "prompt": "a kite", "steps": 40, "strength": 1.0}
QUICK = {"image": data_uri(make_image(64, 64)), "prompt": "a kite", "steps": 2, "strength": 1.0, "guidance_scale": 1.0}
WAIT_S = 120.0


def _headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Prefer": "respond-async"}


def _final(client: httpx.Client, job_id: str, key: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while True:
        job: dict[str, Any] = client.get(f"/v1/image-to-image/{job_id}", headers=_headers(key)).json()
        if job["status"] in {"completed", "failed", "canceled"}:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def test_one_key_flooding_the_queue_gets_429_and_another_keys_job_starts_next(make_gateway: GatewayFactory) -> None:
    settings = {
        "api_keys": frozenset({KEY_A, KEY_B}),
        "max_active_jobs_per_key": CAP,
        "max_running_jobs": 1,
        "work_per_minute": 0,
    }
    with make_gateway(**settings) as url, httpx.Client(base_url=url, timeout=60) as client:
        flood = [client.post("/v1/image-to-image", json=SLOW, headers=_headers(KEY_A)) for _ in range(CAP + 4)]
        codes = [r.status_code for r in flood]
        assert codes[:CAP] == [202] * CAP, codes
        refused = [r for r in flood[CAP:] if r.status_code == 429]
        assert refused, codes  # A's jobs take seconds each: its queue cannot have drained while it posted
        for r in refused:
            assert r.json()["error"]["code"] == "too_many_jobs" and int(r.headers["retry-after"]) >= 1, r.text
        accepted_a = [r.json()["id"] for r in flood if r.status_code == 202]
        b = client.post("/v1/image-to-image", json=QUICK, headers=_headers(KEY_B))
        assert b.status_code == 202, b.text  # B is not refused: the cap is per key
        b_job = _final(client, b.json()["id"], KEY_B)
        a_jobs = [_final(client, job_id, KEY_A) for job_id in accepted_a]
        assert b_job["status"] == "completed" and all(j["status"] == "completed" for j in a_jobs)
        # With one worker slot, jobs finish in the order they were claimed.
        ahead = [j for j in a_jobs if b_job["created_at"] < j["completed_at"] < b_job["completed_at"]]
        assert len(ahead) <= 1, (b_job, a_jobs)  # only the job running when B asked (FIFO: CAP - 1 or more)
        # Once A's jobs are done, A may create again.
        again = client.post("/v1/image-to-image", json=QUICK, headers=_headers(KEY_A))
        assert again.status_code == 202, again.text
        _final(client, again.json()["id"], KEY_A)


def test_a_costly_request_is_refused_by_the_work_budget_while_cheap_ones_pass(make_gateway: GatewayFactory) -> None:
    # 60 UNet samples a minute (one a second), bursts of 100.
    with (
        make_gateway(api_keys=frozenset({KEY_A, KEY_B}), work_per_minute=60, work_burst=100) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        first = client.post(
            "/v1/image-to-image", json={**QUICK, "steps": 10, "guidance_scale": 7.5}, headers=_headers(KEY_A)
        )
        assert first.status_code == 202, first.text  # 10 steps x 2 (guidance) = 20 samples: 80 left
        costly = {**QUICK, "num_images": 4, "steps": 150, "guidance_scale": 7.5}  # 1,200 samples: needs a full bucket
        refused = client.post("/v1/image-to-image", json=costly, headers=_headers(KEY_A))
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "rate_limited"
        assert 10 <= int(refused.headers["retry-after"]) <= 20  # 20 samples short at one a second
        cheap = client.post("/v1/image-to-image", json=QUICK, headers=_headers(KEY_A))  # 2 samples
        assert cheap.status_code == 202, cheap.text
        other = client.post("/v1/image-to-image", json=costly, headers=_headers(KEY_B))  # B's bucket is full
        assert other.status_code == 202, other.text
        client.post(f"/v1/image-to-image/{other.json()['id']}/cancel", headers=_headers(KEY_B))
        for job in (first, cheap):
            assert _final(client, job.json()["id"], KEY_A)["status"] == "completed"


def _started(job: dict[str, Any]) -> str | None:
    started: str | None = job.get("started_at")
    return started


def test_a_key_with_100_queued_jobs_delays_another_keys_job_by_at_most_one_job_slot(
    make_gateway: GatewayFactory,
) -> None:
    """Start-time fair queuing: B's single job gets the next free slot, ahead of A's backlog (FIFO would put
    it behind all of A's queued jobs)."""
    settings = {
        "api_keys": frozenset({KEY_A, KEY_B}),
        "max_active_jobs_per_key": 0,
        "max_running_jobs": 1,
        "work_per_minute": 0,
    }
    with make_gateway(**settings) as url, httpx.Client(base_url=url, timeout=60) as client:
        a_ids = []
        for i in range(100):
            response = client.post("/v1/image-to-image", json={**QUICK, "seed": i}, headers=_headers(KEY_A))
            assert response.status_code == 202, response.text
            a_ids.append(response.json()["id"])
        b = client.post("/v1/image-to-image", json=QUICK, headers=_headers(KEY_B))
        assert b.status_code == 202, b.text
        b_job = _final(client, b.json()["id"], KEY_B)
        for job_id in a_ids:  # the rest of A's backlog is not needed
            client.post(f"/v1/image-to-image/{job_id}/cancel", headers=_headers(KEY_A))
        a_jobs = [_final(client, job_id, KEY_A) for job_id in a_ids]
        queued_when_b_came = [j for j in a_jobs if (_started(j) or "~") > b_job["created_at"]]
        assert len(queued_when_b_came) >= 10, "A's backlog had drained: the test would prove nothing"
        b_started = _started(b_job)
        assert b_job["status"] == "completed" and b_started is not None
        overtook = [j for j in a_jobs if b_job["created_at"] < (_started(j) or "~") < b_started]
        assert len(overtook) <= 1, (b_job, overtook)  # one job slot: the next one free when B came
