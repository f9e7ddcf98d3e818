#!/usr/bin/env bash
# Parts of `sandbox-train -m experiment=mad` on one GPU machine: the tasks x models given, every job with the same
# further overrides (an optimiser point of MAD's grid, several as comma lists, a seed, ...), as one multirun whose
# jobs the sandbox launcher packs as processes under the CUDA MPS daemon.
#   bash docs/results/mad/run.sh TASK,... MODEL,... [OVERRIDE ...]
#   e.g. run.sh mad_recall,mad_fuzzy attention,mom optim.lr=5.0e-4,1.0e-3 optim.weight_decay=0.0 seed=0
#   PROCESSES=8 ...   processes at once (default 12: on an H100, 20 of fuzzy and noisy recall's ran out of memory,
#     12 did not; attention's optimiser points of one task setting train as one stacked process)
#   STOP_AFTER_S=500 ...   runs end with a checkpoint 500 s after the start; the same command given again while the
#     machine is warm resumes them from their checkpoints and leaves finished ones as they are. ROOT: where the
#     runs go (default /tmp/mad).
# Writes $OUT/mad.tar.gz (result.json, metrics.csv and logs of every run). Exit code 1 where a run failed.
# The arguments are checked before anything is installed or started (one line, exit code 2): a typo'd task or
# model would otherwise fail its jobs after the jobs before them had trained.
bad() { echo "mad/run.sh: error: $*" >&2; exit 2; }
names_ok() {  # names_ok GROUP NAME,...: each a config of conf/GROUP
  [ -n "${2//,/}" ] || bad "no $1 given: run.sh TASK,... MODEL,... [OVERRIDE ...]"
  local name
  for name in ${2//,/ }; do
    [ -f "conf/$1/$name.yaml" ] || bad "$1 '$name' is invalid: choose one of $(cd conf/$1 && ls | sed 's/\.yaml$//' | xargs)"
  done
}
names_ok task "$1" && names_ok model "$2"
[ -z "$PROCESSES" ] || [[ $PROCESSES =~ ^[1-9][0-9]*$ ]] || bad "PROCESSES=$PROCESSES is invalid: a whole number >= 1"
source docs/results/fidelity/gpu_env.sh
tasks=$1 models=$2; shift 2
root=${ROOT:-/tmp/mad}
start_runs $root
if limit=$(multirun_limit); then
  echo "== $(date -u +%FT%TZ) task=$tasks model=$models $* (${PROCESSES:-12} processes)" >> $root/logs/mad.log
  timeout -s TERM "$limit" python -m sandbox.train -m experiment=mad task=$tasks model=$models "$@" \
    output_root=$root callbacks.progress=lines hydra.launcher.processes=${PROCESSES:-12} >> $root/logs/mad.log 2>&1
  status=$?
  echo "multirun: exit code $status"
fi
# exit code 1 where the multirun failed (a run failed, a bad setting), not where its runs ended or were stopped
finish_runs $root "$OUT/mad.tar.gz" && { runs_ended ${status:-0} || runs_stopped ${status:-0}; }
