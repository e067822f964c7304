"""FLOPs per image, counted from the ONNX graphs, and the machine's large-matmul FLOP/s.

How FLOPs are counted: each component runs once at batch 1 in onnxruntime with graph optimizations OFF (so the
nodes are the graph's own ops) and profiling ON. The profile gives every node's actual input/output shapes; the
graph gives the weight shapes. We count multiply-adds of the ops that carry the arithmetic, 2 FLOPs each:
  MatMul / Gemm   2 * prod(output) * K            (K = the inner dimension of the first input)
  Conv            2 * prod(output) * prod(weight[1:])   (weight [Cout, Cin/groups, kh, kw])
  ConvTranspose   2 * prod(input) * prod(weight[1:])
Element-wise ops, norms, softmax are left out (a few % of a UNet), so the figure is a slight under-count.
Per image = text_encoder x (2 with guidance) + vae_encoder x 1 + unet x (2 with guidance) x effective steps
+ vae_decoder x 1 (a batch-1 pass scales linearly with batch for these ops).

Peak: one ONNX MatMul of 2048x2048 by 2048x2048 in onnxruntime with the run's thread pinning, best of a few.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.models import COMPONENTS, ModelFiles
from benchmarks.pinning import ort_session_options
from benchmarks.systems.limit import component_inputs, work_shapes


def _node_flops(op: str, inputs: list[list[int]], outputs: list[list[int]], weight: list[int] | None) -> int:
    if not outputs:
        return 0
    out = math.prod(outputs[0])
    if op in ("MatMul", "Gemm") and inputs:
        k = inputs[0][-1] if inputs[0] else 1
        return 2 * out * k
    if op == "Conv" and weight is not None:
        return 2 * out * math.prod(weight[1:])
    if op == "ConvTranspose" and weight is not None and inputs:
        return 2 * math.prod(inputs[0]) * math.prod(weight[1:])
    return 0


def component_flops(onnx_path: Path, feeds: dict[str, np.ndarray]) -> int:
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {i.name: list(i.dims) for i in model.graph.initializer}
    weights = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1:
            weights[node.name] = initializers.get(node.input[1])
    with tempfile.TemporaryDirectory() as tmp:
        options = ort_session_options(1, profile_prefix=os.path.join(tmp, "flops"), optimize=False)
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    total = 0
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        args = event["args"]
        node = event["name"][: -len("_kernel_time")]
        shapes_in = [next(iter(s.values())) for s in args.get("input_type_shape", [])]
        shapes_out = [next(iter(s.values())) for s in args.get("output_type_shape", [])]
        total += _node_flops(args["op_name"], shapes_in, shapes_out, weights.get(node))
    return total


def flops_per_image(files: ModelFiles, input_side: int, effective_steps: int, guidance: bool) -> dict[str, Any]:
    shapes = work_shapes(files.manifest(), input_side)
    rng = np.random.default_rng(0)
    per_sample = {c: component_flops(files.onnx(c), component_inputs(c, 1, shapes, rng)) for c in COMPONENTS}
    cfg = 2 if guidance else 1
    per_image = {
        "text_encoder": per_sample["text_encoder"] * cfg,
        "vae_encoder": per_sample["vae_encoder"],
        "unet": per_sample["unet"] * cfg * effective_steps,
        "vae_decoder": per_sample["vae_decoder"],
    }
    return {
        "per_sample_call": per_sample,
        "per_image": per_image,
        "total": sum(per_image.values()),
        "effective_steps": effective_steps,
        "guidance_batch": cfg,
        "method": "onnxruntime profile shapes (optimizations off) + graph weight shapes; MatMul/Gemm/Conv only",
        "work_shapes": shapes,
    }


def matmul_peak(threads: int, n: int = 2048, runs: int = 5) -> dict[str, Any]:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "matmul",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in ("a", "b")],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), ort_session_options(threads))
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((n, n), dtype=np.float32), "b": rng.standard_normal((n, n), dtype=np.float32)}
    session.run(None, feeds)
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - began)
    flops = 2 * n**3
    return {
        "n": n,
        "threads": threads,
        "best_s": min(times),
        "median_s": float(np.median(times)),
        "flops_per_s": flops / min(times),
        "method": f"onnxruntime MatMul {n}x{n}x{n} fp32, best of {runs}",
    }
