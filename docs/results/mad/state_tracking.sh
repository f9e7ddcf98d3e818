#!/usr/bin/env bash
# State tracking on one H200 (issue 22): the delta rules with and without negative eigenvalues
# (model.mixer_options.allow_neg_eigval) and MoM on them, on parity and S5 under experiment=mad's training
# (d_model 128, SwiGLU MLPs, trained at L 64, tested at 64 and 256), one learning rate and weight decay, one process
# per run, all packed at once.
#   bash docs/results/mad/state_tracking.sh [TASK ...]        (default: parity s5)
#   OVERRIDES="..." bash ...   more Hydra overrides for every run
# Writes $OUT/state_tracking.tar.gz (result.json, metrics.csv and logs of every run).
source docs/results/fidelity/gpu_env.sh
tasks=("$@"); [ ${#tasks[@]} -gt 0 ] || tasks=(parity s5)
root=/tmp/state_tracking
start_runs $root
for task in "${tasks[@]}"; do
  for model in deltanet gated_deltanet mom; do
    for neg in false true; do
      timeout ${RUN_LIMIT_S:-480} python -m sandbox.train -m experiment=mad task=$task model=$model \
        model.mixer_options.allow_neg_eigval=$neg optim.lr=${LR:-1.0e-3} optim.weight_decay=0.0 seed=0 \
        output_root=$root callbacks.progress=lines $OVERRIDES > $root/logs/$task-$model-neg$neg.log 2>&1 &
    done
  done
done
finish_runs $root "$OUT/state_tracking.tar.gz"
