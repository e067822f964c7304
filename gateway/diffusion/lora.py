"""The LoRA folder as the gateway sees it: which adapters exist, what each is for, and whether a model can run it.

The folder (`IMAGEN_LORA_DIR`, default `loras/` beside the model repository) is the one the Triton runners read the
weights from. The gateway reads only headers (`lora_format.parse_adapter`), once per version of a file (its
size and modification time), so a file added or replaced is seen by the next request without a restart, and a
corrupt or mismatched file is a 400 for the requests that name it, never for the others.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gateway.diffusion import lora_format
from gateway.diffusion.lora_format import Adapter, LoraFileError
from gateway.diffusion.manifest import LoraSupport, PipelineManifest
from gateway.errors import InvalidRequest

# Headers kept in memory (a kohya SDXL header is ~100 KiB of JSON): the folder's working set.
MAX_CACHED_HEADERS = 256
# What the UNet and text-encoder models take per batch row: JSON `[["name", scale], ...]`; "" is no adapter.
LORA_ROLE = "loras"
NO_ADAPTER = b""


@dataclass(frozen=True)
class LoraChoice:
    """One adapter a job applies, at its scale."""

    name: str
    scale: float


def _field(index: int) -> str:
    return f"loras[{index}].name"


class LoraRegistry:
    """Adapter headers of one folder, cached per file version; shared by the requests on the event loop and by
    `GET /v1/loras`, which reads the folder in a worker thread: the cache is guarded by a lock (a header is read
    outside it; two readers of one new file both read it, and the second one's copy is kept)."""

    def __init__(self, folder: Path, *, max_cached: int = MAX_CACHED_HEADERS) -> None:
        self.folder = folder
        self.max_cached = max_cached
        self._headers: OrderedDict[str, Adapter] = OrderedDict()
        self._lock = threading.Lock()

    def adapter(self, name: str) -> Adapter:
        """The header of `name`'s current file. FileNotFoundError when there is none; LoraFileError when it
        cannot be used."""
        path = lora_format.adapter_path(self.folder, name)
        if not lora_format.NAME_PATTERN.match(name) or not path.is_file():
            raise FileNotFoundError(name)
        current = lora_format.fingerprint(path)
        with self._lock:
            held = self._headers.get(name)
            if held is not None and held.fingerprint == current:
                self._headers.move_to_end(name)
                return held
        adapter = lora_format.parse_adapter(path, name)
        with self._lock:
            self._headers[name] = adapter
            self._headers.move_to_end(name)
            while len(self._headers) > self.max_cached:
                self._headers.popitem(last=False)
        return adapter

    def fits(self, adapter: Adapter, lora: LoraSupport) -> None:
        """Raise LoraFileError unless `adapter` runs on a model with these slots."""
        lora_format.fit_adapter(
            adapter, lora.targets, rank=lora.rank, layers_per_block=lora.layers_per_block, base=lora.base
        )

    def admit(self, manifest: PipelineManifest, choices: Sequence[LoraChoice]) -> tuple[LoraChoice, ...]:
        """The request's adapters, each checked against the model: a 400 naming the first that cannot run."""
        if not choices:
            return ()
        lora = manifest.lora
        if lora is None:
            raise InvalidRequest(
                "Invalid field 'loras'",
                f"Model '{manifest.name}' takes no LoRA adapters (it was exported without --lora-slots)",
            )
        if len(choices) > lora.max_per_request:
            raise InvalidRequest(
                "Invalid field 'loras'",
                f"Model '{manifest.name}' takes at most {lora.max_per_request} LoRA adapters per request",
            )
        for index, choice in enumerate(choices):
            try:
                self.fits(self.adapter(choice.name), lora)
            except FileNotFoundError:
                raise InvalidRequest(
                    f"Invalid field '{_field(index)}'",
                    f"Unknown LoRA adapter '{choice.name}': GET /v1/loras lists those this deployment has",
                ) from None
            except LoraFileError as exc:
                raise InvalidRequest(
                    f"Invalid field '{_field(index)}'",
                    f"LoRA adapter '{choice.name}' cannot be used with model '{manifest.name}': {exc}",
                ) from None
        return tuple(choices)

    def listing(self, manifests: Mapping[str, PipelineManifest]) -> list[tuple[Adapter, list[str]]]:
        """Every readable adapter in the folder with the served models it fits (unreadable files are left out)."""
        found = []
        for name, _ in lora_format.scan_folder(self.folder):
            try:
                adapter = self.adapter(name)
            except (FileNotFoundError, LoraFileError):
                continue
            fitting = []
            for model, manifest in sorted(manifests.items()):
                if manifest.lora is None:
                    continue
                try:
                    self.fits(adapter, manifest.lora)
                except LoraFileError:
                    continue
                fitting.append(model)
            found.append((adapter, fitting))
        return found

    def rows_for(self, component: str, choices: Sequence[LoraChoice]) -> bytes:
        """One batch row's `loras` value for `component`: the adapters with weights for it (a UNet-only adapter
        leaves the text encoders alone, so their calls and cache entries stay those of no adapter)."""
        touching = [[c.name, c.scale] for c in choices if component in self.adapter(c.name).components]
        return json.dumps(touching, separators=(",", ":")).encode() if touching else NO_ADAPTER

    def text_key(self, choices: Sequence[LoraChoice]) -> tuple[tuple[str, float, tuple[int, int]], ...]:
        """What of the adapters changes the text encoders' output: part of a text-cache key (a file replaced
        under the same name is another key)."""
        key = []
        for choice in choices:
            adapter = self.adapter(choice.name)
            if any(c.startswith("text_encoder") for c in adapter.components):
                key.append((choice.name, choice.scale, adapter.fingerprint))
        return tuple(key)


def row_feed(value: bytes, rows: int) -> np.ndarray:
    """The `loras` input of a call of `rows` rows that all apply the same adapters."""
    feed = np.empty((rows, 1), dtype=np.object_)
    feed.fill(value)
    return feed
