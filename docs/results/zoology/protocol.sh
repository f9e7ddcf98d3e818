#!/usr/bin/env bash
# Zoology's protocol at one width through `sandbox-train -m` on one GPU: seed 0 at every model and rate of
# experiment=zoology (the sandbox launcher packs the jobs as processes under the CUDA MPS daemon, attention's
# rates stacked), then seeds 1 and 2 at the rate the report chooses on seed 0 (chosen_rates.py; run.sh).
#   bash docs/results/zoology/protocol.sh WIDTH
#   STOP_AFTER_S=500 bash docs/results/zoology/protocol.sh WIDTH   runs end with a checkpoint 500 s after the start;
#     the same command given again resumes them (finished runs are returned as they are) and goes on
#   PROCESSES=12 ...   jobs at once (default: as many as the GPU's memory holds at this width, at most 18)
#   OVERRIDES="trainer.max_steps=3000" ...   more Hydra overrides for every run; ROOT as in run.sh (default /tmp/zoology)
# Writes $OUT/zoology_d${WIDTH}_protocol.tar.gz (result.json, metrics.csv and logs of every run).
# Exit code 1 where the seed-0 pass failed (a run failed, a bad setting), or the choice or the seeds pass did; 0 when
# STOP_AFTER_S stopped it (the same command resumes) and when runs diverged (the choice ranks their rates lower).
[[ $1 =~ ^[1-9][0-9]*$ ]] || { echo "protocol.sh: error: WIDTH '$1' is invalid: a whole number >= 1 (model.d_model)" >&2; exit 2; }
[ -z "$PROCESSES" ] || [[ $PROCESSES =~ ^[1-9][0-9]*$ ]] ||
  { echo "protocol.sh: error: PROCESSES=$PROCESSES is invalid: a whole number >= 1" >&2; exit 2; }
source docs/results/fidelity/gpu_env.sh
width=$1 root=${ROOT:-/tmp/zoology}
# GPU memory a process held: 4.2-4.3 GiB at width 64, up to 5.6 at 128 (../zoology_6000_steps/d128/logs/console),
# up to 8.9 at 256 (d256/README.md): about 3500 MiB + 24 MiB per unit of width. As many as fit in 90% of the card,
# at most 18 (the GPU is full long before).
memory_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -n 1)
fit=$(( memory_mib * 9 / 10 / (3500 + 24 * width) ))
processes=${PROCESSES:-$(( fit > 18 ? 18 : fit < 1 ? 1 : fit ))}
start_runs $root
code=0  # this script's: 1 where the seed-0 pass, the choice or the seeds pass failed
if limit=$(multirun_limit); then
  echo "== $(date -u +%FT%TZ) seed 0, every model and rate, $processes processes $OVERRIDES" >> $root/logs/seed0-d$width.log
  timeout -s TERM "$limit" python -m sandbox.train -m experiment=zoology output_root=$root callbacks.progress=lines \
    model.d_model=$width seed=0 hydra.launcher.processes=$processes $OVERRIDES >> $root/logs/seed0-d$width.log 2>&1
  status=$?
  echo "seed 0 pass: exit code $status"
  # every run ended: the choice goes on (rates with diverged runs rank below the others); stopped: the same command
  # resumes; anything else failed (a run, a setting)
  if runs_ended $status; then
    if limit=$(multirun_limit); then
      chosen=$(python docs/results/zoology/chosen_rates.py $root/zoology) || code=1
      echo "chosen on seed 0: $chosen"
      # run.sh joins the same MPS daemon and packs into its own ROOT's logs, beside this one's runs
      [ -z "$chosen" ] || ROOT=$root STOP_AFTER_S=$limit MAX_PROCS=$processes bash docs/results/zoology/run.sh \
        $width 1,2 $chosen || code=1
    fi
  elif ! runs_stopped $status; then
    code=1
  fi
fi
finish_runs $root "$OUT/zoology_d${width}_protocol.tar.gz" || code=1
exit $code
