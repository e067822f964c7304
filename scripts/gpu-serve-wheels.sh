#!/bin/sh
# Download the wheels the device run (scripts/gpu-serve-check.sh) installs on the GPU machine into .device-wheels/
# (git-ignored; the device tool carries it with `carry: [".device-wheels"]`), and measure what travels: the device
# tool carries the working tree and the carried paths, 64 MiB in all. The machine has Python 3.12, torch,
# transformers, numpy 2, httpx; it lacks the Triton server (nvidia-pytriton, 55 MB) and diffusers (5.6 MB), and
# what they need there: requests (diffusers checks it on import; transformers 5 and huggingface_hub 1 dropped it;
# with urllib3 and charset-normalizer, 0.3 MB) and open-clip-torch (1.5 MB, never imported: export.tiny reads the
# CLIP vocabulary from it). The gateway's gRPC client (tritonclient with python-rapidjson, starlette for
# gateway.observability) would add about 1.9 MB more and does not fit beside them, so the run drives Triton over
# its HTTP API (httpx) there.
set -eu
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
mkdir -p .device-wheels
"$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_35_x86_64 --dest .device-wheels nvidia-pytriton==0.7.0 diffusers==0.39.0 \
  requests==2.34.2 urllib3==2.8.0 charset-normalizer==3.5.3 open-clip-torch==3.3.0
"$PYTHON" - <<'PY'
import json
import subprocess
from pathlib import Path

LIMIT = 64 * 2**20
tree = subprocess.run(
    ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], capture_output=True, check=True
).stdout.decode().split("\0")
tree_bytes = sum(Path(p).stat().st_size for p in tree if p and Path(p).is_file())
wheels = {p.name: p.stat().st_size for p in sorted(Path(".device-wheels").glob("*.whl"))}
total = tree_bytes + sum(wheels.values())
record = {"wheels": wheels, "working_tree_bytes": tree_bytes, "total_bytes": total, "limit_bytes": LIMIT}
Path(".device-wheels/carried.json").write_text(json.dumps(record, indent=2) + "\n")
print(f"gpu-serve-wheels: {total / 2**20:.1f} MiB travel (tree {tree_bytes / 2**20:.1f} MiB + wheels), limit 64 MiB")
if total > LIMIT:
    raise SystemExit("gpu-serve-wheels: over the device tool's 64 MiB: remove something from the working tree")
PY
