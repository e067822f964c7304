#!/bin/sh
# Build every missing TensorRT plan of a Triton model repository written by `python -m export --backend
# tensorrt`, with trtexec, inside the NGC TensorRT container of Triton's release (plans are tied to the
# TensorRT version and GPU they were built with). See export/trt_build.py.
#
#   scripts/build-trt-plans.sh --repository /data/models              # build what is missing
#   scripts/build-trt-plans.sh --repository /data/models --dry-run    # print the exact commands only
set -eu
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m export.trt_build "$@"
