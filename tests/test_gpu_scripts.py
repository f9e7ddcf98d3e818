"""The shell scripts that run the committed GPU measurements (docs/results/) parse; `run_limit`, which decides
how long a packed run may train and whether it starts at all, gives the limits it documents; and packed runs that
ran out of GPU memory run again. Device time is scarce: a script that fails there costs a command.
"""

import re
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GPU_ENV = REPO / "docs" / "results" / "fidelity" / "gpu_env.sh"
SCRIPTS = sorted(str(p.relative_to(REPO)) for p in (REPO / "docs" / "results").rglob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses(script):
    done = subprocess.run(["bash", "-n", script], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def run_limit(elapsed_s: int, **env: str) -> tuple[int, str, str]:
    """run_limit of gpu_env.sh (its definition alone: sourcing the file installs packages) `elapsed_s` after
    start_runs, with the given variables: exit status, stdout, stderr."""
    function = re.search(r"^run_limit\(\) \{.*?^\}", GPU_ENV.read_text(), re.S | re.M).group(0)
    assignments = " ".join(f"{name}={value}" for name, value in env.items())
    script = f"{function}\nruns_start=$(( {int(time.time())} - {elapsed_s} ))\n{assignments}\nrun_limit"
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    return done.returncode, done.stdout.strip(), done.stderr.strip()


@pytest.mark.parametrize(("elapsed", "env", "limit"), [
    (0, {}, "540"),                                    # RUN_LIMIT_S's default
    (0, {"RUN_LIMIT_S": "30"}, "30"),                  # a short limit given is kept
    (100, {"STOP_AFTER_S": "500"}, "400"),             # STOP_AFTER_S comes first
    (0, {"STOP_AFTER_S": "900", "RUN_LIMIT_S": "300"}, "300"),
])
def test_run_limit_gives_the_seconds_a_run_may_take(elapsed, env, limit):
    status, out, _ = run_limit(elapsed, **env)
    assert (status, out) == (0, limit)


@pytest.mark.parametrize(("elapsed", "env", "named"), [
    (450, {"STOP_AFTER_S": "500"}, "under a minute left"),
    (0, {"RUN_LIMIT_S": "9m"}, "RUN_LIMIT_S=9m is invalid"),
    (0, {"STOP_AFTER_S": "8m"}, "STOP_AFTER_S=8m is invalid"),
])
def test_run_limit_starts_no_run_and_says_why(elapsed, env, named):
    status, out, err = run_limit(elapsed, **env)
    assert status != 0 and out == "" and named in err


def test_runs_that_ran_out_of_gpu_memory_run_once_more_at_the_end(tmp_path):
    """docs/results/zoology/run.sh with gpu_env.sh's functions (not its package install) and a `python` that
    fails seed 1's first run the way CUDA does when packed runs fill the card."""
    functions = GPU_ENV.read_text().split("\nexport PYTHONPATH=", 1)[1].split("\n", 1)[1]
    for script, text in [("docs/results/fidelity/gpu_env.sh", functions),
                         ("docs/results/zoology/run.sh", (REPO / "docs/results/zoology/run.sh").read_text()),
                         ("bin/python", '#!/usr/bin/env bash\necho "$*" >> "$CALLS"\n'
                                        'if [[ "$*" == *seed=1* && ! -e "$CALLS.oom" ]]; then touch "$CALLS.oom"\n'
                                        '  echo "torch.OutOfMemoryError: CUDA out of memory"; exit 1; fi\n'
                                        'echo "sandbox-train: run: best val acc 0.99, test acc 0.99"\n')]:
        (tmp_path / script).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / script).write_text(text)
    (tmp_path / "bin/python").chmod(0o755)
    calls = tmp_path / "calls"
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "OUT": str(tmp_path), "ROOT": str(tmp_path / "runs"),
           "CALLS": str(calls), "MAX_PROCS": "2"}
    done = subprocess.run(["bash", "docs/results/zoology/run.sh", "64", "0,1,2", "attention:1.0e-3"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seeds = sorted(re.search(r"seed=(\d)", line).group(1) for line in calls.read_text().splitlines())
    assert seeds == ["0", "1", "1", "2"]
    assert "out of GPU memory, run again: attention:1.0e-3:1" in done.stdout
