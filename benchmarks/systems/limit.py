"""The limit: the best throughput any schedule of the Triton repository's own ONNX files reaches in this process.

For each model and concurrency level, the limit is the fastest of these ways to do the service run's work (the
same images, each with the same per-image model work) on this machine, in one process, with the service stopped
(it is up but idle: its processes sleep), and with the best session settings found:

- *settings* (per component and batch size, each measured): intra-op threads = the run's thread budget, inter-op
  1, and three settings: the service's own (its config.pbtxt: CPU arena on, memory patterns off, no spinning, as
  exported), the other CPU-arena setting, and onnxruntime's defaults (arena, patterns and spinning on: the ORT
  peer's);
- *replay, concurrent*: as many Python threads as the service had requests in flight take the run's executions
  (every (component, batch size) Triton ran, as many times as it ran it, from its statistics), shuffled, from
  one shared list, each the next one whose model is not already running (Triton's one instance per model);
  onnxruntime releases the GIL, so the models' executions overlap as in the service. Each component's session
  uses the setting fastest on the run's batches among those with the service's spinning (idle threads of
  several sessions spinning on the same cores slow each other);
- *replay, serial*: sum over the run's executions of the fastest setting's time of that batch alone;
- *free batches, serial*: the same work per image (text encoder: the request's rows; VAE encoder and decoder:
  1 row; UNet: effective steps x 2 rows with guidance, else x 1) run at any batch size b in 1, 2, 4, ... up to
  the component's max_batch_size, with the b and setting of the lowest time per row t(b)/b; images/s =
  1 / sum over components of rows x that time. Doubling b stops once it no longer lowers the time per row.
  This is what a one-request-at-a-time peer does at best, so no such peer should beat it.

Every timing is the median of `calls` calls after one warm-up, cached per (component, batch size, setting) and
reused across levels. Sessions are opened one at a time while timing and dropped right after; sessions with the
arena on hold their largest batch's peak (several GB for the medium UNet), so `release` drops them (and collects)
before the next service run. A system above the limit (flagged in the report) means the limit missed a faster
schedule or setting: a bug here, or a shared machine's noise.
"""

from __future__ import annotations

import gc
import random
import re
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmarks.models import COMPONENTS, ModelFiles
from export.repository import config_parameters, python_runner


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


@dataclass(frozen=True)
class Setting:
    """The session settings the limit tries (threads are always the run's budget, inter-op 1)."""

    arena: bool  # onnxruntime's CPU memory arena
    spinning: bool  # idle intra-op threads spin (`session.intra_op.allow_spinning`)
    pattern: bool = True  # memory patterns (`enable_mem_pattern`, onnxruntime's default on)

    @property
    def label(self) -> str:
        on = {True: "on", False: "off"}
        return f"arena {on[self.arena]}, spinning {on[self.spinning]}, patterns {on[self.pattern]}"

    def runner_parameters(self) -> dict[str, str]:
        """This setting in the config parameters the python runner's `session_options` reads."""
        flag = {True: "1", False: "0"}
        return {
            "allow_spinning": flag[self.spinning],
            "cpu_mem_arena": flag[self.arena],
            "mem_pattern": flag[self.pattern],
        }

    @classmethod
    def of(cls, options: Any) -> Setting:
        """The setting of onnxruntime `SessionOptions` (the runner's, for a served config)."""
        spinning = options.get_session_config_entry(SPINNING_ENTRY) == "1"
        return cls(arena=options.enable_cpu_mem_arena, spinning=spinning, pattern=options.enable_mem_pattern)


SPINNING_ENTRY = "session.intra_op.allow_spinning"
ORT_DEFAULTS = Setting(arena=True, spinning=True, pattern=True)  # what optimum's pipeline (the ORT peer) runs with


class Limit:
    """onnxruntime sessions over the served ONNX files, cached per-(component, batch, setting) timings, and the
    schedules built from them (`replay`)."""

    def __init__(self, files: ModelFiles, *, threads: int, input_side: int, calls: int) -> None:
        self.files = files
        self.calls = calls
        self.threads = threads
        self.shapes = work_shapes(files.manifest(), input_side)
        self.outputs = {"text_encoder": ["last_hidden_state"], "vae_encoder": ["latent_parameters"],
                        "unet": ["out_sample"], "vae_decoder": ["sample"]}  # fmt: skip
        # Sessions are built by the python runner's own `session_options` (model.py), so the service's setting is
        # exactly what its Triton stubs run, and every other setting differs from it only where it says.
        self.runner = python_runner()
        self.service_settings: dict[str, Setting] = {}
        self.max_batch: dict[str, int] = {}
        for component in COMPONENTS:
            config = (files.repository / f"{files.name}_{component}" / "config.pbtxt").read_text()
            self.service_settings[component] = Setting.of(self.runner.session_options(config_parameters(config)))
            found = re.search(r"^max_batch_size: (\d+)", config, re.MULTILINE)
            self.max_batch[component] = max(int(found.group(1)), 1) if found else 1
        self.sessions: dict[tuple[str, Setting], Any] = {}  # open while timing or replaying (`release`)
        self.timings: dict[tuple[str, int, Setting], dict[str, float]] = {}
        self._rng = np.random.default_rng(0)
        self._feeds: dict[tuple[str, int], dict[str, np.ndarray]] = {}

    # --- sessions and timings ---------------------------------------------------------------------------------

    def settings(self, component: str) -> list[Setting]:
        """The service's setting first, then the other arena setting, then onnxruntime's defaults."""
        service = self.service_settings[component]
        out = [
            service,
            Setting(arena=not service.arena, spinning=service.spinning, pattern=service.pattern),
            ORT_DEFAULTS,
        ]
        return list(dict.fromkeys(out))

    def open_session(self, component: str, setting: Setting) -> Any:
        import onnxruntime as ort

        options = self.runner.session_options({"intra_op_threads": str(self.threads), **setting.runner_parameters()})
        options.inter_op_num_threads = 1  # as every system's sessions (benchmarks.pinning)
        return ort.InferenceSession(str(self.files.onnx(component)), options, providers=["CPUExecutionProvider"])

    def session(self, component: str, setting: Setting) -> Any:
        key = (component, setting)
        if key not in self.sessions:
            self.sessions[key] = self.open_session(component, setting)
        return self.sessions[key]

    def drop(self, component: str, setting: Setting) -> None:
        if self.sessions.pop((component, setting), None) is not None:
            gc.collect()

    def release(self) -> None:
        """Drop every session and its memory arena: the limit runs while the service is up and idle, and a medium
        UNet stub in Triton once held ~11 GB; both at once, on a shared 24 GB host, got the stub OOM-killed."""
        self.sessions = {}
        gc.collect()

    def feeds(self, component: str, batch: int) -> dict[str, np.ndarray]:
        key = (component, batch)
        if key not in self._feeds:
            self._feeds[key] = component_inputs(component, batch, self.shapes, self._rng)
        return self._feeds[key]

    def time_batch(self, component: str, batch: int, setting: Setting) -> dict[str, float]:
        """Median/min/max seconds of `calls` calls after one warm-up (cached); opens the session if needed."""
        key = (component, batch, setting)
        if key not in self.timings:
            feeds = self.feeds(component, batch)
            session, outputs = self.session(component, setting), self.outputs[component]
            session.run(outputs, feeds)  # warm-up
            samples = []
            for _ in range(max(self.calls, 1)):
                began = time.perf_counter()
                session.run(outputs, feeds)
                samples.append(time.perf_counter() - began)
            self.timings[key] = {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples)}
        return self.timings[key]

    def seconds(self, component: str, batch: int, setting: Setting) -> float:
        return self.timings[(component, batch, setting)]["median_s"]

    def measure(self, needs: dict[str, set[int]], free: tuple[str, ...] = ()) -> None:
        """Time every (component, batch) of `needs`, and the free-batch sizes of the components in `free`, in
        every setting: one session open at a time, dropped after its batches, so at most one arena is held."""
        for component in dict.fromkeys([*needs, *free]):
            for setting in self.settings(component):
                for b in sorted(needs.get(component, ())):
                    self.time_batch(component, b, setting)
                if component in free:
                    for _ in self.doubling(component, setting):
                        pass
                self.drop(component, setting)

    def doubling(self, component: str, setting: Setting) -> Iterator[tuple[int, float]]:
        """(b, seconds per row) for b = 1, 2, 4, ... up to the component's max batch, timing each (cached); stops
        after the first b whose time per row is no lower than the previous one's."""
        b, previous = 1, None
        while b <= self.max_batch[component]:
            per_row = self.time_batch(component, b, setting)["median_s"] / b
            yield b, per_row
            if previous is not None and per_row >= previous:
                return
            b, previous = b * 2, per_row

    def best(self, component: str, batch: int, settings: list[Setting] | None = None) -> tuple[Setting, float]:
        """The fastest measured setting for one batch (among `settings`, default all)."""
        return min(
            ((s, self.seconds(component, batch, s)) for s in settings or self.settings(component)),
            key=lambda st: st[1],
        )

    # --- schedules --------------------------------------------------------------------------------------------

    def free_batches(self, rows_per_image: dict[str, int]) -> dict[str, Any]:
        """Serial, any batch size: per component the (b, setting) of the lowest time per row, b = 1, 2, 4, ...
        up to the component's max batch, doubling while the time per row still falls."""
        rows_per_image = {c: rows for c, rows in rows_per_image.items() if rows > 0}
        self.measure({}, tuple(rows_per_image))
        per_component: dict[str, Any] = {}
        seconds_per_image = 0.0
        for component, rows in rows_per_image.items():
            walks = [(per_row, b, s) for s in self.settings(component) for b, per_row in self.doubling(component, s)]
            per_row, b, setting = min(walks, key=lambda found: found[0])
            per_component[component] = {"rows_per_image": rows, "batch": b, "setting": setting.label,
                                        "s_per_row": per_row}  # fmt: skip
            seconds_per_image += rows * per_row
        return {
            "seconds_per_image": seconds_per_image,
            "images_per_s": 1.0 / seconds_per_image if seconds_per_image > 0 else None,
            "per_component": per_component,
        }

    def run_concurrently(
        self,
        batches: dict[str, dict[int, int]],
        threads: int,
        *,
        instances: int = 1,
        settings: dict[str, Setting] | None = None,
    ) -> float:
        """Wall seconds for `threads` threads to run every execution of `batches` (shuffled, one shared list),
        at most `instances` executions of one component at a time (Triton's instances per model: the service's
        own bound, which also bounds memory: one medium UNet batch of 4 holds ~4 GB of attention scores).
        Each component's session has `settings[component]` (default: the service's) and runs its largest batch
        once before the clock starts."""
        chosen = {c: (settings or {}).get(c, self.service_settings[c]) for c in batches}
        sessions = {c: self.session(c, chosen[c]) for c in batches}
        calls = [(c, b) for c, histogram in batches.items() for b, n in histogram.items() for _ in range(n)]
        random.Random(0).shuffle(calls)
        for component, histogram in batches.items():
            if any(histogram.values()):
                largest = max(b for b, n in histogram.items() if n)
                sessions[component].run(self.outputs[component], self.feeds(component, largest))  # warm-up
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
                    sessions[component].run(self.outputs[component], self.feeds(component, batch))
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

    def replay(
        self,
        batches: dict[str, dict[int, int]],
        images: int,
        *,
        in_flight: int = 1,
        rows_per_image: dict[str, int] | None = None,
    ) -> dict[str, Any]:
        """The limit of one service run. `batches`: component -> {batch size: executions}, from Triton's
        statistics of a run that completed `images` with `in_flight` requests in flight; `rows_per_image`: each
        component's rows per image, for the free-batch schedule (None: replays only). Every schedule and setting
        is tried; the fastest is the limit (`images_per_s`), named in `schedule` and `settings`."""
        batches = {c: {b: n for b, n in h.items() if n} for c, h in batches.items()}
        batches = {c: h for c, h in batches.items() if h}
        self.measure({c: set(h) for c, h in batches.items()}, tuple(c for c, r in (rows_per_image or {}).items() if r))
        serial = service_serial = 0.0
        serial_settings: dict[str, str] = {}
        concurrent_settings: dict[str, Setting] = {}
        per_component: dict[str, float] = {}
        for component, histogram in batches.items():
            seconds = 0.0
            for b, n in histogram.items():
                setting, t = self.best(component, b)
                seconds += n * t
                serial_settings[f"{component}@{b}"] = setting.label
                service_serial += n * self.seconds(component, b, self.service_settings[component])
            per_component[component] = seconds
            serial += seconds
            # One setting per session for the concurrent replay: the fastest on this run's batches, among those
            # that spin as the service does.
            same_spin = [s for s in self.settings(component) if s.spinning == self.service_settings[component].spinning]
            costs = {s: sum(n * self.seconds(component, b, s) for b, n in histogram.items()) for s in same_spin}
            concurrent_settings[component] = min(costs, key=costs.__getitem__)
        try:
            concurrent = self.run_concurrently(batches, max(in_flight, 1), settings=concurrent_settings)
        finally:
            self.release()
        free = self.free_batches(rows_per_image) if rows_per_image else None

        def rate(seconds: float) -> float | None:
            return images / seconds if seconds > 0 and images > 0 else None

        candidates: dict[str, float | None] = {
            "replay_concurrent": rate(concurrent),
            "replay_serial": rate(serial),
            "replay_serial_service_settings": rate(service_serial),
        }
        settings: dict[str, Any] = {
            "replay_concurrent": {c: s.label for c, s in concurrent_settings.items()},
            "replay_serial": serial_settings,
            "replay_serial_service_settings": {c: s.label for c, s in self.service_settings.items() if c in batches},
        }
        if free is not None:
            candidates["free_batches"] = free["images_per_s"] if images > 0 else None
            settings["free_batches"] = {c: f"batch {p['batch']}, {p['setting']}"
                                        for c, p in free["per_component"].items()}  # fmt: skip
        found = {k: v for k, v in candidates.items() if v is not None}
        schedule = max(found, key=lambda k: found[k]) if found else None
        return {
            "images_per_s": found[schedule] if schedule else None,
            "schedule": schedule,
            "settings": settings[schedule] if schedule else None,
            "candidates": candidates,
            "candidate_settings": settings,
            "serial_s": serial,
            "concurrent_s": concurrent,
            "free_batches": free,
            "threads": in_flight,
            "per_component_s": per_component,
            "images": images,
        }
