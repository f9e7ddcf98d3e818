#!/usr/bin/env bash
# Why tied embeddings stop attention and untied ones stop the linear models (issue 17): 14 runs packed on one
# H200, MQAR V = 8192 at (L 256, K 16) and (L 512, K 64), 40k training examples each, d_model 64, 2 layers,
# batch 64, 2500 steps, validation every 250. Variants: the default init, `model.init_std=0.02` (every linear
# N(0, 0.02), output projections scaled), `model.center_embeddings=true`, tied or untied.
# Round 2 (after round 1 showed that neither the init nor centring the embedding lets tied attention learn):
# untied with the output layer initialised as a copy of the embedding (`model.head_init=embedding`), and tied
# with the output loss not training the embedding (`model.detach_head=true`); the other rules' baselines.
# Both rounds ran before the fixes became the defaults: the runs name the defaults of that time
# (`model.init_std=null`: PyTorch's init; `qk_norm=false`: attention without the q, k norm).
# Run from the repo root on the GPU machine: bash docs/results/fidelity/diagnose.sh ROUND  (writes
# $OUT/diagnose_ROUND.tar.gz)
round=${1:?give the round, 1 or 2}
source docs/results/fidelity/gpu_env.sh
root=/tmp/diag$round
common=(experiment=diagnose output_root=$root callbacks.progress=lines)
runs_1=(
  "model=attention optim.lr=1e-3 model.init_std=null model.mixer_options.qk_norm=false"
  "model=attention optim.lr=1e-3 model.init_std=0.02 model.mixer_options.qk_norm=false"
  "model=attention optim.lr=1e-3 model.center_embeddings=true model.init_std=null model.mixer_options.qk_norm=false"
  "model=attention optim.lr=1e-3 model.center_embeddings=true model.init_std=0.02 model.mixer_options.qk_norm=false"
  "model=attention optim.lr=1e-3 model.tie_embeddings=false model.init_std=null model.mixer_options.qk_norm=false"
  "model=attention optim.lr=1e-3 model.tie_embeddings=false model.init_std=0.02 model.mixer_options.qk_norm=false"
  "model=gated_deltanet optim.lr=3e-3 model.init_std=null"
  "model=gated_deltanet optim.lr=3e-3 model.init_std=0.02"
  "model=gated_deltanet optim.lr=3e-3 model.center_embeddings=true model.init_std=null"
  "model=gated_deltanet optim.lr=3e-3 model.tie_embeddings=false model.init_std=null"
  "model=gated_deltanet optim.lr=3e-3 model.tie_embeddings=false model.init_std=0.02"
  "model=mom optim.lr=3e-3 seed=1 model.init_std=null"
  "model=mom optim.lr=3e-3 seed=1 model.init_std=0.02"
  "model=mom optim.lr=3e-3 seed=1 model.center_embeddings=true model.init_std=null"
)
copy="model.tie_embeddings=false model.head_init=embedding"
runs_2=(
  "model=attention optim.lr=1e-3 $copy model.init_std=null model.mixer_options.qk_norm=false"
  "model=attention optim.lr=3e-3 $copy model.init_std=null model.mixer_options.qk_norm=false"
  "model=attention optim.lr=1e-3 model.detach_head=true model.init_std=null model.mixer_options.qk_norm=false"
  "model=gated_deltanet optim.lr=3e-3 $copy model.init_std=null"
  "model=gated_deltanet optim.lr=1e-3 $copy model.init_std=null"
  "model=gated_deltanet optim.lr=3e-3 model.detach_head=true model.init_std=null"
  "model=mom optim.lr=3e-3 seed=1 $copy model.init_std=null"
  "model=mom optim.lr=3e-3 seed=0 $copy model.init_std=null"
  "model=mom optim.lr=3e-3 seed=1 model.detach_head=true model.init_std=null"
  "model=mom optim.lr=3e-3 seed=0 model.init_std=null"
  "model=gla optim.lr=3e-3 model.init_std=null"
  "model=gla optim.lr=3e-3 $copy model.init_std=null"
  "model=deltanet optim.lr=3e-3 model.init_std=null"
  "model=deltanet optim.lr=3e-3 $copy model.init_std=null"
  "model=linear_attention optim.lr=3e-3 model.init_std=null"
  "model=linear_attention optim.lr=3e-3 $copy model.init_std=null"
)
declare -n runs=runs_$round
start_runs $root
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for i in "${!runs[@]}"; do
  # shellcheck disable=SC2086
  timeout ${RUN_LIMIT_S:-540} python -m sandbox.train "${common[@]}" ${runs[$i]} > $root/logs/run$i.log 2>&1 &
done
finish_runs $root "$OUT/diagnose_$round.tar.gz"
