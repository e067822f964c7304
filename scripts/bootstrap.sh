#!/usr/bin/env bash
# Create or update the two virtual environments, idempotently (skipped when the pins did not change):
#   .venv          gateway, export, tests, benchmarks (numpy 2)
#   .venv-triton   what Triton's Python-backend models run in (numpy 1.x, see requirements/triton-runtime.txt),
#                  with the torch runtime's packages too (requirements/triton-torch.txt), so either runtime serves
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
quiet=(-q --disable-pip-version-check)

stamp() { cat "$@" | sha256sum | cut -d' ' -f1; }

# The headless browser of the playground's browser test (tests/integration/test_playground_browser.py): Debian's
# chromium and chromedriver, installed with apt-get when missing and we are root (`apt-get update` only when the
# install fails, e.g. on a fresh image with empty package lists); otherwise say how. Never fatal here: without
# the browser that test is skipped on a workstation and fails in CI.
browser() {
  local want=(/usr/bin/chromium /usr/bin/chromedriver) path
  for path in "${want[@]}"; do [[ -x "$path" ]] || break; done
  [[ -x "$path" ]] && return 0
  local install=(apt-get install -y -q --no-install-recommends chromium chromium-driver)
  if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null; then
    echo "bootstrap: no headless browser for the playground test; install it with: sudo ${install[*]}" >&2
    return 0
  fi
  echo "bootstrap: installing Debian's chromium and chromium-driver"
  export DEBIAN_FRONTEND=noninteractive
  "${install[@]}" >/dev/null || { apt-get update -q >/dev/null && "${install[@]}" >/dev/null; } \
    || echo "bootstrap: could not install chromium and chromium-driver with apt-get" >&2
}
browser

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
.venv-triton/bin/python -m pip install "${quiet[@]}" -r requirements/triton-runtime.txt -r requirements/triton-torch.txt
echo "$want" > .venv-triton/.bootstrap-stamp
echo "bootstrap: done"
