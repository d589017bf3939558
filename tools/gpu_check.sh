#!/usr/bin/env bash
# The GPU evidence in one call: within 9 minutes on one H100, run every Triton kernel test file natively
# on CUDA (kernels/tests/test_kernels_*.py, a glob, so new files join by name) and the sm_90 compile
# check (spills, registers, shared memory, wgmma: kernels/tests/test_kernels_cuda_compile.py), then
# `dsv bench kernels` at V3.2 shapes up to 128K context (sparse prefill, decode at batch 1 and 64,
# indexer; each kernel checked against its torch reference in the same run), `dsv bench fp8-gemm` at
# V3.2's projection shapes, `dsv bench core decode --device cuda` and `dsv bench serve --device cuda`,
# and write every table under tools/bench/results/gpu/.
#
#   tools/gpu_check.sh              on a machine with a CUDA GPU
#   tools/gpu_check.sh --dry-run    on a CPU: the same steps at tiny shapes, kernels in Triton's
#                                   interpreter (about a minute; tests/test_gpu_check.py runs it)
#   tools/gpu_check.sh --out DIR    write the results elsewhere (the dry run defaults to a temp folder)
#
# Each step has its own time budget (`timeout`); a step that fails or runs out is recorded and the
# next one still runs, so one bad step cannot eat the GPU time of the rest. summary.md lists every
# step with its status, seconds and log; the exit code is 1 when any step did not pass.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) [ $# -ge 2 ] || { echo "error: --out needs a folder" >&2; exit 2; }; OUT="$2"; shift ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument '$1' (use --dry-run, --out DIR or --help)" >&2; exit 2 ;;
  esac
  shift
done

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ -z "$OUT" ]; then
  if [ "$DRY" = 1 ]; then OUT="$(mktemp -d "${TMPDIR:-/tmp}/dsv-gpu-check-dry.XXXXXX")"; else OUT=tools/bench/results/gpu; fi
fi
mkdir -p "$OUT/logs" || { echo "error: cannot create $OUT" >&2; exit 2; }
DSV=("$PY" -m dsv.cli.main)

if [ "$DRY" = 0 ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "error: torch sees no CUDA device here; run with --dry-run to check the script on a CPU" >&2
  exit 2
fi

# the native parity pass: every kernel test file (a glob: a new test_kernels_*.py is included without an
# edit here) but the compile check, which needs no GPU and runs as its own step
COMPILE_TEST=kernels/tests/test_kernels_cuda_compile.py
KERNEL_TESTS=(kernels/tests/test_dsa_ties.py)
for f in kernels/tests/test_kernels_*.py; do
  [ "$f" = "$COMPILE_TEST" ] || KERNEL_TESTS+=("$f")
done

if [ "$DRY" = 1 ]; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  DEVICE=cpu
  # budgets in seconds; the shapes are tiny, the budgets only stop a hang
  B_TESTS=120; B_COMPILE=120; B_KERNELS=120; B_FP8=120; B_DECODE=120; B_SERVE=180
  TESTS=(env -u DSV_KERNELS_TEST_DEVICE "$PY" -m pytest -p no:cacheprovider -q -x
    kernels/tests/test_kernels_fp8_gemm.py -k "act_quant or matches_dequantize")
  # the instruction classifier only: the whole sm_90 table runs in the GPU run (about a minute of one core)
  COMPILE=("$PY" -m pytest -p no:cacheprovider -q "$COMPILE_TEST" -k mma_kinds)
  KERNELS=("${DSV[@]}" bench kernels --device cpu --backend triton --preset tiny --contexts 32 --repeats 1
    --dtype fp32 --ops indexer,topk,sparse_prefill,sparse_decode --out "$OUT/kernels")
  FP8=("${DSV[@]}" bench fp8-gemm --device cpu --preset tiny --tokens 1,16 --layers o_proj,expert\ down
    --repeats 1 --out "$OUT/fp8-gemm")
  DECODE=("${DSV[@]}" bench core decode --device cpu --preset tiny --layers 1 --contexts 64 --contexts 128
    --repeats 1 --dtype float32 --out "$OUT/core-decode")
  SERVE=("${DSV[@]}" bench serve --device cpu --preset tiny --clients 1 --shape 8x4 --runs 1
    --no-engine-alone --write "$OUT/serve/serve.md")
else
  DEVICE=cuda
  # 510 s of budgets in all, the rest of the 9 minutes is start-up and the summary
  B_TESTS=110; B_COMPILE=60; B_KERNELS=150; B_FP8=50; B_DECODE=55; B_SERVE=85
  TESTS=(env DSV_KERNELS_TEST_DEVICE=cuda "$PY" -m pytest -p no:cacheprovider -q "${KERNEL_TESTS[@]}")
  COMPILE=(env -u DSV_KERNELS_TEST_DEVICE "$PY" -m pytest -p no:cacheprovider -q "$COMPILE_TEST")
  KERNELS=("${DSV[@]}" bench kernels --device cuda --backend triton --preset v32
    --contexts 4096,16384,32768,65536,131072 --batches 1,64 --repeats 3 --out "$OUT/kernels")
  FP8=("${DSV[@]}" bench fp8-gemm --device cuda --preset v32 --tokens 1,16,128,1024,4096 --repeats 3
    --out "$OUT/fp8-gemm")
  DECODE=("${DSV[@]}" bench core decode --device cuda --dtype bfloat16 --preset v32 --layers 2
    --contexts 4096 --contexts 16384 --contexts 65536 --contexts 131072 --repeats 3 --out "$OUT/core-decode")
  SERVE=("${DSV[@]}" bench serve --device cuda --dtype bfloat16 --preset tiny --preset small
    --clients 1 --clients 8 --clients 32 --shape 32x32 --shape 512x128 --runs 1 --write "$OUT/serve/serve.md")
fi
mkdir -p "$OUT/serve"

SUMMARY="$OUT/summary.md"
FAILED=0
{
  echo "# tools/gpu_check.sh$([ "$DRY" = 1 ] && echo ' --dry-run')"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "- machine: $("$PY" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")' 2>/dev/null), $(nproc) CPU cores"
  echo "- versions: $("$PY" -c 'import torch, triton; print(f"torch {torch.__version__}, triton {triton.__version__}")' 2>/dev/null)"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- kernel test files (native CUDA pass): ${KERNEL_TESTS[*]}"
  echo
  echo "| step | status | seconds | budget | log |"
  echo "|---|---|---:|---:|---|"
} > "$SUMMARY"

# step NAME BUDGET CMD...: run CMD under `timeout BUDGET`, log to logs/NAME.log, add a summary row
step() {
  local name="$1" budget="$2"
  shift 2
  local log="$OUT/logs/$name.log" start end status rc
  echo "== $name (budget ${budget}s): $*" | tee "$log"
  start=$(date +%s)
  timeout --kill-after=10 "$budget" "$@" >>"$log" 2>&1
  rc=$?
  end=$(date +%s)
  case "$rc" in
    0) status=passed ;;
    124|137) status="TIMEOUT" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  [ "$rc" = 0 ] || FAILED=1
  echo "   $status in $((end - start)) s; log: $log"
  [ "$rc" = 0 ] || tail -n 15 "$log" | sed 's/^/   | /'
  echo "| $name | $status | $((end - start)) | $budget | logs/$name.log |" >> "$SUMMARY"
}

step kernel-tests "$B_TESTS" "${TESTS[@]}"
step compile-check "$B_COMPILE" "${COMPILE[@]}"
step bench-kernels "$B_KERNELS" "${KERNELS[@]}"
step bench-fp8-gemm "$B_FP8" "${FP8[@]}"
step bench-core-decode "$B_DECODE" "${DECODE[@]}"
step bench-serve "$B_SERVE" "${SERVE[@]}"

# every Markdown table the steps wrote, in one file beside the summary
{
  echo
  for md in "$OUT"/kernels/*.md "$OUT"/fp8-gemm/*.md "$OUT"/core-decode/*.md "$OUT"/serve/*.md; do
    [ -f "$md" ] && { echo "## ${md#"$OUT"/}"; echo; cat "$md"; echo; }
  done
} >> "$SUMMARY"
echo "device: $DEVICE; results in $OUT (summary: $SUMMARY)"
exit "$FAILED"
