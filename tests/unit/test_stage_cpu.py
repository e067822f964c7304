"""`stage()`: thread CPU per request stage, exclusive when nested, exported on /metrics."""

from __future__ import annotations

import asyncio
import threading
import time

from prometheus_client.parser import text_string_to_metric_families

from gateway.media.work import ImageWorkPool, stage_of
from gateway.observability import Metrics, stage, stage_seconds, staged


def burn(seconds: float) -> None:
    """Spin on this thread's CPU clock until it advanced `seconds`."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def charged(name: str, before: dict[str, float]) -> float:
    return stage_seconds().get(name, 0.0) - before.get(name, 0.0)


def test_a_stage_is_charged_the_threads_cpu_and_a_sleep_costs_nothing() -> None:
    before = stage_seconds()
    with stage("test-burn"):
        burn(0.05)
    with stage("test-sleep"):
        time.sleep(0.05)
    assert 0.05 <= charged("test-burn", before) < 0.5
    assert charged("test-sleep", before) < 0.01


def test_nested_stages_are_exclusive() -> None:
    before = stage_seconds()
    with stage("test-outer"):
        burn(0.03)
        with stage("test-inner"):
            burn(0.06)
        burn(0.03)
    outer, inner = charged("test-outer", before), charged("test-inner", before)
    assert 0.06 <= inner < 0.5
    assert 0.06 <= outer < inner + 0.06  # its own 2 x 30 ms, not the inner 60 ms too


def test_threads_are_charged_their_own_cpu_only() -> None:
    before = stage_seconds()
    worker = threading.Thread(target=staged("test-thread", burn), args=(0.05,))
    with stage("test-idle-caller"):
        worker.start()
        worker.join()
    assert charged("test-thread", before) >= 0.05
    assert charged("test-idle-caller", before) < 0.02


def test_image_work_is_charged_to_the_stage_named_for_its_function() -> None:
    def decode_image(seconds: float) -> str:
        burn(seconds)
        return "done"

    assert stage_of(decode_image) == "decode"

    def tensor_to_png() -> None: ...

    def image_to_tensor() -> None: ...

    assert (stage_of(tensor_to_png), stage_of(image_to_tensor), stage_of(burn)) == ("encode", "resize", "burn")
    before = stage_seconds()
    work = ImageWorkPool(threads=1)
    try:
        assert asyncio.run(work.run(decode_image, 0.05)) == "done"
    finally:
        work.shutdown()
    assert charged("decode", before) >= 0.05


def test_metrics_export_stage_seconds_and_the_process_cpu() -> None:
    with stage("test-exported"):
        burn(0.02)
    body, _ = asyncio.run(Metrics().render())
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    stages = {s.labels["stage"]: s.value for s in families["imagen_stage_cpu_seconds"].samples}
    assert stages["test-exported"] >= 0.02
    (process,) = families["imagen_process_cpu_seconds"].samples
    assert process.value >= sum(stages.values())  # stages are exclusive: they never sum past the process
