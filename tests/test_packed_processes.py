"""`hydra.launcher.processes`: the jobs of `sandbox-train -m` trained in several processes at once
(hydra_plugins/sandbox_launcher/launcher.py), on the CPU here: each run ends as it does one at a time, a signal
to the launcher interrupts every run with its checkpoint, and a process that dies fails its own job only."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_stacked_run import REPO, SMALL, assert_same_run, sandbox_train

GRID = ("model=attention,gated_deltanet", "seed=0", "hydra.launcher.stack=false")
# two runs of one speed, long enough to be signalled after their first checkpoints (step 10), short enough to
# resume to the end
LONG = ("model=gated_deltanet", "seed=0,1", "hydra.launcher.stack=false", "trainer.max_steps=100",
        "callbacks.early_stopping.threshold=1.0")


def results(root: Path) -> dict[str, dict]:
    """The results of the runs below root that wrote one."""
    return {d.parent.name: json.loads(d.read_text()) for d in sorted((root / "train").glob("*/result.json"))}


def test_packed_jobs_end_as_the_same_jobs_one_at_a_time(tmp_path):
    packed = sandbox_train(tmp_path / "packed", *GRID, "hydra.launcher.processes=2")
    alone = sandbox_train(tmp_path / "alone", *GRID, "hydra.launcher.processes=1")
    for done in (packed, alone):
        assert done.returncode == 0, done.stderr[-2000:]
    assert packed.stdout.count("best val acc") == 2
    packed_results, alone_results = results(tmp_path / "packed"), results(tmp_path / "alone")
    assert len(alone_results) == 2 and packed_results.keys() == alone_results.keys()
    for name, alone_result in alone_results.items():
        assert_same_run(alone_result, packed_results[name], tmp_path / "alone" / "train" / name,
                        tmp_path / "packed" / "train" / name)


def start(tmp_path: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sandbox.train", "-m", *SMALL, f"output_root={tmp_path}",
                             "hydra.launcher.processes=2", *overrides],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoints(tmp_path: Path, count: int) -> None:
    deadline = time.monotonic() + 300
    while len(list(tmp_path.glob("train/*/checkpoints/last.ckpt"))) < count:
        assert time.monotonic() < deadline, "the packed runs wrote no checkpoints"
        time.sleep(0.2)


def training_processes(parent: int) -> list[int]:
    """The processes that `parent` spawned to train (not multiprocessing's own helpers)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def test_sigterm_to_the_launcher_interrupts_every_packed_run_and_the_same_command_resumes(tmp_path):
    proc = start(tmp_path, *LONG)
    wait_for_checkpoints(tmp_path, 2)
    proc.send_signal(signal.SIGTERM)  # to the launcher only, as a scheduler that signals one process
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert [r["status"] for r in results(tmp_path).values()] == ["interrupted"] * 2

    resumed = start(tmp_path, *LONG)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert out.count("resuming from") == 2
    ends = [(r["status"], r["resumed"], r["steps"]) for r in results(tmp_path).values()]
    assert ends == [("finished", True, 100)] * 2


def test_a_packed_process_that_dies_fails_its_own_job_only(tmp_path):
    proc = start(tmp_path, *LONG)
    wait_for_checkpoints(tmp_path, 2)
    victim = training_processes(proc.pid)[0]
    os.kill(victim, signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-3000:]
    assert "ended without a result (exit code -9)" in err
    assert out.count("best val acc") == 1  # the other run finished
    assert [r["status"] for r in results(tmp_path).values()] == ["finished"]


def patched(tmp_path: Path, code: str) -> dict:
    """The environment of a command whose launcher and packed processes first run `code` (a sitecustomize)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(code)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


SHORT = ("model=gated_deltanet", "seed=0,1", "hydra.launcher.stack=false", "trainer.max_steps=20")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_jobs_are_prepared_stops_before_any_trains(signum, tmp_path):
    """Ctrl-C or SIGTERM while the launcher composes and checks the jobs: it was a KeyboardInterrupt traceback (or
    a bogus one-line error, exit 2, where it landed inside OmegaConf) and SIGTERM killed the launcher, leaving the
    jobs' folders; now the command stops as interrupted, nothing trained, no job's folder left."""
    env = patched(tmp_path, f"""
import os
import sandbox.settings
check = sandbox.settings.check_settings
def signalled(cfg):  # as the launcher checks its first job
    if os.environ.pop("SIGNAL_IN_CHECK", None):
        os.kill(os.getpid(), {int(signum)})
    check(cfg)
sandbox.settings.check_settings = signalled
""")
    env["SIGNAL_IN_CHECK"] = "1"
    done = subprocess.run([sys.executable, "-m", "sandbox.train", "-m", *SMALL, f"output_root={tmp_path}",
                           "hydra.launcher.processes=2", *SHORT], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 128 + signum, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "before any job trained" in done.stderr, done.stderr[-3000:]
    assert not list(tmp_path.glob("train/*/")), "a job's folder was left"


def test_sigterm_as_the_launcher_starts_a_process_interrupts_it_and_the_same_command_resumes(tmp_path):
    """SIGTERM to the launcher just after it started its first packed process, before that process was among those
    it passes signals on to: the process was not told, and its run trained on to its end. Now it is stopped too,
    and the same command trains both runs."""
    env = patched(tmp_path, """
import os, signal
from multiprocessing.context import SpawnProcess
start = SpawnProcess.start
def signalled(self):
    start(self)
    if os.environ.pop("SIGNAL_AS_IT_STARTS", None):
        os.kill(os.getpid(), signal.SIGTERM)
SpawnProcess.start = signalled
""")
    command = [sys.executable, "-m", "sandbox.train", "-m", *SMALL, f"output_root={tmp_path}",
               "hydra.launcher.processes=2", *SHORT]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**env, "SIGNAL_AS_IT_STARTS": "1"},
                           timeout=300)
    assert first.returncode == 128 + signal.SIGTERM, first.stderr[-3000:]
    assert "best val acc" not in first.stdout
    assert all(r["status"] == "interrupted" for r in results(tmp_path).values()), results(tmp_path)
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [r["status"] for r in results(tmp_path).values()] == ["finished"] * 2


def test_a_job_that_fails_in_a_packed_process_shows_its_traceback(tmp_path):
    """Run one at a time, a failing job's traceback names where it failed; packed, only `RuntimeError: RuntimeError:
    injected crash` and the launcher's frames came back (the traceback is in no result.json either). Lightning's
    info lines, silenced by the job's logging settings one at a time, are silenced in the packed processes too."""
    env = patched(tmp_path, """
import sandbox.module
real = sandbox.module.RecallModule.training_step
def crashing_step(self, batch, batch_idx):
    if self.global_step == 3 and "seed=1" in str(self.trainer.default_root_dir):
        raise RuntimeError("injected crash")
    return real(self, batch, batch_idx)
sandbox.module.RecallModule.training_step = crashing_step
""")
    done = subprocess.run([sys.executable, "-m", "sandbox.train", "-m", *SMALL, f"output_root={tmp_path}",
                           "hydra.launcher.processes=2", *SHORT], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "in crashing_step" in done.stderr and "RuntimeError: injected crash" in done.stderr, done.stderr[-3000:]
    assert done.stdout.count("best val acc") == 1
    assert sorted(r["status"] for r in results(tmp_path).values()) == ["failed", "finished"]
    assert "GPU available" not in done.stdout + done.stderr


def test_a_multirun_given_again_returns_its_ended_runs_without_starting_processes(tmp_path):
    """Resuming a packed grid: the runs that ended are returned by the launcher itself; each used to get a process
    of its own, whose start and imports cost 15-25 s on the GPU machine (two minutes of idle GPU for a grid of 48).
    The runs left to train still get one each."""
    counted = patched(tmp_path, """
import os
from multiprocessing.context import SpawnProcess
start = SpawnProcess.start
def counted(self):
    with open(os.environ["STARTS"], "a") as starts:
        starts.write("start\\n")
    start(self)
SpawnProcess.start = counted
""")
    starts = tmp_path / "starts"
    grid = ["model=gated_deltanet", "seed=0,1,2,3", "hydra.launcher.stack=false", "trainer.max_steps=20"]
    first = sandbox_train(tmp_path, *grid, "hydra.launcher.processes=2")
    assert first.returncode == 0, first.stderr[-2000:]
    for seed in (2, 3):  # as runs whose command was killed before they recorded their end
        (next((tmp_path / "train").glob(f"*seed={seed}*")) / "result.json").unlink()
    again = subprocess.run([sys.executable, "-m", "sandbox.train", "-m", *SMALL, f"output_root={tmp_path}", *grid,
                            "hydra.launcher.processes=2"], cwd=REPO, capture_output=True, text=True,
                           env={**counted, "STARTS": str(starts)}, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("already finished") == 2 and again.stdout.count("best val acc") == 4
    assert starts.read_text().split() == ["start"] * 2
    assert [r["status"] for r in results(tmp_path).values()] == ["finished"] * 4


@pytest.mark.parametrize("processes", [1, 2])
def test_every_failed_job_is_named_and_the_exit_code_is_the_highest_end(processes, tmp_path):
    """Hydra raises the error of the first failed job alone, once every job has ended: a second failed job was said
    nowhere (its result.json alone said so), a bad setting that a job found in training was never printed, and the
    command exited 1 past a diverged job's 3 (the highest exit code of the runs, as sandbox-train's main says).
    Now each failed job is named in a line, the bad setting is said, and the exit code is the highest."""
    env = patched(tmp_path, """
import sandbox.module
import sandbox.train
from sandbox.settings import ConfigError
real_step = sandbox.module.RecallModule.training_step
def step(self, batch, batch_idx):
    where = str(self.trainer.default_root_dir)
    if self.global_step == 3 and ("model=gated_deltanet," in where or "model=deltanet," in where):
        raise RuntimeError("injected crash")
    loss = real_step(self, batch, batch_idx)
    return loss * float("nan") if self.global_step == 3 and "model=mom," in where else loss
sandbox.module.RecallModule.training_step = step
real_train = sandbox.train.train
def train(cfg, run_dir, *args, **kwargs):
    if "model=attention," in str(run_dir):
        raise ConfigError(f"{run_dir}: injected bad setting")
    return real_train(cfg, run_dir, *args, **kwargs)
sandbox.train.train = train
""")
    done = subprocess.run([sys.executable, "-m", "sandbox.train", "-m", *SMALL, f"output_root={tmp_path}",
                           "model=attention,gated_deltanet,deltanet,mom", "hydra.launcher.stack=false",
                           "trainer.max_steps=20", f"hydra.launcher.processes={processes}"],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 3, done.stderr[-3000:]
    ends = {name: r["status"] for name, r in results(tmp_path).items()}
    assert sorted(ends.values()) == ["diverged", "failed", "failed"], ends
    lines = [line for line in done.stderr.splitlines() if line.startswith("sandbox-train: ")]
    for name, status in ends.items():
        if status == "failed":
            assert f"sandbox-train: {tmp_path / 'train' / name}: failed: RuntimeError: injected crash" in lines, lines
    assert any(line.startswith("sandbox-train: error: ") and line.endswith("injected bad setting") for line in lines)
    assert "Traceback" in done.stderr and "RuntimeError: injected crash" in done.stderr  # the first one's, as before
