#!/bin/sh
# Every prepared GPU check as one command, for a lent device machine (the device tool allows 10 minutes a call;
# this stays under it): the torch runtime served through Triton (scripts/gpu-serve-check.sh, which installs the
# carried wheels into a virtual environment first), then the raw UNet and VAE device check (scripts/gpu-check.sh,
# in that environment: it needs diffusers too). Both JSONs and their logs go into $OUT (default /tmp/device-run);
# commit the JSONs under benchmarks/results/.
#
#   here, once:   scripts/gpu-serve-wheels.sh
#   device tool:  run(command="scripts/device-run.sh", carry=[".device-wheels"], timeout_s=600)
#   here, a try:  scripts/device-run.sh --device cpu --tiny        (extra arguments go to both checks)
set -u
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/device-run}"
mkdir -p "$out"
wheels=""
if ls .device-wheels/*.whl >/dev/null 2>&1; then wheels="--wheels .device-wheels"; fi
# shellcheck disable=SC2086  # $wheels is two words or none
scripts/gpu-serve-check.sh $wheels --budget-s 200 --out "$out/gpu-serve-check.json" "$@" >"$out/gpu-serve-check.log" 2>&1
echo "gpu-serve-check: exit $? (see $out/gpu-serve-check.log)"
env_python="${TMPDIR:-/tmp}/gpu-serve-env/bin/python"
if [ -n "$wheels" ] && [ -x "$env_python" ]; then PYTHON="$env_python"; export PYTHON; fi
timeout 200 scripts/gpu-check.sh --budget-s 120 --out "$out/gpu-check.json" "$@" >"$out/gpu-check.log" 2>&1
echo "gpu-check: exit $? (see $out/gpu-check.log)"
