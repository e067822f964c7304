"""Triton Python-backend model that serves one ONNX component with onnxruntime.

The same file serves every component (text encoder, VAE encoder, UNet, VAE decoder); what differs lives in
config.pbtxt (tensors, batching, `parameters`). It gathers the dynamic batch, runs one session call, and splits
the result back, one response per request. It uses CUDA when onnxruntime-gpu and a GPU instance are present.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton, for `session_options` (export/calibrate.py): no serving there
    pb_utils = None


def _providers(instance_kind: str, device_id: str) -> list[Any]:
    """CUDA when onnxruntime-gpu sees a GPU and the instance may use it (KIND_GPU, or KIND_MODEL: our choice)."""
    if instance_kind in ("GPU", "MODEL") and "CUDAExecutionProvider" in ort.get_available_providers():
        return [("CUDAExecutionProvider", {"device_id": int(device_id or 0)}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session_options(params: dict[str, str]) -> ort.SessionOptions:
    """The session settings of a config.pbtxt's `parameters`; the export's calibration times the UNet with
    exactly these, so its batch policy is measured as served."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(params.get("intra_op_threads", "0"))
    # Several model processes share the CPU cores: idle pool threads must sleep, not spin.
    options.add_session_config_entry("session.intra_op.allow_spinning", params.get("allow_spinning", "0"))
    # The CPU arena holds the largest batch's activations for the life of the process (the export sets it;
    # absent, as in configs written before it was on by default, it is off).
    options.enable_cpu_mem_arena = params.get("cpu_mem_arena", "0") == "1"
    # Memory patterns pre-plan one block per input shape on top of the arena; without them the arena alone reuses
    # its chunks (the 512 px UNet on 2 cores: 0.93 s a row at 2 rows and 3.4 GiB held, against 1.34 s and 5.6 GiB
    # with them; benchmarks/README.md). Absent, as in configs written before the export set it: onnxruntime's on.
    options.enable_mem_pattern = params.get("mem_pattern", "1") == "1"
    return options


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        if int(np.__version__.split(".")[0]) >= 2:
            # pb_utils.Tensor <-> numpy goes through a numpy-1.x ABI in this stub: numpy 2 corrupts the data.
            raise RuntimeError(
                f"numpy {np.__version__} in the model runtime; this Triton Python backend needs numpy<2 "
                "(start Triton with the runtime env from requirements/triton-runtime.txt)"
            )
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        onnx_path = Path(args["model_repository"]) / args["model_version"] / params.get("onnx_file", "model.onnx")
        self.session = ort.InferenceSession(
            str(onnx_path),
            session_options(params),
            providers=_providers(args["model_instance_kind"], args["model_instance_device_id"]),
        )
        self.input_names = [t["name"] for t in config["input"]]
        self.output_names = [t["name"] for t in config["output"]]
        # Triton hands a per-sample scalar as [B, 1]; the ONNX graph wants [B]. Reshape to the graph's rank.
        self.ranks = {i.name: len(i.shape) for i in self.session.get_inputs()}

    def _gather(self, requests: list[Any]) -> tuple[dict[str, np.ndarray], list[int]]:
        arrays: dict[str, list[np.ndarray]] = {name: [] for name in self.input_names}
        sizes = []
        for request in requests:
            for name in self.input_names:
                value = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                if value.ndim > self.ranks[name]:
                    value = value.reshape(value.shape[: self.ranks[name]])
                arrays[name].append(value)
            sizes.append(arrays[self.input_names[0]][-1].shape[0])
        return {name: np.concatenate(parts) for name, parts in arrays.items()}, sizes

    def execute(self, requests: list[Any]) -> list[Any]:
        try:
            feeds, sizes = self._gather(requests)
            outputs = self.session.run(self.output_names, feeds)
        except Exception as exc:
            if len(requests) > 1:  # shapes that cannot share a batch: serve each request on its own
                return [self.execute([request])[0] for request in requests]
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}"))]
        bounds = np.cumsum([0, *sizes])
        return [
            pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor(name, np.ascontiguousarray(out[bounds[i] : bounds[i + 1]]))
                    for name, out in zip(self.output_names, outputs, strict=True)
                ]
            )
            for i in range(len(requests))
        ]
