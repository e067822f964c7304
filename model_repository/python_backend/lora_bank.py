"""The LoRA bank of one model instance (copied beside model.py by an export with `--lora-slots`).

The graph (export/lora.py) takes, besides its own inputs, each layer's bank `lora.<layer>.down` [K, in, R] and
`lora.<layer>.up` [K, R, out], and per call the adapter rows, their slots and scales. The bank lives here, in the
instance's memory: an adapter named by a request is read from the LoRA folder into a free slot on first use (the
least recently used slot is reused when all K are taken) and stays there while its file does not change. The
gateway sends only, per batch row, the adapters and scales as JSON (`loras`, `[["name", 0.8], ...]`).

A batch may name more adapters than K: its requests are then run in groups that fit. A file that cannot be read
fails the requests that name it, and only those.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# The Triton input: one JSON string per batch row.
LORA_INPUT = "loras"
BANK_PREFIX = "lora."
ROWS, SLOTS, SCALES = "lora_rows", "lora_slots", "lora_scales"

Row = tuple[tuple[str, float], ...]
# Distinct `loras` strings kept parsed (a request sends one string for all its rows, every step).
MAX_PARSED_ROWS = 4096


class AdapterError(Exception):
    """One adapter cannot be served: the requests naming it fail with this message."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"LoRA '{name}': {message}")
        self.name = name


@dataclass
class _Loaded:
    adapter: Any  # lora_format.Adapter
    fit: Any  # lora_format.Fit


class LoraBank:
    """K slots of rank R for every branch of one component's graph."""

    def __init__(
        self,
        formats: Any,  # the lora_format module
        component: str,
        bank_shapes: Mapping[str, Sequence[Any]],  # graph input name -> shape (the slot axis symbolic)
        *,
        slots: int,
        folder: Path,
        layers_per_block: int,
        base: str,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.formats, self.component, self.slots, self.folder = formats, component, slots, folder
        self.log = log  # told of every load (Triton's log: which adapter went into which slot, which left)
        self.layers_per_block, self.base = layers_per_block, base
        self.down: dict[str, np.ndarray] = {}
        self.up: dict[str, np.ndarray] = {}
        targets: dict[str, tuple[int, int]] = {}
        for name, shape in bank_shapes.items():
            if name.startswith(BANK_PREFIX) and name.endswith(".down"):
                layer = name[len(BANK_PREFIX) : -len(".down")]
                fan_in, rank = int(shape[1]), int(shape[2])
                fan_out = int(bank_shapes[f"{BANK_PREFIX}{layer}.up"][2])
                targets[layer] = (fan_in, fan_out)
                self.down[layer] = np.zeros((slots, fan_in, rank), np.float32)
                self.up[layer] = np.zeros((slots, rank, fan_out), np.float32)
                self.rank = rank
        self.targets = {component: targets}
        self.held: OrderedDict[str, tuple[tuple[int, int], int]] = OrderedDict()  # name -> (fingerprint, slot), LRU
        self.free = list(range(slots))
        self.parsed: dict[str, _Loaded] = {}
        self._rows_cache: dict[bytes, Row] = {}

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.down.values()) + sum(a.nbytes for a in self.up.values())

    def rows(self, raw: np.ndarray) -> list[Row]:
        """A request's `loras` input ([n, 1] bytes) -> each row's (name, scale) pairs; malformed -> ValueError."""
        parsed = []
        for value in raw.reshape(-1):
            data = value if isinstance(value, bytes) else str(value).encode()
            row = self._rows_cache.get(data)
            if row is None:
                decoded = json.loads(data) if data.strip() else []
                row = tuple((str(name), float(scale)) for name, scale in decoded)
                if len(self._rows_cache) < MAX_PARSED_ROWS:
                    self._rows_cache[data] = row
            parsed.append(row)
        return parsed

    def _adapter(self, name: str) -> _Loaded:
        """The file's header, mapped onto this component (read again when the file changed)."""
        formats = self.formats
        if not formats.NAME_PATTERN.match(name):
            raise AdapterError(name, "not a valid adapter name")
        path = formats.adapter_path(self.folder, name)
        try:
            current = formats.fingerprint(path)
        except OSError as exc:
            raise AdapterError(name, f"no file {path.name} in the LoRA folder") from exc
        held = self.parsed.get(name)
        if held is not None and held.adapter.fingerprint == current:
            return held
        try:
            adapter = formats.parse_adapter(path, name)
            fit = formats.fit_adapter(
                adapter,
                self.targets,
                rank=self.rank,
                layers_per_block=self.layers_per_block,
                base=self.base,
                components=(self.component,),
            )
        except formats.LoraFileError as exc:
            raise AdapterError(name, str(exc)) from exc
        loaded = _Loaded(adapter, fit)
        self.parsed[name] = loaded
        return loaded

    def touches(self, name: str) -> bool:
        """Whether `name` has weights for this component (a UNet-only adapter leaves a text encoder alone)."""
        return self.component in self._adapter(name).adapter.layers

    def plan(self, requests: Sequence[Sequence[Row]]) -> tuple[list[list[int]], dict[int, str]]:
        """Groups of request indices to run together (each naming at most K adapters this component serves), and
        the error of each request that cannot run (an adapter it names cannot be read)."""
        errors: dict[int, str] = {}
        needs: list[set[str]] = []
        for index, rows in enumerate(requests):
            names: set[str] = set()
            try:  # each distinct name once: a request's rows all name the same adapters
                names = {name for name in {n for row in rows for n, _ in row} if self.touches(name)}
            except AdapterError as exc:
                errors[index] = str(exc)
            if len(names) > self.slots:
                errors[index] = f"{len(names)} LoRA adapters in one request; this model has {self.slots} slots"
            needs.append(names)
        groups: list[list[int]] = []
        group_names: list[set[str]] = []
        for index, names in enumerate(needs):
            if index in errors:
                continue
            for members, held in zip(groups, group_names, strict=True):
                if len(held | names) <= self.slots:
                    members.append(index)
                    held |= names
                    break
            else:
                groups.append([index])
                group_names.append(set(names))
        return groups, errors

    def _slot(self, name: str, pinned: set[int]) -> int:
        """The slot holding `name`'s current file, loading it (into a free or the least recently used slot)."""
        loaded = self._adapter(name)
        held = self.held.get(name)
        if held is not None and held[0] == loaded.adapter.fingerprint:
            self.held.move_to_end(name)
            return held[1]
        victim = None
        if held is not None:  # the file changed: its slot is reloaded in place
            slot = held[1]
            del self.held[name]
        elif self.free:
            slot = self.free.pop(0)
        else:
            victim = next(n for n, (_, s) in self.held.items() if s not in pinned)
            slot = self.held.pop(victim)[1]
        try:
            weights = self.formats.load_weights(loaded.adapter, loaded.fit).get(self.component, {})
        except (self.formats.LoraFileError, OSError) as exc:
            self.free.append(slot)
            self.parsed.pop(name, None)
            raise AdapterError(name, str(exc)) from exc
        for layer in self.down:
            self.down[layer][slot] = 0.0
            self.up[layer][slot] = 0.0
        for layer, (down, up) in weights.items():
            rank = down.shape[1]
            self.down[layer][slot, :, :rank] = down
            self.up[layer][slot, :rank, :] = up
        self.held[name] = (loaded.adapter.fingerprint, slot)
        if self.log is not None:
            evicted = f", evicting '{victim}'" if victim is not None else ""
            self.log(f"LoRA '{name}' loaded into slot {slot} of the {self.component} bank{evicted}")
        return slot

    def feeds(self, rows: Sequence[Row]) -> dict[str, np.ndarray]:
        """The graph's LoRA inputs for a batch whose rows ask for `rows` (at most K adapters among them), loading
        what is not held. Raises AdapterError when a file cannot be loaded."""
        pinned: set[int] = set()
        slot_of: dict[str, int] = {}
        for name in dict.fromkeys(n for row in rows for n, _ in row):  # each distinct name once, in order
            if self.touches(name):
                slot_of[name] = self._slot(name, pinned)
                pinned.add(slot_of[name])
        adapted = [(i, [(slot_of[n], s) for n, s in row if n in slot_of]) for i, row in enumerate(rows)]
        adapted = [(i, pairs) for i, pairs in adapted if pairs]
        per_row = max((len(pairs) for _, pairs in adapted), default=1)
        slots = np.zeros((len(adapted), per_row), np.int64)
        scales = np.zeros((len(adapted), per_row), np.float32)
        for r, (_, pairs) in enumerate(adapted):
            for j, (slot, scale) in enumerate(pairs):
                slots[r, j], scales[r, j] = slot, scale
        feeds: dict[str, np.ndarray] = {
            ROWS: np.array([i for i, _ in adapted], np.int64),
            SLOTS: slots,
            SCALES: scales,
        }
        for layer in self.down:
            feeds[f"{BANK_PREFIX}{layer}.down"] = self.down[layer]
            feeds[f"{BANK_PREFIX}{layer}.up"] = self.up[layer]
        return feeds


def serve(
    bank: LoraBank,
    requests: Sequence[Any],
    raw_rows: Callable[[Any], np.ndarray],
    run: Callable[[list[Any], dict[str, np.ndarray]], list[Any]],
    error: Callable[[str], Any],
) -> list[Any]:
    """One response per request: the requests grouped by `bank.plan`, each group run once with its bank feeds
    (`run(requests, feeds)` returns their responses), the unservable ones answered with `error(message)`."""
    responses: list[Any] = [None] * len(requests)
    parsed: list[list[Row]] = []
    bad: dict[int, str] = {}
    for index, request in enumerate(requests):
        try:
            parsed.append(bank.rows(raw_rows(request)))
        except (ValueError, TypeError) as exc:
            parsed.append([])
            bad[index] = f"malformed '{LORA_INPUT}' input: {exc}"
    groups, errors = bank.plan([[] if i in bad else rows for i, rows in enumerate(parsed)])
    errors.update(bad)
    for group in groups:
        members = [i for i in group if i not in bad]
        while members:
            rows = [row for i in members for row in parsed[i]]
            try:
                feeds = bank.feeds(rows)
            except AdapterError as exc:  # this file cannot be loaded: fail its requests, run the others
                failing = [i for i in members if any(n == exc.name for row in parsed[i] for n, _ in row)]
                for i in failing:
                    errors[i] = str(exc)
                members = [i for i in members if i not in failing]
                continue
            for i, response in zip(members, run([requests[i] for i in members], feeds), strict=True):
                responses[i] = response
            break
    for index, message in errors.items():
        responses[index] = error(message)
    return responses
