#!/usr/bin/env bash
# Issue 20 on one GPU: the chunk ops and the MoM layer with float32-accurate products (backend triton) and with
# bf16 products and chunk states (backend triton_bf16), against fla where it is installed (its wheels in .whl/:
# fla-core and flash-linear-attention; the GPU image has transformers and einops).
#   bash docs/results/bf16_products/run.sh [PART ...]   PART: tests kernels mom (default: all three, in order)
#   FLA=0 ...   leaves fla out (its first compiling takes some 3 minutes a benchmark)
# Writes logs and JSON to $OUT (default docs/results/bf16_products/latest). The kernel tests (both backends
# against float64 at the GPU shapes) run first: no timing where they fail. TRITON_CACHE_DIR stays on the machine
# (/tmp/triton-cache), so a second command on the same warm machine compiles nothing again.
set -u
parts=${*:-tests kernels mom}
for part in $parts; do  # before anything is installed or run
  [[ $part =~ ^(tests|kernels|mom)$ ]] ||
    { echo "run.sh: error: part '$part' is invalid: tests, kernels or mom" >&2; exit 2; }
done
source docs/results/fidelity/gpu_env.sh
out=${OUT:-docs/results/bf16_products/latest}
mkdir -p "$out"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/device.txt"
timed() {  # timed NAME COMMAND...: its wall time and exit code to times.log
  local name=$1 start=$SECONDS; shift
  "$@"; local code=$?
  echo "$name: $((SECONDS - start)) s, exit code $code" | tee -a "$out/times.log"
  return $code
}
tests() {
  python -m pytest -q -m gpu -n 12 -p no:cacheprovider --durations=10 -rf tests/test_kernels_triton.py \
    tests/test_mom_routed.py > "$out/tests.log" 2>&1
}
fla=()
[ "${FLA:-1}" = 0 ] && fla=(--no-fla)
bench() {  # bench kernels|mom [ARG ...]: fla's kernels compiled first (unless FLA=0), then ours on each backend
  local name=$1; shift
  [ ${#fla[@]} -gt 0 ] || python -m sandbox.bench.$name "$@" --fla-compile-only > "$out/fla_${name}_compile.log" 2>&1
  for backend in triton triton_bf16; do
    python -m sandbox.bench.$name "$@" --backend $backend "${fla[@]}" --json "$out/${name}_$backend.json" \
      > "$out/${name}_$backend.log" 2>&1 || return 1
  done
}
for part in $parts; do
  case $part in
    tests) timed tests tests || { tail -15 "$out/tests.log"; echo "kernel tests failed: no timing"; exit 1; } ;;
    kernels) timed kernels bench kernels --rules gated_deltanet deltanet ;;
    mom) timed mom bench mom ;;
  esac
done
tail -3 "$out/tests.log" 2>/dev/null
grep -h "ours\|fla \|fla/ours\|WRONG\|device" "$out"/kernels_*.log "$out"/mom_*.log 2>/dev/null | cut -c1-220
