#!/usr/bin/env bash
# Set up a virtual environment with every dsv distribution and run the whole test suite.
# This is the README's test command and what .ci/run calls. It fails when pytest fails,
# and also when pytest collected or ran no test at all (pytest's exit code 5, or 0 passed).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DSV_VENV:-.venv}"
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# Tests run the `dsv` console script the way a user with the environment active would.
export PATH="$(cd "$VENV/bin" && pwd):$PATH"
"$VENV/bin/python" -m pip install -q --upgrade pip
# Pinned versions (constraints.txt, regenerated on purpose with tools/lock.sh): a new upstream release
# cannot break a fresh clone. `nox -s latest` runs the same suite against the newest releases.
"$VENV/bin/python" -m pip install -q -r requirements-dev.txt -c constraints.txt
"$VENV/bin/ruff" check .
# --- dsv chat: apps/tui/tests/test_tui_tmux.py drives the installed `dsv chat` in tmux. Install
# tmux when it is missing and we can (root with apt-get); otherwise that test skips and says why.
if ! command -v tmux >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get install -y -qq tmux >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq tmux >/dev/null 2>&1; } \
    || echo "tools/test.sh: could not install tmux; the dsv chat tmux test will skip" >&2
fi
# --- end of the dsv chat block
# Two pytest workers share two cores: one intra-op thread each avoids oversubscription, which
# slows torch on CPU by an order of magnitude.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
log=$(mktemp)
set +e
# A new random order every run (pytest-randomly; its header line names the seed): the suite must
# pass in any order. Replay one with `bash tools/test.sh -p randomly --randomly-seed=N`, or run the
# file order with `-p no:randomly`.
"$VENV/bin/python" -m pytest -n "${DSV_TEST_WORKERS:-2}" --dist loadgroup -p no:cacheprovider "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" -eq 5 ]; then
  echo "tools/test.sh: pytest collected no tests; failing" >&2
  exit 1
fi
if [ "$rc" -ne 0 ]; then
  exit "$rc"
fi
if ! grep -Eq '[1-9][0-9]* passed' "$log"; then
  echo "tools/test.sh: no test passed; failing" >&2
  exit 1
fi
