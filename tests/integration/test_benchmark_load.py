"""`python -m benchmarks load`: the harness's load generator against a running gateway (the real one, on the real
Triton, behind an API key), as a user benchmarking their own deployment would run it; and its one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.settings import PROJECT_ROOT
from gateway.triton.server import TritonServer
from tests.helpers import free_port
from tests.integration.conftest import Repository
from tests.integration.gateways import SubprocessGateway, start_gateway

pytestmark = pytest.mark.integration

KEY = "load-bench-key-0000-0123456789abcdef"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Two denoising steps of the tiny model: the command is under test, not the service's speed.
FAST = ["--steps", "2", "--strength", "1.0", "--warmup", "1", "--no-progress"]


@pytest.fixture(scope="module")
def service(
    triton: TritonServer,
    repository: Repository,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SubprocessGateway]:
    gateway = start_gateway(
        triton,
        repository,
        tmp_path_factory.mktemp("load-gw"),
        IMAGEN_API_KEYS=KEY,
        IMAGEN_RATE_LIMIT_PER_MINUTE="0",
        IMAGEN_LOG_LEVEL="warning",
    )
    try:
        yield gateway
    finally:
        gateway.stop()


def load(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "IMAGEN_API_KEY"}  # the key only where a test gives one
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", "load", *args],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_sweep_writes_json_markdown_and_plots(service: SubprocessGateway, tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = load(
        "--url", service.url, "--key", KEY, "--model", "imagen-v2",
        "--concurrency", "1,2", "--requests", "6", "--rates", "4", "--slo-ms", "60000",
        "--output", str(out), *FAST,
    )  # fmt: skip
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{service.log_tail()}"
    assert "Traceback" not in done.stderr

    (json_path,) = out.glob("*.json")
    data = json.loads(json_path.read_text())
    assert data["kind"] == "load"
    assert data["target"]["endpoint"] == f"{service.url}/v1/image-to-image"
    assert data["target"]["model"] == "imagen-v2" and "imagen-v2" in data["target"]["served_models"]
    assert data["request"]["image"]["width"] == 512 and data["request"]["steps"] == 2

    closed = data["summary"]["closed"]
    assert set(closed) == {"1", "2"}
    for level in ("1", "2"):
        (run,) = data["runs"]["closed"][level]
        assert run["requests"] == 6 and run["completed"] == 6 and run["errors"] == 0, run["error_samples"]
        assert run["status_counts"] == {"200": 6}
        assert len(run["latencies_s"]) == 6 and run["p50_s"] > 0 and run["p99_s"] >= run["p50_s"]
        assert closed[level]["images_per_s"]["median"] > 0
        assert closed[level]["slo_met_share"]["median"] == 1.0  # 60 s: every request meets it
    (poisson,) = data["runs"]["open"]["4"]
    assert poisson["rate_per_s"] == 4 and poisson["completed"] == 6 and poisson["errors"] == 0
    assert data["summary"]["open"]["4"]["p95_s"]["median"] > 0
    assert data["summary"]["best"]["concurrency"] in (1, 2)
    assert data["summary"]["slo"] == {"ms": 60000, "met": 18, "requests": 18, "met_share": 1.0}
    assert data["summary"]["requests"] == 18 and data["summary"]["errors"] == 0

    markdown = json_path.with_suffix(".md").read_text()
    assert "| conc. | images/s | p50 ms | p95 ms | p99 ms | errors | ≤ 60000 ms |" in markdown
    assert "| offered req/s |" in markdown and "100.0% of them (18/18) finished within 60000 ms" in markdown
    assert json_path.stem.endswith(f"-load-127-0-0-1-{service.url.rsplit(':', 1)[1]}")
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [f"{json_path.stem}-{s}.png" for s in ("latency-cdf", "latency-vs-load", "throughput")]
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000, png
        assert f"]({png.name})" in markdown
    assert f"wrote json: {json_path}" in done.stdout


def test_tight_slo_is_counted_as_missed(service: SubprocessGateway, tmp_path: Path) -> None:
    """A 1 ms target: no request meets it; a JPEG input file, no open loop, the endpoint URL itself as --url."""
    from PIL import Image

    image = tmp_path / "in.jpg"
    Image.new("RGB", (96, 64), (120, 30, 200)).save(image, format="JPEG")
    done = load(
        "--url", f"{service.url}/v1/image-to-image/", "--key", KEY, "--image", str(image),
        "--concurrency", "2", "--requests", "2", "--rates", "", "--slo-ms", "1",
        "--output", str(tmp_path / "r"), *FAST,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (json_path,) = (tmp_path / "r").glob("*.json")
    data = json.loads(json_path.read_text())
    assert data["target"]["model"] == "imagen-v2"  # the service's default, from GET /v1/models
    assert data["request"]["image"] == {**data["request"]["image"], "format": "JPEG", "width": 96, "height": 64}
    assert data["runs"]["open"] == {} and data["summary"]["slo"]["met_share"] == 0.0
    pngs = sorted(p.name for p in (tmp_path / "r").glob("*.png"))
    assert pngs == [f"{json_path.stem}-{s}.png" for s in ("latency-cdf", "throughput")]


def _fails_cleanly(done: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for text in expected:
        assert text in lines[0], lines[0]


def test_unreachable_url(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    _fails_cleanly(load("--url", f"http://127.0.0.1:{port}", "--output", str(tmp_path), timeout=60),
                   "cannot reach", str(port))  # fmt: skip
    assert not list(tmp_path.iterdir())


def test_wrong_or_missing_key(service: SubprocessGateway, tmp_path: Path) -> None:
    _fails_cleanly(load("--url", service.url, "--key", "not-the-key", "--output", str(tmp_path), timeout=60),
                   "refused the API key", "401")  # fmt: skip
    _fails_cleanly(load("--url", service.url, "--output", str(tmp_path), timeout=60), "no --key given", "401")
    assert not list(tmp_path.iterdir())


def test_bad_image_file(service: SubprocessGateway, tmp_path: Path) -> None:
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    _fails_cleanly(load("--url", service.url, "--key", KEY, "--image", str(text), timeout=60), "not an image")
    _fails_cleanly(load("--url", service.url, "--key", KEY, "--image", str(tmp_path / "missing.png"), timeout=60),
                   "cannot read --image")  # fmt: skip


def test_unknown_model(service: SubprocessGateway, tmp_path: Path) -> None:
    _fails_cleanly(load("--url", service.url, "--key", KEY, "--model", "no-such-model", timeout=60),
                   "no-such-model", "imagen-v2")  # fmt: skip


def test_harness_arguments_unchanged() -> None:
    """`python -m benchmarks` without `load` is the harness, with its own options."""
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0 and "--quick" in done.stdout and "--models" in done.stdout
