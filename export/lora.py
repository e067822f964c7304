"""Low-rank side branches for per-row LoRA adapters (`python -m export --lora-slots K --lora-rank R`).

Every layer a LoRA may target (the attention projections, the feed-forward and the transformer's 1x1 in/out
projections of the UNet; the CLIP encoders' attention and MLP) keeps its base weights and gains an unfused branch

    y = W x + sum_j scale_j * B[slot_j] (A[slot_j] x)        (only for the rows that have adapters)

whose weights are graph *inputs*: a bank of K slots per layer, `lora.<layer>.down` [K, in, R] (A transposed)
and `lora.<layer>.up` [K, R, out] (B transposed), which the Triton runner fills from adapter files and binds on
every call (never sent by the gateway). Each call also takes `lora_rows` [P] (the batch rows that have adapters,
ascending), `lora_slots` [P, m] and `lora_scales` [P, m] (each such row's adapters: bank slot and scale;
a row with fewer than m adapters pads with scale 0). Rows without adapters are not touched by the branch at all
(P may be 0), so they cost what they cost in a graph without branches, plus the branch's empty operations.

A row's adapters are gathered per row (m*R*(in+out) weights a row per layer, 1/tokens of the branch's
multiply-adds) and summed; the result is written into the adapter rows only (a ScatterND of P rows).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The per-call inputs, ahead of the bank's per-layer inputs.
ROWS, SLOTS, SCALES = "lora_rows", "lora_slots", "lora_scales"
CALL_INPUTS = (ROWS, SLOTS, SCALES)
BANK_PREFIX = "lora."
# What Triton and the gateway see instead: one JSON string per batch row, `[["name", scale], ...]`.
LORA_INPUT = "loras"
# The highest adapter rank an export serves unless --lora-rank says (16 covers most published SD adapters).
DEFAULT_LORA_RANK = 16
# Adapters one request may name (the gateway's limit; a row's adapters are summed in one branch).
MAX_PER_REQUEST = 4
# What a batch row is traced with: two adapter rows, two adapters each (a dimension of 1 could be specialised).
TRACE_ROWS, TRACE_PER_ROW = 2, 2

# The modules a LoRA targets, by component, as diffusers names them inside the exported module: in the UNet,
# every linear (and 1x1 convolution) of a transformer (kohya's `Transformer2DModel` set, which contains the
# diffusers/PEFT training scripts' to_q/to_k/to_v/to_out.0); in a CLIP text encoder, the attention projections
# and the MLP (kohya's `CLIPAttention`/`CLIPMLP` set).
UNET_TARGET = re.compile(
    r"^(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+\."
    r"(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2))$"
)
TEXT_TARGET = re.compile(
    r"^text_model\.encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.fc[12])$"
)


def target_pattern(component: str) -> re.Pattern[str]:
    return UNET_TARGET if component == "unet" else TEXT_TARGET


def lora_components(components: tuple[str, ...]) -> tuple[str, ...]:
    """The components that get branches: the UNet and the text encoder(s)."""
    return tuple(c for c in components if c == "unet" or c.startswith("text_encoder"))


@dataclass(frozen=True)
class LoraShape:
    """The bank an export is built for: K slots of rank at most R."""

    slots: int
    rank: int

    def as_json(self) -> dict[str, int]:
        return {"slots": self.slots, "rank": self.rank}


def bank_input(layer: str, part: str) -> str:
    """The graph input of one layer's half of the bank (`down` or `up`)."""
    return f"{BANK_PREFIX}{layer}.{part}"


@dataclass
class _CallState:
    """The current call's per-row inputs, shared by every branch of one traced module."""

    rows: Any = None
    slots: Any = None
    scales: Any = None


def _branch_class() -> type:
    import torch

    class LoraBranch(torch.nn.Module):
        """A base linear or 1x1 convolution plus its per-row low-rank branch (the module docstring)."""

        def __init__(self, base: torch.nn.Module, state: _CallState) -> None:
            super().__init__()
            self.base = base
            self.state = state
            self.conv = isinstance(base, torch.nn.Conv2d)
            self.down: torch.Tensor | None = None  # [K, in, R], bound per call by the wrapper
            self.up: torch.Tensor | None = None  # [K, R, out]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # No reshape: with no adapter row (P = 0) an ONNX Reshape reads a 0 in its shape as "keep this
            # dimension". The m adapters of a row stay an axis of their own, summed at the end.
            y: torch.Tensor = self.base(x)
            if self.down is None or self.up is None:
                raise RuntimeError("a LoRA branch called without its bank (LoraInputs binds it)")
            rows: torch.Tensor = self.state.rows
            slots, scales = self.state.slots, self.state.scales
            down = self.down[slots]  # [P, m, in, R]
            up = self.up[slots]  # [P, m, R, out]
            weight = scales.unsqueeze(-1).unsqueeze(-1)  # [P, m, 1, 1]
            xs = x.index_select(0, rows)
            if self.conv:  # [P, C, H, W]: a 1x1 convolution is a linear map of the channels at each pixel
                h = torch.matmul(xs.permute(0, 2, 3, 1).unsqueeze(1), down.unsqueeze(2))  # [P, m, H, W, R]
                delta = torch.matmul(h * weight.unsqueeze(-1), up.unsqueeze(2)).sum(1).permute(0, 3, 1, 2)
            else:  # [P, tokens, in]
                h = torch.matmul(xs.unsqueeze(1), down) * weight  # [P, m, tokens, R]
                delta = torch.matmul(h, up).sum(1)
            return y.index_put((rows,), y.index_select(0, rows) + delta)

    return LoraBranch


def _target_layers(module: Any, component: str) -> list[tuple[str, Any]]:
    """(name, layer) of every layer of `module` a branch goes on: a targeted linear or 1x1 convolution."""
    import torch

    pattern = target_pattern(component)
    return [
        (name, layer)
        for name, layer in module.named_modules()
        if pattern.match(name)
        and (isinstance(layer, torch.nn.Linear) or (isinstance(layer, torch.nn.Conv2d) and layer.kernel_size == (1, 1)))
    ]


def _dims(layer: Any) -> tuple[int, int]:
    """(in, out) features of a linear or a 1x1 convolution."""
    if hasattr(layer, "in_features"):
        return int(layer.in_features), int(layer.out_features)
    return int(layer.in_channels), int(layer.out_channels)


def add_branches(module: Any, component: str) -> dict[str, Any]:
    """Replace every targeted layer of `module` (in place) with a branch over it; returns layer name -> branch, in
    the module's order. The branches share one call state (`_CallState`), set by `LoraInputs`."""
    branch_class = _branch_class()
    state = _CallState()
    branches: dict[str, Any] = {}
    for name, layer in _target_layers(module, component):
        parent_name, _, attribute = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        branch = branch_class(layer, state)
        setattr(parent, attribute, branch)
        branches[name] = branch
    return branches


def remove_branches(module: Any, branches: dict[str, Any]) -> None:
    """Put the base layers back (the module is as it was before `add_branches`)."""
    for name, branch in branches.items():
        parent_name, _, attribute = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attribute, branch.base)


def layer_dims(branch: Any) -> tuple[int, int]:
    """(in, out) features of a branch's base layer."""
    return _dims(branch.base)


def _wrapper_class() -> type:
    import torch

    class LoraInputs(torch.nn.Module):
        """The exported module with the LoRA inputs after its own: binds them to the branches, then calls it."""

        def __init__(self, module: Any, template: dict[str, Any], count: int, branches: dict[str, Any]) -> None:
            super().__init__()
            self.module = module
            self.template = template  # the module's keyword arguments, each leaf the index of its tensor
            self.count = count
            self.branches = list(branches.values())

        def forward(self, *tensors: torch.Tensor) -> Any:
            n = self.count
            state = self.branches[0].state
            state.rows, state.slots, state.scales = tensors[n : n + 3]
            bank = tensors[n + 3 :]
            for i, branch in enumerate(self.branches):
                branch.down, branch.up = bank[2 * i], bank[2 * i + 1]
            return self.module(**_fill(self.template, tensors))

    return LoraInputs


def _fill(template: Any, tensors: tuple[Any, ...]) -> Any:
    if isinstance(template, dict):
        return {key: _fill(value, tensors) for key, value in template.items()}
    return tensors[template]


def flat_inputs(dummy: dict[str, Any], names: list[str]) -> tuple[dict[str, Any], list[Any]]:
    """optimum's dummy inputs (keyword arguments, SDXL's `added_cond_kwargs` nested) as the positional tensors of
    the graph's input `names`, in order, and a template that rebuilds the keyword arguments from them."""
    position = {name: i for i, name in enumerate(names)}
    tensors: list[Any] = [None] * len(names)

    def walk(value: dict[str, Any]) -> dict[str, Any]:
        template: dict[str, Any] = {}
        for key, item in value.items():
            if isinstance(item, dict):
                template[key] = walk(item)
            else:
                template[key] = position[key]
                tensors[position[key]] = item
        return template

    template = walk(dummy)
    if any(t is None for t in tensors):
        raise ValueError(f"the dummy inputs do not give every graph input: {names}")
    return template, tensors


def lora_trace_inputs(branches: dict[str, Any], shape: LoraShape, seed: int = 0) -> dict[str, Any]:
    """Inputs to trace the branches with: TRACE_ROWS adapter rows of TRACE_PER_ROW adapters, a random bank."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    inputs: dict[str, Any] = {
        ROWS: torch.arange(TRACE_ROWS, dtype=torch.int64),
        SLOTS: torch.randint(0, shape.slots, (TRACE_ROWS, TRACE_PER_ROW), generator=generator),
        SCALES: torch.rand(TRACE_ROWS, TRACE_PER_ROW, generator=generator),
    }
    for name, branch in branches.items():
        fan_in, fan_out = layer_dims(branch)
        inputs[bank_input(name, "down")] = torch.randn(shape.slots, fan_in, shape.rank, generator=generator) * 0.01
        inputs[bank_input(name, "up")] = torch.randn(shape.slots, shape.rank, fan_out, generator=generator) * 0.01
    return inputs


def lora_dynamic_axes(branches: dict[str, Any]) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {
        ROWS: {0: "lora_rows"},
        SLOTS: {0: "lora_rows", 1: "lora_per_row"},
        SCALES: {0: "lora_rows", 1: "lora_per_row"},
    }
    for name in branches:
        axes[bank_input(name, "down")] = {0: "lora_bank_slots"}
        axes[bank_input(name, "up")] = {0: "lora_bank_slots"}
    return axes


def wrap_for_export(
    module: Any, component: str, dummy: dict[str, Any], names: list[str], shape: LoraShape
) -> tuple[Any, tuple[Any, ...], list[str], dict[str, dict[int, str]], Callable[[], None]]:
    """`module` with branches and the LoRA inputs: (the module to trace, its positional trace inputs, their
    names, the LoRA inputs' dynamic axes, a function that takes the branches out again)."""
    branches = add_branches(module, component)
    if not branches:
        raise ValueError(f"{component} has no layer a LoRA targets")
    template, tensors = flat_inputs(dummy, names)
    extra = lora_trace_inputs(branches, shape)
    wrapper = _wrapper_class()(module, template, len(names), branches)
    return (
        wrapper,
        (*tensors, *extra.values()),
        [*names, *extra],
        lora_dynamic_axes(branches),
        lambda: remove_branches(module, branches),
    )


def bank_targets(graph_inputs: dict[str, list[Any]]) -> tuple[dict[str, tuple[int, int]], int]:
    """(layer -> (in, out), rank) of a graph's bank inputs (by name and shape; the slot axis is symbolic)."""
    targets, rank = {}, 0
    for name, shape in graph_inputs.items():
        if name.startswith(BANK_PREFIX) and name.endswith(".down"):
            layer = name[len(BANK_PREFIX) : -len(".down")]
            targets[layer] = (int(shape[1]), int(graph_inputs[bank_input(layer, "up")][2]))
            rank = int(shape[2])
    return targets, rank


def empty_lora_feeds_for(graph_inputs: dict[str, list[Any]]) -> dict[str, Any]:
    """`empty_lora_feeds` for a graph's inputs (by name and shape), one slot; none for a graph without slots."""
    targets, rank = bank_targets(graph_inputs)
    return empty_lora_feeds(targets, LoraShape(1, rank)) if ROWS in graph_inputs else {}


def empty_lora_feeds(targets: dict[str, tuple[int, int]], shape: LoraShape) -> dict[str, Any]:
    """numpy inputs for a call with no adapter row (and a zero bank): what the export's check feeds."""
    import numpy as np

    feeds: dict[str, Any] = {
        ROWS: np.zeros((0,), np.int64),
        SLOTS: np.zeros((0, 1), np.int64),
        SCALES: np.zeros((0, 1), np.float32),
    }
    for name, (fan_in, fan_out) in targets.items():
        feeds[bank_input(name, "down")] = np.zeros((shape.slots, fan_in, shape.rank), np.float32)
        feeds[bank_input(name, "up")] = np.zeros((shape.slots, shape.rank, fan_out), np.float32)
    return feeds


def branch_targets(module: Any, component: str) -> dict[str, tuple[int, int]]:
    """layer -> (in, out) of every layer of `module` a branch goes on, without changing it."""
    return {name: _dims(layer) for name, layer in _target_layers(module, component)}


# The wrapper holds the exported module as `module`: torch names its weights `module.<name>` in the graph.
WRAPPER_PREFIX = "module."


def strip_wrapper_prefix(path: Path) -> None:
    """Give a branched graph's weights the names they have without branches (`conv_out.weight`, not
    `module.conv_out.weight`): tools that find a weight by name find it in both. External data is referenced by
    file and offset, not by name, so it is not read."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    renames = {
        t.name: t.name[len(WRAPPER_PREFIX) :] for t in model.graph.initializer if t.name.startswith(WRAPPER_PREFIX)
    }
    if not renames:
        return
    for tensor in model.graph.initializer:
        tensor.name = renames.get(tensor.name, tensor.name)
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    onnx.save(model, str(path))
