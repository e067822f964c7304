"""Issue 10, items 1, 9 and the DNS part of 2: what a hostile outside world can do through image URLs and Triton.

Everything runs against the real gateway over real HTTP on loopback, with local hostile servers:

- an image host on 127.0.0.2 (the allow-listed address the test gateways treat as "the internet") that answers
  with compressed bombs (`gzip, gzip`, gzip, deflate, br, endless identity) and records what it was sent;
- a fake Triton (a gRPC server on loopback) whose every inference fails with onnxruntime-like text that must not
  reach clients;
- a "public" host on 127.0.0.3 that redirects into the allow-listed 127.0.0.2 (the in-process gateway treats
  127.0.0.3 as public: the test patches the guard's address table for that one address);
- a silent nameserver (the in-process gateway's `socket.getaddrinfo` blocks for names under `.silent.test`).

Bounds asserted here are liveness bounds with generous margins, not performance claims: the gateway's peak
resident memory (VmHWM) grows by less than `RSS_GROWTH_CEILING` while 12 bombs that each decode to 1 GiB are
refused at once (the old code inflated each whole: gigabytes, then the OOM killer), and `/healthz` and a job read
answer within `LIVENESS_S` while 10 image URLs sit on a silent nameserver.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import http.server
import os
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc  # type: ignore[import-untyped]
import httpx
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.media import netguard
from gateway.triton.client import BACKEND_FAILED_MESSAGE, translate_triton_errors
from tests.helpers import data_uri, make_image, start_http_server
from tests.integration.gateways import start_gateway, subprocess_gateway

if TYPE_CHECKING:
    from gateway.triton.server import TritonServer
    from tests.integration.conftest import GatewayFactory, Repository

pytestmark = pytest.mark.integration

API_KEY = "hardening-outbound-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
INTERNAL_HOST = "127.0.0.2"  # allow-listed by the test gateways
PUBLIC_HOST = "127.0.0.3"  # treated as public by the in-process gateway of the redirect test
BOMB_DECODED = 1024 * 1024 * 1024  # each bomb decodes to 1 GiB of zeros
RSS_GROWTH_CEILING = 256 * 1024 * 1024  # peak RSS growth allowed while 12 bombs are refused (each capped at 10 MB)
LIVENESS_S = 1.0
SECRET = "[ONNXRuntimeError] /opt/internal/models/unet-7f3a.onnx: secret-token-ZX81"
DEAD_PROXY = "http://127.0.0.1:9"  # discard port: nothing listens, a proxied channel would never connect


def _zeros_compressed(wbits: int, size: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, wbits)
    chunk = bytes(1024 * 1024)
    parts = [compressor.compress(chunk) for _ in range(size // len(chunk))]
    return b"".join(parts) + compressor.flush()


@dataclass
class Bombs:
    gzip: bytes
    deflate: bytes
    gzip_gzip: bytes


@pytest.fixture(scope="module")
def bombs() -> Bombs:
    gz = _zeros_compressed(16 + zlib.MAX_WBITS, BOMB_DECODED)  # ~1 MB on the wire
    return Bombs(gzip=gz, deflate=_zeros_compressed(zlib.MAX_WBITS, BOMB_DECODED), gzip_gzip=gzip.compress(gz, 9))


@dataclass
class HostileHost:
    url: str
    paths: list[str] = field(default_factory=list)
    authorizations: list[str] = field(default_factory=list)


def _serve(host: str, routes: dict[str, tuple[int, dict[str, str], bytes]], record: HostileHost) -> Any:
    """A threaded HTTP server on `host` answering `routes` (path -> status, headers, body); `/endless` streams
    zeros without a length (cut off after 64 MiB, should a client read that far)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self) -> None:
            record.paths.append(self.path)
            if self.headers.get("Authorization"):
                record.authorizations.append(self.headers["Authorization"])
            if self.path == "/endless":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Encoding", "identity")
                self.end_headers()
                try:
                    for _ in range(64):
                        self.wfile.write(bytes(1024 * 1024))
                except OSError:
                    pass
                return
            status, headers, body = routes.get(self.path, (404, {}, b""))
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(OSError):
                self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = start_http_server(Handler, host)
    record.url = f"http://{host}:{server.server_address[1]}"
    return server


PNG = make_image(64, 64, seed=10)


@pytest.fixture(scope="module")
def hostile(bombs: Bombs) -> Iterator[HostileHost]:
    png = {"Content-Type": "image/png"}
    routes = {
        "/ok.png": (200, png, PNG),
        "/ok-gzip.png": (200, {**png, "Content-Encoding": "gzip"}, gzip.compress(PNG)),
        "/bomb-gzip": (200, {**png, "Content-Encoding": "gzip"}, bombs.gzip),
        "/bomb-deflate": (200, {**png, "Content-Encoding": "deflate"}, bombs.deflate),
        "/bomb-gzip-gzip": (200, {**png, "Content-Encoding": "gzip, gzip"}, bombs.gzip_gzip),
        "/bomb-gzip-br": (200, {**png, "Content-Encoding": "gzip, br"}, bombs.gzip_gzip),
        "/br": (200, {**png, "Content-Encoding": "br"}, os.urandom(4096)),
    }
    record = HostileHost(url="")
    server = _serve(INTERNAL_HOST, routes, record)
    yield record
    server.shutdown()
    server.server_close()


def _memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak resident) of a process, in bytes, from /proc."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0]) * 1024
    return values


def _assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code, error
    return error


def test_compressed_bombs_are_refused_with_memory_flat_and_triton_ignores_proxies(
    triton: TritonServer, repository: Repository, tmp_path: Path, hostile: HostileHost
) -> None:
    """Items 1 and 9(b, d): a subprocess gateway whose environment names a dead HTTP proxy for everything."""
    env = {
        "IMAGEN_API_KEYS": API_KEY,
        "IMAGEN_RATE_LIMIT_PER_MINUTE": "0",
        "IMAGEN_FETCH_TIMEOUT_S": "20",
        **{name: DEAD_PROXY for name in ("http_proxy", "https_proxy", "grpc_proxy", "HTTP_PROXY", "HTTPS_PROXY")},
        "no_proxy": "",
        "NO_PROXY": "",
    }
    with subprocess_gateway(triton, repository, tmp_path, **env) as gateway:
        before = _memory(gateway.process.pid)
        cases = [
            ("/bomb-gzip", 413, "image_too_large"),
            ("/bomb-deflate", 413, "image_too_large"),
            ("/endless", 413, "image_too_large"),
            ("/bomb-gzip-gzip", 400, "invalid_image"),
            ("/bomb-gzip-br", 400, "invalid_image"),
            ("/br", 400, "invalid_image"),
        ] * 2

        async def attack() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as client:
                return await asyncio.gather(
                    *(
                        client.post(
                            f"{gateway.url}/v1/image-to-image",
                            json={"image": f"{hostile.url}{path}", "prompt": "a bomb", "steps": 2},
                            headers=AUTH,
                        )
                        for path, _, _ in cases
                    )
                )

        started = time.monotonic()
        responses = asyncio.run(attack())
        elapsed = time.monotonic() - started
        for (path, status, code), response in zip(cases, responses, strict=True):
            error = _assert_error(response, status, code)
            if code == "invalid_image":
                assert "Content-Encoding" in error["details"], (path, error)
        after = _memory(gateway.process.pid)
        growth = after["VmHWM"] - max(before["VmHWM"], before["VmRSS"])
        print(f"bombs refused in {elapsed:.1f}s; RSS {before} -> {after}; peak growth {growth / 2**20:.0f} MiB")
        assert growth < RSS_GROWTH_CEILING, (before, after)
        assert gateway.process.poll() is None
        assert httpx.get(f"{gateway.url}/healthz", timeout=5).status_code == 200

        # 9(b): credentials in an image URL are refused, never sent (no Authorization reached the host), never echoed.
        response = httpx.post(
            f"{gateway.url}/v1/image-to-image",
            json={"image": f"http://user:hunter2@{hostile.url.removeprefix('http://')}/ok.png", "prompt": "x"},
            headers=AUTH,
            timeout=30,
        )
        error = _assert_error(response, 400, "invalid_image")
        assert "hunter2" not in response.text and "credentials" in error["details"]
        assert hostile.authorizations == []

        # A gzip-coded image is decoded within the cap, and the job runs on Triton through no proxy (9d): with
        # the gRPC channel honouring http_proxy it would go to the dead proxy and fail backend_unavailable.
        response = httpx.post(
            f"{gateway.url}/v1/image-to-image",
            json={"image": f"{hostile.url}/ok-gzip.png", "prompt": "a harbour", "steps": 2, "seed": 1},
            headers=AUTH,
            timeout=120,
        )
        assert response.status_code == 200, response.text
        job = response.json()
        assert job["status"] == "completed", job
        assert job["original_image"]["url"] == f"{hostile.url}/ok-gzip.png"


# --- 9(a): a hostile Triton's error text never reaches clients ----------------------------------------------


class HostileTriton(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """Live and ready for every model; every inference fails with text a client must never see."""

    def ServerLive(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerReadyResponse(ready=True)

    def ModelReady(self, request: Any, context: Any) -> Any:
        return service_pb2.ModelReadyResponse(ready=True)

    def ModelInfer(self, request: Any, context: Any) -> Any:
        context.abort(grpc.StatusCode.INTERNAL, f"onnxruntime failed in {request.model_name}: {SECRET}")

    def ModelStatistics(self, request: Any, context: Any) -> Any:
        context.abort(grpc.StatusCode.INTERNAL, SECRET)


@pytest.fixture
def hostile_triton() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(HostileTriton(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


def test_triton_error_text_stays_in_the_log(
    triton: TritonServer, repository: Repository, tmp_path: Path, hostile_triton: str
) -> None:
    body = {"image": data_uri(PNG), "prompt": "a cat", "steps": 2, "seed": 3}
    gateway = start_gateway(
        triton,
        repository,
        tmp_path,
        triton_url=hostile_triton,
        IMAGEN_API_KEYS=API_KEY,
        IMAGEN_RATE_LIMIT_PER_MINUTE="0",
    )  # the hostile Triton, not the session one
    try:
        url = f"{gateway.url}/v1/image-to-image"
        sync = httpx.post(url, json=body, headers={**AUTH, "X-Request-ID": "req-sync-0001"}, timeout=60)
        error = _assert_error(sync, 502, "backend_error")
        assert error["message"] == BACKEND_FAILED_MESSAGE
        assert "req-sync-0001" in error["details"], error
        assert SECRET not in sync.text and "onnxruntime" not in sync.text.lower()

        queued = httpx.post(
            url, json=body, headers={**AUTH, "Prefer": "respond-async", "X-Request-ID": "req-async-0002"}, timeout=60
        )
        assert queued.status_code == 202, queued.text
        job_url = f"{url}/{queued.json()['id']}"
        deadline = time.monotonic() + 60
        while (job := httpx.get(job_url, headers=AUTH, timeout=10)).json()["status"] not in ("failed", "completed"):
            assert time.monotonic() < deadline, job.text
            time.sleep(0.2)
        assert job.json()["status"] == "failed", job.text
        assert job.json()["error"]["code"] == "backend_error"
        assert job.json()["error"]["message"] == BACKEND_FAILED_MESSAGE
        assert "req-async-0002" in job.json()["error"]["details"]
        assert SECRET not in job.text and "onnxruntime" not in job.text.lower()
        assert SECRET in gateway.log_tail(200_000), "the detail belongs in the gateway log"
    finally:
        gateway.stop()


def test_translation_keeps_the_request_id_and_drops_the_text() -> None:
    from tritonclient.utils import InferenceServerException

    from gateway.errors import BackendError
    from gateway.observability import request_context

    with request_context("req-unit-1"), pytest.raises(BackendError) as info, translate_triton_errors("m"):
        raise InferenceServerException(SECRET, status="StatusCode.INTERNAL")
    assert SECRET not in f"{info.value.message} {info.value.details}" and "req-unit-1" in (info.value.details or "")


# --- 9(c): a public host may not redirect into the allow-list -----------------------------------------------


@pytest.fixture
def public_host(hostile: HostileHost) -> Iterator[HostileHost]:
    routes = {
        "/image.png": (200, {"Content-Type": "image/png"}, PNG),
        "/to-internal": (302, {"Location": f"{hostile.url}/ok.png"}, b""),
    }
    record = HostileHost(url="")
    server = _serve(PUBLIC_HOST, routes, record)
    yield record
    server.shutdown()
    server.server_close()


def test_a_public_redirect_into_the_allow_list_is_refused(
    make_gateway: GatewayFactory, hostile: HostileHost, public_host: HostileHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = netguard.refusal_reason
    monkeypatch.setattr(netguard, "refusal_reason", lambda ip: None if str(ip) == PUBLIC_HOST else real(ip))
    with make_gateway(api_keys=frozenset({API_KEY}), outbound_allow=(INTERNAL_HOST,)) as gateway:
        url = f"{gateway}/v1/image-to-image"
        headers = {**AUTH, "Prefer": "respond-async"}
        # Both hosts are reachable when named: the public one as public, the internal one through the allow-list.
        for image in (f"{public_host.url}/image.png", f"{hostile.url}/ok.png"):
            response = httpx.post(url, json={"image": image, "prompt": "x", "steps": 2}, headers=headers, timeout=30)
            assert response.status_code == 202, response.text
        served = list(hostile.paths)
        response = httpx.post(
            url, json={"image": f"{public_host.url}/to-internal", "prompt": "x"}, headers=headers, timeout=30
        )
        error = _assert_error(response, 400, "url_not_allowed")
        assert "a public host may not redirect to an allow-listed internal host" in error["details"]
        assert public_host.paths[-1] == "/to-internal"
        assert hostile.paths == served, "the internal host must not be asked"


# --- 2 (DNS): a silent nameserver ties up nothing else ------------------------------------------------------


def test_a_silent_nameserver_does_not_stall_job_reads_or_health(
    make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    real = socket.getaddrinfo

    def silent(host: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host.endswith(".silent.test"):
            release.wait(30)
            raise socket.gaierror(socket.EAI_AGAIN, "silent nameserver")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", silent)
    settings = {"api_keys": frozenset({API_KEY}), "outbound_dns_threads": 2, "outbound_dns_timeout_s": 3.0}
    try:
        with make_gateway(**settings) as gateway:
            url = f"{gateway}/v1/image-to-image"
            created = httpx.post(
                url,
                json={"image": data_uri(PNG), "prompt": "x", "steps": 2},
                headers={**AUTH, "Prefer": "respond-async"},
                timeout=30,
            )
            assert created.status_code == 202, created.text
            job_url = f"{url}/{created.json()['id']}"

            async def scenario() -> tuple[list[httpx.Response], list[float]]:
                async with httpx.AsyncClient(timeout=30) as client:
                    stuck = [
                        asyncio.ensure_future(
                            client.post(
                                url,
                                json={"image": f"http://img{i}.silent.test/x.png", "prompt": "x"},
                                headers=AUTH,
                            )
                        )
                        for i in range(10)
                    ]
                    await asyncio.sleep(0.5)  # every lookup is now stuck or queued
                    latencies: list[float] = []
                    for _ in range(5):
                        for probe in (job_url, f"{gateway}/healthz"):
                            started = time.monotonic()
                            answer = await client.get(probe, headers=AUTH, timeout=LIVENESS_S * 5)
                            latencies.append(time.monotonic() - started)
                            assert answer.status_code == 200, answer.text
                        await asyncio.sleep(0.3)
                    return list(await asyncio.gather(*stuck)), latencies

            started = time.monotonic()
            refused, latencies = asyncio.run(scenario())
            elapsed = time.monotonic() - started
            print(f"probe latencies max {max(latencies):.3f}s; 10 silent lookups answered within {elapsed:.1f}s")
            assert max(latencies) < LIVENESS_S, latencies
            for response in refused:
                assert (response.status_code, response.json()["error"]["code"]) in {
                    (400, "invalid_image"),  # no DNS answer within the deadline
                    (503, "overloaded"),  # lookups backed up: refused at once, with Retry-After
                }, response.text
                if response.status_code == 503:
                    assert response.headers["Retry-After"]
            assert elapsed < 15  # 3 s deadline per lookup, generous margin
    finally:
        release.set()
