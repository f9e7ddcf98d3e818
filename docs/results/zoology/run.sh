#!/usr/bin/env bash
# Parts of `sandbox-train -m experiment=zoology` on one GPU, runs packed: one process per (model, lr, seed),
# each a one-job Hydra multirun, all writing into one folder that `sandbox-report` merges.
#   bash docs/results/zoology/run.sh WIDTH SEEDS MODEL:LR ...   e.g.  run.sh 64 1,2 attention:2.2e-3 mom:2.2e-3
#   bash docs/results/zoology/run.sh WIDTH SEEDS all            every model of the experiment at its 4 lrs
#   bash docs/results/zoology/run.sh WIDTH SEEDS stacked [MODEL ...]   one process per model (default: all): its
#     4 lrs x SEEDS runs as one stack (sandbox/stacked_run.py), the models' processes packed
#   OVERRIDES="cuda_graphs=true" bash docs/results/zoology/run.sh ...   more Hydra overrides for every run
#   STOP_AFTER_S=500 bash docs/results/zoology/run.sh ...   runs end (with a checkpoint) 500 s after the start and
#     no run starts later; the same command given again resumes them (run_limit in gpu_env.sh)
#   MPS=0 bash docs/results/zoology/run.sh ...   the runs time-sliced, not through the CUDA MPS daemon (gpu_env.sh)
#   ROOT=/tmp/long bash docs/results/zoology/run.sh ...   the runs' folder on the GPU machine (default /tmp/zoology):
#     one per experiment whose runs are resumed or packed apart
#   MAX_PROCS=8 bash docs/results/zoology/run.sh ...   at most 8 runs at once (default 12). Runs that ran out of GPU
#     memory run once more at the end, half as many at once; a run that failed runs again when the same command is
#     given again; finished runs are returned as they are.
# Writes $OUT/zoology_d${WIDTH}_s${SEEDS}.tar.gz (result.json, metrics.csv and logs of every run).
# The arguments are checked before anything is installed or started (one line, exit code 2): a typo'd model or
# rate would otherwise fail in each run's log after the runs before it had started.
bad() { echo "zoology/run.sh: error: $*" >&2; exit 2; }
model_ok() {
  [ -f "conf/model/$1.yaml" ] || bad "model '$1' is invalid: choose one of $(cd conf/model && ls | sed 's/\.yaml$//' | xargs)"
}
[[ $1 =~ ^[1-9][0-9]*$ ]] || bad "WIDTH '$1' is invalid: a whole number >= 1 (model.d_model)"
[[ $2 =~ ^[0-9]+(,[0-9]+)*$ ]] || bad "SEEDS '$2' is invalid: whole numbers separated by commas (0,1,2)"
[ $# -ge 3 ] || bad "no runs given: MODEL:LR ..., all, or stacked [MODEL ...] after WIDTH SEEDS"
if [ "$3" = stacked ]; then
  for m in "${@:4}"; do model_ok "$m"; done
elif [ "$3" != all ]; then
  for job in "${@:3}"; do
    lr=${job#*:}
    [[ $job == *:* && $lr =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ && ${lr%%[eE]*} =~ [1-9] ]] ||
      bad "run '$job' is invalid: MODEL:LR, LR a number > 0 (attention:2.2e-3)"
    model_ok "${job%%:*}"
  done
fi
source docs/results/fidelity/gpu_env.sh
width=$1 seeds=$2; shift 2
root=${ROOT:-/tmp/zoology}
models=(attention linear_attention gla deltanet gated_deltanet gated_deltanet_equal_state
        mom_m2 mom mom_m8 mom_m2_noshared mom_noshared mom_m8_noshared)
lrs=(1.0e-4 4.6e-4 2.2e-3 1.0e-2)
jobs=("$@")
train() {  # train LIMIT LOG OVERRIDE...: one `sandbox-train -m experiment=zoology` at this width, in the background
  local limit=$1 log=$2; shift 2
  # appended under a header: a command given again to resume keeps what the earlier ones printed
  echo "== $(date -u +%FT%TZ) $* $OVERRIDES" >> "$log"
  { timeout "$limit" python -m sandbox.train -m experiment=zoology output_root=$root callbacks.progress=lines \
      model.d_model=$width "$@" $OVERRIDES; echo "run.sh: exit code $?"; } >> "$log" 2>&1 &
}
# failed LOG: whether the run whose console output is LOG failed in its last start (a run failed, a bad setting)
failed() {
  local code; code=$(last_start "$1" | sed -n 's/^run\.sh: exit code //p' | head -n 1)
  [ -n "$code" ] && ! runs_ended "$code" && ! runs_stopped "$code"
}
# say_failed LOG...: after finish_runs, exit code 1 (naming them) where runs started by this command failed
say_failed() {
  local log bad=()
  for log in "$@"; do failed "$log" && bad+=("${log##*/}"); done
  [ ${#bad[@]} -eq 0 ] || { echo "failed (the same command runs them again): ${bad[*]}"; exit 1; }
}
if [ "${jobs[0]}" = stacked ]; then
  stacked=("${jobs[@]:1}"); [ ${#stacked[@]} -eq 0 ] && stacked=("${models[@]}")
  start_runs $root
  logs=()
  for m in "${stacked[@]}"; do
    limit=$(run_limit) || break
    logs+=("$root/logs/$m-d$width-stacked.log")
    train "$limit" "${logs[-1]}" model=$m seed=$seeds hydra.launcher.stack=true
  done
  finish_runs $root "$OUT/zoology_d${width}_s${seeds//,/_}_stacked.tar.gz" || exit 1
  say_failed "${logs[@]}"
  exit
fi
if [ "${jobs[0]}" = all ]; then
  jobs=(); for m in "${models[@]}"; do for lr in "${lrs[@]}"; do jobs+=("$m:$lr"); done; done
fi
runs=()  # MODEL:LR:SEED
for job in "${jobs[@]}"; do for seed in ${seeds//,/ }; do runs+=("$job:$seed"); done; done
log_of() { local m=${1%%:*} rest=${1#*:}; echo "$root/logs/$m-${rest%:*}-d$width-s${rest##*:}.log"; }
start() {  # the runs given, at most MAX_PROCS at once; returns when the last has started
  local run m rest limit
  for run in "$@"; do
    m=${run%%:*} rest=${run#*:}
    wait_for_slot
    limit=$(run_limit) || return 0
    started[$run]=1
    train "$limit" "$(log_of "$run")" model=$m optim.lr=${rest%:*} seed=${rest##*:}
  done
}
declare -A started  # the runs this command started
start_runs $root
start "${runs[@]}"
wait
# runs that ran out of GPU memory beside the others run once more, half as many at once, now that those are done
again=(); for run in "${runs[@]}"; do out_of_memory "$(log_of "$run")" && again+=("$run"); done
if [ ${#again[@]} -gt 0 ]; then
  echo "out of GPU memory, run again: ${again[*]}"
  MAX_PROCS=$(( (${MAX_PROCS:-12} + 1) / 2 )) start "${again[@]}"
fi
finish_runs $root "$OUT/zoology_d${width}_s${seeds//,/_}.tar.gz" || exit 1
say_failed $(for run in "${!started[@]}"; do log_of "$run"; done)
