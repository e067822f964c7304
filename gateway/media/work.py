"""Image work (base64 decoding, image decoding, resizing, PNG encoding) on its own bounded thread pool.

asyncio's default executor is shared with everything that calls `asyncio.to_thread` (and `getaddrinfo`), so a
few expensive images there would stall unrelated work. Image work runs here instead: `threads` threads (default
`os.cpu_count()`: the work is CPU-bound and Pillow/zlib release the GIL), and at most `max_waiting` calls
waiting for a thread beyond those running. Past that, a request's image work is refused at once with 503
`overloaded` and `Retry-After` (`run_image_work`); a job's own work (`run_image_work(..., wait=True)`) always
waits its turn, since workers are already bounded by `max_running_jobs` and an accepted job must not fail for
being busy. A call counts until its thread finishes, even when its caller was cancelled meanwhile, so the bound
is on work actually queued or running, not on callers still listening.

`configure(settings)` (once, at startup) sizes the pool and sets the per-image decode bound of `codecs`.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar, TypeVarTuple, Unpack

from gateway.errors import Overloaded
from gateway.media import codecs
from gateway.observability import staged
from gateway.settings import Settings

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

DEFAULT_MAX_WAITING = 16
RETRY_AFTER_S = 1  # image work is short (tens of ms per image): a second is plenty for the queue to drain
# The CPU of image work is charged to a stage (`gateway.observability.stage`) named for what the function does;
# output encoders (`tensor_to_png`, other formats) are `encode`, anything else is charged under its own name.
# Threads, not processes: a process pool sized to the cores cost 57-62 ms of gateway CPU per image against 38
# (pickling the image both ways), measured in docs/benchmarks.md.
STAGES = {"parse_image_field": "base64", "decode_image": "decode", "image_to_tensor": "resize"}
ENCODE_STAGE = "encode"


def stage_of(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__name__", "image_work")
    if name in STAGES:
        return STAGES[name]
    return ENCODE_STAGE if name.startswith(("tensor_to_", "encode")) or name.endswith(("_png", "_jpeg")) else name


def default_threads() -> int:
    return os.cpu_count() or 1


class ImageWorkPool:
    """A bounded thread pool: `threads` running, at most `max_waiting` more queued for a request's work."""

    def __init__(self, threads: int | None = None, max_waiting: int = DEFAULT_MAX_WAITING) -> None:
        if threads is not None and threads < 1:
            raise ValueError("image work needs at least one thread")
        if max_waiting < 0:
            raise ValueError("max_waiting must not be negative")
        self.threads = threads or default_threads()
        self.max_waiting = max_waiting
        self._executor = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="image-work")
        self._lock = threading.Lock()
        self._in_flight = 0  # submitted and not finished (running or waiting for a thread)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def _release(self, _: Future[Any]) -> None:
        with self._lock:
            self._in_flight -= 1

    async def run(self, fn: Callable[[Unpack[Ts]], T], *args: *Ts, wait: bool = False) -> T:
        """Run `fn(*args)` on the pool. Without `wait`, raise `Overloaded` (503) when the queue is full."""
        with self._lock:
            if not wait and self._in_flight >= self.threads + self.max_waiting:
                raise Overloaded(
                    "Server is busy",
                    "Too many images are being processed; retry shortly",
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                )
            self._in_flight += 1
        try:
            future = self._executor.submit(staged(stage_of(fn), fn), *args)
        except BaseException:
            with self._lock:
                self._in_flight -= 1
            raise
        future.add_done_callback(self._release)
        # Cancelling the caller cancels a call still waiting for a thread (its slot is released then); a running
        # call finishes on its thread and releases its slot when it does.
        return await asyncio.wrap_future(future)

    def shutdown(self) -> None:
        """Stop taking work; what was submitted still runs (callers awaiting it get their results)."""
        self._executor.shutdown(wait=False)


_lock = threading.Lock()
_pool: ImageWorkPool | None = None


def pool() -> ImageWorkPool:
    """The process's image work pool (created with the defaults on first use unless `configure`d)."""
    global _pool
    with _lock:
        if _pool is None:
            _pool = ImageWorkPool()
        return _pool


def configure_pool(threads: int | None, max_waiting: int) -> ImageWorkPool:
    """Use a pool of this size from now on (the same pool is kept when its size is unchanged)."""
    global _pool
    new_threads = threads or default_threads()
    with _lock:
        old = _pool
        if old is not None and (old.threads, old.max_waiting) == (new_threads, max_waiting):
            return old
        _pool = ImageWorkPool(new_threads, max_waiting)
    if old is not None:
        old.shutdown()
    return _pool


def configure(settings: Settings) -> ImageWorkPool:
    """Apply the image settings: the pool's size and queue, the decode bound per image."""
    codecs.set_max_jpeg_scans(settings.max_jpeg_scans)
    return configure_pool(settings.image_threads, settings.image_queue)


async def run_image_work(fn: Callable[[Unpack[Ts]], T], *args: *Ts, wait: bool = False) -> T:
    """`fn(*args)` on the image work pool; see `ImageWorkPool.run`."""
    return await pool().run(fn, *args, wait=wait)
