"""The python runner's PyTorch runtime (`python -m export --runtime torch`): one diffusers component served eagerly.

The export writes each component's own module (config.json and safetensors, as diffusers/transformers save them)
into `torch/` beside model.py; no ONNX. The component answers with exactly the tensors its ONNX graph would
(names, shapes, a per-sample timestep), so the gateway cannot tell the runtimes apart, and its I/O stays fp32
whatever it computes in. On CUDA it runs fp16 (fp32 where the export says so: a `force_upcast` SDXL VAE), SDPA
attention, channels-last, and the UNet replays a CUDA graph per (batch, shapes), a batch padded up to the next
captured size; `torch.compile` is an option. On CPU it runs fp32, eager (how the tests run it).

An export with `--lora-slots` serves per-row LoRA adapters here as in the onnxruntime runtime: the same branches
(export/lora.py, copied beside model.py as lora_branches.py) go on the module's targeted layers, and each call binds
the instance's bank (lora_bank.py: numpy, filled from adapter files) and the batch's adapter rows to them
(`LoraBranches`). Such a UNet runs eagerly, without CUDA graphs: which rows a call adapts, and how many, changes
the branches' shapes from call to call. `torch.compile` still applies, and recompiles as those shapes change (on
the tiny UNet on CPU the compiled calls matched eager to ~3e-6 across adapter rows, slots and rows per adapter).

Tensors cross the stub as DLPack (model.py), so this runtime never touches the stub's numpy ABI. Imports torch,
diffusers (UNet, VAE) and transformers (text encoders): the serving image of this runtime adds them.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Where the export writes a component's module, inside the model version folder.
WEIGHTS_DIR = "torch"
# The text encoder classes an SD/SDXL pipeline uses (transformers), by the `architectures` of their config.
TEXT_ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection")
# The parts of the VAE each half needs; the other half is dropped after loading (a VAE half serves one way only).
VAE_HALVES = {"vae_encoder": ("decoder", "post_quant_conv"), "vae_decoder": ("encoder", "quant_conv")}
# How many UNet CUDA graphs one instance keeps (one per batch size and latent shape seen, least recently used
# dropped): 5 batch sizes x a few resolutions, all sharing one memory pool.
MAX_CUDA_GRAPHS = 24
# Eager calls on a side stream before a graph is captured (cuDNN/cuBLAS pick and cache their kernels there).
GRAPH_WARMUP_CALLS = 2
# How this runtime's lines start in Triton's log (model.py logs each instance's settings at load).
LOG_PREFIX = "imagen torch runtime:"
DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
# The LoRA branches' module (export/lora.py), beside model.py in a model exported with --lora-slots.
LORA_BRANCHES_FILE = "lora_branches.py"

log = logging.getLogger("imagen.torch_runtime")


@dataclass(frozen=True)
class TorchSettings:
    """What the config.pbtxt `parameters` and the instance Triton gives us decide."""

    component: str
    device: torch.device
    dtype: torch.dtype
    cuda_graphs: bool
    compile: bool
    graph_batches: tuple[int, ...]
    lora_slots: int = 0  # LoRA bank slots (config `lora_slots`), 0 without LoRA branches
    lora_rank: int = 0  # the bank's rank (config `lora_rank`)

    @classmethod
    def of(cls, params: Mapping[str, str], kind: str, device_id: str, max_batch_size: int) -> TorchSettings:
        """CUDA when torch sees a GPU and the instance may use it (KIND_GPU, or KIND_MODEL: our choice)."""
        cuda = kind in ("GPU", "MODEL") and torch.cuda.is_available()
        device = torch.device(f"cuda:{int(device_id or 0)}") if cuda else torch.device("cpu")
        dtype = DTYPES[params.get("cuda_dtype", "float16")] if cuda else torch.float32
        lora_slots = int(params.get("lora_slots", "0")) if "lora_component" in params else 0
        return cls(
            component=params["component"],
            device=device,
            dtype=dtype,
            # With LoRA slots the UNet runs eagerly: the branches' shapes follow each call's adapter rows.
            cuda_graphs=cuda
            and params.get("cuda_graphs", "1") == "1"
            and params["component"] == "unet"
            and not lora_slots,
            compile=params.get("torch_compile", "0") == "1",
            graph_batches=graph_batches(max_batch_size),
            lora_slots=lora_slots,
            lora_rank=int(params["lora_rank"]) if lora_slots else 0,
        )

    def describe(self) -> str:
        graphs = f"CUDA graphs at {list(self.graph_batches)} rows" if self.cuda_graphs else "eager"
        lora = f", LoRA: {self.lora_slots} slots of rank {self.lora_rank}" if self.lora_slots else ""
        return (
            f"{self.component} on {self.device} in {str(self.dtype).removeprefix('torch.')}, {graphs}"
            + (", torch.compile" if self.compile else "")
            + lora
        )


def graph_batches(max_batch_size: int) -> tuple[int, ...]:
    """The batch sizes captured: powers of two up to the model's max_batch_size, and that size itself."""
    sizes = [1 << i for i in range(max_batch_size.bit_length()) if 1 << i <= max_batch_size]
    return tuple(sorted({*sizes, max_batch_size}))


def padded_batch(rows: int, batches: Sequence[int]) -> int | None:
    """The smallest captured batch that holds `rows`, or None when none does (then the call runs eagerly)."""
    return next((b for b in batches if b >= rows), None)


def load_module(component: str, folder: Path) -> torch.nn.Module:
    """The component's module from the export's config.json + safetensors, fp32 on the CPU."""
    config = json.loads((folder / "config.json").read_text("utf-8"))
    if component.startswith("text_encoder"):
        import transformers

        architecture = (config.get("architectures") or ["CLIPTextModel"])[0]
        if architecture not in TEXT_ARCHITECTURES:
            raise ValueError(f"{folder}: text encoder {architecture!r} is not one of {TEXT_ARCHITECTURES}")
        module: torch.nn.Module = getattr(transformers, architecture).from_pretrained(folder)
    elif component == "unet":
        from diffusers import UNet2DConditionModel

        module = UNet2DConditionModel.from_pretrained(folder)
    else:
        from diffusers import AutoencoderKL

        module = AutoencoderKL.from_pretrained(folder)
        for unused in VAE_HALVES[component]:
            setattr(module, unused, None)
    return module.eval().requires_grad_(False)


class TorchComponent:
    """One component on one device: `run(feeds)` takes the batched inputs by name and returns the outputs.

    `lora_branches`: the loaded lora_branches.py, for a component exported with LoRA slots (settings.lora_slots).
    """

    def __init__(
        self, settings: TorchSettings, folder: Path, output_names: Sequence[str], lora_branches: Any = None
    ) -> None:
        self.settings = settings
        self.output_names = tuple(output_names)
        module = load_module(settings.component, folder).to(settings.device, settings.dtype)
        if settings.device.type == "cuda" and settings.component in ("unet", "vae_encoder", "vae_decoder"):
            module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.module = module
        self.lora: LoraBranches | None = None
        if settings.lora_slots:
            if lora_branches is None:
                raise ValueError(f"{settings.component} has LoRA slots: its {LORA_BRANCHES_FILE} is needed")
            self.lora = LoraBranches(lora_branches, module, settings)
        # torch.compile wraps `forward`: the UNet's (the VAE halves are called through encode/decode, and the
        # text encoders are a small share of the time).
        self._call: Any = torch.compile(module) if settings.compile and settings.component == "unet" else module
        self._graphs = CudaGraphs(self._unet_eager, settings.graph_batches) if settings.cuda_graphs else None

    # -- the components, as the ONNX export traces them (export.validate runs the same calls on the torch side) --

    def run(
        self, feeds: Mapping[str, Any], lora_slot_owners: Mapping[int, Any] | None = None
    ) -> dict[str, torch.Tensor]:
        """`feeds`: the component's inputs (tensors) and, with LoRA slots, the bank's feeds (numpy: lora_bank.py's
        `LoraBank.feeds`; none, a call without adapter rows). `lora_slot_owners`: LoraBranches.bind."""
        with torch.inference_mode():
            if self.lora is not None:
                feeds = self.lora.bind(feeds, lora_slot_owners)
            inputs = {name: self._to_device(name, value) for name, value in feeds.items()}
            component = self.settings.component
            if component.startswith("text_encoder"):
                outputs = self._text(inputs["input_ids"])
            elif component == "vae_encoder":
                outputs = {"latent_parameters": self._call.encode(inputs["sample"]).latent_dist.parameters}
            elif component == "vae_decoder":
                outputs = {"sample": self._call.decode(inputs["latent_sample"]).sample}
            else:
                unet = self._graphs if self._graphs is not None else self._unet_eager
                outputs = {"out_sample": unet(inputs)}
            # The wire stays fp32 whatever the compute dtype; DLPack wants C-contiguous tensors.
            return {name: outputs[name].float().contiguous() for name in self.output_names}

    def _to_device(self, name: str, value: torch.Tensor) -> torch.Tensor:
        value = value.to(self.settings.device, non_blocking=True)
        # The timestep stays fp32, as diffusers passes it to an fp16 UNet (whose time embedding computes in fp32):
        # fp16 would round a schedule's fractional timesteps.
        if value.is_floating_point() and name != "timestep":
            value = value.to(self.settings.dtype)
            if value.ndim == 4 and self.settings.device.type == "cuda":
                value = value.contiguous(memory_format=torch.channels_last)
        return value

    def _text(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = any(name.startswith("hidden_states.") for name in self.output_names)
        out = self._call(input_ids, output_hidden_states=hidden)
        values: dict[str, torch.Tensor] = {}
        for name in self.output_names:
            if name.startswith("hidden_states."):  # optimum's name for hidden_states[i]
                values[name] = out.hidden_states[int(name.split(".", 1)[1])]
            else:  # last_hidden_state, pooler_output, text_embeds
                values[name] = getattr(out, name)
        return values

    def _unet_eager(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        added = {k: inputs[k] for k in ("text_embeds", "time_ids") if k in inputs}
        timestep = inputs["timestep"].reshape(-1)  # Triton's [B, 1] per-sample scalar, as the ONNX graph's [B]
        kwargs = {"added_cond_kwargs": added} if added else {}
        result: torch.Tensor = self._call(inputs["sample"], timestep, inputs["encoder_hidden_states"], **kwargs).sample
        return result


class LoraBranches:
    """The LoRA branches on one component's module, and the bank they read on this device.

    The branches are export/lora.py's (`add_branches`, loaded from lora_branches.py): the graph the onnxruntime
    runtime serves traces the same modules. The bank itself is lora_bank.py's (numpy, one array per layer and half,
    slots filled in place as adapters load). On the CPU in fp32 the branches read it through `torch.from_numpy`, the
    same memory; elsewhere a device copy in the compute dtype is kept, and a slot's part of it is copied again
    when the bank puts another adapter (or another version of the file) in that slot: `bind`'s `slot_owners`,
    slot -> what it holds, tells. Without them (None) the whole bank is copied on each call.
    """

    def __init__(self, library: Any, module: torch.nn.Module, settings: TorchSettings) -> None:
        self.library = library
        self.branches: dict[str, Any] = library.add_branches(module, settings.component)
        if not self.branches:
            raise ValueError(f"{settings.component} has no layer a LoRA targets")
        self.state = next(iter(self.branches.values())).state
        self.device, self.dtype = settings.device, settings.dtype
        self.shares_host = self.device.type == "cpu" and self.dtype == torch.float32
        self.targets: dict[str, tuple[int, int]] = {
            layer: library.layer_dims(branch) for layer, branch in self.branches.items()
        }
        # The bank's inputs as an ONNX graph with these branches declares them (what lora_bank.LoraBank reads).
        self.bank_shapes: dict[str, list[Any]] = {}
        for layer, (fan_in, fan_out) in self.targets.items():
            self.bank_shapes[library.bank_input(layer, "down")] = ["lora_bank_slots", fan_in, settings.lora_rank]
            self.bank_shapes[library.bank_input(layer, "up")] = ["lora_bank_slots", settings.lora_rank, fan_out]
        self.input_names = frozenset((*library.CALL_INPUTS, *self.bank_shapes))
        # A call without the bank's feeds adapts no row (one zero slot).
        self.empty = library.empty_lora_feeds(self.targets, library.LoraShape(1, settings.lora_rank))
        self._device: dict[str, tuple[np.ndarray, torch.Tensor]] = {}  # input -> (the host array, its copy)
        self._owners: dict[int, Any] = {}

    def bind(self, feeds: Mapping[str, Any], slot_owners: Mapping[int, Any] | None) -> dict[str, Any]:
        """Give the branches this call's adapter rows and bank (the LoRA inputs of `feeds`, else none adapted);
        returns the other inputs."""
        lib = self.library
        lora = {name: value for name, value in feeds.items() if name in self.input_names}
        changed: set[int] | None
        if lib.ROWS not in lora:
            lora, changed = self.empty, set()
        elif slot_owners is None:
            changed = None
        else:
            owners = dict(slot_owners)
            changed = {s for s in {*owners, *self._owners} if owners.get(s) != self._owners.get(s)}
            self._owners = owners
        state = self.state
        state.rows = torch.from_numpy(np.ascontiguousarray(lora[lib.ROWS])).to(self.device)
        state.slots = torch.from_numpy(np.ascontiguousarray(lora[lib.SLOTS])).to(self.device)
        state.scales = torch.from_numpy(np.ascontiguousarray(lora[lib.SCALES])).to(self.device, self.dtype)
        for layer, branch in self.branches.items():
            down, up = lib.bank_input(layer, "down"), lib.bank_input(layer, "up")
            branch.down = self._bank(down, lora[down], changed)
            branch.up = self._bank(up, lora[up], changed)
        return {name: value for name, value in feeds.items() if name not in self.input_names}

    def _bank(self, name: str, array: np.ndarray, changed: set[int] | None) -> torch.Tensor:
        """One bank input on the device: the host array itself on the CPU in fp32, else the kept copy, its
        `changed` slots copied again (all of it when the array is another, or `changed` is None)."""
        if self.shares_host:
            return torch.from_numpy(array)
        cached = self._device.get(name)
        if cached is None or cached[0] is not array or tuple(cached[1].shape) != array.shape:
            copy = torch.from_numpy(array).to(self.device, self.dtype)
            self._device[name] = (array, copy)
            return copy
        copy = cached[1]
        if changed is None:
            copy.copy_(torch.from_numpy(array), non_blocking=False)
        else:
            for slot in sorted(changed):
                if slot < array.shape[0]:
                    copy[slot].copy_(torch.from_numpy(array[slot]))
        return copy


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    output: torch.Tensor


def record_cuda_graph(
    eager: Callable[[Mapping[str, torch.Tensor]], torch.Tensor], static: dict[str, torch.Tensor], pool: Any
) -> tuple[Any, torch.Tensor]:
    """Capture one call of `eager` on the static inputs as a CUDA graph (PyTorch's recipe: warm-up calls on a side
    stream first); returns the graph and its static output."""
    stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(GRAPH_WARMUP_CALLS):
            eager(static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = eager(static)
    return graph, output


class CudaGraphs:
    """The UNet replayed from CUDA graphs, one per padded batch and input shapes, captured on first use.

    A step's kernels launch as one graph instead of hundreds of calls, which is most of what an SD UNet at small
    batches loses to Python and launch overhead. Rows are independent in the UNet (group norm, attention and
    convolutions never mix samples), so the rows padding a batch up to its captured size change no real row.
    Graphs share one memory pool: they never run at once (one execution per instance), and each output is
    copied out before the next replay. A capture that fails turns graphs off for the instance, eagerly served.
    `record` is the capture (record_cuda_graph; the unit tests pass one that runs on the CPU).
    """

    def __init__(
        self,
        eager: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
        batches: Sequence[int],
        record: Callable[..., tuple[Any, torch.Tensor]] = record_cuda_graph,
        pool: Any = None,
    ) -> None:
        self.eager = eager
        self.batches = tuple(batches)
        self.record = record
        self.graphs: OrderedDict[tuple[Any, ...], _Graph] = OrderedDict()
        if pool is None and record is record_cuda_graph:
            pool = torch.cuda.graph_pool_handle()
        self.pool = pool
        self.disabled: str | None = None

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        rows = int(inputs["sample"].shape[0])
        batch = padded_batch(rows, self.batches)
        if self.disabled is not None or batch is None:
            return self.eager(inputs)
        key = (batch, *((name, tuple(v.shape[1:]), v.dtype) for name, v in sorted(inputs.items())))
        graph = self.graphs.get(key)
        if graph is None:
            try:
                graph = self._capture(key, batch, inputs)
            except RuntimeError as exc:  # e.g. an op that syncs with the host: serve eagerly from now on
                self.disabled = f"{type(exc).__name__}: {exc}"
                log.warning("%s CUDA graphs off for this UNet instance: %s", LOG_PREFIX, self.disabled)
                return self.eager(inputs)
        else:
            self.graphs.move_to_end(key)
        for name, value in inputs.items():
            graph.inputs[name][:rows].copy_(value)
        graph.graph.replay()
        return graph.output[:rows].clone()

    def _capture(self, key: tuple[Any, ...], batch: int, inputs: Mapping[str, torch.Tensor]) -> _Graph:
        static = {}
        for name, value in inputs.items():
            fmt = torch.channels_last if value.ndim == 4 else torch.contiguous_format
            buffer = torch.zeros((batch, *value.shape[1:]), dtype=value.dtype, device=value.device)
            static[name] = buffer.contiguous(memory_format=fmt)
            static[name][: value.shape[0]].copy_(value)
        graph, output = self.record(self.eager, static, self.pool)
        captured = _Graph(graph, static, output)
        self.graphs[key] = captured
        while len(self.graphs) > MAX_CUDA_GRAPHS:
            self.graphs.popitem(last=False)
        return captured
