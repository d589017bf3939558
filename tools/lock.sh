#!/usr/bin/env bash
# Re-resolve the test environment from requirements-dev.txt in a fresh virtual environment and write
# the result to constraints.txt, the versions the README test command (tools/test.sh) installs.
# Run it on purpose (after adding a dependency, or to move to newer releases), then run tools/test.sh
# and commit constraints.txt with the change that needed it. `nox -s latest` runs the suite against
# the newest releases without touching the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q --upgrade pip
"$tmp/venv/bin/python" -m pip install -q -r requirements-dev.txt
{
  echo "# The versions the README test command installs (pip -c): regenerate with tools/lock.sh, on purpose."
  echo "# Resolved on $(date -u +%Y-%m-%d) with $("$tmp/venv/bin/python" --version). torch is pinned in the requirements files."
  # The dsv distributions are installed editable from this tree; torch has its own pin.
  "$tmp/venv/bin/python" -m pip freeze --exclude-editable | grep -viE '^(torch|dsv-[a-z]+)==' | LC_ALL=C sort -f
} > constraints.txt.tmp
mv constraints.txt.tmp constraints.txt
echo "tools/lock.sh: wrote constraints.txt ($(grep -vc '^#' constraints.txt) pins)"
