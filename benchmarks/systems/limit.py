"""The limit: the Triton repository's own ONNX files, called in this process with onnxruntime, no server.

For a measured service run, Triton's statistics say how many executions of each batch size every component ran.
The limit replays exactly that work: for each (component, batch size) it times `session.run` at that batch size
(median of a few calls after one warm-up, same thread pinning), and the compute-bound time of the run is
    T_limit = sum over components and batch sizes of executions(b) * t(b).
Limit images/s = images the run completed / T_limit: what the hardware delivers for the batches the service formed,
with no HTTP, no gRPC, no serialization, no queueing and no Python between the calls.
"""

from __future__ import annotations

import statistics
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
        import onnxruntime as ort

        self.files = files
        self.calls = calls
        self.shapes = work_shapes(files.manifest(), input_side)
        self.sessions = {
            c: ort.InferenceSession(
                str(files.onnx(c)), ort_session_options(threads), providers=["CPUExecutionProvider"]
            )
            for c in COMPONENTS
        }
        self.outputs = {"text_encoder": ["last_hidden_state"], "vae_encoder": ["latent_parameters"],
                        "unet": ["out_sample"], "vae_decoder": ["sample"]}  # fmt: skip
        self.timings: dict[tuple[str, int], dict[str, float]] = {}
        self._rng = np.random.default_rng(0)

    def time_batch(self, component: str, batch: int) -> dict[str, float]:
        key = (component, batch)
        if key not in self.timings:
            feeds = component_inputs(component, batch, self.shapes, self._rng)
            session, outputs = self.sessions[component], self.outputs[component]
            session.run(outputs, feeds)  # warm-up
            samples = []
            for _ in range(self.calls):
                began = time.perf_counter()
                session.run(outputs, feeds)
                samples.append(time.perf_counter() - began)
            self.timings[key] = {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples)}
        return self.timings[key]

    def replay(self, batches: dict[str, dict[int, int]], images: int) -> dict[str, Any]:
        """`batches`: component -> {batch size: executions}, from Triton's statistics of one service run."""
        per_component = {}
        total = 0.0
        for component, histogram in batches.items():
            seconds = sum(n * self.time_batch(component, b)["median_s"] for b, n in histogram.items())
            per_component[component] = seconds
            total += seconds
        return {
            "compute_s": total,
            "per_component_s": per_component,
            "images": images,
            "images_per_s": images / total if total > 0 and images > 0 else None,
        }
