"""`sandbox-bench quickstart`: the README's first command, timed, with its accuracy targets checked.

Runs `sandbox-train -m experiment=quickstart` in a fresh output folder, then prints the wall time and
each model's test accuracy against the targets (at most 300 s; attention and MoM at least 0.99).
The numbers are also written to `bench.json` in the output folder (wall time, machine, per-model steps and
accuracy, the targets missed). Exit code 1 when a target is missed.
"""

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sandbox.results import collect_results, git_commit, write_json_atomic

TIME_LIMIT_S = 300
ACCURACY_TARGETS = {"attention": 0.99, "mom": 0.99}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sandbox-bench quickstart", description=__doc__.splitlines()[0])
    parser.add_argument("--output-root", type=Path, default=None, help="default: a new temporary folder")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = parser.parse_args(argv)
    root = args.output_root or Path(tempfile.mkdtemp(prefix="quickstart-"))
    command = [sys.executable, "-m", "sandbox.train", "-m", "experiment=quickstart", f"output_root={root}",
               *args.overrides]
    start = time.perf_counter()
    proc = subprocess.run(command, check=False)
    wall = time.perf_counter() - start
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
