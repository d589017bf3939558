#!/usr/bin/env bash
# The end-to-end demo on the embedded default, offline on a CPU (a few minutes):
#   1. synthesise verifiable tasks (dsv-synth),
#   2. pretrain a tiny DeepSeek-V3.2 on the embedded corpus, dense attention (dsv-train),
#   3. DSA stage 1: warm up the lightning indexer against the dense attention (reports recall),
#   4. DSA stage 2: sparse training with top-k selection on,
#   5. stream a generation from the DSA checkpoint, and
#   6. score it on the synthesised tasks (dsv eval: JSON + Markdown + PNG report).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${DSV_DEMO_DIR:-runs/demo}"
STEPS="${DSV_DEMO_STEPS:-40}"
rm -rf "$OUT"
mkdir -p "$OUT"
dsv doctor
dsv synth generate arithmetic unit_conversion meeting --n 8 --seed 0 --out "$OUT/tasks.jsonl"
dsv train pretrain --model tiny --out "$OUT/pretrain" --steps "$STEPS" --attention dense
dsv train dsa-warmup --model "$OUT/pretrain/final" --out "$OUT/warmup" --steps "$((STEPS / 2))"
dsv train dsa-sparse --model "$OUT/warmup/final" --out "$OUT/sparse" --steps "$((STEPS / 2))"
dsv model info "$OUT/sparse/final"
dsv generate "$OUT/sparse/final" --prompt "The model reads a token and" --max-new-tokens 24 --temperature 0
dsv eval --model "$OUT/sparse/final" --tasks "$OUT/tasks.jsonl" --no-thinking --max-tokens 16 --out "$OUT/eval"
echo "demo outputs (checkpoints, loss plots, eval report) are in $OUT"
