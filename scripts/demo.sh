#!/usr/bin/env bash
# Sets everything up (idempotent) and runs the main job on the embedded synthetic dataset.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=${1:-demo-output}
exec .venv/bin/captions prepare synthetic --out "$out/prepared"
