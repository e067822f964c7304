"""The Triton calls: one asyncio gRPC client, and the one place Triton's exceptions become ours."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc._client import MAX_GRPC_MESSAGE_SIZE
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from gateway.errors import BackendError, BackendUnavailable
from gateway.observability import current_request_id, stage

log = logging.getLogger(__name__)

# gRPC statuses that mean "not now" (server down, model not loaded, overloaded, too slow): retryable, 503.
_UNAVAILABLE_STATUSES = frozenset(
    {
        "StatusCode.UNAVAILABLE",
        "StatusCode.DEADLINE_EXCEEDED",
        "StatusCode.NOT_FOUND",
        "StatusCode.RESOURCE_EXHAUSTED",
    }
)


# A job's priority: 0 bulk, 1 normal (the default), 2 interactive. Every exported model's dynamic batcher has
# PRIORITY_LEVELS levels and gives a request without one triton_priority(DEFAULT_PRIORITY)
# (export.repository's copies of both; tests/unit/test_export_args.py holds them equal).
PRIORITY_LEVELS = 3
DEFAULT_PRIORITY = 1


def triton_priority(priority: int) -> int:
    """Triton's level for a job priority: 2 -> 1, 1 -> 2, 0 -> 3 (Triton serves level 1 first; 0 on a request
    would mean "the model's default"). Safe on a model exported without priority levels: Triton (2.51) gives a
    request whose level is 0 or above the model's highest the model's default level, and serves it as before."""
    if not 0 <= priority < PRIORITY_LEVELS:
        raise ValueError(f"priority {priority} is not one of 0..{PRIORITY_LEVELS - 1}")
    return PRIORITY_LEVELS - priority


class Engine(Protocol):
    """What the pipelines, `/readyz` and `/metrics` call: one `TritonEngine` or a `TritonPool` of replicas."""

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        *,
        priority: int = DEFAULT_PRIORITY,
    ) -> dict[str, np.ndarray]: ...

    async def models_ready(self, models: Sequence[str]) -> bool: ...

    async def statistics(self, model: str) -> dict[str, Any]: ...

    async def close(self) -> None: ...


def triton_status(exc: BaseException) -> str:
    """The gRPC status (`StatusCode.UNAVAILABLE`...) of the Triton exception behind one of our errors, or ''."""
    cause = exc if isinstance(exc, InferenceServerException) else exc.__cause__
    if isinstance(cause, InferenceServerException):
        return str(cause.status() or "")
    return ""


BACKEND_FAILED_MESSAGE = "The inference backend failed"
BACKEND_UNAVAILABLE_MESSAGE = "The inference backend is unavailable"


def _request_ref() -> str:
    request_id = current_request_id()
    return f"request {request_id}" if request_id else "no request id"


@contextmanager
def translate_triton_errors(model: str) -> Iterator[None]:
    """Map tritonclient's exceptions to our API errors, as httpx maps httpcore's at one boundary.

    This is where Triton's and onnxruntime's text stops: it goes to the log (with the request id the log line
    carries), and the client gets a fixed message and the request id to quote, never the backend's words (paths,
    shapes, library versions, a model's exception text).
    """
    try:
        yield
    except InferenceServerException as exc:
        status = str(exc.status() or "")
        log.warning("triton call to %s failed: %s %s", model, status, exc.message())
        # An answer over MAX_RECEIVE_BYTES is RESOURCE_EXHAUSTED too, but it is not "busy": it would be as big on
        # every replica and every retry, so it is the request's failure.
        oversized = "larger than max" in str(exc.message() or "")
        if status in _UNAVAILABLE_STATUSES and not oversized:
            raise BackendUnavailable(
                BACKEND_UNAVAILABLE_MESSAGE, f"Model '{model}' could not be reached; retry later ({_request_ref()})"
            ) from exc
        raise BackendError(
            BACKEND_FAILED_MESSAGE, f"Model '{model}' failed ({_request_ref()}; the cause is in the gateway log)"
        ) from exc


# The most one Triton answer may hold. The largest the recipe asks for is the VAE decoder's: at most 4 images
# (jobs.request.MAX_NUM_IMAGES) x 3 x 2048 x 2048 (media.codecs.MAX_IMAGE_SIDE) float32 = 192 MiB; the guided
# UNet's answer (8 x 4 x 256 x 256 float32, 8 MiB) and the text encoders' are far smaller. Twice the decoder's
# (4 x 2 x 3 x 2048 x 2048 x 4 bytes = 384 MiB) leaves room for framing; a bigger answer is refused by gRPC
# (RESOURCE_EXHAUSTED) instead of being buffered up to gRPC's 2 GiB. tests/unit/test_triton_outputs.py holds
# it to those constants (this layer cannot import them).
MAX_RECEIVE_BYTES = 4 * 2 * 3 * 2048 * 2048 * 4

# gRPC's default reconnect backoff grows to minutes while Triton is down; keep it short so the gateway serves
# again within seconds of Triton coming back, without a restart.
_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
    ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # Triton is reached directly: http_proxy/https_proxy/grpc_proxy in the environment (meant for outbound
    # traffic, if anything) must not reroute the inference channel or hand it to a proxy.
    ("grpc.enable_http_proxy", 0),
]


class TritonEngine:
    """Thin async wrapper: numpy in, numpy out, our exceptions on failure."""

    def __init__(self, url: str, *, timeout_s: float) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._client = grpcclient.InferenceServerClient(url, channel_args=_CHANNEL_ARGS)

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        *,
        timeout_s: float | None = None,
        priority: int = DEFAULT_PRIORITY,
    ) -> dict[str, np.ndarray]:
        """One inference at the job's `priority` (`triton_priority`: the models' batchers serve higher levels'
        requests first); `timeout_s` (a pool's share of the call's budget) overrides the engine's timeout."""
        level = triton_priority(priority)
        with stage("triton"):  # the client's own CPU: tensors to protobuf and back (gRPC I/O itself is `other`)
            request_inputs = []
            for name, array in inputs.items():
                tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
                tensor.set_data_from_numpy(np.ascontiguousarray(array))
                request_inputs.append(tensor)
            requested = [grpcclient.InferRequestedOutput(name) for name in outputs]
        with translate_triton_errors(model):
            result = await self._client.infer(
                model,
                request_inputs,
                outputs=requested,
                priority=level,
                client_timeout=timeout_s or self.timeout_s,
            )
        with stage("triton"):
            return {name: result.as_numpy(name) for name in outputs}

    async def models_ready(self, models: Sequence[str]) -> bool:
        try:
            if not await self._client.is_server_live(client_timeout=2.0):
                return False
            for model in models:
                if not await self._client.is_model_ready(model, client_timeout=2.0):
                    return False
        except InferenceServerException:
            return False
        return True

    async def is_live(self, *, timeout_s: float = 2.0) -> bool:
        try:
            return bool(await self._client.is_server_live(client_timeout=timeout_s))
        except InferenceServerException:
            return False

    async def model_ready(self, model: str, *, timeout_s: float = 2.0) -> bool:
        try:
            return bool(await self._client.is_model_ready(model, client_timeout=timeout_s))
        except InferenceServerException:
            return False

    async def statistics(self, model: str) -> dict[str, Any]:
        with translate_triton_errors(model):
            stats = await self._client.get_inference_statistics(model, as_json=True, client_timeout=5.0)
        return dict(stats)

    async def close(self) -> None:
        await self._client.close()
