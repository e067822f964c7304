#!/bin/sh
# The device run of the torch runtime (scripts/gpu_serve_check.py): an SD 1.5-shaped random pipeline exported with
# `--runtime torch`, served by the bundled Triton on the GPU, its UNet driven at 1, 4, 16 and 32 concurrent images
# against diffusers at batch 1. Writes gpu-serve-check.json (or --out PATH); docs/gpu.md, "GPU serving
# check", explains it. Made to finish within 6 minutes on one GPU (this wrapper stops it at 360 s, leaving the
# JSON of what was measured), so that with the machine's start it stays within 8 minutes of device time.
#
# The device machine has torch, transformers and numpy 2 but not diffusers or Triton: the wheels it needs travel
# with the working tree in .device-wheels/ (scripts/gpu-serve-wheels.sh downloads them here and measures what
# travels). With `--wheels DIR` (first), DIR's wheels are installed into a virtual environment over the system's
# packages and the run uses it; without it (here, in its test) the run uses $PYTHON as it is.
#
#   scripts/gpu-serve-wheels.sh                                              # here, once
#   device: scripts/gpu-serve-check.sh --wheels .device-wheels --out "$OUT/gpu-serve-check.json"  (carry it)
#   scripts/gpu-serve-check.sh --device cpu --tiny --out /tmp/gpu-serve-tiny.json   # here, about a minute
set -eu
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
carried=""
if [ "${1:-}" = "--wheels" ]; then
  wheels="$2"
  shift 2
  env="${TMPDIR:-/tmp}/gpu-serve-env"
  # Debian's python3 without python3-venv has no ensurepip: then the env gets no pip, and $PYTHON's pip installs.
  pip="$env/bin/python -m pip"
  if ! "$PYTHON" -m venv --system-site-packages "$env" 2>/dev/null; then
    "$PYTHON" -m venv --system-site-packages --without-pip "$env"
    pip="$PYTHON -m pip --python $env/bin/python"
  fi
  # --system-site-packages reaches the base interpreter's packages only: where $PYTHON is itself a virtual
  # environment (or has packages in the user's site), its own (torch, transformers) come through a .pth, after the
  # env's own packages.
  "$PYTHON" -c 'import site; print("\n".join([*site.getsitepackages(), site.getusersitepackages()]))' \
    >"$("$env/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/gpu-serve-base.pth"
  # shellcheck disable=SC2086  # $pip is several words
  $pip install -q --disable-pip-version-check --no-deps --no-index "$wheels"/*.whl
  PYTHON="$env/bin/python"
  if [ -f "$wheels/carried.json" ]; then carried="--carried $wheels/carried.json"; fi
fi
# shellcheck disable=SC2086  # $carried is two words or none
exec timeout 360 "$PYTHON" scripts/gpu_serve_check.py $carried "$@"
