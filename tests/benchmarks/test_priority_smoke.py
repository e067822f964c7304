"""Smoke test of `python -m benchmarks priority`: its smallest form runs and writes every figure; no timings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.config import PORT_BASE

pytestmark = pytest.mark.integration


def test_priority_subcommand_writes_its_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.__main__ import main

    args = ["priority", "--quick", "--probes", "2", "--bulk-concurrency", "3", "--max-running-jobs", "1"]
    args += ["--capacity-s", "0.5", "--steady-s", "2", "--cache-requests", "2", "--port-base", str(PORT_BASE + 120)]
    assert main([*args, "--output", str(tmp_path), "--note", "smoke"]) == 0

    (json_file,) = tmp_path.glob("*-priority-quick.json")
    data = json.loads(json_file.read_text())
    assert data["kind"] == "priority" and data["mode"] == "quick" and data["host"]["cpu"] is not None
    assert data["gateway_env"]["IMAGEN_MAX_RUNNING_JOBS"] == "1" and data["notes"] == ["smoke"]

    latency = data["latency"]
    for kind in ("idle_priority_2", "loaded_priority_2", "loaded_priority_0"):
        assert latency[kind]["requests"] == 2 and latency[kind]["median_s"] > 0, kind
        assert all(s["status"] == "completed" for s in latency[kind]["samples"]), kind
    assert set(latency["ratios"]) == {
        "priority_2_loaded/idle",
        "priority_0_loaded/idle",
        "priority_0_loaded/priority_2_loaded",
    }
    assert all(r is not None and r > 0 for r in latency["ratios"].values())
    assert isinstance(latency["acceptance"]["met"], bool)
    bulk = latency["bulk"]
    assert bulk["concurrency"] == 3 and bulk["completed"] > 0 and bulk["errors"] == 0
    assert bulk["queued_at_send_median"] is not None  # the saturation evidence was read
    assert set(latency["triton"]) == {"idle_probes", "loaded"}
    assert latency["capacity"]["jobs_per_s"] > 0

    estimates = data["estimates"]
    assert estimates["arrival_rate_per_s"] > 0 and estimates["all"]["jobs"] >= 1
    for key in ("within_tolerance_share", "median_abs_relative_error", "p90_abs_relative_error"):
        assert key in estimates["steady"] and key in estimates["all"]
    assert all({"estimated_s", "actual_s", "relative_error"} <= set(job) for job in estimates["jobs"])
    assert len(estimates["median_queue_position_by_third"]) == 3 and isinstance(estimates["steady_state"], bool)

    cache = data["cache"]
    assert cache["cached_requests"] == 2 and cache["first"]["cached"] is False
    assert cache["cached_flags_all_true"] and cache["identical_images"] and cache["triton_unchanged"]
    assert cache["median_s"] > 0 and len(cache["first"]["sha256"]) == 1

    markdown = json_file.with_suffix(".md").read_text()
    for heading in ("## 1. Interactive latency", "## 2. Wait estimates", "## 3. Exact-result cache", "## Notes"):
        assert heading in markdown
    assert "| bulk load, priority 2 |" in markdown
    assert "wrote json" in capsys.readouterr().out
