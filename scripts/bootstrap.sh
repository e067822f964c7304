#!/usr/bin/env bash
# Create or update the two virtual environments, idempotently (skipped when the pins did not change):
#   .venv          gateway, export, tests, benchmarks (numpy 2)
#   .venv-triton   what Triton's Python-backend models run in (numpy 1.x, see requirements/triton-runtime.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
quiet=(-q --disable-pip-version-check)

stamp() { cat "$@" | sha256sum | cut -d' ' -f1; }

want=$(stamp requirements/*.txt scripts/bootstrap.sh)
if [[ -f .venv/.bootstrap-stamp && "$(cat .venv/.bootstrap-stamp)" == "$want" \
      && -f .venv-triton/.bootstrap-stamp && "$(cat .venv-triton/.bootstrap-stamp)" == "$want" ]]; then
  exit 0
fi

echo "bootstrap: creating virtual environments with $PYTHON ($("$PYTHON" --version))"
"$PYTHON" -m venv .venv
.venv/bin/python -m pip install "${quiet[@]}" --upgrade pip
.venv/bin/python -m pip install "${quiet[@]}" -r requirements/dev.txt
.venv/bin/python -m pip install "${quiet[@]}" --no-deps -r requirements/no-deps.txt
echo "$want" > .venv/.bootstrap-stamp

"$PYTHON" -m venv .venv-triton
.venv-triton/bin/python -m pip install "${quiet[@]}" -r requirements/triton-runtime.txt
echo "$want" > .venv-triton/.bootstrap-stamp
echo "bootstrap: done"
