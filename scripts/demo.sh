#!/usr/bin/env bash
# Sets everything up (idempotent) and runs `captions demo` on the embedded synthetic dataset:
# generate + prepare, extract features, train an attention decoder, evaluate on the test split,
# caption a few test images with attention maps, print a report. Offline; a few minutes on 2 CPU cores.
# Usage: scripts/demo.sh [OUT_DIR] [more `captions demo` options]   (OUT_DIR defaults to demo-output;
# a first argument starting with '-' is an option, not OUT_DIR)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=demo-output
if [[ $# -gt 0 && $1 != -* ]]; then  # an option first (scripts/demo.sh --quiet) is not a folder name
    out=$1
    shift
fi
exec .venv/bin/captions demo --out "$out" "$@"
