"""The benchmark's limit and CPU accounting, at their seams: fake sessions, canned /metrics text, canned runs."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import psutil
import pytest

from benchmarks import report
from benchmarks.cpu import OTHER_STAGE, ProcessCpu, parse_stage_metrics, run_cpu
from benchmarks.systems.limit import Limit

CALL_S = 0.02


class SleepySession:
    """Stands in for an onnxruntime session: each run takes CALL_S of wall time and releases the GIL (sleeps);
    records how many runs of this session, and of all sessions sharing `overall`, overlapped."""

    def __init__(self, overall: SleepySession | None = None) -> None:
        self.lock = threading.Lock()
        self.overall = overall
        self.running = 0
        self.most = 0
        self.calls = 0

    def enter(self, delta: int) -> None:
        with self.lock:
            self.running += delta
            self.most = max(self.most, self.running)
            self.calls += delta > 0

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        for tracker in (self, self.overall):
            if tracker is not None:
                tracker.enter(1)
        time.sleep(CALL_S)
        for tracker in (self, self.overall):
            if tracker is not None:
                tracker.enter(-1)
        return [np.zeros(1)]


COMPONENTS = ("text_encoder", "vae_encoder", "unet", "vae_decoder")


def fake_limit() -> tuple[Limit, dict[str, SleepySession], SleepySession]:
    limit = Limit.__new__(Limit)  # the seam: no ONNX files, sessions replaced
    overall = SleepySession()
    sessions = {c: SleepySession(overall) for c in COMPONENTS}
    limit.calls = 1
    limit.sessions = sessions  # type: ignore[assignment]
    limit.outputs = {c: ["y"] for c in COMPONENTS}
    limit.timings = {}
    limit._feeds = {(c, b): {"x": np.zeros(b)} for c in COMPONENTS for b in (1, 2, 4)}
    return limit, sessions, overall


def test_the_limit_overlaps_the_models_with_as_many_threads_as_requests_were_in_flight() -> None:
    limit, sessions, overall = fake_limit()
    batches = {"text_encoder": {2: 4}, "vae_encoder": {1: 4}, "unet": {4: 4}, "vae_decoder": {2: 4}}
    result = limit.replay(batches, images=8, in_flight=8)
    assert overall.most == 4  # the four models at once
    assert all(s.most == 1 for s in sessions.values())  # one execution per model at a time, as Triton's instance
    # every execution ran: per shape a warm-up and one timed call (serial timings), then the run's 16
    assert overall.calls == 4 * 2 + 16
    assert result["serial_s"] == pytest.approx(16 * CALL_S, rel=0.5)
    assert result["concurrent_s"] < result["serial_s"] / 2
    assert result["schedule"] == "concurrent"
    assert result["compute_s"] == result["concurrent_s"]
    assert result["images_per_s"] == pytest.approx(8 / result["concurrent_s"])


def test_fewer_threads_overlap_fewer_models() -> None:
    limit, _, overall = fake_limit()
    limit.replay({c: {1: 3} for c in COMPONENTS}, images=3, in_flight=2)
    assert overall.most == 2


def test_at_one_request_in_flight_the_replay_runs_one_call_after_another() -> None:
    limit, _, overall = fake_limit()
    result = limit.replay({"unet": {1: 5}, "vae_decoder": {1: 5}}, images=5, in_flight=1)
    assert overall.most == 1
    assert overall.calls == 2 * 2 + 10
    assert result["concurrent_s"] == pytest.approx(10 * CALL_S, rel=0.5)
    assert result["compute_s"] == min(result["serial_s"], result["concurrent_s"])
    assert result["images_per_s"] == pytest.approx(5 / result["compute_s"])


def test_a_failing_session_fails_the_replay() -> None:
    limit, _, _ = fake_limit()

    class Broken(SleepySession):
        def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            raise RuntimeError("onnxruntime error")

    limit.timings = {("unet", 1): {"median_s": CALL_S, "min_s": CALL_S, "max_s": CALL_S}}
    limit.sessions = {"unet": Broken()}  # type: ignore[misc]
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


def _model(service_ips: float, limit_ips: float) -> dict[str, Any]:
    run = {"images_per_s": service_ips, "completed": 8}
    return {
        "flops": {"total": 1e9},
        "systems": {
            "service": {"closed": {"8": [run]}},
            "limit": {"closed": {"8": [{"images_per_s": limit_ips}]}},
        },
    }


def test_a_service_faster_than_its_limit_is_flagged() -> None:
    assert report.aggregate(_model(9.0, 10.0), 1e12)["limit_violations"] == []
    flagged = report.aggregate(_model(11.0, 10.0), 1e12)
    assert flagged["limit_violations"] == ["8"]
    assert flagged["ratios"]["8"]["service/limit"] == pytest.approx(1.1)
