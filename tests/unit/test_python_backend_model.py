"""The Triton Python-backend runner, outside Triton: provider choice and batch gather/split."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

MODEL_PY = Path(__file__).resolve().parents[2] / "model_repository" / "python_backend" / "model.py"


class _Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self.name, self.array = name, array

    def as_numpy(self) -> np.ndarray:
        return self.array


class _Response:
    def __init__(self, output_tensors: list[_Tensor] | None = None, error: Any = None) -> None:
        self.output_tensors, self.error = output_tensors or [], error


def _fake_pb_utils() -> types.ModuleType:
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor = _Tensor  # type: ignore[attr-defined]
    module.InferenceResponse = _Response  # type: ignore[attr-defined]
    module.TritonError = lambda message: message  # type: ignore[attr-defined]
    module.get_input_tensor_by_name = lambda request, name: request[name]  # type: ignore[attr-defined]
    return module


@pytest.fixture
def runner_module(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    spec = importlib.util.spec_from_file_location("triton_runner_under_test", MODEL_PY)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setattr(module, "__name__", "triton_runner_under_test")
    # numpy 2 is refused inside Triton (ABI); the guard is what we test separately below.
    monkeypatch.setattr(np, "__version__", "1.26.4")
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("kind", "available", "cuda"),
    [
        ("GPU", ["CUDAExecutionProvider", "CPUExecutionProvider"], True),
        ("MODEL", ["CUDAExecutionProvider", "CPUExecutionProvider"], True),
        ("CPU", ["CUDAExecutionProvider", "CPUExecutionProvider"], False),
        ("MODEL", ["CPUExecutionProvider"], False),
    ],
)
def test_cuda_provider_when_available(
    runner_module: types.ModuleType, monkeypatch: pytest.MonkeyPatch, kind: str, available: list[str], cuda: bool
) -> None:
    monkeypatch.setattr(runner_module.ort, "get_available_providers", lambda: available)
    providers = runner_module._providers(kind, "1")
    assert (providers[0] == ("CUDAExecutionProvider", {"device_id": 1})) is cuda
    assert providers[-1] == "CPUExecutionProvider"


def _scale_model(path: Path) -> None:
    """y = x * t, with x [B, 2] and a per-sample t [B]: enough to see gather, reshape and split."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 2])
    t = helper.make_tensor_value_info("t", TensorProto.FLOAT, ["B"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 2])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    nodes = [helper.make_node("Unsqueeze", ["t", "axes"], ["t2"]), helper.make_node("Mul", ["x", "t2"], ["y"])]
    graph = helper.make_graph(nodes, "scale", [x, t], [y], initializer=[axes])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def test_batch_is_gathered_run_once_and_split_per_request(runner_module: types.ModuleType, tmp_path: Path) -> None:
    (tmp_path / "1").mkdir()
    _scale_model(tmp_path / "1" / "model.onnx")
    config = {
        "input": [{"name": "x"}, {"name": "t"}],
        "output": [{"name": "y"}],
        "parameters": {"onnx_file": {"string_value": "model.onnx"}, "intra_op_threads": {"string_value": "1"}},
    }
    model = runner_module.TritonPythonModel()
    model.initialize(
        {
            "model_config": json.dumps(config),
            "model_repository": str(tmp_path),
            "model_version": "1",
            "model_instance_kind": "CPU",
            "model_instance_device_id": "0",
        }
    )
    requests = [
        {"x": _Tensor("x", np.ones((2, 2), np.float32)), "t": _Tensor("t", np.array([[2.0], [3.0]], np.float32))},
        {"x": _Tensor("x", np.ones((1, 2), np.float32)), "t": _Tensor("t", np.array([[5.0]], np.float32))},
    ]
    responses = model.execute(requests)
    assert len(responses) == 2
    np.testing.assert_array_equal(responses[0].output_tensors[0].array, [[2, 2], [3, 3]])
    np.testing.assert_array_equal(responses[1].output_tensors[0].array, [[5, 5]])
    # A request that cannot run gets its own error; the others in the batch are still answered.
    bad = {"x": _Tensor("x", np.ones((1, 3), np.float32)), "t": _Tensor("t", np.array([[1.0]], np.float32))}
    mixed = model.execute([requests[1], bad])
    assert mixed[0].output_tensors and mixed[0].error is None
    assert mixed[1].error is not None and not mixed[1].output_tensors


def test_refuses_numpy_2_inside_triton(runner_module: types.ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner_module.np, "__version__", "2.4.6")
    with pytest.raises(RuntimeError, match="numpy<2"):
        runner_module.TritonPythonModel().initialize({"model_config": "{}"})


@pytest.mark.parametrize(
    ("params", "arena", "pattern"),
    [
        ({"cpu_mem_arena": "1", "mem_pattern": "0"}, True, False),  # what the export writes
        ({"cpu_mem_arena": "0", "mem_pattern": "1"}, False, True),
        ({}, False, True),  # a config written before either was set: onnxruntime's pattern default, no arena
    ],
)
def test_session_options_follow_the_config(
    runner_module: types.ModuleType, params: dict[str, str], arena: bool, pattern: bool
) -> None:
    options = runner_module.session_options({"intra_op_threads": "2", **params})
    assert options.intra_op_num_threads == 2
    assert options.enable_cpu_mem_arena is arena and options.enable_mem_pattern is pattern
