"""The exact-result cache: a request identical to an earlier completed one of the same key gets that result again.

Only requests with an explicit `seed` qualify (a drawn seed makes every request another one), and only when the
request does not opt out (`cache: false`) and the deployment has the cache on (`IMAGEN_RESULT_CACHE`). The key
is a digest of everything that decides the pixels and their encoding: the input image's bytes as received (and a
masked edit's mask and blur), the model (its manifest file, so a re-export is another model), every generation
parameter of the spec, and each LoRA adapter's file version. What only decides delivery (webhook, priority,
max_queue_s, sync or async) is not in it. The lookup is the store's (`find_result`: the owner's newest completed
job with the key), so the cache holds exactly what retention keeps, fleet-wide, with no memory of its own; a hit
is a new job whose stored objects are copies, so it owns them and is purged on its own schedule.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from gateway.diffusion.lora import LoraChoice, LoraRegistry

_DOMAIN = b"imagen-result-v1\0"


def model_version(manifest_path: Path) -> str:
    """The served export's identity: its manifest file's size and modification time (written last by an export,
    so a re-export in place is another version)."""
    stat = manifest_path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def result_key(
    *,
    image: bytes,
    model: str,
    version: str,
    parameters: dict[str, object],
    loras: Sequence[LoraChoice],
    registry: LoraRegistry | None,
    mask: bytes | None = None,
) -> str:
    """The cache key of one request (see the module docstring); `parameters`: every generation parameter, by
    name, JSON-ready; `mask`: a masked edit's mask bytes as received (None: unmasked, the key unchanged)."""
    digest = hashlib.sha256(_DOMAIN)
    digest.update(hashlib.sha256(image).digest())
    if mask is not None:
        digest.update(b"mask\0" + hashlib.sha256(mask).digest())
    adapters = [
        [choice.name, choice.scale, list(registry.adapter(choice.name).fingerprint) if registry else None]
        for choice in loras
    ]
    described = {"model": model, "version": version, "parameters": parameters, "loras": adapters}
    digest.update(json.dumps(described, sort_keys=True, separators=(",", ":")).encode())
    return digest.hexdigest()
