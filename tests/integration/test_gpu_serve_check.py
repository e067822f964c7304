"""Issue 19, item 3: the device run (scripts/gpu-serve-check.sh) in its CPU mode, as the GPU machine runs it.

It builds and exports the tiny pipeline with the torch runtime, starts the bundled Triton in the interpreter's
own environment (numpy 2 here, as on the device machine: the torch runtime's tensors cross the stub as DLPack),
drives the UNet at 1 and 8 concurrent images (the device run's 1, 4, 16 and 32 take longer and prove no more
here) through the gateway's gRPC client, runs diffusers at batch
1, and writes one JSON with every field the device run reports. On CPU there is no fp16 peak, so the fraction of
it is null (and says so by its peak); everything else is measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.settings import PROJECT_ROOT

pytestmark = pytest.mark.integration

LEVELS = [1, 8]
LEVEL_FIELDS = {
    "concurrency",
    "seconds",
    "unet_calls",
    "images_per_s",
    "rows_per_s",
    "step_ms_median",
    "step_ms_p90",
    "batches_formed",
    "mean_batch_rows",
    "service_over_diffusers",
    "unet_tflops",
    "fraction_of_fp16_peak",
}


def test_gpu_serve_check_cpu_mode_serves_through_triton_and_writes_every_field(tmp_path: Path) -> None:
    out = tmp_path / "gpu-serve-check.json"
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(
        [
            str(PROJECT_ROOT / "scripts" / "gpu-serve-check.sh"),
            *("--device", "cpu", "--tiny", "--levels", ",".join(map(str, LEVELS)), "--out", str(out)),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert (data["check"], data["version"], data["tiny"], data["levels"]) == ("gpu-serve-check", 1, True, LEVELS)
    assert data["environment"]["device"] == "cpu"
    assert set(data["stages"]) == {"build_s", "export_s", "triton_start_s", "service_s", "diffusers_s"}
    assert data["triton"]["status"] == "ready" and "direct" not in data
    instances = data["triton"]["instances"]  # from Triton's log: where each model runs
    assert len(instances) == 4 and all("on cpu in float32, eager" in line for line in instances), instances
    service = data["service"]
    assert service["client"] == "gateway (gRPC)"
    assert set(service["components"]) == {"text_encoder", "vae_encoder", "unet", "vae_decoder"}
    assert all(c["finite"] for c in service["components"].values())
    # Every CUDA-graph batch size up to the UNet's max batch (2 rows per image at the top level).
    assert set(service["first_call_ms_by_rows"]) == {str(2**k) for k in range(5)}
    levels = service["levels"]
    assert [level["concurrency"] for level in levels] == LEVELS
    for level in levels:
        assert set(level) == LEVEL_FIELDS, level
        assert level["images_per_s"] > 0 and level["unet_calls"] > 0
        assert level["service_over_diffusers"] == pytest.approx(
            level["images_per_s"] / data["diffusers"]["images_per_s"], rel=1e-2
        )
        assert level["fraction_of_fp16_peak"] is None  # no fp16 peak for a CPU
    # Concurrent images' steps, each at its own timestep, shared UNet executions.
    assert max(level["mean_batch_rows"] for level in levels[1:]) > 2, [level["batches_formed"] for level in levels]
    assert data["diffusers"]["images_per_s"] > 0 and data["diffusers"]["batch"] == 1
    assert data["unet_flops_per_row"] > 0 and data["fp16_peak_tflops"] is None
    assert set(data["summary"]) == {str(c) for c in LEVELS}


def test_without_triton_the_run_times_the_runtime_directly_and_says_why(tmp_path: Path) -> None:
    """The fallback when Triton cannot serve on the device: the torch runtime's UNet timed directly, each level as
    one batch of all its images' rows, against the same diffusers baseline."""
    out = tmp_path / "direct.json"
    argv = ["--device", "cpu", "--tiny", "--no-triton", "--levels", "1,4", "--out", str(out)]
    result = subprocess.run(
        [str(PROJECT_ROOT / "scripts" / "gpu-serve-check.sh"), *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
        timeout=300,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["triton"] == {"status": "skipped", "reason": "--no-triton"} and "service" not in data
    direct = data["direct"]
    assert direct["why"] == "--no-triton"
    assert [(level["concurrency"], level["batch_rows"]) for level in direct["levels"]] == [(1, 2), (4, 8)]
    for level in direct["levels"]:
        assert level["images_per_s"] > 0 and level["service_over_diffusers"] is not None
    assert set(data["summary"]) == {"1", "4"}
