"""The real CLIP BPE vocabulary, taken from the open-clip-torch wheel, as `vocab.json` + `merges.txt`.

Random-weight test pipelines still tokenize prompts exactly as Stable Diffusion does, so the tokenizer path of
the gateway is exercised for real. The wheel is installed with ``--no-deps`` (its torch/torchvision requirements
are not wanted), so the package is never imported: the file is found through the distribution's file list.
"""

from __future__ import annotations

import gzip
import json
from importlib import metadata
from pathlib import Path

from export.errors import ExportError

_VOCAB_FILE = "open_clip/bpe_simple_vocab_16e6.txt.gz"
# open_clip's SimpleTokenizer keeps the first 49152 - 256 - 2 merges of the file (after its header line).
_NUM_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def find_bpe_file() -> Path:
    """Locate `bpe_simple_vocab_16e6.txt.gz` inside the installed open-clip-torch distribution."""
    try:
        dist = metadata.distribution("open_clip_torch")
    except metadata.PackageNotFoundError as exc:
        raise ExportError(
            "the CLIP vocabulary is missing: install it with `pip install --no-deps open-clip-torch==3.3.0`"
        ) from exc
    path = Path(str(dist.locate_file(_VOCAB_FILE)))
    if not path.is_file():
        raise ExportError(f"open-clip-torch is installed but {_VOCAB_FILE} is missing from it")
    return path


def write_clip_vocab(out_dir: Path) -> tuple[Path, Path]:
    """Write `vocab.json` and `merges.txt` for `CLIPTokenizer` into `out_dir`."""
    lines = gzip.decompress(find_bpe_file().read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    byte_tokens = list(_bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_path.write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}, ensure_ascii=False), "utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", "utf-8")
    return vocab_path, merges_path
