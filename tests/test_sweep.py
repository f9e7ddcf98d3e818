"""Optuna searches: a tiny study, continuing it, failing trials, two workers, a killed worker."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import yaml
from optuna.trial import TrialState

from sandbox.sweep import main, parse_param
from sandbox.train import ConfigError

REPO = Path(__file__).resolve().parent.parent
FAST = ["debug=fast", "task.limit_examples=64", "model.n_layers=1"]


def load_study(root: Path, name: str = "routing") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{root / 'sweeps' / name / 'study.db'}")


def test_tiny_study_then_continue(tmp_path):
    assert main(["--space", "routing", "--n-trials", "3", "--output-root", str(tmp_path), *FAST]) == 0
    study = load_study(tmp_path)
    first = study.get_trials()
    assert [t.state for t in first] == [TrialState.COMPLETE] * 3
    for trial in first:
        assert trial.params["top_k"] <= trial.params["num_memories"]
        assert 0 <= trial.value <= 1
        assert (Path(trial.user_attrs["run_dir"]) / "result.json").exists()
    # Running again with a larger total continues the study: the old trials are kept, not repeated.
    assert main(["--space", "routing", "--n-trials", "4", "--output-root", str(tmp_path), *FAST]) == 0
    again = load_study(tmp_path).get_trials()
    assert len(again) == 4
    assert [(t.number, t.params, t.datetime_complete) for t in again[:3]] == \
        [(t.number, t.params, t.datetime_complete) for t in first]


def test_failing_trials_do_not_stop_the_study(tmp_path):
    args = ["--space", "routing", "--n-trials", "2", "--output-root", str(tmp_path),
            "--param", "optim.lr=choice:-1.0", *FAST]
    assert main(args) == 0
    trials = load_study(tmp_path).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 2
    assert all("optim.lr=-1.0" in t.user_attrs["fail_reason"] for t in trials)


def test_two_objectives_report_a_pareto_front(tmp_path, capsys):
    space = yaml.safe_load((REPO / "conf" / "sweep" / "routing.yaml").read_text())
    space.update(study_name="pareto", objectives=["best_val_acc", "state_size"])
    path = tmp_path / "pareto.yaml"
    path.write_text(yaml.safe_dump(space))
    assert main(["--space", str(path), "--n-trials", "2", "--output-root", str(tmp_path), *FAST]) == 0
    assert "Pareto front" in capsys.readouterr().out
    study = load_study(tmp_path, "pareto")
    assert all(len(t.values) == 2 for t in study.get_trials(states=(TrialState.COMPLETE,)))


@pytest.mark.parametrize("args, named", [
    (["--space", "nope"], "--space"),
    (["--param", "optim.lr=float:1e-2:1e-4"], "optim.lr"),
    (["--param", "optim.lr=between:1:2"], "optim.lr"),
    (["--workers", "0"], "--workers"),
    (["--storage", "postgresql://nobody@127.0.0.1:1/none"], "--storage"),
    (["model.nope=1"], "nope"),
])
def test_bad_sweep_input_is_one_line_exit_2(args, named, tmp_path, capsys):
    assert main([*args, "--output-root", str(tmp_path), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0]


def test_empty_search_space_is_rejected(tmp_path, capsys):
    path = tmp_path / "empty.yaml"
    space = yaml.safe_load((REPO / "conf" / "sweep" / "routing.yaml").read_text())
    space["params"] = {}
    path.write_text(yaml.safe_dump(space))
    assert main(["--space", str(path), "--output-root", str(tmp_path)]) == 2
    assert "no params" in capsys.readouterr().err


def test_parse_param():
    assert parse_param("model.d_model=choice:64,128") == (
        "model.d_model", {"type": "categorical", "choices": [64, 128]})
    assert parse_param("optim.lr=float:1e-4:1e-2:log") == (
        "optim.lr", {"type": "float", "low": 1e-4, "high": 1e-2, "log": True})
    with pytest.raises(ConfigError):
        parse_param("optim.lr=float:1e-4")


def sweep_command(root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sandbox.sweep", "--output-root", str(root), *extra, *FAST]


def test_two_workers_share_one_study(tmp_path):
    proc = subprocess.run(sweep_command(tmp_path, "--n-trials", "4", "--workers", "2"), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    trials = load_study(tmp_path).get_trials()
    # Two workers may each start a last trial at the same moment: at most one extra.
    assert 4 <= len(trials) <= 5
    assert all(t.state == TrialState.COMPLETE for t in trials)
    run_dirs = [t.user_attrs["run_dir"] for t in trials]
    assert len(set(run_dirs)) == len(run_dirs)


def test_killed_worker_trial_is_failed_and_retried(tmp_path):
    space = yaml.safe_load((REPO / "conf" / "sweep" / "routing.yaml").read_text())
    space["heartbeat"] = {"interval_s": 1, "grace_s": 2}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    # trials of a few seconds (debug=fast ones take well under one), so that the poll below sees one running
    command = sweep_command(tmp_path, "--space", str(path), "--n-trials", "2", "task.limit_examples=1024",
                            "trainer.limit_train_batches=1.0")
    worker = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.time() + 300
    db = tmp_path / "sweeps" / "routing" / "study.db"
    while time.time() < deadline:
        try:
            # a running trial that has drawn all its parameters (one killed before is retried with new ones)
            running = load_study(tmp_path).get_trials(states=(TrialState.RUNNING,)) if db.exists() else []
            if any(len(t.params) == len(space["params"]) for t in running):
                break
        except (KeyError, sqlalchemy.exc.SQLAlchemyError):
            pass  # the database file exists before the worker has written its tables or the study into it
        time.sleep(0.5)
    else:
        pytest.fail("the worker never started a trial")
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    killed = load_study(tmp_path).get_trials(states=(TrialState.RUNNING,))[0]
    time.sleep(3)  # past the grace period: the trial's heartbeat is stale
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    trials = load_study(tmp_path).get_trials()
    assert trials[killed.number].state == TrialState.FAIL
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    retries = [t for t in trials
               if optuna.storages.RetryFailedTrialCallback.retried_trial_number(t) == killed.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == killed.params
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(completed) == 2
