"""Job integrity acceptance tests: a locked job store, the cancel/finish race, the error-code enum, 405 + Allow.

Real gateways (a `python -m gateway` subprocess, or the session's in-process one) on the session's real Triton,
real HTTP on loopback; webhook receivers listen on 127.0.0.2, the one private host the test gateways may call.
Every wait is bounded by a deadline.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import random
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.routing import Mount, Route

from gateway.app import create_app
from gateway.errors import ERROR_TABLE
from gateway.settings import PROJECT_ROOT, Settings
from gateway.triton.server import TritonServer
from tests.helpers import data_uri, make_image, serving_http
from tests.integration import gateways
from tests.integration.conftest import Repository
from tests.integration.gateways import SubprocessGateway

pytestmark = pytest.mark.integration

IMAGE = data_uri(make_image(128, 128, seed=23))
FINAL = {"completed", "failed", "canceled"}
API_KEY = "integrity-key-0000-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def body(**overrides: Any) -> dict[str, Any]:
    return {"image": IMAGE, "prompt": "a lighthouse in fog", "steps": 6, "seed": 7, **overrides}


def subprocess_gateway(
    triton: TritonServer, repository: Repository, folder: Path, **env_overrides: str
) -> AbstractContextManager[SubprocessGateway]:
    settings = {"IMAGEN_API_KEYS": API_KEY, "IMAGEN_RATE_LIMIT_PER_MINUTE": "0", "IMAGEN_LOG_LEVEL": "warning"}
    return gateways.subprocess_gateway(triton, repository, folder, **{**settings, **env_overrides})


# --- a webhook receiver that counts deliveries per job --------------------------------------------------------


@dataclass
class Receiver:
    url: str = ""
    bodies: list[dict[str, Any]] = field(default_factory=list)
    unparsable: list[bytes] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def by_job(self) -> dict[str, list[dict[str, Any]]]:
        with self.lock:
            out: dict[str, list[dict[str, Any]]] = {}
            for delivered in self.bodies:
                out.setdefault(str(delivered.get("id")), []).append(delivered)
            return out


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with state.lock:
                try:
                    state.bodies.append(json.loads(raw))
                except ValueError:
                    state.unparsable.append(raw)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    with serving_http(Handler, "127.0.0.2") as base:
        state.url = f"{base}/hook"
        yield state


# --- the OpenAPI error-code enum ------------------------------------------------------------------------------


def error_object_schema(document: dict[str, Any]) -> dict[str, Any] | None:
    """The ErrorObject schema from components/schemas (or one shaped like it: code, message, details)."""
    schemas = document.get("components", {}).get("schemas", {})
    if isinstance(schemas.get("ErrorObject"), dict):
        return dict(schemas["ErrorObject"])
    for schema in schemas.values():
        props = schema.get("properties", {}) if isinstance(schema, dict) else {}
        if {"code", "message", "details"} <= set(props):
            return dict(schema)
    return None


def openapi_error_codes(base_url: str) -> set[str]:
    response = httpx.get(f"{base_url}/openapi.json", timeout=30)
    assert response.status_code == 200, response.text
    schema = error_object_schema(response.json())
    assert schema is not None, (
        "GET /openapi.json has no ErrorObject schema (code, message, details) in components/schemas"
    )
    code = schema.get("properties", {}).get("code", {})
    enum = code.get("enum")
    assert isinstance(enum, list) and enum, f"ErrorObject.code in GET /openapi.json has no enum of error codes: {code}"
    return set(enum)


def table_codes() -> set[str]:
    return {code for _, code in ERROR_TABLE.values()}


# --- 1. a locked job store must not lose a job or a worker ----------------------------------------------------

STORE_LOCK_S = 8.0  # longer than SQLite's default busy timeout (5 s), which the gateway's store uses today
STORE_RECOVERY_BOUND_S = 30.0  # after the lock is released, the locked job reaches a final state within this
LOCKED_JOB_TARGET_S = 1.5  # how long the locked job should denoise: it must finish (and write) inside the lock


def wait_final(url: str, job_id: str, timeout_s: float, gateway: SubprocessGateway | None = None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/image-to-image/{job_id}", headers=AUTH, timeout=30).json()
        if job.get("status") in FINAL:
            return job
        time.sleep(0.1)
    tail = f"\ngateway log:\n{gateway.log_tail()}" if gateway is not None else ""
    raise AssertionError(f"job {job_id} is still {job.get('status')!r} after {timeout_s:.0f} s: {job}{tail}")


def test_job_and_workers_survive_a_locked_job_store(
    triton: TritonServer, repository: Repository, tmp_path: Path
) -> None:
    with subprocess_gateway(triton, repository, tmp_path, IMAGEN_MAX_RUNNING_JOBS="1") as gw:
        codes = openapi_error_codes(gw.url)
        url = f"{gw.url}/v1/image-to-image"
        # Calibrate: the locked job should denoise for about LOCKED_JOB_TARGET_S on this machine, so it is
        # running when the lock is taken and writes its result while the lock is still held.
        started = time.monotonic()
        probe = httpx.post(url, json=body(steps=20, strength=1.0), headers=AUTH, timeout=120)
        assert probe.status_code == 200, probe.text
        per_step = (time.monotonic() - started) / 20
        steps = max(4, min(500, round(LOCKED_JOB_TARGET_S / per_step)))

        accepted = httpx.post(
            url, json=body(steps=steps, strength=1.0), headers={**AUTH, "Prefer": "respond-async"}, timeout=30
        )
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["id"]
        deadline = time.monotonic() + 60
        while (job := httpx.get(f"{url}/{job_id}", headers=AUTH, timeout=30).json())["status"] != "processing":
            assert job["status"] == "queued" and time.monotonic() < deadline, f"job never ran: {job}"
            time.sleep(0.01)

        lock = sqlite3.connect(str(gw.jobs_db), timeout=30, isolation_level=None)
        try:
            lock.execute("BEGIN EXCLUSIVE")
            locked_at = time.monotonic()
            # WAL readers still read; a GET may wait for the gateway's own (blocked) writer, hence the timeout.
            during = httpx.get(f"{url}/{job_id}", headers=AUTH, timeout=30).json()
            assert during["status"] == "processing", (
                f"test setup: the job finished before the store was locked ({steps} steps, {per_step * 1e3:.0f} "
                f"ms/step); it must still run when the lock is taken: {during}"
            )
            time.sleep(max(0.0, locked_at + STORE_LOCK_S - time.monotonic()))
        finally:
            if lock.in_transaction:
                lock.execute("ROLLBACK")
            lock.close()

        final = wait_final(gw.url, job_id, STORE_RECOVERY_BOUND_S, gw)
        assert final["status"] in {"completed", "failed"}, final
        if final["status"] == "failed":
            assert final["error"]["code"] in codes, f"error code not in the OpenAPI enum {sorted(codes)}: {final}"

        # No worker lost: with a single worker, new jobs only complete if it is still alive.
        new_ids = []
        for seed in range(3):
            r = httpx.post(url, json=body(seed=seed), headers={**AUTH, "Prefer": "respond-async"}, timeout=30)
            assert r.status_code == 202, r.text
            new_ids.append(r.json()["id"])
        for new_id in new_ids:
            done = wait_final(gw.url, new_id, 60, gw)
            assert done["status"] == "completed", done


# --- 2. cancel racing the finish: one final state, agreed on by the answer, the job and the webhook -----------

CANCEL_ROUNDS = 200
CANCEL_CONCURRENCY = 10
CANCEL_SEED = 20240611
CANCEL_MAX_DELAY_S = 0.2
CANCEL_NUM_IMAGES = 1
ROUND_DEADLINE_S = 20.0  # a steps=2 job ends well within this, queued or not
WEBHOOK_SETTLE_S = 20.0  # all webhooks leave `pending` within this after the last round
DUPLICATE_GRACE_S = 1.5  # then wait this long for any late (duplicate) delivery


@dataclass
class Round:
    index: int
    delay_s: float
    job_id: str = ""
    cancel_status: int = 0
    cancel_body: dict[str, Any] = field(default_factory=dict)
    first_final: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None


async def _one_round(client: httpx.AsyncClient, base: str, hook: str, r: Round, gate: asyncio.Semaphore) -> None:
    async with gate:
        try:
            await _round_steps(client, base, hook, r)
        except httpx.HTTPError as exc:  # a hung or dropped request is a finding, not a crash of the whole test
            r.problem = f"{type(exc).__name__} on {exc.request.method} {exc.request.url.path}: {exc}"


async def _round_steps(client: httpx.AsyncClient, base: str, hook: str, r: Round) -> None:
    created = await client.post(
        f"{base}/v1/image-to-image",
        json=body(steps=2, strength=1.0, num_images=CANCEL_NUM_IMAGES, seed=r.index, webhook_url=hook),
        headers={**AUTH, "Prefer": "respond-async"},
    )
    if created.status_code not in (200, 202):
        r.problem = f"create answered {created.status_code}: {created.text[:300]}"
        return
    job = created.json()
    r.job_id = job["id"]
    if job.get("effective_steps") not in (None, 2):
        r.problem = f"effective_steps is {job.get('effective_steps')}, expected 2"
    await asyncio.sleep(r.delay_s)
    cancel = await client.post(f"{base}/v1/image-to-image/{r.job_id}/cancel", headers=AUTH)
    r.cancel_status = cancel.status_code
    try:
        r.cancel_body = cancel.json()
    except ValueError:
        r.cancel_body = {"unparsable": cancel.text[:300]}
    deadline = time.monotonic() + ROUND_DEADLINE_S
    view: dict[str, Any] = {}
    while time.monotonic() < deadline:
        view = (await client.get(f"{base}/v1/image-to-image/{r.job_id}", headers=AUTH)).json()
        if view.get("status") in FINAL:
            r.first_final = view
            return
        await asyncio.sleep(0.05)
    r.problem = f"not final {ROUND_DEADLINE_S:.0f} s after cancel: {view.get('status')!r}"


async def _run_rounds(base: str, hook: str, rounds: list[Round]) -> None:
    gate = asyncio.Semaphore(CANCEL_CONCURRENCY)
    limits = httpx.Limits(max_connections=4 * CANCEL_CONCURRENCY)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        await asyncio.gather(*(_one_round(client, base, hook, r, gate) for r in rounds))


def _violations(r: Round, final: dict[str, Any], deliveries: list[dict[str, Any]], codes: set[str]) -> list[str]:
    out = [r.problem] if r.problem else []
    status = final.get("status")
    if status not in FINAL:
        out.append(f"left {status!r}")
    if r.first_final and r.first_final.get("status") != status:
        out.append(f"changed after reaching a final state: {r.first_final.get('status')} -> {status}")
    if status == "canceled" and final.get("images"):
        out.append(f"canceled with {len(final['images'])} images")
    if status == "completed" and len(final.get("images") or []) != CANCEL_NUM_IMAGES:
        out.append(f"completed with {len(final.get('images') or [])} images")
    if status == "failed" and (final.get("error") or {}).get("code") not in codes:
        out.append(f"failed with an error code outside the OpenAPI enum: {final.get('error')}")
    # The cancel answer must tell the state the job ended in.
    if r.cancel_status == 200:
        answered = r.cancel_body.get("status")
        if answered != status:
            out.append(f"cancel answered 200 {answered!r} but the job ended {status!r}")
        if answered == "canceled" and r.cancel_body.get("images"):
            out.append("cancel answered canceled with images")
    elif r.cancel_status == 409:
        code = (r.cancel_body.get("error") or {}).get("code")
        if code != "job_finished":
            out.append(f"cancel answered 409 {code!r}")
        elif status not in {"completed", "failed"}:
            out.append(f"cancel answered 409 job_finished but the job ended {status!r}")
    elif r.cancel_status:
        out.append(f"cancel answered {r.cancel_status}: {json.dumps(r.cancel_body)[:300]}")
    # One final state, one webhook.
    statuses = [d.get("status") for d in deliveries]
    if len(deliveries) > 1:
        out.append(f"webhook delivered {len(deliveries)} times: {statuses}")
    if any(s not in FINAL for s in statuses):
        out.append(f"webhook sent for a job that was not final: {statuses}")
    if any(s != status for s in statuses):
        out.append(f"webhook bodies say {statuses} but the job ended {status!r}")
    if any(d.get("status") == "canceled" and d.get("images") for d in deliveries):
        out.append("webhook body is canceled with images")
    webhook = final.get("webhook") or {}
    if webhook.get("status") == "pending":
        out.append(f"webhook still pending {WEBHOOK_SETTLE_S:.0f} s after the last round")
    if webhook.get("status") == "delivered" and len(deliveries) != 1:
        out.append(f"job says its webhook was delivered, the receiver got {len(deliveries)}")
    return out


def test_cancel_racing_completion_keeps_one_final_state(
    triton: TritonServer, repository: Repository, receiver: Receiver, tmp_path: Path
) -> None:
    rng = random.Random(CANCEL_SEED)
    rounds = [Round(index=i, delay_s=rng.uniform(0.0, CANCEL_MAX_DELAY_S)) for i in range(CANCEL_ROUNDS)]
    with subprocess_gateway(triton, repository, tmp_path) as gw:
        codes = openapi_error_codes(gw.url)
        asyncio.run(_run_rounds(gw.url, receiver.url, rounds))

        def read(job_id: str) -> dict[str, Any]:
            return httpx.get(f"{gw.url}/v1/image-to-image/{job_id}", headers=AUTH, timeout=30).json()

        ids = [r.job_id for r in rounds if r.job_id]
        deadline = time.monotonic() + WEBHOOK_SETTLE_S
        pending = set(ids)
        while pending and time.monotonic() < deadline:
            pending = {i for i in pending if ((read(i).get("webhook") or {}).get("status")) == "pending"}
            if pending:
                time.sleep(0.2)
        time.sleep(DUPLICATE_GRACE_S)
        finals = {job_id: read(job_id) for job_id in ids}

    deliveries = receiver.by_job()
    assert not receiver.unparsable, receiver.unparsable[:3]
    problems = []
    for r in rounds:
        final = finals.get(r.job_id, {})
        for v in _violations(r, final, deliveries.get(r.job_id, []), codes):
            problems.append(f"round {r.index} (delay {r.delay_s * 1e3:.0f} ms, job {r.job_id or '-'}): {v}")
    strays = set(deliveries) - set(ids)
    assert not strays, f"webhooks for unknown jobs: {sorted(strays)[:5]}"
    outcomes: dict[str, int] = {}
    for r in rounds:
        key = f"{r.cancel_status}/{finals.get(r.job_id, {}).get('status')}"
        outcomes[key] = outcomes.get(key, 0) + 1
    assert not problems, f"{len(problems)} violations (cancel answer/final: {outcomes}):\n" + "\n".join(problems[:30])


# --- 3. every error code on the wire is in the table and in the OpenAPI enum ----------------------------------

_CODE_LITERAL = re.compile(r"""["']code["']\s*:\s*["']([A-Za-z0-9_]+)["']""")


def job_runner_codes() -> set[str]:
    """Error codes the job system writes into job.error as literals (`"code": "..."` in gateway/jobs)."""
    root = PROJECT_ROOT / "gateway"
    sources = sorted((root / "jobs").rglob("*.py")) if (root / "jobs").is_dir() else []
    sources += [p for p in (root / "jobs.py", root / "jobrunner.py") if p.is_file()]
    return {code for path in sources for code in _CODE_LITERAL.findall(path.read_text())}


def test_every_error_table_code_is_in_the_openapi_enum(gateway: str) -> None:
    enum = openapi_error_codes(gateway)
    missing = sorted(table_codes() - enum)
    assert not missing, f"ERROR_TABLE codes missing from ErrorObject.code's enum in GET /openapi.json: {missing}"


def test_job_error_codes_are_in_the_error_table_and_the_enum(gateway: str) -> None:
    written = job_runner_codes() | {"interrupted"}
    enum = openapi_error_codes(gateway)
    not_in_table = sorted(written - table_codes())
    not_in_enum = sorted(written - enum)
    assert not not_in_table and not not_in_enum, (
        f"codes the job runner writes into job.error but missing from gateway.errors.ERROR_TABLE: {not_in_table}; "
        f"missing from ErrorObject.code's enum in GET /openapi.json: {not_in_enum}"
    )


# --- 4. a known route with the wrong method: 405, the error shape, and Allow (RFC 9110 15.5.6) -----------------


def app_routes(settings: Settings) -> list[tuple[str, set[str]]]:
    """(path with placeholders filled, allowed methods) for every method-restricted route of the app."""

    def walk(routes: Any, prefix: str) -> Iterator[tuple[str, set[str]]]:
        for route in routes:
            if isinstance(route, Route) and route.methods:
                yield prefix + route.path, {m.upper() for m in route.methods}
            elif isinstance(route, Mount):
                yield from walk(route.routes, prefix + route.path)

    app = create_app(settings)  # not started: only its routing table is read
    return [(re.sub(r"\{[^}]+\}", "probe-1", path), methods) for path, methods in walk(app.routes, "")]


def test_wrong_method_gives_405_with_allow_header(
    gateway: str, gateway_settings: Settings, auth: dict[str, str]
) -> None:
    routes = app_routes(gateway_settings)
    assert len(routes) >= 5, routes
    problems = []
    for path, allowed in routes:
        candidates = ["DELETE", "PUT", "PATCH", "POST" if "POST" not in allowed else "GET"]
        for method in (m for m in candidates if m not in allowed):
            r = httpx.request(method, f"{gateway}{path}", headers=auth, timeout=30)
            where = f"{method} {path}"
            if r.status_code != 405:
                problems.append(f"{where}: {r.status_code}, expected 405")
                continue
            try:
                payload = r.json()
            except ValueError:
                problems.append(f"{where}: body is not JSON: {r.text[:100]!r}")
                payload = None
            if payload is not None:
                error = payload.get("error") if isinstance(payload, dict) else None
                if not (
                    isinstance(payload, dict)
                    and set(payload) == {"error"}
                    and isinstance(error, dict)
                    and set(error) == {"code", "message", "details"}
                    and error["code"] == "method_not_allowed"
                    and isinstance(error["message"], str)
                    and error["message"]
                    and (error["details"] is None or isinstance(error["details"], str))
                ):
                    problems.append(f"{where}: not the spec's error shape: {payload}")
            header = r.headers.get("allow")
            if header is None:
                problems.append(f"{where}: no Allow header (should list {sorted(allowed)})")
                continue
            listed = {m.strip().upper() for m in header.split(",") if m.strip()}
            if not (allowed - {"HEAD"} <= listed <= allowed) or method in listed:
                problems.append(f"{where}: Allow: {header!r}, route allows {sorted(allowed)}")
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems)
