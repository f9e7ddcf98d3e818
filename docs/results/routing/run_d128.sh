#!/usr/bin/env bash
# The routing measurement at Zoology's MQAR, d_model 128, on one GPU machine (the runs of ../zoology/d128/ kept no
# checkpoints): MoM with and without the shared memory, 4 and 8 memories, at the learning rate chosen there, seeds
# 0-2, packed; then `sandbox-routing` on every run, on the GPU. 3000 steps, `experiment=zoology`'s budget when those
# runs were made (it is 6000 now): the runs of d128/ are these.
#   bash docs/results/routing/run_d128.sh
# Writes $OUT/routing_d128.{md,json} and $OUT/routing_d128_runs.tar.gz (result.json, metrics.csv and logs).
source docs/results/fidelity/gpu_env.sh
root=/tmp/routing
start_runs $root
for job in mom:1.0e-2 mom_noshared:1.0e-2 mom_m8:2.2e-3 mom_m8_noshared:2.2e-3; do
  m=${job%%:*} lr=${job#*:}
  for seed in 0 1 2; do
    timeout ${RUN_LIMIT_S:-420} python -m sandbox.train experiment=zoology output_root=$root callbacks.progress=lines \
      model=$m model.d_model=128 optim.lr=$lr seed=$seed trainer.max_steps=3000 > $root/logs/$m-$seed.log 2>&1 &
  done
done
finish_runs $root "$OUT/routing_d128_runs.tar.gz"
python -m sandbox.recall_routing $root --device cuda --limit 2000 --json $OUT/routing_d128.json > $OUT/routing_d128.md
cat $OUT/routing_d128.md
