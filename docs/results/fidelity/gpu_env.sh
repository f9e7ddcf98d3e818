# Sourced at the start of every GPU command of docs/results/: the project's Python dependencies that the GPU
# machine lacks (hydra, optuna; carried as wheels in .whl/), the repo on the path, one thread per process.
# Once per machine, under a lock: scripts started together must not import from a folder being rewritten.
( flock 9; [ -e /tmp/site/.installed ] ||
  { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
    touch /tmp/site/.installed; } ) 9> /tmp/site.lock || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
# Pack the small files of every run below $1 (results, metric curves, logs; no checkpoints) into $2.
pack_runs() { (cd "$1" && find . \( -name result.json -o -name metrics.csv -o -name '*.log' -o -name failed.json \) -print0 | tar -czf "$2" --null -T -); }
# Runs packed on the GPU: start_runs ROOT before starting them in the background (their logs go to ROOT/logs),
# finish_runs ROOT TARBALL after: waits for them, prints the wall time and each run's last line, packs ROOT.
# The packed runs share the GPU through the CUDA MPS daemon (kernels of several processes at once) where the
# machine has it: 1.2-1.6x the run-steps per second of the same processes time-sliced
# (docs/results/throughput/README.md, "CUDA MPS"). MPS=0: without it; MPS=1: fail where it cannot start.
mps_env() { export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log; }
start_mps() {
  mps_env; mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  stop_mps 2> /dev/null  # a daemon left by a command that was killed
  # without join_mps's lock (fd 9): a daemon that kept it open would block every later join and leave
  command -v nvidia-cuda-mps-control > /dev/null && nvidia-cuda-mps-control -d 9>&- ||
    { echo "the CUDA MPS daemon did not start"; return 1; }
}
stop_mps() { echo quit | nvidia-cuda-mps-control; }
# Scripts run side by side (one per ROOT) share one daemon: the first to join starts it, the last to leave
# stops it (MPS_USERS counts them). A script killed before it left keeps the daemon, which it also leaves
# running, for the next script on the machine.
MPS_USERS=${MPS_USERS:-/tmp/mps-users}
join_mps() {
  mps_env
  ( flock 9; users=$(cat "$MPS_USERS" 2> /dev/null || echo 0)
    if [ "$users" -eq 0 ]; then start_mps || exit 1; fi
    echo $((users + 1)) > "$MPS_USERS" ) 9> "$MPS_USERS.lock"
}
leave_mps() {
  ( flock 9; users=$(( $(cat "$MPS_USERS") - 1 )); echo $users > "$MPS_USERS"
    [ $users -gt 0 ] || stop_mps ) 9> "$MPS_USERS.lock"
}
# start_runs stops the script (exit code 2, nothing started) on a MAX_PROCS, RUN_LIMIT_S, STOP_AFTER_S or MPS that
# run_limit, wait_for_slot and the daemon cannot use (MAX_PROCS=0 would wait forever, MAX_PROCS=abc start every
# run at once), and on a ROOT that is no plain path as a Hydra override value (output_root=$ROOT): a comma made a
# multirun sweep output_root, each run trained once in each folder; a space split it.
start_runs() {
  whole_number MAX_PROCS 1 && whole_number RUN_LIMIT_S 1 && whole_number STOP_AFTER_S 0 || exit 2
  [ -z "$ROOT" ] || [[ $ROOT =~ ^[A-Za-z0-9_./+@%-]+$ ]] ||
    { echo "ROOT=$ROOT is invalid: a path of letters, digits and _ . / + @ % - (Hydra's output_root)" >&2; exit 2; }
  local mps=${MPS:-auto}
  [[ $mps =~ ^(0|1|auto)$ ]] || { echo "MPS=$MPS is invalid: 0, 1 or auto (the default)" >&2; exit 2; }
  mkdir -p "$1/logs"; runs_start=$(date +%s) mps_on=0
  if [ "$mps" = auto ] && ! command -v nvidia-cuda-mps-control > /dev/null; then
    echo "no CUDA MPS on this machine: the packed runs are time-sliced"
  elif [ "$mps" != 0 ]; then
    join_mps || exit 1; mps_on=1
  fi
}
# whole_number NAME LEAST: fails, saying why, where the variable NAME is set to other than a whole number >= LEAST
whole_number() {
  if [ -n "${!1}" ] && ! { [[ ${!1} =~ ^[0-9]+$ ]] && [ "${!1}" -ge "$2" ]; }; then
    echo "$1=${!1} is invalid: a whole number >= $2" >&2; return 1
  fi
}
# wait_for_slot before starting a run keeps at most MAX_PROCS (default 12) running: packed runs share the GPU's
# memory (how many fit at d_model 256: docs/results/zoology/d256/README.md).
# run_limit prints how many seconds a run started now may take: RUN_LIMIT_S (default 540), less where
# STOP_AFTER_S (seconds after start_runs) comes sooner; it fails, saying why, on a value that is not a whole number
# of seconds (RUN_LIMIT_S=0 would be no limit at all: timeout 0) and when under a minute is left before
# STOP_AFTER_S, so that no run starts that could not reach its first checkpoint. A run stopped by its limit gets
# SIGTERM, saves a checkpoint and is recorded as interrupted; the same command given again resumes it and starts
# the runs that did not start.
run_limit() {
  whole_number RUN_LIMIT_S 1 && whole_number STOP_AFTER_S 0 || return 1
  local left=${RUN_LIMIT_S:-540}
  if [ -n "$STOP_AFTER_S" ]; then
    local to_stop=$(( STOP_AFTER_S - ($(date +%s) - runs_start) ))
    if [ "$to_stop" -lt 60 ]; then
      echo "STOP_AFTER_S=$STOP_AFTER_S: under a minute left, no more runs start" >&2; return 1
    fi
    [ "$to_stop" -lt "$left" ] && left=$to_stop
  fi
  echo "$left"
}
# multirun_limit: run_limit for a `sandbox-train -m` that packs many runs itself: what STOP_AFTER_S leaves, with
# no limit of a run's own (none when under a minute is left).
multirun_limit() { RUN_LIMIT_S=1000000 run_limit; }
# out_of_memory LOG: whether the run whose console output is LOG failed for want of GPU memory in its last start
# (the part after LOG's last "== " header; packed runs share the memory: one that starts when the others have
# grown can find none left).
out_of_memory() { [ -f "$1" ] && last_start "$1" | grep -q "torch.OutOfMemoryError"; }
# last_start LOG: LOG's lines since its last "== " header (the last start of its run), newest first
last_start() { tac "$1" | sed '/^== /q'; }
# sandbox-train's exit code: every run ended (0 finished; 3, 4, 5 some diverged, not trained or pruned), or stopped
# by STOP_AFTER_S, a run's limit or a signal (124, 130, 143: the same command resumes); anything else, a failure
runs_ended() { [[ $1 =~ ^(0|3|4|5)$ ]]; }
runs_stopped() { [[ $1 =~ ^(124|130|143)$ ]]; }
wait_for_slot() { while [ "$(jobs -rp | wc -l)" -ge "${MAX_PROCS:-12}" ]; do wait -n; done; }
finish_runs() {
  wait
  if [ "$mps_on" = 1 ]; then leave_mps; fi
  echo "wall time: $(( $(date +%s) - runs_start )) s"
  grep -h "best val acc\|rror" "$1"/logs/*.log | sed "s|$1/[^/]*/||" | cut -c1-200
  # a run killed outright leaves no result.json and no line above: named, or the report leaves it out unseen
  local logs run
  for logs in "$1"/*/*/logs; do
    run=${logs%/logs}
    [ -d "$logs" ] && [ ! -e "$run/result.json" ] && echo "ended without a record (no result.json): ${run#$1/}"
  done
  pack_runs "$1" "$2"
}
