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
