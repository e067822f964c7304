"""Small test utilities shared by unit and integration tests (no fakes of our own services here)."""

from __future__ import annotations

import base64
import http.server
import io
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import uvicorn
from PIL import Image
from starlette.types import ASGIApp

# The spec's example request body (docs: "Example Request"), without its image, which each test supplies.
SPEC_EXAMPLE = {
    "prompt": "Transform this into a cyberpunk style with neon lights and futuristic elements",
    "model": "imagen-v3",
    "strength": 0.8,
    "steps": 50,
    "guidance_scale": 8.0,
    "negative_prompt": "blurry, low quality",
    "style": "cyberpunk",
    "num_images": 2,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_image(width: int, height: int, *, seed: int = 0, fmt: str = "PNG") -> bytes:
    """A smooth, deterministic test picture (gradients plus a disc) encoded as `fmt`."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(seed)
    cx, cy, r = width * rng.uniform(0.3, 0.7), height * rng.uniform(0.3, 0.7), min(width, height) / 4
    disc = ((x - cx) ** 2 + (y - cy) ** 2 < r**2).astype(np.float32)
    rgb = np.stack([x / width, y / height, disc], axis=-1) * 255
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def start_http_server(handler: type[http.server.BaseHTTPRequestHandler], host: str) -> http.server.ThreadingHTTPServer:
    """A threaded stdlib HTTP server on `host` and a free port, serving from a daemon thread (webhook receivers,
    hostile image hosts); the caller shuts it down."""
    server = http.server.ThreadingHTTPServer((host, 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@contextmanager
def serving_http(handler: type[http.server.BaseHTTPRequestHandler], host: str) -> Iterator[str]:
    """`start_http_server` for a block: yields the server's base URL, then shuts it down and closes it."""
    server = start_http_server(handler, host)
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


class ThreadedUvicorn:
    """A real uvicorn server for an ASGI app, on a loopback port, in a background thread."""

    def __init__(self, app: ASGIApp, port: int) -> None:
        self.port = port
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def model_counts(grpc_url: str, model: str) -> tuple[int, int]:
    """(inferences, executions) Triton has counted for `model`: fewer executions than inferences is batching."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    finally:
        client.close()
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def batch_sizes(grpc_url: str, model: str) -> Counter[int]:
    """How many executions of each batch size (rows) Triton has run for `model` (its `batch_stats`)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    finally:
        client.close()
    return Counter(
        {
            int(entry["batch_size"]): int(entry["compute_infer"].get("count", 0))
            for entry in stats.get("batch_stats", [])
        }
    )
