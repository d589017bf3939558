#!/usr/bin/env bash
# The README's first command: `dsv quickstart` on the embedded default (tiny model, embedded data,
# offline, about three minutes on two CPU cores): tasks -> tokenizer -> dense pretraining -> DSA warm-up
# -> sparse training -> SFT -> GRPO -> eval -> decode benchmark -> a served agent turn -> report.md.
# Arguments go to `dsv quickstart` (e.g. --scale 0.2 for a quick look, --preset small on a GPU);
# run it again to continue an interrupted run.
set -euo pipefail
cd "$(dirname "$0")/.."
dsv doctor
exec dsv quickstart --out "${DSV_QUICKSTART_DIR:-runs/quickstart}" "$@"
