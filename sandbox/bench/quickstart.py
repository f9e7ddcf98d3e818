"""`sandbox-bench quickstart`: the README's first command, timed, with its accuracy targets checked.

Runs `sandbox-train -m experiment=quickstart` in a fresh output folder, then prints the wall time and
each model's test accuracy against the targets (at most 300 s; attention and MoM at least 0.99).
The numbers are also written to `bench.json` in the output folder (wall time, machine, per-model steps and
accuracy, the targets missed). Exit code 1 when a target is missed; 2, with nothing run or written, for a bad
override or output folder.
"""

import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from sandbox.bench import set_by_bench
from sandbox.results import (
    collect_results,
    folder_problem,
    git_commit,
    path_argument,
    write_json_atomic,
    write_problem,
)
from sandbox.train import CONF_DIR, ConfigError, check_settings, one_line
from tasks.cli import OneLineParser

TIME_LIMIT_S = 300
ACCURACY_TARGETS = {"attention": 0.99, "mom": 0.99}
# The settings the command runs with, and why an override of one cannot stand: it would time another command
# than the README's, or put the runs where the bench does not read them.
SET_BY_BENCH = {"experiment": "it times experiment=quickstart", "output_root": "use --output-root",
                "name": "it reads the runs from <output-root>/quickstart",
                "hydra.sweeper.params.model": "it times and checks every model of experiment=quickstart"}


def check(args) -> None:
    """The output folder, and the overrides composed and checked as sandbox-train checks them (on the default
    model; a setting only another model refuses stops sandbox-train itself, with exit code 2)."""
    problem = args.output_root and folder_problem(args.output_root)
    if problem:
        raise ConfigError(f"--output-root {args.output_root} is invalid: {problem}")
    problem = args.output_root and write_problem(args.output_root)
    if problem:
        raise ConfigError(f"--output-root {args.output_root} cannot be written ({problem})")
    runs = args.output_root and Path(args.output_root) / "quickstart"
    if runs and runs.is_dir() and any(runs.iterdir()):
        # sandbox-train returns a finished run as it is and resumes an interrupted one: the time would be seconds,
        # and the accuracies those of runs it did not train
        raise ConfigError(f"--output-root {args.output_root} is invalid: {runs} already holds runs, which "
                          "sandbox-train would return or resume instead of training them; give a new or empty folder")
    problem = set_by_bench(args.overrides, SET_BY_BENCH)
    if problem:
        raise ConfigError(problem)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        check_settings(compose(config_name="train", overrides=["experiment=quickstart", *args.overrides]))


def main(argv: list[str]) -> int:
    parser = OneLineParser(prog="sandbox-bench quickstart", description=__doc__.splitlines()[0])
    parser.add_argument("--output-root", type=path_argument, default=None, help="default: a new temporary folder")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = parser.parse_args(argv)
    try:
        check(args)
    except (ConfigError, HydraException, OmegaConfBaseException) as err:
        print(f"sandbox-bench quickstart: error: {one_line(err)}", file=sys.stderr)
        return 2
    root = args.output_root or Path(tempfile.mkdtemp(prefix="quickstart-"))
    command = [sys.executable, "-m", "sandbox.train", "-m", "experiment=quickstart", f"output_root={root}",
               *args.overrides]
    start = time.perf_counter()
    proc = subprocess.run(command, check=False)
    wall = time.perf_counter() - start
    if proc.returncode == 2:  # a bad setting, said by sandbox-train on one line: no benchmark to record
        print("sandbox-bench quickstart: error: sandbox-train refused a setting (above)", file=sys.stderr)
        return 2
    results = {r["config"]["model"]["mixer"]: r for r in collect_results(root / "quickstart")}
    print(f"quickstart: exit code {proc.returncode}, wall time {wall:.0f} s (target <= {TIME_LIMIT_S} s), "
          f"runs in {root / 'quickstart'}")
    missed = ([] if wall <= TIME_LIMIT_S else ["wall time"]) + ([] if proc.returncode == 0 else ["exit code"])
    for mixer, result in sorted(results.items()):
        target = ACCURACY_TARGETS.get(mixer)
        line = (f"  {mixer:16s} test acc {result['test_acc']:.4f}  steps {result['steps']:5d}  "
                f"train wall {result['wall_time_s']:.0f} s")
        if target is not None:
            ok = result["test_acc"] >= target
            line += f"  (target >= {target}: {'met' if ok else 'MISSED'})"
            missed += [] if ok else [mixer]
        print(line)
    missed += [m for m in ACCURACY_TARGETS if m not in results]
    print("all targets met" if not missed else f"targets missed: {missed}")
    (root / "quickstart").mkdir(parents=True, exist_ok=True)  # absent when the command failed before its runs
    write_json_atomic(root / "quickstart" / "bench.json", {
        "wall_time_s": wall, "time_limit_s": TIME_LIMIT_S, "exit_code": proc.returncode, "missed": missed,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "git_commit": git_commit(),
        "runs": {m: {k: r[k] for k in ("steps", "test_acc", "wall_time_s", "backend")} for m, r in results.items()},
    })  # fmt: skip
    return 1 if missed else 0
