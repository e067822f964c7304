"""The torch runtime's batching pieces on the CPU (model_repository/python_backend/torch_runtime.py): the batch
sizes captured, the padding up to them, and the CUDA-graph cache around a capture seam. The capture itself
(record_cuda_graph) needs a GPU: the device run (scripts/gpu-serve-check.sh) exercises it; here a recorder that
replays the eager call on the CPU stands in, so what is tested is the cache, the padding and the copies."""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

RUNTIME_PY = Path(__file__).resolve().parents[2] / "model_repository" / "python_backend" / "torch_runtime.py"


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    spec = importlib.util.spec_from_file_location("torch_runtime_under_test", RUNTIME_PY)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "torch_runtime_under_test", module)
    spec.loader.exec_module(module)
    yield module


def test_captured_batches_are_powers_of_two_up_to_the_limit_and_the_limit(runtime: types.ModuleType) -> None:
    assert runtime.graph_batches(16) == (1, 2, 4, 8, 16)
    assert runtime.graph_batches(12) == (1, 2, 4, 8, 12)
    assert runtime.graph_batches(1) == (1,)
    assert [runtime.padded_batch(n, (1, 2, 4, 8, 12)) for n in (1, 3, 5, 9, 12, 13)] == [1, 4, 8, 12, 12, None]


def test_settings_on_a_host_without_cuda_run_fp32_on_the_cpu_without_graphs(runtime: types.ModuleType) -> None:
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    settings = runtime.TorchSettings.of({"component": "unet", "cuda_dtype": "float16"}, "GPU", "0", 16)
    assert (settings.device.type, settings.dtype, settings.cuda_graphs) == ("cpu", torch.float32, False)


class _Replay:
    """A 'graph' that reruns the eager call on the static inputs into the static output, as a replay would."""

    def __init__(self, eager: Any, static: dict[str, torch.Tensor], output: torch.Tensor) -> None:
        self.eager, self.static, self.output = eager, static, output

    def replay(self) -> None:
        self.output.copy_(self.eager(self.static))


def _unet(inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Row-independent, like the UNet: each row's sample scaled by its own timestep."""
    return inputs["sample"] * inputs["timestep"].reshape(-1, 1, 1, 1)


def _inputs(rows: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(rows, 4, 8, 8, generator=g), "timestep": torch.rand(rows, 1, generator=g) * 999}


def test_graphs_pad_to_the_captured_batch_reuse_it_and_never_leak_padding_rows(runtime: types.ModuleType) -> None:
    captures: list[int] = []

    def record(eager: Any, static: dict[str, torch.Tensor], pool: Any) -> tuple[Any, torch.Tensor]:
        captures.append(int(static["sample"].shape[0]))
        output = eager(static).clone()
        return _Replay(eager, static, output), output

    graphs = runtime.CudaGraphs(_unet, (1, 2, 4, 8), record=record, pool="pool")
    for seed, rows in enumerate((3, 3, 4, 2, 5)):
        feeds = _inputs(rows, seed)
        out = graphs(feeds)
        assert out.shape[0] == rows
        torch.testing.assert_close(out, _unet(feeds), rtol=0, atol=0)
    assert captures == [4, 2, 8]  # 3 and 3 and 4 rows share the 4-row graph
    eager = _inputs(9, 9)  # above every captured size: served eagerly, nothing captured
    torch.testing.assert_close(graphs(eager), _unet(eager), rtol=0, atol=0)
    assert captures == [4, 2, 8]


def test_graph_cache_is_bounded_and_a_failed_capture_falls_back_to_eager(
    runtime: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime, "MAX_CUDA_GRAPHS", 2)

    def record(eager: Any, static: dict[str, torch.Tensor], pool: Any) -> tuple[Any, torch.Tensor]:
        output = eager(static).clone()
        return _Replay(eager, static, output), output

    graphs = runtime.CudaGraphs(_unet, (1, 2, 4), record=record, pool="pool")
    for rows in (1, 2, 4):
        graphs(_inputs(rows, rows))
    assert [key[0] for key in graphs.graphs] == [2, 4]  # the least recently used (1 row) was dropped

    def broken(eager: Any, static: dict[str, torch.Tensor], pool: Any) -> tuple[Any, torch.Tensor]:
        raise RuntimeError("operation not permitted when stream is capturing")

    failing = runtime.CudaGraphs(_unet, (1, 2, 4), record=broken, pool="pool")
    feeds = _inputs(3, 1)
    torch.testing.assert_close(failing(feeds), _unet(feeds), rtol=0, atol=0)
    assert failing.disabled and "capturing" in failing.disabled and not failing.graphs
    torch.testing.assert_close(failing(_inputs(2, 2)), _unet(_inputs(2, 2)), rtol=0, atol=0)
