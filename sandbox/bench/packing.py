"""`sandbox-bench packing`: several small runs at once on one device against one at a time.

Small models are launch-bound: one run leaves most of a GPU idle. `sandbox-sweep --workers N` packs N
trials on the device; this benchmark runs the same number of small runs (a random-seed study of one
small model) with 1 worker and with N, and prints runs per hour for each and their ratio.
"""

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from tasks.cli import OneLineParser


def study_space(name: str, runs: int, overrides: list[str]) -> dict:
    return {"study_name": name, "objectives": ["best_val_acc"], "n_trials": runs,
            "sampler": {"name": "random", "seed": 0}, "pruner": {"name": "none"},
            "heartbeat": {"interval_s": 20, "grace_s": 60}, "overrides": overrides,
            "params": {"seed": {"key": "seed", "type": "int", "low": 0, "high": 999_999}}}


def check(args) -> None:
    """The counts, and the study both measurements run, as sandbox-sweep checks it (its overrides composed and
    checked at both ends of the seed range): a ConfigError before any run."""
    from sandbox.sweep import check_space, check_trial_config
    from sandbox.train import ConfigError

    for name in ("runs", "workers"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} {getattr(args, name)} is invalid: must be >= 1")
    if args.workers > args.runs:  # the extra workers find no run: fewer at once than the row says
        raise ConfigError(f"--workers {args.workers} is invalid: must be <= --runs {args.runs}")
    space = study_space("check", args.runs, args.overrides)
    check_space(space)
    check_trial_config(space, [])


def timed_sweep(root: Path, name: str, runs: int, workers: int, overrides: list[str]) -> float | None:
    """Seconds the sweep took, or None when it failed (its own error is on stderr)."""
    space = root / f"{name}.yaml"
    space.write_text(yaml.safe_dump(study_space(name, runs, overrides)))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sandbox.sweep", "--space", str(space), "--workers", str(workers),
                           "--output-root", str(root)], check=False, stdout=subprocess.DEVNULL)
    if proc.returncode != 0:
        print(f"sandbox-bench packing: error: the sweep with {workers} worker(s) failed (exit code "
              f"{proc.returncode})", file=sys.stderr)
        return None
    return time.perf_counter() - start


def main(argv: list[str]) -> int:
    parser = OneLineParser(prog="sandbox-bench packing", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=8, help="runs in each measurement")
    parser.add_argument("--workers", type=int, default=4, help="runs at once in the packed measurement")
    parser.add_argument("overrides", nargs="*", default=[
        "model=gated_deltanet", "task.limit_examples=4000", "trainer.max_epochs=1"],
        help="the small run's Hydra overrides")
    args = parser.parse_args(argv)
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from sandbox.train import ConfigError, one_line

    try:
        check(args)
    except (ConfigError, HydraException, OmegaConfBaseException) as err:
        print(f"sandbox-bench packing: error: {one_line(err)}", file=sys.stderr)
        return 2
    # SIGTERM as an exception, as Ctrl-C is: subprocess.run then kills the sweep, and the folder goes either way
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    root = Path(tempfile.mkdtemp(prefix="packing-"))
    try:
        one = timed_sweep(root, "one-at-a-time", args.runs, 1, args.overrides)
        packed = None if one is None else timed_sweep(root, f"packed-{args.workers}", args.runs, args.workers,
                                                      args.overrides)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if packed is None:
        return 1
    print(f"{args.runs} runs ({' '.join(args.overrides)})")
    print(f"  one at a time: {one:7.1f} s  {3600 * args.runs / one:8.1f} runs/hour")
    print(f"  {args.workers} at once:     {packed:7.1f} s  {3600 * args.runs / packed:8.1f} runs/hour")
    print(f"  packed / one at a time: {one / packed:.2f}x runs per hour")
    return 0
