"""The benchmark's limit and CPU accounting, at their seams: fake sessions, canned /metrics text, canned runs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import psutil
import pytest

from benchmarks import report
from benchmarks.cpu import OTHER_STAGE, ProcessCpu, parse_stage_metrics, run_cpu
from benchmarks.systems.limit import ORT_DEFAULTS, Limit, Setting

CALL_S = 0.02


class Tracker:
    """Counts overlapping runs (the most at once) and calls."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.calls = 0

    def enter(self, delta: int) -> None:
        with self.lock:
            self.running += delta
            self.most = max(self.most, self.running)
            self.calls += delta > 0


class SleepySession:
    """Stands in for an onnxruntime session: a run of a batch of b takes `seconds(b)` of wall time and releases the
    GIL (sleeps); records the overlap in its component's tracker and in the overall one."""

    def __init__(self, trackers: list[Tracker], seconds: Callable[[int], float] = lambda b: CALL_S) -> None:
        self.trackers = trackers
        self.seconds = seconds
        self.batches: list[int] = []

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        batch = len(feeds["x"])
        self.batches.append(batch)
        for tracker in self.trackers:
            tracker.enter(1)
        time.sleep(self.seconds(batch))
        for tracker in self.trackers:
            tracker.enter(-1)
        return [np.zeros(1)]


COMPONENTS = ("text_encoder", "vae_encoder", "unet", "vae_decoder")
SERVICE = Setting(arena=False, spinning=False)


def fake_limit(
    seconds: Callable[[str, int, Setting], float] = lambda c, b, s: CALL_S, max_batch: int = 4
) -> tuple[Limit, dict[str, Tracker], Tracker, dict[tuple[str, Setting], SleepySession]]:
    """A Limit over fake sessions (the seam: `open_session`), each run taking `seconds(component, batch, setting)`."""
    limit = Limit.__new__(Limit)  # no ONNX files
    overall = Tracker()
    per_component = {c: Tracker() for c in COMPONENTS}
    opened: dict[tuple[str, Setting], SleepySession] = {}

    def open_session(component: str, setting: Setting) -> SleepySession:
        session = SleepySession([per_component[component], overall], lambda b: seconds(component, b, setting))
        opened[(component, setting)] = session
        return session

    limit.calls = 1
    limit.threads = 2
    limit.sessions = {}
    limit.outputs = {c: ["y"] for c in COMPONENTS}
    limit.timings = {}
    limit.service_settings = {c: SERVICE for c in COMPONENTS}
    limit.max_batch = {c: max_batch for c in COMPONENTS}
    limit._feeds = {(c, b): {"x": np.zeros(b)} for c in COMPONENTS for b in range(1, 17)}
    limit.open_session = open_session  # type: ignore[method-assign]
    return limit, per_component, overall, opened


def test_the_settings_tried_are_the_services_the_other_arena_and_onnxruntimes_defaults() -> None:
    limit, _, _, _ = fake_limit()
    assert limit.settings("unet") == [SERVICE, Setting(arena=True, spinning=False), ORT_DEFAULTS]
    limit.service_settings["unet"] = ORT_DEFAULTS
    assert limit.settings("unet") == [ORT_DEFAULTS, Setting(arena=False, spinning=True)]


def test_the_limit_overlaps_the_models_with_as_many_threads_as_requests_were_in_flight() -> None:
    limit, per_component, overall, opened = fake_limit()
    batches = {"text_encoder": {2: 4}, "vae_encoder": {1: 4}, "unet": {4: 4}, "vae_decoder": {2: 4}}
    result = limit.replay(batches, images=8, in_flight=8)
    assert overall.most == 4  # the four models at once
    assert all(t.most == 1 for t in per_component.values())  # one execution per model at a time, as Triton's
    # every shape timed in every setting (a warm-up and one timed call), then per model a warm-up and the run's 16
    assert overall.calls == 4 * 3 * 2 + 4 + 16
    assert result["serial_s"] == pytest.approx(16 * CALL_S, rel=0.5)
    assert result["concurrent_s"] < result["serial_s"] / 2
    assert result["schedule"] == "replay_concurrent"
    assert result["images_per_s"] == pytest.approx(8 / result["concurrent_s"])
    assert result["images_per_s"] == max(v for v in result["candidates"].values() if v is not None)
    assert "free_batches" not in result["candidates"]  # no rows per image given
    assert limit.sessions == {}  # released after the replay
    assert len(opened) == 4 * 3


def test_fewer_threads_overlap_fewer_models() -> None:
    limit, _, overall, _ = fake_limit()
    limit.replay({c: {1: 3} for c in COMPONENTS}, images=3, in_flight=2)
    assert overall.most == 2


def test_at_one_request_in_flight_the_replay_runs_one_call_after_another() -> None:
    limit, _, overall, _ = fake_limit()
    result = limit.replay({"unet": {1: 5}, "vae_decoder": {1: 5}}, images=5, in_flight=1)
    assert overall.most == 1
    assert overall.calls == 2 * 3 * 2 + 2 + 10
    assert result["concurrent_s"] == pytest.approx(10 * CALL_S, rel=0.5)
    assert result["images_per_s"] == pytest.approx(5 / min(result["serial_s"], result["concurrent_s"]), rel=1e-6)


def test_the_fastest_setting_is_used_per_batch_and_named() -> None:
    # the arena helps the UNet; spinning helps only alone (the concurrent replay keeps the service's spinning)
    def seconds(component: str, batch: int, setting: Setting) -> float:
        if component != "unet":
            return CALL_S
        return {SERVICE: 4, Setting(arena=True, spinning=False): 2, ORT_DEFAULTS: 1}[setting] * CALL_S

    limit, _, _, opened = fake_limit(seconds)
    result = limit.replay({"unet": {2: 3}}, images=3, in_flight=1)
    assert result["candidate_settings"]["replay_serial"] == {"unet@2": ORT_DEFAULTS.label}
    assert result["candidate_settings"]["replay_concurrent"] == {"unet": "arena on, spinning off, patterns on"}
    assert result["candidate_settings"]["replay_serial_service_settings"] == {
        "unet": "arena off, spinning off, patterns on"
    }
    assert result["serial_s"] == pytest.approx(3 * CALL_S, rel=0.5)
    assert result["candidates"]["replay_serial_service_settings"] < result["candidates"]["replay_serial"]
    assert result["schedule"] == "replay_serial"
    assert result["settings"] == {"unet@2": ORT_DEFAULTS.label}
    # the concurrent replay's own session (opened after the timings): a warm-up, then the run's 3 executions
    assert opened[("unet", Setting(arena=True, spinning=False))].batches == [2] * 4


def test_free_batches_run_the_same_rows_at_the_best_batch_size() -> None:
    # time per row falls with the batch size up to the max batch (4): every component runs at 4 rows per call
    limit, _, _, opened = fake_limit(lambda c, b, s: CALL_S * (1 + b) / 2)
    rows = {"text_encoder": 2, "vae_encoder": 1, "unet": 8, "vae_decoder": 1}
    # the service's run of the same 4 images: 2 rows per UNet call, 1 per VAE call (9.5 calls' time per image)
    batches = {"text_encoder": {2: 4}, "vae_encoder": {1: 4}, "unet": {2: 16}, "vae_decoder": {1: 4}}
    result = limit.replay(batches, images=4, in_flight=1, rows_per_image=rows)
    free = result["free_batches"]
    assert {c: p["batch"] for c, p in free["per_component"].items()} == dict.fromkeys(COMPONENTS, 4)
    assert free["seconds_per_image"] == pytest.approx(12 * CALL_S * 5 / 8, rel=0.5)
    assert result["schedule"] == "free_batches"  # 7.5 calls' time per image
    assert result["images_per_s"] == free["images_per_s"]
    assert result["settings"]["unet"].startswith("batch 4, ")
    assert all(max(s.batches) <= 4 for s in opened.values())  # never above the model's max batch


def test_free_batches_stop_doubling_once_the_time_per_row_stops_falling() -> None:
    limit, _, _, opened = fake_limit(lambda c, b, s: CALL_S * (1 if b == 1 else 3 * b), max_batch=16)
    free = limit.free_batches({"unet": 4})
    assert free["per_component"]["unet"]["batch"] == 1
    assert free["seconds_per_image"] == pytest.approx(4 * CALL_S, rel=0.5)
    assert {b for s in opened.values() for b in s.batches} == {1, 2}  # 4, 8 and 16 never timed
    assert limit.sessions == {}  # one session at a time, dropped after its timings


def test_a_failing_session_fails_the_replay() -> None:
    limit, _, _, _ = fake_limit()

    class Broken(SleepySession):
        def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            raise RuntimeError("onnxruntime error")

    limit.open_session = lambda component, setting: Broken([])  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="onnxruntime error"):
        limit.run_concurrently({"unet": {1: 3}}, threads=2)


METRICS_TEXT = """# HELP imagen_stage_cpu_seconds_total Gateway CPU time charged to each request stage
# TYPE imagen_stage_cpu_seconds_total counter
imagen_stage_cpu_seconds_total{stage="decode"} 1.5
imagen_stage_cpu_seconds_total{stage="encode"} 0.25
imagen_stage_cpu_seconds_created{stage="decode"} 1.7e9
# TYPE imagen_process_cpu_seconds_total counter
imagen_process_cpu_seconds_total 4.0
imagen_http_requests_total{route="/v1/image-to-image",method="POST",status="200"} 3.0
"""


def test_stage_metrics_parse_and_the_rest_is_other() -> None:
    stages, process = parse_stage_metrics(METRICS_TEXT)
    assert stages == {"decode": 1.5, "encode": 0.25} and process == 4.0
    cpu = run_cpu({"gateway": 3.0, "tritonserver": 1.0, "stub:m_unet": 6.0, "loadgen": 2.0}, stages, process, 10)
    assert cpu["gateway_cpu_ms_per_image"] == pytest.approx(300.0)
    assert cpu["gateway_cpu_share"] == pytest.approx(0.3)  # the load generator is not the service's CPU
    assert cpu["stage_cpu_s"][OTHER_STAGE] == pytest.approx(3.0 - 1.75)  # the process tree's CPU, less the stages
    assert run_cpu({}, stages, process, 10)["stage_cpu_s"][OTHER_STAGE] == pytest.approx(4.0 - 1.75)
    assert cpu["stage_cpu_ms_per_image"]["decode"] == pytest.approx(150.0)


def test_process_cpu_finds_the_stub_of_each_model_among_the_servers_children() -> None:
    import subprocess
    import sys

    code = "import time; time.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys, time; "
                               f"c = subprocess.Popen([sys.executable, '-c', {code!r}, '/repo/m_unet/1/model.py']); "
                               "time.sleep(30)"])  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not psutil.Process(parent.pid).children() and time.monotonic() < deadline:
            time.sleep(0.05)
        cpu = ProcessCpu(psutil.Process().pid, parent.pid, ["m_unet"], loadgen_pid=None)
        assert set(cpu.snapshot()) == {"gateway", "tritonserver", "stub:m_unet"}
        with pytest.raises(RuntimeError, match="m_vae"):
            ProcessCpu(psutil.Process().pid, parent.pid, ["m_unet", "m_vae"], loadgen_pid=None)
    finally:
        for child in psutil.Process(parent.pid).children():
            child.kill()
        parent.kill()
        parent.wait()


def _model(service_ips: float, limit_ips: float, peers: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    """Canned runs: the service and the limit at level 8; each peer at its own levels (`{system: {level: ips}}`)."""
    run = {"images_per_s": service_ips, "completed": 8}
    limit = {"images_per_s": limit_ips, "schedule": "free_batches", "settings": {"unet": "batch 2, arena on"},
             "candidates": {"free_batches": limit_ips, "replay_concurrent": limit_ips / 2}}  # fmt: skip
    systems: dict[str, Any] = {"service": {"closed": {"8": [run]}}, "limit": {"closed": {"8": [limit]}}}
    for system, levels in (peers or {}).items():
        systems[system] = {"closed": {level: [{"images_per_s": ips}] for level, ips in levels.items()}}
    return {"flops": {"total": 1e9}, "systems": systems}


def test_a_service_faster_than_its_limit_is_flagged() -> None:
    assert report.aggregate(_model(9.0, 10.0), 1e12)["limit_violations"] == []
    flagged = report.aggregate(_model(11.0, 10.0), 1e12)
    assert flagged["limit_violations"] == [{"level": "8", "system": "service", "ratio": pytest.approx(1.1)}]
    assert flagged["ratios"]["8"]["service/limit"] == pytest.approx(1.1)


def test_a_peer_above_the_limit_is_listed_naming_the_peer() -> None:
    # the ORT peer beats the limit at 8; at 1 there is no limit figure to compare with, so nothing is listed there
    peers = {"ort_peer": {"1": 50.0, "8": 10.3}, "naive": {"8": 4.0}}
    summary = report.aggregate(_model(9.0, 10.0, peers), 1e12)
    assert summary["limit_violations"] == [{"level": "8", "system": "ort_peer", "ratio": pytest.approx(1.03)}]
    r = summary["ratios"]["8"]
    assert r["ort_peer/limit"] == pytest.approx(1.03) and r["naive/limit"] == pytest.approx(0.4)
    assert summary["limit_schedules"]["8"]["schedule"] == "free_batches"
    lines = report.violations_line(summary["limit_violations"])
    assert "ORT peer (optimum) at 8 (1.03x)" in lines
    assert report.violations_line([]).startswith("Above the limit: none")


def test_a_peer_measured_at_other_levels_is_compared_only_where_both_exist() -> None:
    summary = report.aggregate(_model(9.0, 10.0, {"ort_peer": {"1": 50.0}}), 1e12)
    assert summary["limit_violations"] == []
    assert summary["ratios"]["8"]["ort_peer/limit"] == pytest.approx(5.0)  # the ratio falls back to its median
    assert summary["ratios"]["8"]["ort_peer/limit peer level"] == "median over 1"


def test_the_services_setting_and_every_session_come_from_the_runners_session_options() -> None:
    """The limit reads the served setting through model.py's `session_options`, and builds its sessions with it."""
    from export.repository import ServingOptions, TensorSpec, config_parameters, python_runner, render_config

    runner = python_runner()
    config = render_config("m_unet", [TensorSpec("sample", "FP32", (-1, 4, -1, -1))], [], ServingOptions(), "x.onnx")
    served = Setting.of(runner.session_options(config_parameters(config)))
    assert served == Setting(arena=True, spinning=False, pattern=False)  # the export's defaults
    for setting in (served, ORT_DEFAULTS, Setting(arena=False, spinning=False)):
        assert Setting.of(runner.session_options(setting.runner_parameters())) == setting
