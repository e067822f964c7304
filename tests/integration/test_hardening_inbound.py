"""Inbound hardening against the real gateway (`python -m gateway` subprocesses, real HTTP on loopback).

- Request bodies held at once are bounded: 20 concurrent 19 MB bodies leave the gateway's resident memory under a
  ceiling, every answer is 200/202, a 4xx or a 503 `overloaded` with Retry-After in the error shape (never a 500).
- Slow clients: 500 connections that send one header byte every 2 s do not stop `/healthz` from answering within
  1 s, and are closed within the header timeout (plus margin); a stalled body is answered 408; past the
  connection cap a connection gets a 503 in the error shape.
- Stored images are streamed with `nosniff` and cached no longer than retention; an input is served only to the
  key that created its job; outputs carry no metadata of an input that had EXIF and GPS.

Memory and time bounds here are liveness bounds with generous margins, not performance claims.
"""

from __future__ import annotations

import io
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from gateway.triton.server import TritonServer
from tests.helpers import data_uri, make_image
from tests.integration.conftest import Repository
from tests.integration.gateways import SubprocessGateway, subprocess_gateway

KEY_A = "hardening-key-a-0123456789-abcdef"
KEY_B = "hardening-key-b-0123456789-abcdef"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}
KEYS = f"{KEY_A},{KEY_B}"

BODY_BYTES = 19 * 2**20
CONCURRENT_BODIES = 20
# Liveness ceiling on the gateway's resident memory growth while 20 x 19 MB bodies arrive at once, with the
# default 64 MiB budget of body bytes in flight. Unbounded, the bodies alone are 380 MB before any parse copies
# (about 4 copies each for a base64 body, gigabytes for a body of empty objects).
RSS_GROWTH_CEILING = 600 * 2**20
HEADER_TIMEOUT_S = 5.0
BODY_TIMEOUT_S = 3.0
SLOW_CONNECTIONS = 500
HEALTHZ_WITHIN_S = 1.0
CLOSE_MARGIN_S = 5.0  # closed within the header timeout plus this


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _gateway_pid(gateway: SubprocessGateway) -> int:
    """`python -m gateway` serves in the launched process itself (one worker)."""
    return gateway.process.pid


def _assert_error_shape(response: httpx.Response, code: str | None = None) -> None:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "details"}, body
    if code is not None:
        assert body["error"]["code"] == code, body


@pytest.fixture(scope="module")
def gw(
    triton: TritonServer, repository: Repository, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SubprocessGateway]:
    with subprocess_gateway(
        triton,
        repository,
        tmp_path_factory.mktemp("inbound"),
        IMAGEN_API_KEYS=KEYS,
        IMAGEN_RATE_LIMIT_PER_MINUTE="0",
        IMAGEN_WORK_PER_MINUTE="0",
        IMAGEN_RETENTION_S="3600",
        IMAGEN_LOG_LEVEL="warning",
    ) as gateway:
        yield gateway


# --- item 3: request bodies held at once -------------------------------------------------------------------


def _bodies() -> list[bytes]:
    base64_body = b'{"prompt":"x","image":"data:image/png;base64,' + b"A" * (BODY_BYTES - 60) + b'"}'
    objects_body = b"[" + b"{}," * ((BODY_BYTES - 4) // 3) + b"{}]"
    assert len(base64_body) <= BODY_BYTES and len(objects_body) <= BODY_BYTES
    return [base64_body if i % 2 == 0 else objects_body for i in range(CONCURRENT_BODIES)]


def test_concurrent_large_bodies_leave_memory_bounded(gw: SubprocessGateway) -> None:
    pid = _gateway_pid(gw)
    with httpx.Client(timeout=10) as client:  # warm up the request path once
        assert client.post(f"{gw.url}/v1/image-to-image", json={"prompt": "x"}, headers=A).status_code == 400
    baseline = _rss(pid)
    peak = baseline
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _rss(pid))
            time.sleep(0.02)

    bodies = _bodies()

    def send(body: bytes) -> httpx.Response:
        headers = {**A, "Content-Type": "application/json", "Prefer": "respond-async"}
        with httpx.Client(timeout=120) as client:
            return client.post(f"{gw.url}/v1/image-to-image", content=body, headers=headers)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(CONCURRENT_BODIES) as pool:
            responses = list(pool.map(send, bodies))
    finally:
        stop.set()
        sampler.join(timeout=5)
    elapsed = time.monotonic() - started
    statuses = sorted(r.status_code for r in responses)
    print(
        f"\n20 x 19 MB bodies: statuses {statuses}, in {elapsed:.1f} s; RSS baseline {baseline / 2**20:.0f} MiB, "
        f"peak {peak / 2**20:.0f} MiB (growth {(peak - baseline) / 2**20:.0f} MiB, ceiling "
        f"{RSS_GROWTH_CEILING / 2**20:.0f} MiB)"
    )
    for response in responses:
        assert response.status_code in (200, 202, 400, 413, 503), response.text[:300]
        if response.status_code >= 400:
            _assert_error_shape(response)
        if response.status_code == 503:
            _assert_error_shape(response, "overloaded")
            assert int(response.headers["Retry-After"]) >= 1
    assert peak - baseline < RSS_GROWTH_CEILING
    with httpx.Client(timeout=5) as client:  # still serving, and the budget was given back
        assert client.get(f"{gw.url}/healthz").status_code == 200
        again = client.post(
            f"{gw.url}/v1/image-to-image", content=bodies[1], headers={**A, "Content-Type": "application/json"}
        )
        assert again.status_code == 400, again.text[:300]
        _assert_error_shape(again, "invalid_request")


# --- item 4: slow clients -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_gw(
    triton: TritonServer, repository: Repository, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SubprocessGateway]:
    with subprocess_gateway(
        triton,
        repository,
        tmp_path_factory.mktemp("slow"),
        IMAGEN_API_KEYS=KEYS,
        IMAGEN_RATE_LIMIT_PER_MINUTE="0",
        IMAGEN_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S),
        IMAGEN_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S),
        IMAGEN_LOG_LEVEL="warning",
    ) as gateway:
        yield gateway


def _address(gateway: SubprocessGateway) -> tuple[str, int]:
    host, port = gateway.url.removeprefix("http://").split(":")
    return host, int(port)


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(4096) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_slow_header_connections_do_not_stop_healthz_and_are_closed(slow_gw: SubprocessGateway) -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 64
    sockets: list[socket.socket] = []
    opened_at: list[float] = []
    closed_at: dict[int, float] = {}
    slowest_healthz = 0.0
    try:
        for _ in range(SLOW_CONNECTIONS):
            sock = socket.create_connection(_address(slow_gw), timeout=5)
            sock.sendall(head[:1])
            sock.setblocking(False)
            sockets.append(sock)
            opened_at.append(time.monotonic())
        sent = 1
        next_byte = time.monotonic() + 2.0
        deadline = opened_at[-1] + HEADER_TIMEOUT_S + CLOSE_MARGIN_S
        with httpx.Client(timeout=HEALTHZ_WITHIN_S * 5) as client:
            while len(closed_at) < len(sockets) and time.monotonic() < deadline:  # bounded by the deadline
                began = time.monotonic()
                response = client.get(f"{slow_gw.url}/healthz")
                took = time.monotonic() - began
                assert response.status_code == 200
                slowest_healthz = max(slowest_healthz, took)
                if time.monotonic() >= next_byte and sent < len(head):  # one more header byte each, every 2 s
                    for index, sock in enumerate(sockets):
                        if index not in closed_at:
                            try:
                                sock.send(head[sent : sent + 1])
                            except OSError:
                                closed_at[index] = time.monotonic()
                    sent += 1
                    next_byte = time.monotonic() + 2.0
                for index, sock in enumerate(sockets):
                    if index not in closed_at and _closed_by_peer(sock):
                        closed_at[index] = time.monotonic()
                time.sleep(0.2)
    finally:
        for sock in sockets:
            sock.close()
    print(
        f"\n{SLOW_CONNECTIONS} slow connections: {len(closed_at)} closed by the gateway, the last "
        f"{max((closed_at[i] - opened_at[i] for i in closed_at), default=0):.1f} s after it opened; "
        f"slowest /healthz {slowest_healthz:.2f} s"
    )
    assert slowest_healthz < HEALTHZ_WITHIN_S
    assert len(closed_at) == len(sockets), "some slow connections were never closed"
    assert all(closed_at[i] - opened_at[i] < HEADER_TIMEOUT_S + CLOSE_MARGIN_S for i in closed_at)


def test_stalled_body_is_answered_408(slow_gw: SubprocessGateway) -> None:
    request = (
        f"POST /v1/image-to-image HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY_A}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    ).encode() + b'{"prompt": "x",'
    started = time.monotonic()
    with socket.create_connection(_address(slow_gw), timeout=BODY_TIMEOUT_S + CLOSE_MARGIN_S) as sock:
        sock.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    took = time.monotonic() - started
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer[:300]
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert BODY_TIMEOUT_S - 0.5 < took < BODY_TIMEOUT_S + CLOSE_MARGIN_S


def test_connections_past_the_cap_get_503(
    triton: TritonServer, repository: Repository, tmp_path_factory: pytest.TempPathFactory
) -> None:
    cap = 20
    with subprocess_gateway(
        triton, repository, tmp_path_factory.mktemp("cap"), IMAGEN_API_KEYS=KEYS, IMAGEN_MAX_CONNECTIONS=str(cap)
    ) as gateway:
        held = [socket.create_connection(_address(gateway), timeout=5) for _ in range(cap)]
        try:
            time.sleep(0.5)
            with socket.create_connection(_address(gateway), timeout=5) as extra:
                answer = b""
                while chunk := extra.recv(4096):  # the gateway closes it after the 503
                    answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503"), answer[:300]
            assert b"retry-after: 1" in head.lower()
            assert json.loads(body)["error"]["code"] == "overloaded"
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + 10
        while True:  # the held ones are gone: the gateway serves again
            try:
                if httpx.get(f"{gateway.url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the gateway did not serve again after the connections closed"
            time.sleep(0.2)


# --- item 7: stored images ----------------------------------------------------------------------------------


def _jpeg_with_exif_and_gps() -> bytes:
    image = Image.open(io.BytesIO(make_image(64, 64, seed=5)))
    exif = Image.Exif()
    exif[0x010F] = "SecretCameraMaker"  # Make
    exif[0x0132] = "2024:01:01 12:00:00"  # DateTime
    exif[0x8825] = {1: "N", 2: (48.0, 51.0, 30.0), 3: "E", 4: (2.0, 17.0, 40.0)}  # GPSInfo
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", exif=exif.tobytes(), comment=b"secret comment")
    data = buf.getvalue()
    assert b"SecretCameraMaker" in data
    return data


def test_images_streamed_private_inputs_and_no_metadata_in_outputs(gw: SubprocessGateway) -> None:
    body = {"image": data_uri(_jpeg_with_exif_and_gps(), "image/jpeg"), "prompt": "a harbour", "steps": 2}
    created = httpx.post(f"{gw.url}/v1/image-to-image", json=body, headers=A, timeout=120)
    assert created.status_code == 200, created.text
    job = created.json()
    input_url = job["original_image"]["url"]
    input_name = input_url.rsplit("/", 1)[1]
    assert "_input." in input_name
    outputs = [image["url"] for image in job["images"]]
    assert outputs

    with httpx.Client(timeout=10) as client:
        for url in outputs:  # outputs: capability URLs, no key needed; no metadata of the input
            response = client.get(url)
            assert response.status_code == 200
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["cache-control"] == "private, max-age=3600"  # a capability: no shared cache
            data = response.content
            for marker in (b"eXIf", b"tEXt", b"iTXt", b"zTXt", b"Exif", b"SecretCameraMaker", b"secret comment"):
                assert marker not in data, marker
            decoded = Image.open(io.BytesIO(data))
            assert "exif" not in decoded.info and not decoded.getexif()
            assert not any(k in decoded.info for k in ("comment", "icc_profile", "xmp"))

        owner = client.get(input_url, headers=A)  # the input: its job's key only
        assert owner.status_code == 200
        assert owner.headers["x-content-type-options"] == "nosniff"
        assert owner.headers["cache-control"] == "private, max-age=3600"
        assert owner.headers["content-length"] == str(len(owner.content))
        assert owner.content.startswith(b"\xff\xd8")
        for marker in (b"SecretCameraMaker", b"secret comment", b"2024:01:01"):  # issue 22: the copy keeps none
            assert marker not in owner.content, marker
        other = client.get(input_url, headers=B)
        assert other.status_code == 404
        _assert_error_shape(other, "not_found")
        anonymous = client.get(input_url)
        assert anonymous.status_code == 401
        _assert_error_shape(anonymous, "unauthorized")
        missing = client.get(f"{gw.url}/v1/images/nosuchjob_input.png", headers=A)
        assert missing.status_code == 404
        _assert_error_shape(missing, "not_found")


def test_large_stored_image_is_streamed(gw: SubprocessGateway) -> None:
    """A stored file bigger than a chunk comes back whole, in chunks, with its length (read as a stream)."""
    storage = Path(gw.jobs_db).parent / "images"
    name = "streamtest-0123456789_0.png"
    buf = io.BytesIO()
    Image.frombytes("RGB", (256, 256), os.urandom(256 * 256 * 3)).save(buf, format="PNG")  # incompressible
    data = buf.getvalue()
    assert len(data) > 3 * 64 * 1024
    (storage / name).write_bytes(data)
    with httpx.Client(timeout=10) as client, client.stream("GET", f"{gw.url}/v1/images/{name}") as response:
        assert response.status_code == 200
        assert response.headers["content-length"] == str(len(data))
        chunks = list(response.iter_raw())
    assert b"".join(chunks) == data
