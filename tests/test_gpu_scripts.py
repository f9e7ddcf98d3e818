"""The shell scripts that run the committed GPU measurements (docs/results/) parse, and `run_limit`, which decides
how long a packed run may train and whether it starts at all, gives the limits it documents. Device time is
scarce: a script that fails there costs a command.
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
