"""Issue 20, item 2: a large graph's weights are merged into one external-data file a tensor at a time
(export.onnx_export.merge_external_data), and tensor specs are read from the graph without its weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from export.onnx_export import EXTERNAL_DATA_ALIGNMENT, merge_external_data
from export.repository import tensor_specs


def _model_with_one_file_per_tensor(folder: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """y = (x @ a + b) @ c, its three weights each in its own external file, as torch writes a graph over 2 GB."""
    rng = np.random.default_rng(0)
    weights = {
        "a": rng.standard_normal((8, 16)).astype(np.float32),
        "b": rng.standard_normal((16,)).astype(np.float32),
        "c": rng.standard_normal((16, 4)).astype(np.float32),
    }
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "a"], ["xa"]),
            helper.make_node("Add", ["xa", "b"], ["h"]),
            helper.make_node("MatMul", ["h", "c"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "model.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    return path, weights


def test_the_weights_are_merged_into_one_aligned_file_and_the_graph_computes_the_same(tmp_path: Path) -> None:
    path, weights = _model_with_one_file_per_tensor(tmp_path)
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    before = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert len(list(tmp_path.iterdir())) == 1 + len(weights)

    merge_external_data(path)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx_data"]
    graph = onnx.load(str(path), load_external_data=False).graph
    for tensor in graph.initializer:
        info = {e.key: e.value for e in tensor.external_data}
        assert info["location"] == "model.onnx_data"
        assert int(info["offset"]) % EXTERNAL_DATA_ALIGNMENT == 0
        assert int(info["length"]) == weights[tensor.name].nbytes
    after = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(after, before)
    np.testing.assert_allclose(after, (x @ weights["a"] + weights["b"]) @ weights["c"], rtol=1e-5, atol=1e-5)


def test_a_graph_with_inline_weights_is_left_as_it_is(tmp_path: Path) -> None:
    path, _ = _model_with_one_file_per_tensor(tmp_path)
    onnx.save(onnx.load(str(path)), str(path))  # weights back inline
    for file in tmp_path.iterdir():
        if file != path:
            file.unlink()
    data = path.read_bytes()
    merge_external_data(path)
    assert path.read_bytes() == data and list(tmp_path.iterdir()) == [path]


def test_tensor_specs_come_from_the_graph_without_reading_its_weights(tmp_path: Path) -> None:
    path, _ = _model_with_one_file_per_tensor(tmp_path)
    merge_external_data(path)
    (tmp_path / "model.onnx_data").write_bytes(b"")  # unreadable weights: the specs must not need them
    inputs, outputs = tensor_specs(path, text_length=77)
    assert [(s.name, s.datatype, s.shape) for s in inputs] == [("x", "FP32", (-1, 8))]
    assert [(s.name, s.datatype, s.shape) for s in outputs] == [("y", "FP32", (-1, 4))]


def test_streamed_safetensors_read_back_exactly(tmp_path: Path) -> None:
    """export.weights writes what safetensors itself reads, in every dtype a module holds (0-d tensors too)."""
    import torch
    from safetensors.torch import load_file

    from export.weights import write_safetensors

    generator = torch.Generator().manual_seed(0)
    state = {
        "w32": torch.randn(3, 5, generator=generator),
        "w16": torch.randn(7, generator=generator).half(),
        "wbf16": torch.randn(2, 2, generator=generator).bfloat16(),
        "ids": torch.arange(6).reshape(2, 3),
        "scalar": torch.tensor(1.5),
        "strided": torch.randn(4, 4, generator=generator).T,  # not contiguous
    }
    read = load_file(str(write_safetensors(state, tmp_path / "w.safetensors")))
    assert list(read) == list(state)
    for name, tensor in state.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor), name
