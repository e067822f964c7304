"""The limit: the Triton repository's own ONNX files, called in this process with onnxruntime, no server.

For a measured service run, Triton's statistics say how many executions of each batch size every component ran.
The limit does exactly that work again, in this process, with the service stopped (the cores are free), the same
sessions options (intra-op threads = the service's thread budget, inter-op 1) and two schedules:

- *concurrent*: as many Python threads as the service had requests in flight (the run's concurrency level) take
  the run's executions, shuffled, from one shared list until it is empty, each the next one whose model is not
  already running (Triton has one instance of each model, so the service too runs at most one execution per
  model at a time); onnxruntime releases the GIL, so the four models' executions overlap as in the service, and
  nothing waits for HTTP, gRPC, serialization, a batcher or Python between calls;
- *serial*: each (component, batch size) is timed alone (median of a few calls after one warm-up) and
  T = sum over components and batch sizes of executions(b) * t(b).

Limit images/s = images the run completed / the shorter of the two times: the better of two ways to do the
service's work on this hardware, so the service (which does the same work plus its own) cannot beat it. A run
where it does (`service/limit` > 1, flagged in the report) means the limit missed a faster schedule: a bug here.
"""

from __future__ import annotations

import random
import re
import statistics
import threading
import time
from typing import Any

import numpy as np

from benchmarks.models import COMPONENTS, ModelFiles
from benchmarks.pinning import ort_session_options


def work_shapes(manifest: dict[str, Any], input_side: int) -> dict[str, int]:
    """Pixel and latent sizes the gateway runs a square `input_side` image at."""
    from gateway.media.codecs import fit_to_grid

    width, height = fit_to_grid(input_side, input_side, manifest["native_resolution"], manifest["grid"])
    factor = manifest["vae_scale_factor"]
    return {
        "height": height,
        "width": width,
        "latent_h": height // factor,
        "latent_w": width // factor,
        "text_len": manifest["text"]["max_length"],
        "hidden": manifest["text"]["hidden_size"],
        "channels": manifest["latent_channels"],
    }


def component_inputs(component: str, batch: int, s: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    def normal(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32)

    if component == "text_encoder":
        return {"input_ids": rng.integers(0, 49407, (batch, s["text_len"]), dtype=np.int64)}
    if component == "vae_encoder":
        return {"sample": np.clip(normal(batch, 3, s["height"], s["width"]), -1, 1)}
    if component == "unet":
        return {
            "sample": normal(batch, s["channels"], s["latent_h"], s["latent_w"]),
            "timestep": rng.uniform(0, 999, batch).astype(np.float32),
            "encoder_hidden_states": normal(batch, s["text_len"], s["hidden"]),
        }
    if component == "vae_decoder":
        return {"latent_sample": normal(batch, s["channels"], s["latent_h"], s["latent_w"])}
    raise ValueError(component)


class Limit:
    """onnxruntime sessions over the served ONNX files, and cached per-batch timings."""

    def __init__(self, files: ModelFiles, *, threads: int, input_side: int, calls: int) -> None:
        self.files = files
        self.calls = calls
        self.threads = threads
        self.shapes = work_shapes(files.manifest(), input_side)
        self.sessions: dict[str, Any] = {}  # opened for a replay, released after it (`release`)
        self.outputs = {"text_encoder": ["last_hidden_state"], "vae_encoder": ["latent_parameters"],
                        "unet": ["out_sample"], "vae_decoder": ["sample"]}  # fmt: skip
        self.timings: dict[tuple[str, int], dict[str, float]] = {}
        self._rng = np.random.default_rng(0)
        self._feeds: dict[tuple[str, int], dict[str, np.ndarray]] = {}

    def open(self) -> None:
        """Open the sessions (a no-op while open)."""
        if self.sessions:
            return
        import onnxruntime as ort

        self.sessions = {
            c: ort.InferenceSession(
                str(self.files.onnx(c)), self.session_options(c, self.threads), providers=["CPUExecutionProvider"]
            )
            for c in COMPONENTS
        }

    def release(self) -> None:
        """Drop the sessions and their memory arenas: the limit replays while the service is up and idle, and a
        medium UNet stub in Triton holds ~11 GB; both at once, on a shared 24 GB host, got the stub OOM-killed."""
        self.sessions = {}

    def session_options(self, component: str, threads: int) -> Any:
        """Triton's session for this model (its model.py): intra-op threads, and idle pool threads that sleep
        instead of spinning (`allow_spinning` in its config.pbtxt), as several sessions share the cores, and the
        same CPU arena setting (`cpu_mem_arena`)."""
        options = ort_session_options(threads)
        config = (self.files.repository / f"{self.files.name}_{component}" / "config.pbtxt").read_text()
        found = re.search(r'key: "allow_spinning" value: \{ string_value: "(\d)" \}', config)
        options.add_session_config_entry("session.intra_op.allow_spinning", found.group(1) if found else "0")
        arena = re.search(r'key: "cpu_mem_arena" value: \{ string_value: "(\d)" \}', config)
        options.enable_cpu_mem_arena = arena is not None and arena.group(1) == "1"
        return options

    def feeds(self, component: str, batch: int) -> dict[str, np.ndarray]:
        key = (component, batch)
        if key not in self._feeds:
            self._feeds[key] = component_inputs(component, batch, self.shapes, self._rng)
        return self._feeds[key]

    def time_batch(self, component: str, batch: int) -> dict[str, float]:
        key = (component, batch)
        if key not in self.timings:
            feeds = self.feeds(component, batch)
            session, outputs = self.sessions[component], self.outputs[component]
            session.run(outputs, feeds)  # warm-up
            samples = []
            for _ in range(self.calls):
                began = time.perf_counter()
                session.run(outputs, feeds)
                samples.append(time.perf_counter() - began)
            self.timings[key] = {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples)}
        return self.timings[key]

    def run_concurrently(self, batches: dict[str, dict[int, int]], threads: int, *, instances: int = 1) -> float:
        """Wall seconds for `threads` threads to run every execution of `batches` (shuffled, one shared list),
        at most `instances` executions of one component at a time (Triton's instances per model: the service's
        own bound, which also bounds memory: one medium UNet batch of 4 holds ~4 GB of attention scores)."""
        calls = [(c, b) for c, histogram in batches.items() for b, n in histogram.items() for _ in range(n)]
        random.Random(0).shuffle(calls)
        for component, batch in set(calls):
            self.time_batch(component, batch)  # warm: every shape has run once before the clock starts
        ready = threading.Condition()
        busy: dict[str, int] = {}
        failures: list[BaseException] = []

        def next_call() -> tuple[str, int] | None:
            """The last queued call whose component has a free instance (None: nothing left); under `ready`."""
            while calls and not failures:
                for i in range(len(calls) - 1, -1, -1):
                    if busy.get(calls[i][0], 0) < instances:
                        component, batch = calls.pop(i)
                        busy[component] = busy.get(component, 0) + 1
                        return component, batch
                ready.wait()
            return None

        def worker() -> None:
            while True:
                with ready:
                    call = next_call()
                if call is None:
                    return
                component, batch = call
                try:
                    self.sessions[component].run(self.outputs[component], self.feeds(component, batch))
                except BaseException as exc:  # re-raised in the caller
                    with ready:
                        failures.append(exc)
                        ready.notify_all()
                    return
                finally:
                    with ready:
                        busy[component] -= 1
                        ready.notify_all()

        pool = [threading.Thread(target=worker, name=f"limit-{i}") for i in range(max(threads, 1))]
        began = time.perf_counter()
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
        wall = time.perf_counter() - began
        if failures:
            raise failures[0]
        return wall

    def replay(self, batches: dict[str, dict[int, int]], images: int, *, in_flight: int = 1) -> dict[str, Any]:
        """`batches`: component -> {batch size: executions}, from Triton's statistics of one service run that had
        `in_flight` requests in flight. The replay runs even at 1 (one thread, one call after another): the
        per-batch timings are taken once and reused, and on a shared machine the load they saw has changed."""
        self.open()
        per_component = {}
        serial = 0.0
        for component, histogram in batches.items():
            seconds = sum(n * self.time_batch(component, b)["median_s"] for b, n in histogram.items())
            per_component[component] = seconds
            serial += seconds
        concurrent = self.run_concurrently(batches, max(in_flight, 1))
        best = min(serial, concurrent)
        return {
            "compute_s": best,
            "serial_s": serial,
            "concurrent_s": concurrent,
            "threads": in_flight,
            "schedule": "concurrent" if concurrent < serial else "serial",
            "per_component_s": per_component,
            "images": images,
            "images_per_s": images / best if best > 0 and images > 0 else None,
        }
