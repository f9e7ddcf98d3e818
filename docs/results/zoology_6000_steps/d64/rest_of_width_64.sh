# Zoology width 64 at the 6000-step default, the runs the 6000-step folder lacks: every model at all four rates on
# seed 0, attention and linear attention on seeds 1, 2 at their 3000-step rates. Three run.sh side by side (one ROOT
# each) also check the MPS default on the real daemon: one daemon while they run, none after, users back to 0.
# Given again on the still-warm machine, it resumes the runs STOP_AFTER_S cut.
export STOP_AFTER_S=${STOP_AFTER_S:-530}
mkdir -p $OUT/a $OUT/b $OUT/c
ROOT=/tmp/g64a MAX_PROCS=6 OUT=$OUT/a bash docs/results/zoology/run.sh 64 0 \
  mom:1.0e-4 mom_m8:1.0e-4 mom_m2:1.0e-4 mom_noshared:1.0e-4 mom_m8_noshared:1.0e-4 mom_m2_noshared:1.0e-4 \
  mom:4.6e-4 mom_m8:4.6e-4 mom_m2:4.6e-4 mom_noshared:4.6e-4 mom_m8_noshared:4.6e-4 mom_m2_noshared:4.6e-4 \
  mom:2.2e-3 mom_m2:2.2e-3 mom_m8:1.0e-2 mom_noshared:1.0e-2 mom_m8_noshared:1.0e-2 mom_m2_noshared:1.0e-2 \
  > $OUT/a.out 2>&1 &
sleep 2
ROOT=/tmp/g64b MAX_PROCS=6 OUT=$OUT/b bash docs/results/zoology/run.sh 64 0 \
  gated_deltanet:1.0e-4 gated_deltanet_equal_state:1.0e-4 deltanet:1.0e-4 gla:1.0e-4 linear_attention:1.0e-4 attention:1.0e-4 \
  gated_deltanet:4.6e-4 gated_deltanet_equal_state:4.6e-4 deltanet:4.6e-4 gla:4.6e-4 linear_attention:4.6e-4 attention:4.6e-4 \
  gated_deltanet:1.0e-2 gated_deltanet_equal_state:2.2e-3 deltanet:1.0e-2 gla:1.0e-2 linear_attention:1.0e-2 attention:1.0e-2 \
  linear_attention:2.2e-3 attention:2.2e-3 \
  > $OUT/b.out 2>&1 &
sleep 2
ROOT=/tmp/g64c MAX_PROCS=3 OUT=$OUT/c bash docs/results/zoology/run.sh 64 1,2 attention:1.0e-2 linear_attention:2.2e-3 \
  > $OUT/c.out 2>&1 &
sleep 60; echo "MPS daemons while running: $(pgrep -fc nvidia-cuda-mps-control) users: $(cat /tmp/mps-users)"
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
wait
echo "MPS daemons after: $(pgrep -fc nvidia-cuda-mps-control) users: $(cat /tmp/mps-users)"
for f in a b c; do echo "== $f"; grep -v "USDT\|Warning\|warn(" $OUT/$f.out | tail -n 8; done
