"""Issue 18, item 3: the real tritonserver keeps the models' onnxruntime threads within a CPU budget.

Two python-backend models whose configs the export renders (each instance asking for its intra-op threads as
Triton's `cpu_threads`) sleep in `execute` and answer with when they ran. Started with the bundled server's
budget (`TritonServer(cpu_budget=...)`), their executions never overlap; the same repository without a budget
does overlap, so the check can fail. One model asks for more threads than the budget: it still loads, since the
server raises the budget to the largest ask (Triton refuses to load an instance that asks for more).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from export.repository import ServingOptions, TensorSpec, render_config
from gateway.triton.server import TritonServer
from tests.integration.conftest import start_own_triton

BUDGET = 2
ASKS = {"budget_a": 2, "budget_b": 3}  # together over the budget; b alone is over it too
EXECUTE_S = 0.5  # long enough that two executions started together surely overlap without the limiter
CALLS_PER_MODEL = 2

SLEEPER = f"""
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for _ in requests:
            start = time.time()
            time.sleep({EXECUTE_S})
            span = np.array([[start, time.time()]], dtype=np.float64)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("span", span)]))
        return responses
"""


def _repository(root: Path) -> Path:
    for name, threads in ASKS.items():
        (root / name / "1").mkdir(parents=True)
        (root / name / "1" / "model.py").write_text(SLEEPER)
        config = render_config(
            name,
            [TensorSpec("x", "FP32", (-1, 1))],
            [TensorSpec("span", "FP64", (-1, 2))],
            ServingOptions(intra_op_threads=threads),
            "model.onnx",
        )
        (root / name / "config.pbtxt").write_text(config)
    return root


@contextmanager
def _server(repository: Path, log_file: Path, cpu_budget: int) -> Iterator[TritonServer]:
    server = start_own_triton(repository, log_file, cpu_budget=cpu_budget)
    try:
        server.wait_ready(list(ASKS), timeout_s=60)
        yield server
    finally:
        server.stop()


def _spans(server: TritonServer) -> list[tuple[float, float]]:
    """Every model called CALLS_PER_MODEL times, all at once; the (start, end) of each execution."""

    def call(model: str) -> tuple[float, float]:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            x = grpcclient.InferInput("x", [1, 1], "FP32")
            x.set_data_from_numpy(np.zeros((1, 1), np.float32))
            start, end = client.infer(model, [x]).as_numpy("span")[0]
            return float(start), float(end)
        finally:
            client.close()

    models = list(ASKS) * CALLS_PER_MODEL
    with ThreadPoolExecutor(len(models)) as pool:
        return list(pool.map(call, models))


def _overlaps(spans: list[tuple[float, float]]) -> bool:
    ordered = sorted(spans)
    return any(later[0] < earlier[1] for earlier, later in pairwise(ordered))


def test_executions_whose_threads_exceed_the_budget_never_overlap(tmp_path: Path) -> None:
    repository = _repository(tmp_path / "models")
    assert (
        'rate_limiter { resources [ { name: "cpu_threads" global: true count: 3 } ] }'
        in (repository / "budget_b" / "config.pbtxt").read_text()
    )
    with _server(repository, tmp_path / "limited.log", cpu_budget=BUDGET) as server:
        limited = _spans(server)
    with _server(repository, tmp_path / "free.log", cpu_budget=0) as server:
        free = _spans(server)
    assert _overlaps(free), f"the control never overlapped, so the check below proves nothing: {free}"
    assert not _overlaps(limited), f"executions overlapped under a {BUDGET}-core budget: {limited}"
