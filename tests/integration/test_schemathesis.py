"""The real schemathesis CLI against a running gateway: every operation of `/openapi.json`, bounded and seeded.

`schemathesis run` reads the document the gateway serves, generates valid and invalid requests for each
operation (its `examples`, `coverage` and `fuzzing` phases) and sequences that follow the document's links
from a created job to the operations on it (`stateful`), sends them with a valid API key over loopback, and
checks every answer: no 5xx (`not_a_server_error`), a documented status (`status_code_conformance`), the
documented content type (`content_type_conformance`) and body schema (`response_schema_conformance`). Any
failure fails this test with the CLI's own report (request, response and a curl line to reproduce it).

Bounds, so `make test` stays short on a 2-core machine: at most `MAX_EXAMPLES` generated cases per operation
and phase, one worker, deterministic generation (no random seed, no example database: the same
requests on every run), and the whole CLI run killed after `RUN_TIMEOUT_S` (a liveness bound, not a performance claim:
the run takes about half a minute here). Every operation lists its statuses (no `default` response), so
`status_code_conformance` has teeth. Run it longer with more examples and a time budget (with `--max-time`
schemathesis repeats fuzzing and stateful runs until the budget is spent), e.g. against a gateway on :8080
with key `$KEY`:

    schemathesis run http://127.0.0.1:8080/openapi.json -H "Authorization: Bearer $KEY" \\
        -c not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \\
        --phases examples,coverage,fuzzing,stateful -n 1000 --max-time 1800 --workers 2

Safety: the gateway's outbound guard (SSRF) refuses loopback and private hosts except `127.0.0.2`, where
nothing listens, and the fetch timeout is short, so generated image and webhook URLs go nowhere.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.http.openapi import openapi_document
from gateway.triton.server import TritonServer
from tests.integration.conftest import API_KEY, Repository
from tests.integration.gateways import SubprocessGateway, start_gateway

pytestmark = pytest.mark.integration

CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance", "response_schema_conformance")
PHASES = ("examples", "coverage", "fuzzing", "stateful")
MAX_EXAMPLES = 25
REQUEST_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 240.0  # liveness bound for the whole CLI run (it takes well under that)
OUTPUT_TAIL_CHARS = 20_000


def schemathesis_cli() -> list[str]:
    """The CLI of the environment running the tests (the venv's console script, else `python -m schemathesis`)."""
    beside = Path(sys.executable).with_name("schemathesis")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("schemathesis")
    if found:
        return [found]
    return [sys.executable, "-m", "schemathesis.cli"]


@pytest.fixture(scope="module")
def fuzzed_gateway(
    triton: TritonServer, repository: Repository, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SubprocessGateway]:
    folder = tmp_path_factory.mktemp("schemathesis")
    gateway = start_gateway(
        triton,
        repository,
        folder,
        IMAGEN_API_KEYS=API_KEY,
        IMAGEN_ALLOW_ANONYMOUS="0",
        IMAGEN_FETCH_TIMEOUT_S="2",
        IMAGEN_WEBHOOK_TIMEOUT_S="2",
        IMAGEN_WEBHOOK_MAX_ATTEMPTS="1",
        # The fuzzer sends bursts of creations; the limiter has its own tests, and a 429 on every other request
        # would hide the validation paths behind it.
        IMAGEN_RATE_LIMIT_PER_MINUTE="0",
    )
    try:
        yield gateway
    finally:
        gateway.stop()


def test_schemathesis_run_finds_no_failure(fuzzed_gateway: SubprocessGateway, tmp_path: Path) -> None:
    url = fuzzed_gateway.url
    assert httpx.get(f"{url}/openapi.json", timeout=5).status_code == 200
    command = [
        *schemathesis_cli(),
        "--no-color",
        "run",
        f"{url}/openapi.json",
        "--header",
        f"Authorization: Bearer {API_KEY}",
        "--checks",
        ",".join(CHECKS),
        "--phases",
        ",".join(PHASES),
        "--max-examples",
        str(MAX_EXAMPLES),
        "--generation-deterministic",
        "--workers",
        "1",
        "--request-timeout",
        str(REQUEST_TIMEOUT_S),
        "--suppress-health-check",
        "all",
    ]
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    try:
        result = subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or "") if isinstance(exc.stdout, str) else (exc.stdout or b"").decode(errors="replace")
        pytest.fail(
            f"schemathesis did not finish within {RUN_TIMEOUT_S:.0f} s\n{output[-OUTPUT_TAIL_CHARS:]}\n"
            f"--- gateway log ---\n{fuzzed_gateway.log_tail()}"
        )
    output = result.stdout + result.stderr
    if result.returncode != 0:
        pytest.fail(
            f"schemathesis run exited {result.returncode}:\n{output[-OUTPUT_TAIL_CHARS:]}\n"
            f"--- gateway log ---\n{fuzzed_gateway.log_tail()}",
            pytrace=False,
        )
    tested = re.search(r"Tested: (\d+)", output)
    selected = re.search(r"Operations: +(\d+) selected / (\d+) total", output)
    cases = re.search(r"(\d+) generated, (\d+) passed", output)
    assert tested is not None and selected is not None, output[-OUTPUT_TAIL_CHARS:]
    # Every operation was exercised (loaded from its URL, schemathesis leaves out the one serving the document).
    operations = sum(1 for item in openapi_document()["paths"].values() for _ in item)
    assert int(tested.group(1)) == int(selected.group(1)) == int(selected.group(2)) >= operations - 1, output
    assert cases is not None and int(cases.group(1)) == int(cases.group(2)) > 0, output[-OUTPUT_TAIL_CHARS:]
