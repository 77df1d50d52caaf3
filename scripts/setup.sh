#!/usr/bin/env bash
# Creates .venv inside the checkout and installs captions (editable) with pinned torch/torchvision.
# Idempotent: when pyproject.toml and constraints.txt have not changed since the last successful
# run, it only checks that the package imports (seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# The browser test of 'captions serve' drives Debian's chromium through chromium-driver. Installed
# when apt-get can (root, or sudo without a password) and they are missing; never fatal: without
# them that one test is skipped with the reason. CAPTIONS_NO_BROWSER=1 skips this step.
if [ -z "${CAPTIONS_NO_BROWSER:-}" ] && { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; } \
        && command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then as_root=""; elif sudo -n true 2>/dev/null; then as_root="sudo -n"; else as_root=none; fi
    if [ "$as_root" != none ]; then
        echo "set-up: installing chromium and chromium-driver (apt-get) for the browser test"
        if ! { timeout 900 $as_root apt-get update -qq \
                && timeout 900 $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
             } >/tmp/captions-setup-chromium.log 2>&1; then
            echo "set-up: could not install chromium (see /tmp/captions-setup-chromium.log); the browser test will be skipped"
        fi
    fi
fi
stamp=.venv/.captions-setup-stamp
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import captions, torch, torchvision" 2>/dev/null; then
    echo "set-up: .venv is up to date"
    exit 0
fi
# -c constraints.txt pins torch==2.14.1/torchvision==0.29.1; without it pip may take the local
# CPU torch 2.13.0 wheel, whose ABI does not match the registry's torchvision ops.
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"
.venv/bin/python -c "import torchvision.ops, captions; print('set-up: torch', __import__('torch').__version__, 'torchvision', __import__('torchvision').__version__)"
echo "$want" > "$stamp"
