"""`sandbox-bench packing`: several small runs at once on one device against one at a time.

Small models are launch-bound: one run leaves most of a GPU idle. `sandbox-sweep --workers N` packs N
trials on the device; this benchmark runs the same number of small runs (a random-seed study of one
small model) with 1 worker and with N, and prints runs per hour for each and their ratio.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def study_space(name: str, runs: int, overrides: list[str]) -> dict:
    return {"study_name": name, "objectives": ["best_val_acc"], "n_trials": runs,
            "sampler": {"name": "random", "seed": 0}, "pruner": {"name": "none"},
            "heartbeat": {"interval_s": 20, "grace_s": 60}, "overrides": overrides,
            "params": {"seed": {"key": "seed", "type": "int", "low": 0, "high": 999_999}}}


def timed_sweep(root: Path, name: str, runs: int, workers: int, overrides: list[str]) -> float:
    space = root / f"{name}.yaml"
    space.write_text(yaml.safe_dump(study_space(name, runs, overrides)))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sandbox.sweep", "--space", str(space), "--workers", str(workers),
                    "--output-root", str(root)], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sandbox-bench packing", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=8, help="runs in each measurement")
    parser.add_argument("--workers", type=int, default=4, help="runs at once in the packed measurement")
    parser.add_argument("overrides", nargs="*", default=[
        "model=gated_deltanet", "task.limit_examples=4000", "trainer.max_epochs=1"],
        help="the small run's Hydra overrides")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="packing-"))
    one = timed_sweep(root, "one-at-a-time", args.runs, 1, args.overrides)
    packed = timed_sweep(root, f"packed-{args.workers}", args.runs, args.workers, args.overrides)
    print(f"{args.runs} runs ({' '.join(args.overrides)})")
    print(f"  one at a time: {one:7.1f} s  {3600 * args.runs / one:8.1f} runs/hour")
    print(f"  {args.workers} at once:     {packed:7.1f} s  {3600 * args.runs / packed:8.1f} runs/hour")
    print(f"  packed / one at a time: {one / packed:.2f}x runs per hour")
    return 0
