# Width 64 at 6000 steps: seeds 1, 2 at the rates that seed 0 chose at 6000 steps where they differ from the 3000-step
# choice (all 14 at once under MPS).
mkdir -p $OUT/s
ROOT=/tmp/g64s MAX_PROCS=14 STOP_AFTER_S=${STOP_AFTER_S:-320} OUT=$OUT/s bash docs/results/zoology/run.sh 64 1,2 \
  attention:2.2e-3 deltanet:4.6e-4 gated_deltanet:4.6e-4 mom_m2:2.2e-3 mom:2.2e-3 mom_m8_noshared:1.0e-2 mom_m8:4.6e-4 \
  > $OUT/s.out 2>&1
grep -v "USDT\|Warning\|warn(" $OUT/s.out | tail -n 20
