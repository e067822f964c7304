"""CI smoke test of the benchmark harness: tiny model, one concurrency level, two steps. No timing assertions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import report, runner
from benchmarks.config import WORK_DIR, smoke_config

pytestmark = pytest.mark.integration


def test_every_system_produces_numbers(tmp_path: Path) -> None:
    config = smoke_config()
    results = runner.run(config, work_dir=WORK_DIR, progress=False)  # exported models are reused between runs
    written = report.write(results, tmp_path)

    data = json.loads(written["json"].read_text())
    (level,) = [str(c) for c in config.models[0].concurrency]
    table = data["summary"]["tiny"]["table"]
    for system in ("service", "naive", "ort_peer", "limit"):
        row = table[system][level]
        assert row["images_per_s"]["median"] > 0, system
    for system in ("service", "naive", "ort_peer"):
        assert table[system][level]["errors"]["max"] == 0, system
        assert table[system][level]["p99_s"]["median"] > 0, system
    assert table["service"][level]["mean_unet_batch"]["median"] >= 1
    ratios = data["summary"]["tiny"]["ratios"][level]
    keys = ("service/naive", "service/ort_peer", "service/limit", "naive/limit", "ort_peer/limit")
    assert all(ratios[k] is not None for k in keys), ratios
    # The limit: the best of every schedule (the replays and the free batches) and setting, named in the JSON.
    limit_run = data["models"]["tiny"]["systems"]["limit"]["closed"][level][0]
    assert limit_run["schedule"] in limit_run["candidates"]
    assert {"replay_concurrent", "replay_serial", "free_batches"} <= set(limit_run["candidates"])
    assert limit_run["images_per_s"] == max(v for v in limit_run["candidates"].values() if v is not None)
    assert limit_run["settings"]
    model = data["models"]["tiny"]
    assert model["systems"]["service"]["open"]["completed"] > 0
    assert model["transport"]["gateway"]["requests"] > 0
    assert model["transport"]["identity_direct"]["client_ms_p50"] > 0
    assert model["flops"]["total"] > 0 and data["matmul_peak"]["flops_per_s"] > 0
    assert written["markdown"].read_text().count("| this service |") >= 1
    # Where the CPU goes: per process and per gateway stage; and the limit bounds every system at every level.
    summary = data["summary"]["tiny"]
    assert summary["limit_violations"] == [], summary["ratios"]
    assert "Above the limit: none" in written["markdown"].read_text()
    gateway = summary["gateway"]
    assert gateway["cpu_ms_per_image"] > 0 and 0 < gateway["cpu_share"] < 1
    name = data["models"]["tiny"]["model"]
    models = {f"stub:{name}_{c}" for c in ("text_encoder", "vae_encoder", "unet", "vae_decoder")}
    assert {"gateway", "tritonserver", "loadgen", *models} <= set(gateway["processes_ms_per_image"])
    stages = gateway["stages_ms_per_image"]
    for stage in ("parse", "hash", "base64", "decode", "resize", "triton", "scheduler", "encode", "storage"):
        assert stages.get(stage, 0) > 0, (stage, stages)
    assert "job_store" in stages and "other" in stages
    assert sum(stages.values()) <= gateway["cpu_ms_per_image"] * 1.05  # stages are exclusive, within the process
    markdown = written["markdown"].read_text()
    assert "| stage | CPU ms/image |" in markdown and "| gateway |" in markdown
    for kind in ("Throughput vs concurrency", "Latency CDF at concurrency 8"):
        assert written[kind].stat().st_size > 0


def test_lora_cost_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m benchmarks lora` on tiny: the three variants timed, finite positive ratios, the bank's memory."""
    import math

    from benchmarks.__main__ import main

    args = ["lora", "--quick", "--models", "tiny", "--repeats", "2", "--warmup", "1", "--no-text-encoder"]
    assert main([*args, "--work-dir", str(tmp_path / "work"), "--output", str(tmp_path / "out")]) == 0

    (json_file,) = (tmp_path / "out").glob("*-lora-quick.json")
    data = json.loads(json_file.read_text())
    assert data["lora"] == {"slots": 8, "rank": 16} and data["host"]["cpu"]
    (run,) = data["runs"]
    assert run["size"] == "tiny" and run["rows"] == 2 and run["repeats"] == 2
    assert set(run["per_row_s"]) == {"plain", "no_lora", "lora"}
    assert all(len(s) == 2 for s in run["samples_s"].values())
    for ratios in (run["ratios"], run["paired_ratios"]):
        assert set(ratios) == {"no_lora/plain", "lora/plain"}
        assert all(math.isfinite(r) and r > 0 for r in ratios.values()), ratios
    assert run["adapter_effect_max_abs"] > 0  # the adapter rows did run through the branches
    assert run["bank"]["unet"]["layers"] > 0 and run["bank"]["unet"]["bank_bytes"] > 0
    assert run["nodes"]["slotted"] > run["nodes"]["plain"]
    assert "| tiny |" in (tmp_path / "out" / json_file.with_suffix(".md").name).read_text()
    assert "b/a" in capsys.readouterr().out
