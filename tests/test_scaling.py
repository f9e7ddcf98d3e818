"""Past one process: one run on two processes (Lightning DDP on the CPU), a study shared through PostgreSQL by
two "machines", and four workers on one sqlite study with one of them killed mid-trial."""

import glob
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import optuna
import pytest
import yaml
from hydra import compose, initialize_config_dir
from optuna.trial import TrialState
from rich.console import Console

from sandbox.report import report
from sandbox.sweep import WORKER_LOST, open_storage
from sandbox.train import CONF_DIR, train

REPO = Path(__file__).resolve().parent.parent
FAST = ["debug=fast", "task.limit_examples=64", "model.n_layers=1"]


def test_ddp_on_two_cpu_processes_matches_one_process(tmp_path):
    """trainer=ddp with two processes: each trains on half of every global batch and evaluates half of the
    sets, so the run takes the same steps on the same batches as one process and ends at the same loss."""
    overrides = ["model=mom", "model.n_layers=1", "task.params.vocab_size=64", "task.limit_examples=256",
                 "trainer.max_epochs=2", "optim.lr=3e-2"]
    proc = subprocess.run([sys.executable, "-m", "sandbox.train", *overrides, "trainer=ddp",
                           "trainer.accelerator=cpu", "trainer.devices=2", "callbacks.progress=none",
                           f"output_root={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result_file,) = tmp_path.rglob("result.json")
    assert proc.stdout.count("best val acc") == 1  # one process speaks, one writes
    ddp = json.loads(result_file.read_text())
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*overrides, "callbacks.progress=none"])
    one = train(cfg, tmp_path / "one_process")
    assert ddp["steps"] == one["steps"] == 8 and ddp["epochs"] == one["epochs"]
    assert one["test_loss"] < 4.1  # below chance (ln 64 = 4.16): the runs moved, so the match means something
    assert ddp["test_loss"] == pytest.approx(one["test_loss"], rel=1e-4)
    assert ddp["best_val_acc"] == pytest.approx(one["best_val_acc"], abs=1e-3)


# ---- a study shared through PostgreSQL ----
def postgres_bin() -> Path | None:
    found = shutil.which("pg_ctl") or max(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), default=None)
    return Path(found).resolve().parent if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url():
    """A throw-away PostgreSQL server on loopback. It refuses to run as root: as root it runs as the
    `postgres` user that the system package creates."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binary (pg_ctl) on this machine; .ci/run installs the postgresql package")
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="sandbox-pg-"))
    if as_user:
        shutil.chown(folder, "postgres")
    data, port = folder / "data", free_port()
    subprocess.run([*as_user, bin_dir / "initdb", "-D", data, "-U", "sandbox", "--auth=trust"], check=True,
                   capture_output=True, timeout=120)
    subprocess.run([*as_user, bin_dir / "pg_ctl", "-D", data, "-l", folder / "log", "-w", "-o",
                    f"-h 127.0.0.1 -p {port} -k {folder}", "start"], check=True, capture_output=True, timeout=120)
    try:
        yield f"postgresql+psycopg://sandbox@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, bin_dir / "pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True,
                       timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


def sweep_command(root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sandbox.sweep", "--output-root", str(root), *extra, *FAST]


def assert_each_trial_ran_once(trials: list) -> None:
    """Every finished trial has its own run folder with its own result; no run folder has two trials."""
    run_dirs = [Path(t.user_attrs["run_dir"]) for t in trials]
    assert len(set(run_dirs)) == len(run_dirs)
    for trial, run_dir in zip(trials, run_dirs):
        if trial.state == TrialState.COMPLETE:
            result = json.loads((run_dir / "result.json").read_text())
            assert result["best_val_acc"] == trial.value
            assert result["config"]["model"]["mixer_options"]["top_k"] == trial.params["top_k"]


def test_two_machines_share_a_postgresql_study(postgres_url, tmp_path):
    """Two sweep commands, each with its own output folder (as on two machines), one storage URL."""
    machines = [subprocess.Popen(sweep_command(tmp_path / f"machine{i}", "--storage", postgres_url,
                                               "--n-trials", "4", "--worker-index", str(i)),
                                 cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for i in range(2)]
    outputs = [m.communicate(timeout=600) for m in machines]
    for machine, (_, err) in zip(machines, outputs):
        assert machine.returncode == 0, err[-3000:]
    trials = optuna.load_study(study_name="routing", storage=postgres_url).get_trials()
    # Both may start a last trial at the same moment: at most one more than asked for.
    assert 4 <= len(trials) <= 5
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert_each_trial_ran_once(trials)
    # Both machines ran trials, each in its own output folder.
    assert {Path(t.user_attrs["run_dir"]).parents[3].name for t in trials} == {"machine0", "machine1"}


# ---- load: four workers on one sqlite study ----
def test_four_workers_on_sqlite_one_killed_mid_trial(tmp_path):
    """`--workers 4` on the default sqlite study: no "database is locked", every trial completes or fails
    with a reason. One worker is killed mid-trial once a trial has finished: the finished trials stay as they
    were, the killed one is failed when its heartbeat is stale and run again once, nothing stays RUNNING."""
    space = yaml.safe_load((CONF_DIR / "sweep" / "routing.yaml").read_text())
    space["heartbeat"] = {"interval_s": 1, "grace_s": 3}
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(space))
    command = sweep_command(tmp_path, "--space", str(space_file), "--n-trials", "6", "--workers", "4")
    sweep = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    db = tmp_path / "sweeps" / "routing" / "study.db"
    storage = f"sqlite:///{db}"
    deadline = time.time() + 400
    while time.time() < deadline:
        try:  # open_storage: this test races the workers to create the new database's tables, as they race
            trials = (optuna.load_study(study_name="routing", storage=open_storage(storage, space["heartbeat"]))
                      .get_trials() if db.exists() else [])
        except KeyError:  # the study is being created
            trials = []
        finished = [t for t in trials if t.state == TrialState.COMPLETE]
        running = [t for t in trials if t.state == TrialState.RUNNING and "worker" in t.user_attrs]
        if finished and running:
            break
        time.sleep(0.5)
    else:
        pytest.fail("never saw a finished trial and a running one")
    killed = max(running, key=lambda t: t.datetime_start)  # the one with the most left to run
    os.kill(int(killed.user_attrs["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
    finished_files = {t.number: Path(t.user_attrs["run_dir"], "result.json").read_bytes() for t in finished}
    out, err = sweep.communicate(timeout=600)
    # the study ends whole, and the sweep says that a worker died
    assert sweep.returncode == 1, err[-3000:]
    assert re.fullmatch(r"sandbox-sweep: error: worker \d exited with code -9; the study holds the other workers' "
                        r"trials", err.strip().splitlines()[-1]), err[-3000:]
    assert "database is locked" not in err

    trials = optuna.load_study(study_name="routing", storage=storage).get_trials()
    assert not [t for t in trials if t.state not in (TrialState.COMPLETE, TrialState.FAIL)]
    for trial in trials:
        if trial.state == TrialState.FAIL and trial.number != killed.number:
            assert trial.user_attrs["fail_reason"]
    assert trials[killed.number].state == TrialState.FAIL
    assert f"trial {killed.number} failed: {WORKER_LOST}" in out
    retries = [t for t in trials
               if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == killed.number]
    assert len(retries) == 1 and retries[0].params == killed.params
    # The retry ran once more, to the end. Its training may fail like any trial's (once in CI, for a reason
    # that run did not keep): then it must say why, not be lost, and the reason shows in the test summary.
    retry = retries[0]
    if retry.state == TrialState.FAIL:
        assert retry.user_attrs.get("fail_reason") and f"trial {retry.number} failed: {WORKER_LOST}" not in out
        warnings.warn(f"the retried trial failed in training: {retry.user_attrs['fail_reason']}", stacklevel=1)
    else:
        assert retry.state == TrialState.COMPLETE, out
    for number, contents in finished_files.items():
        assert trials[number].state == TrialState.COMPLETE
        assert Path(trials[number].user_attrs["run_dir"], "result.json").read_bytes() == contents
    assert_each_trial_ran_once(trials)
    # the report gives the killed trial the reason the sweep gave it
    markdown = report(tmp_path / "sweeps" / "routing", tmp_path / "report", console=Console(file=io.StringIO()))
    assert f"trial {killed.number} failed: {WORKER_LOST}" in markdown["markdown"].read_text()
    # the 6 trials (the killed one and its retry counting once) completed, bar a failed retry
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) >= 5 + (retry.state == TrialState.COMPLETE)
