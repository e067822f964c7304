"""Triton Python-backend model that serves one component with onnxruntime (ONNX) or PyTorch (`runtime: torch`).

The same file serves every component (text encoder, VAE encoder, UNet, VAE decoder) in either runtime; what
differs lives in config.pbtxt (tensors, batching, `parameters`). It gathers the dynamic batch, runs one call, and
splits the result back, one response per request. onnxruntime uses CUDA when onnxruntime-gpu and a GPU instance
are present; the torch runtime (torch_runtime.py, copied beside this file) when torch sees one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

try:
    import onnxruntime as ort
except ImportError:  # an image for the torch runtime alone need not have it
    ort = None

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton, for `session_options` (export/calibrate.py): no serving there
    pb_utils = None


def _providers(instance_kind: str, device_id: str) -> list[Any]:
    """CUDA when onnxruntime-gpu sees a GPU and the instance may use it (KIND_GPU, or KIND_MODEL: our choice)."""
    if instance_kind in ("GPU", "MODEL") and "CUDAExecutionProvider" in ort.get_available_providers():
        return [("CUDAExecutionProvider", {"device_id": int(device_id or 0)}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session_options(params: dict[str, str]) -> Any:
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
    # with them; docs/benchmarks.md, "CPU memory"). Absent, as in configs written before the export set it:
    # onnxruntime's on.
    options.enable_mem_pattern = params.get("mem_pattern", "1") == "1"
    return options


class OnnxRuntime:
    """The component's ONNX graph in an onnxruntime session; tensors cross the stub as numpy arrays."""

    def __init__(self, args: dict[str, str], config: dict[str, Any], params: dict[str, str]) -> None:
        if int(np.__version__.split(".")[0]) >= 2:
            # pb_utils.Tensor <-> numpy goes through a numpy-1.x ABI in this stub: numpy 2 corrupts the data.
            raise RuntimeError(
                f"numpy {np.__version__} in the model runtime; this Triton Python backend needs numpy<2 "
                "(start Triton with the runtime env from requirements/triton-runtime.txt)"
            )
        onnx_path = Path(args["model_repository"]) / args["model_version"] / params.get("onnx_file", "model.onnx")
        self.session = ort.InferenceSession(
            str(onnx_path),
            session_options(params),
            providers=_providers(args["model_instance_kind"], args["model_instance_device_id"]),
        )
        self.graph_inputs = {i.name: list(i.shape) for i in self.session.get_inputs()}
        # Triton hands a per-sample scalar as [B, 1]; the ONNX graph wants [B]. Reshape to the graph's rank.
        self.ranks = {name: len(shape) for name, shape in self.graph_inputs.items()}

    def value(self, name: str, tensor: Any) -> np.ndarray:
        array: np.ndarray = tensor.as_numpy()
        return array.reshape(array.shape[: self.ranks[name]]) if array.ndim > self.ranks[name] else array

    def concat(self, parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts)

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        return dict(zip(output_names, self.session.run(output_names, feeds), strict=True))

    def tensor(self, name: str, rows: np.ndarray) -> Any:
        return pb_utils.Tensor(name, np.ascontiguousarray(rows))


class TorchRuntime:
    """The component's diffusers/transformers module in PyTorch (torch_runtime.py); tensors cross as DLPack, so
    neither the stub's numpy ABI nor a host copy of a GPU output is in the way.

    With LoRA slots (an export's `--lora-slots`) the module carries export/lora.py's branches (lora_branches.py
    beside this file); `graph_inputs` declares their bank as the ONNX graph would, so `_lora_bank` builds the same
    LoraBank, whose numpy feeds `run` hands the branches (torch_runtime.LoraBranches)."""

    def __init__(self, args: dict[str, str], config: dict[str, Any], params: dict[str, str]) -> None:
        folder = Path(args["model_repository"]) / args["model_version"]
        module = _load_beside(folder / "torch_runtime.py", "imagen_torch_runtime")
        self.torch = module.torch
        settings = module.TorchSettings.of(
            params, args["model_instance_kind"], args["model_instance_device_id"], int(config["max_batch_size"])
        )
        if int(params.get("intra_op_threads", "0")) > 0:
            self.torch.set_num_threads(int(params["intra_op_threads"]))
        branches = (
            _load_beside(folder / module.LORA_BRANCHES_FILE, "imagen_lora_branches") if settings.lora_slots else None
        )
        self.component = module.TorchComponent(
            settings, folder / module.WEIGHTS_DIR, [t["name"] for t in config["output"]], branches
        )
        lora = self.component.lora
        self.graph_inputs: dict[str, list[Any]] = dict(lora.bank_shapes) if lora is not None else {}
        self.lora_bank: Any = None  # set by _lora_bank: its slots tell which part of a device copy is stale
        # In Triton's log, where the device runs (scripts/gpu_serve_check.py) read which device each model got.
        pb_utils.Logger.log_info(f"{module.LOG_PREFIX} {config['name']}: {settings.describe()}")

    def value(self, name: str, tensor: Any) -> Any:
        return self.torch.from_dlpack(tensor)

    def concat(self, parts: list[Any]) -> Any:
        return parts[0] if len(parts) == 1 else self.torch.cat(parts)

    def run(self, feeds: dict[str, Any], output_names: list[str]) -> dict[str, Any]:
        """`feeds`: the inputs as tensors, plus a LoRA bank's feeds (numpy) with LoRA slots."""
        owners = None
        if self.lora_bank is not None:  # LoraBank.held: name -> (file fingerprint, slot)
            owners = {slot: (name, fingerprint) for name, (fingerprint, slot) in self.lora_bank.held.items()}
        return self.component.run(feeds, owners)  # type: ignore[no-any-return]

    def tensor(self, name: str, rows: Any) -> Any:
        return pb_utils.Tensor.from_dlpack(name, rows.contiguous())


def _load_beside(path: Path, name: str) -> Any:
    """A module shipped beside model.py in the version folder (the stub does not put that folder on sys.path)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


RUNTIMES: dict[str, type[OnnxRuntime] | type[TorchRuntime]] = {"onnxruntime": OnnxRuntime, "torch": TorchRuntime}


def _lora_bank(args: dict[str, str], params: dict[str, str], runtime: Any) -> Any:
    """The instance's LoRA bank (lora_bank.py, beside this file) over the graph's bank inputs. The adapter folder:
    IMAGEN_LORA_DIR, else the config's `lora_dir`, else `loras/` beside the model repository (the gateway's
    default: not inside it, where Triton would take it for a model)."""
    folder = Path(args["model_repository"]) / args["model_version"]
    formats = _load_beside(folder / "lora_format.py", "imagen_lora_format")
    bank = _load_beside(folder / "lora_bank.py", "imagen_lora_bank")
    lora_dir = os.environ.get("IMAGEN_LORA_DIR") or params.get("lora_dir") or ""
    lora_bank = bank.LoraBank(
        formats,
        params["lora_component"],
        {k: v for k, v in runtime.graph_inputs.items() if k.startswith(bank.BANK_PREFIX)},
        slots=int(params["lora_slots"]),
        folder=Path(lora_dir) if lora_dir else Path(args["model_repository"]).parent.parent / "loras",
        layers_per_block=int(params.get("lora_layers_per_block", "1")),
        base=params.get("lora_base", "sd"),
        log=pb_utils.Logger.log_info,  # which adapter went into which slot, and which one it evicted
    )
    if isinstance(runtime, TorchRuntime):  # its device copy of the bank follows the slots the bank loads
        runtime.lora_bank = lora_bank
    return lora_bank, bank


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        runtime = params.get("runtime", "onnxruntime")
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {runtime!r} in config.pbtxt (one of {', '.join(RUNTIMES)})")
        self.runtime = RUNTIMES[runtime](args, config, params)
        names = [t["name"] for t in config["input"]]
        # An export with LoRA slots takes `loras` (per row, JSON) and binds the bank itself (lora_bank.py).
        self.lora: Any = None  # lora_bank.LoraBank
        self.lora_module: Any = None  # lora_bank, for its `serve`
        if "loras" in names:
            self.lora, self.lora_module = _lora_bank(args, params, self.runtime)
        self.input_names = [n for n in names if n != "loras"]
        self.output_names = [t["name"] for t in config["output"]]

    def _gather(self, requests: list[Any]) -> tuple[dict[str, Any], list[int]]:
        parts: dict[str, list[Any]] = {name: [] for name in self.input_names}
        sizes = []
        for request in requests:
            for name in self.input_names:
                parts[name].append(self.runtime.value(name, pb_utils.get_input_tensor_by_name(request, name)))
            sizes.append(int(parts[self.input_names[0]][-1].shape[0]))
        return {name: self.runtime.concat(values) for name, values in parts.items()}, sizes

    def execute(self, requests: list[Any]) -> list[Any]:
        if self.lora is None:
            return self._execute(requests, {})
        return self.lora_module.serve(  # type: ignore[no-any-return]
            self.lora,
            requests,
            self._lora_rows,
            self._execute,
            lambda message: pb_utils.InferenceResponse(error=pb_utils.TritonError(message)),
        )

    def _lora_rows(self, request: Any) -> np.ndarray:
        """A request's `loras` (optional: a client that sends none asks for no adapter on any row)."""
        tensor = pb_utils.get_input_tensor_by_name(request, "loras")
        if tensor is not None:
            return tensor.as_numpy()  # type: ignore[no-any-return]
        rows = pb_utils.get_input_tensor_by_name(request, self.input_names[0]).shape()[0]  # no copy, any device
        return np.full((rows, 1), b"", dtype=np.object_)

    def _execute(self, requests: list[Any], extra: dict[str, Any]) -> list[Any]:
        """One run over the requests' gathered inputs plus `extra` (a LoRA bank's feeds)."""
        try:
            feeds, sizes = self._gather(requests)
            outputs = self.runtime.run({**feeds, **extra}, self.output_names)
        except Exception as exc:
            if len(requests) > 1:  # shapes that cannot share a batch: serve each request on its own
                return [self.execute([request])[0] for request in requests]
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}"))]
        bounds = np.cumsum([0, *sizes])
        return [
            pb_utils.InferenceResponse(
                output_tensors=[
                    self.runtime.tensor(name, outputs[name][bounds[i] : bounds[i + 1]]) for name in self.output_names
                ]
            )
            for i in range(len(requests))
        ]
