#!/bin/sh
# The device check (scripts/gpu_check.py): an SD 1.5-shaped random-weight UNet and VAE decoder timed at 1..16
# rows in fp16 on one GPU, fp16 against fp32, and the exported UNet through onnxruntime-gpu where installed.
# Writes gpu-check.json (or --out PATH); docs/gpu.md, "GPU device check", explains it. Made to finish
# within 8 minutes on one GPU: the script stops timing new batches after --budget-s (360 s by default), and
# this wrapper stops it at 480 s, leaving the JSON of what was measured.
#
#   scripts/gpu-check.sh --out /tmp/gpu-check.json
#   scripts/gpu-check.sh --tiny --device cpu --out /tmp/gpu-check-tiny.json     # seconds, on any machine
set -eu
cd "$(dirname "$0")/.."
exec timeout 480 "${PYTHON:-python3}" scripts/gpu_check.py "$@"
