#!/usr/bin/env bash
# Parts of `sandbox-train -m experiment=capacity` on a GPU machine, one process per run, all at once, on the
# CPU's code path (backend torch, float32), so that step counts carry over to the CPU.
#   bash docs/results/capacity/run.sh MODEL:WIDTH:LR:STEPS[:OVERRIDE+OVERRIDE...] ...
#   e.g. run.sh mom:16:1e-2:3000:seed=1   mom:32:3e-3:3000:seed=0+model.mixer_options.top_k=1
# Writes $OUT/capacity.tar.gz (result.json, metrics.csv and log of every run).
source docs/results/fidelity/gpu_env.sh
root=/tmp/capacity
start_runs $root
for job in "$@"; do
  IFS=: read -r m d lr steps extra <<< "$job"
  timeout ${RUN_LIMIT_S:-500} python -m sandbox.train experiment=capacity output_root=$root callbacks.progress=lines \
    model=$m model.d_model=$d optim.lr=$lr trainer.max_steps=$steps model.backend=torch trainer.precision=32-true ${extra//+/ } \
    > $root/logs/$m-d$d-$lr-$steps-${extra//[^a-z0-9=.]/_}.log 2>&1 &
done
finish_runs $root "$OUT/capacity.tar.gz"
