#!/usr/bin/env bash
# Packed runs with and without CUDA MPS, in one command on one GPU. Without MPS the GPU time-slices between
# processes, so the small kernels of packed runs never run at once; under MPS they can. Rows: each model graphed,
# alone and as PACKED (default 8) processes at once, first without MPS, then with it; gated DeltaNet and MoM at
# d_model 64 unless options say otherwise (each option given replaces the default, e.g. --widths 256
# --packed-widths 256). Each half stops after BENCH_LIMIT_S (240 s), keeping the rows it made.
#   bash docs/results/throughput/mps.sh [more sandbox-bench train options]
# Writes $OUT/packed_{plain,mps}.{log,json}.
source docs/results/fidelity/gpu_env.sh
bench=(python -m sandbox.bench.train --modes alone packed --variants graphs --models gated_deltanet mom
       --widths 64 --packed-widths 64 --packed "${PACKED:-8}" "$@")
timeout "${BENCH_LIMIT_S:-240}" "${bench[@]}" --json "$OUT/packed_plain.json" > "$OUT/packed_plain.log" 2>&1
echo "without MPS: exit $?"
start_mps || exit 1
timeout "${BENCH_LIMIT_S:-240}" "${bench[@]}" --json "$OUT/packed_mps.json" > "$OUT/packed_mps.log" 2>&1
echo "with MPS: exit $?"
stop_mps
for f in plain mps; do echo "== $f"; grep -v "USDT\|Warning\|warn(" "$OUT/packed_$f.log" | grep -i "packed\|alone" | tail -n 20; done
