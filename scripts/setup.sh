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
