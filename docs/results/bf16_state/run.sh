# Kept as it ran: from a copy of 218a3c2 whose _gpu/bf16.patch is `git diff 218a3c2 7b2137d -- kernels`.
# issue 20: the MoM layer and the chunked ops at main (head) and with the chunk states in bf16 (the variant), alternated
source docs/results/fidelity/gpu_env.sh
mkdir -p /tmp/v && tar --exclude=./.whl --exclude=./docs --exclude=./.git -cf - . | (cd /tmp/v && tar xf -) && (cd /tmp/v && patch -p1 -s < _gpu/bf16.patch) && echo patched
for round in 1 2; do
  for tree in $PWD /tmp/v; do
    name=$([ $tree = $PWD ] && echo main || echo bf16)
    (cd $tree && PYTHONPATH=/tmp/site:$tree timeout 120 python -m sandbox.bench.mom --no-fla --json $OUT/mom_${name}_$round.json > $OUT/mom_${name}_$round.log 2>&1; echo "mom $name $round: exit $?")
  done
done
for tree in $PWD /tmp/v; do
  name=$([ $tree = $PWD ] && echo main || echo bf16)
  (cd $tree && PYTHONPATH=/tmp/site:$tree timeout 100 python -m sandbox.bench.kernels --no-fla --json $OUT/kernels_$name.json > $OUT/kernels_$name.log 2>&1; echo "kernels $name: exit $?")
done
grep -h -v "Warn\|warn" $OUT/mom_*_1.log | tail -30
