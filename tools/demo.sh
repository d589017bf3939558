#!/usr/bin/env bash
# The end-to-end demo on the embedded default: a tiny DeepSeek-V3.2 checkpoint is created,
# then a short generation streams from it. Everything runs offline on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${DSV_DEMO_DIR:-runs/demo}"
mkdir -p "$OUT"
dsv model init --preset tiny "$OUT/tiny" --force
dsv model info "$OUT/tiny"
dsv generate "$OUT/tiny" --prompt "Plan a trip" --max-new-tokens 24 --seed 0
