#!/usr/bin/env bash
# Issues 19 and 20 on one H200 in one command (at most 10 minutes): every gpu-marked test, JOBS processes at
# once from an empty Triton cache (pytest-xdist, on the GPU machine), the slowest listed, and the stacked-model
# tests on CUDA; then `sandbox-bench train` in every mode (alone, 8 processes packed, 8 runs stacked, the plain
# loop) for attention, gated DeltaNet and MoM at d_model 64, 128, 256. Needs .whl/ in the repo root (gpu_env.sh).
#   bash docs/results/throughput/run.sh [more sandbox-bench train options]
# Writes $OUT/tests.log, $OUT/train.log and $OUT/train.json (rewritten after every row, so a run cut short
# keeps the rows it made; rows run width by width, d_model 64 first).
source docs/results/fidelity/gpu_env.sh
nvidia-smi --query-gpu=name,memory.used,utilization.gpu,clocks.sm --format=csv,noheader
start=$(date +%s)
timeout ${TEST_LIMIT_S:-260} python -m pytest -q -m gpu -p no:cacheprovider -v -n ${JOBS:-12} --durations=25 tests \
  > $OUT/tests.log 2>&1
echo "GPU tests: exit $? after $(( $(date +%s) - start )) s"; tail -n 4 $OUT/tests.log
python -m pytest -q -p no:cacheprovider tests/test_stacked.py > $OUT/tests_stacked.log 2>&1  # Triton under vmap on CUDA
echo "stacked-run tests: exit $?"; tail -n 2 $OUT/tests_stacked.log
timeout ${BENCH_LIMIT_S:-300} python -m sandbox.bench.train --json $OUT/train.json "$@" > $OUT/train.log 2>&1
echo "sandbox-bench train: exit $? after $(( $(date +%s) - start )) s"
grep -v "USDT\|Warning\|warn(" $OUT/train.log | tail -n 70
