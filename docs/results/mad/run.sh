#!/usr/bin/env bash
# Parts of `sandbox-train -m experiment=mad` on one GPU machine, one process per (task setting, model), all packed
# at once, every run with the same further overrides (an optimiser point of MAD's grid, a seed, ...).
#   bash docs/results/mad/run.sh TASK,... MODEL,... [OVERRIDE ...]
#   e.g. run.sh mad_recall,mad_fuzzy attention,mom optim.lr=1.0e-3 optim.weight_decay=0.0 seed=0
# Run again with the same arguments while the machine is warm, it resumes the runs a time limit stopped
# (RUN_LIMIT_S, STOP_AFTER_S: run_limit in gpu_env.sh) from their checkpoints, starts those that did not start,
# and leaves finished ones as they are.
# Writes $OUT/mad.tar.gz (result.json, metrics.csv and logs of every run).
# The arguments are checked before anything is installed or started (one line, exit code 2): a typo'd task or
# model would otherwise fail in its runs' logs after the runs before it had started.
bad() { echo "mad/run.sh: error: $*" >&2; exit 2; }
names_ok() {  # names_ok GROUP NAME,...: each a config of conf/GROUP
  [ -n "${2//,/}" ] || bad "no $1 given: run.sh TASK,... MODEL,... [OVERRIDE ...]"
  local name
  for name in ${2//,/ }; do
    [ -f "conf/$1/$name.yaml" ] || bad "$1 '$name' is invalid: choose one of $(cd conf/$1 && ls | sed 's/\.yaml$//' | xargs)"
  done
}
names_ok task "$1" && names_ok model "$2"
source docs/results/fidelity/gpu_env.sh
tasks=$1 models=$2; shift 2
root=/tmp/mad
start_runs $root
for task in ${tasks//,/ }; do
  for model in ${models//,/ }; do
    limit=$(run_limit) || break 2
    timeout $limit python -m sandbox.train -m experiment=mad task=$task model=$model "$@" \
      output_root=$root callbacks.progress=lines >> $root/logs/$task-$model.log 2>&1 &
  done
done
finish_runs $root "$OUT/mad.tar.gz"
