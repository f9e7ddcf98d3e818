"""Optuna searches: a tiny study, continuing it, failing trials, pruning, seeds per trial, bad input, two workers,
a killed worker, a signalled sweep."""

import contextlib
import hashlib
import json
import math
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import sqlalchemy
import yaml
from omegaconf import OmegaConf
from optuna.trial import TrialState

from sandbox import sweep
from sandbox.module import RecallModule
from sandbox.stacked_run import stack_problem
from sandbox.sweep import load_space, main, make_sampler, parse_param, suggest
from sandbox.train import ConfigError
from test_faults import IN_PRIVATE_MOUNT, private_mounts_work

REPO = Path(__file__).resolve().parent.parent
FAST = ["debug=fast", "task.limit_examples=64", "model.n_layers=1"]


def load_study(root: Path, name: str = "routing") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{root / 'sweeps' / name / 'study.db'}")


def test_continuing_a_study_proposes_new_trials(tmp_path):
    seen = []
    for total in (1, 2, 3):
        assert main(["--space", "routing", "--n-trials", str(total), "--output-root", str(tmp_path), *FAST]) == 0
        trials = load_study(tmp_path).get_trials()
        assert [t.state for t in trials] == [TrialState.COMPLETE] * total
        # The earlier trials are kept as they were, and the new one has parameters of its own.
        assert [(t.number, t.params, t.datetime_complete) for t in trials[:-1]] == seen
        assert trials[-1].params not in [params for _, params, _ in seen]
        seen.append((trials[-1].number, trials[-1].params, trials[-1].datetime_complete))
    for trial in trials:
        assert trial.params["top_k"] <= trial.params["num_memories"]
        assert 0 <= trial.value <= 1
        assert (Path(trial.user_attrs["run_dir"]) / "result.json").exists()


def test_samplers_are_seeded_by_worker_and_trials_so_far():
    space = load_space("routing", [])

    def first_proposal(worker: int, trials_so_far: int) -> dict:
        study = optuna.create_study(direction="maximize", sampler=make_sampler(space, worker, trials_so_far))
        return suggest(study.ask(), space["params"])

    assert first_proposal(0, 2) == first_proposal(0, 2)
    proposals = [json.dumps(first_proposal(w, n)) for w, n in ((0, 0), (0, 1), (1, 0), (1, 1))]
    assert len(set(proposals)) == len(proposals)


def test_failing_trials_do_not_stop_the_study(tmp_path, caplog, monkeypatch):
    # A study made with Optuna's API holding two queued trials: the first one's pair of values is invalid
    # (each value is valid beside the other param's first value, so the checks before the study pass it).
    storage = f"sqlite:///{tmp_path / 'sweeps' / 'routing' / 'study.db'}"
    (tmp_path / "sweeps" / "routing").mkdir(parents=True)
    study = optuna.create_study(study_name="routing", storage=storage, direction="maximize")
    for width, heads in ((66, 4), (64, 4)):
        study.enqueue_trial({"model.d_model": width, "model.mixer_options.num_heads": heads})
    args = ["--space", "routing", "--n-trials", "2", "--output-root", str(tmp_path), "--param",
            "model.d_model=choice:64,66", "--param", "model.mixer_options.num_heads=choice:1,4", *FAST]
    # an earlier test's Hydra run (logging.config with disable_existing_loggers) may have disabled Optuna's loggers
    for name in ("optuna", "optuna.study._optimize"):
        monkeypatch.setattr(logging.getLogger(name), "disabled", False)
    optuna.logging.enable_propagation()  # Optuna's log lines into caplog
    try:
        assert main(args) == 0
    finally:
        optuna.logging.disable_propagation()
    failed, completed = load_study(tmp_path).get_trials()
    assert failed.state == TrialState.FAIL
    assert "num_heads=4 does not divide d_model=66" in failed.user_attrs["fail_reason"]
    assert completed.state == TrialState.COMPLETE
    # The failure is logged as one line, without Optuna's traceback
    failures = {(r.getMessage(), r.exc_info) for r in caplog.records if "Trial 0 failed" in r.getMessage()}
    assert len(failures) == 1  # (pytest may hand the same record over twice)
    ((line, traceback),) = failures
    assert "does not divide" in line and traceback is None


def test_a_sweep_whose_every_trial_failed_exits_1(tmp_path, capsys):
    """Every trial invalid (pairs of values the checks before the study pass, as in the test above): the summary
    lists each failure, and the command fails (it exited 0, as if the search had a result)."""
    (tmp_path / "sweeps" / "routing").mkdir(parents=True)
    study = optuna.create_study(study_name="routing", direction="maximize",
                                storage=f"sqlite:///{tmp_path / 'sweeps' / 'routing' / 'study.db'}")
    for heads in (4, 8):
        study.enqueue_trial({"model.d_model": 66, "model.mixer_options.num_heads": heads})
    args = ["--space", "routing", "--n-trials", "2", "--output-root", str(tmp_path), "--param",
            "model.d_model=choice:64,66", "--param", "model.mixer_options.num_heads=choice:1,4,8", *FAST]
    assert main(args) == 1
    out, err = capsys.readouterr()
    assert out.count("does not divide d_model=66") == 2
    assert err.strip() == "sandbox-sweep: error: every finished trial of study routing failed (reasons above)"


# A task that a good learning rate starts to learn within a few steps: validation every VALIDATE_EVERY steps.
VALIDATE_EVERY = 2
TINY_TASK = ["task.params.vocab_size=32", "task.segments.train=[{seq_len: 16, num_kv_pairs: 2, num_examples: 96}]",
             "task.segments.val=[{seq_len: 16, num_kv_pairs: 2, num_examples: 64}]",
             "task.segments.test=[{seq_len: 16, num_kv_pairs: 2, num_examples: 16}]",
             "trainer.limit_train_batches=1.0", "trainer.limit_val_batches=1.0",
             f"trainer.val_check_interval={VALIDATE_EVERY}"]


def test_median_pruning_stops_bad_trials_at_a_validation(tmp_path):
    good_lr, bad_lr = 3e-2, 1e-8
    space = yaml.safe_load((REPO / "conf" / "sweep" / "routing.yaml").read_text())
    space.update(study_name="pruning", sampler={"name": "random", "seed": 0},
                 pruner={"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0}, overrides=TINY_TASK,
                 params={"lr": {"key": "optim.lr", "type": "categorical", "choices": [good_lr, bad_lr]}})
    path = tmp_path / "pruning.yaml"
    path.write_text(yaml.safe_dump(space))
    # The trials in a known order (a good one, a bad one, a good one), so that the pruner has a finished
    # trial to compare with when the bad one validates.
    (tmp_path / "sweeps" / "pruning").mkdir(parents=True)
    study = optuna.create_study(study_name="pruning", storage=f"sqlite:///{tmp_path / 'sweeps/pruning/study.db'}",
                                direction="maximize")
    for lr in (good_lr, bad_lr, good_lr):
        study.enqueue_trial({"lr": lr})
    assert main(["--space", str(path), "--n-trials", "3", "--output-root", str(tmp_path), "debug=fast",
                 "model.n_layers=1"]) == 0
    good, bad, good_again = load_study(tmp_path, "pruning").get_trials()
    budget = json.loads((Path(good.user_attrs["run_dir"]) / "result.json").read_text())["steps"]
    every_validation = list(range(VALIDATE_EVERY, budget + 1, VALIDATE_EVERY))
    assert len(every_validation) > 1
    for trial in (good, good_again):
        assert trial.state == TrialState.COMPLETE
        assert sorted(trial.intermediate_values) == every_validation
    assert bad.state == TrialState.PRUNED
    assert max(bad.intermediate_values) < budget
    # The pruned run's folder records how it ended: pruned where the pruner stopped it (it was recorded as failed,
    # with a traceback), never as a finished result that a report would average.
    stopped = json.loads((Path(bad.user_attrs["run_dir"]) / "result.json").read_text())
    pruned_at = max(bad.intermediate_values)
    assert (stopped["status"], stopped["status_reason"]) == ("pruned", f"pruned at step {pruned_at}")
    assert stopped["steps"] == pruned_at and math.isnan(stopped["test_acc"])


@pytest.mark.parametrize("objectives", [["state_size"], ["wall_time_s"], ["best_val_acc", "state_size"]])
def test_a_study_not_of_accuracy_alone_is_not_pruned(objectives):
    """The pruner is given validation accuracy: in a study that minimises state size or wall time (the routing
    space's median pruner kept) it stopped the trials above the median, the most accurate ones."""
    space = edit_routing(objectives=objectives)
    assert not sweep.prunes(space) and isinstance(sweep.make_pruner(space), optuna.pruners.NopPruner)
    assert sweep.prunes(edit_routing(objectives=["best_val_acc"]))


@pytest.mark.parametrize("stacked", [False, True], ids=["one-after-the-other", "stacked"])
def test_a_trial_with_seeds_scores_the_mean_of_its_runs(stacked, tmp_path, monkeypatch):
    """Every trial trains at each seed (in its own folder) and scores the mean; the pruner sees the first seed's
    validations. Stacked (the GPU's way, forced here on the CPU) as one after the other."""
    if stacked:
        monkeypatch.setattr(sweep, "stacks", lambda cfg: stack_problem(cfg) is None)
    space = yaml.safe_load((REPO / "conf" / "sweep" / "routing.yaml").read_text())
    space.update(study_name="seeds", sampler={"name": "random", "seed": 0}, overrides=TINY_TASK,
                 pruner={"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
                 params={"lr": {"key": "optim.lr", "type": "categorical", "choices": [3e-2]}})
    path = tmp_path / "seeds.yaml"
    path.write_text(yaml.safe_dump(space))
    assert main(["--space", str(path), "--n-trials", "2", "--seeds", "0,1", "--output-root", str(tmp_path),
                 "debug=fast", "model.n_layers=1"]) == 0
    for trial in load_study(tmp_path, "seeds").get_trials():
        results = [json.loads((Path(trial.user_attrs["run_dir"]) / f"seed{seed}" / "result.json").read_text())
                   for seed in (0, 1)]
        assert [r["config"]["seed"] for r in results] == [0, 1]
        assert (results[0].get("stack") is not None) == stacked
        assert trial.state == TrialState.COMPLETE
        assert trial.value == pytest.approx(np.mean([r["best_val_acc"] for r in results]))
        assert trial.user_attrs["runs"]["seed1"]["best_val_acc"] == pytest.approx(results[1]["best_val_acc"])
        assert sorted(trial.intermediate_values) == list(range(VALIDATE_EVERY, results[0]["steps"] + 1,
                                                               VALIDATE_EVERY))
    assert 0 < trial.value < 1 and results[0]["best_val_acc"] != results[1]["best_val_acc"]  # seeds differ


def test_two_objectives_report_a_pareto_front(tmp_path, capsys):
    space = yaml.safe_load((REPO / "conf" / "sweep" / "routing.yaml").read_text())
    space.update(study_name="pareto", objectives=["best_val_acc", "state_size"])
    path = tmp_path / "pareto.yaml"
    path.write_text(yaml.safe_dump(space))
    assert main(["--space", str(path), "--n-trials", "2", "--output-root", str(tmp_path), *FAST]) == 0
    assert "Pareto front" in capsys.readouterr().out
    study = load_study(tmp_path, "pareto")
    assert all(len(t.values) == 2 for t in study.get_trials(states=(TrialState.COMPLETE,)))


def assert_one_line_naming(err: str, named: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and lines[0].startswith("sandbox-sweep: error:"), err
    assert "Traceback" not in err


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
    assert_one_line_naming(capsys.readouterr().err, named)


def snapshot(root: Path) -> dict[str, str]:
    """Every folder and file below root: its relative path -> 'dir' or the sha256 of its bytes."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory) -> Path:
    """An output root holding a finished one-trial routing study."""
    root = tmp_path_factory.mktemp("study")
    assert main(["--n-trials", "1", "--output-root", str(root), *FAST]) == 0
    return root


def edit_routing(**changes) -> dict:
    """The routing space with changes; a key `a__b` sets space[a][b], a value None removes the key."""
    space = yaml.safe_load((REPO / "conf" / "sweep" / "routing.yaml").read_text())
    for key, value in changes.items():
        *parents, last = key.split("__")
        node = space
        for part in parents:
            node = node[part]
        if value is None:
            del node[last]
        else:
            node[last] = value
    return space


# case id -> (arguments, changes to the routing space or None, what the line must name)
BAD_SWEEP = {
    # the space file
    "space-not-yaml": ([], "n_trials: [24\n", "--space"),
    "space-missing-key": ([], {"heartbeat": None}, "heartbeat"),
    "space-unknown-key": ([], {"n_trial": 24}, "n_trial"),
    "space-unknown-sampler": ([], {"sampler__name": "grid"}, "sampler.name"),
    "space-param-missing-type": ([], {"params__lr__type": None}, "param lr"),
    "space-param-bound-not-a-number": ([], {"params__lr__low": "small"}, "param lr: low"),
    "space-param-low-equals-high": ([], {"params__lr__high": 1.0e-4}, "param lr"),
    "space-at-most-not-integers": ([], {"params__top_k__at_most": "shared_memory"}, "at_most"),
    "space-key-searched-twice": (["--param", "optim.lr=float:1e-4:1e-2"], None, "optim.lr"),
    "param-given-twice": (["--param", "model.d_model=choice:64,128", "--param", "model.d_model=choice:32"], None,
                          "--param 'model.d_model=choice:32' is invalid: param model.d_model is already searched"),
    # choosing trials on test accuracy (the protocol chooses on validation, never on test)
    "space-objective-on-test": ([], {"objectives": ["test_acc"]}, "objectives=['test_acc']"),
    "space-objectives-with-test": ([], {"objectives": ["best_val_acc", "test_acc"]}, "never on test"),
    # the command line
    "param-int-not-numbers": (["--param", "model.d_model=int:a:b"], None, "model.d_model"),
    # a stray comma: YAML read the empty choice as null, a choice of its own
    "param-empty-choice": (["--param", "optim.weight_decay=choice:0,,1e-2"], None, "a choice is empty"),
    "param-float-low-equals-high": (["--param", "optim.weight_decay=float:0.1:0.1"], None, "optim.weight_decay"),
    "worker-index-negative": (["--worker-index", "-1"], None, "--worker-index"),
    "n-trials-not-an-integer": (["--n-trials", "two"], None, "--n-trials"),
    "workers-not-an-integer": (["--workers", "1.5"], None, "--workers"),
    "study-name-not-a-folder": (["--study-name", "../elsewhere"], None, "study_name"),
    # past the file system's 255 bytes: blamed on --output-root, with the folders above the study's made
    "study-name-too-long": (["--study-name", "a" * 256], None, "study_name"),
    # the first trial's configuration
    "param-unknown-key": (["--param", "model.nope=choice:1,2"], None, "model.nope"),
    "param-invalid-setting": (["--param", "trainer.max_epochs=choice:0,1"], None, "trainer.max_epochs"),
    "param-invalid-model": (["--param", "model.mixer_options.num_heads=choice:5,1"], None, "num_heads"),
    "override-invalid-model": (["model.mixer_options.num_heads=5"], None, "num_heads"),
    "override-of-a-searched-key": (["optim.lr=1e-3"], None, "optim.lr"),
    # a trial is composed without Hydra's settings: the override changed nothing, silently
    "override-of-a-hydra-setting": (["hydra.launcher.stack=false"], None, "override 'hydra.launcher.stack=false'"),
    "override-of-a-hydra-group": (["hydra/launcher=basic"], None, "override 'hydra/launcher=basic'"),
    # a searched Hydra setting: every trial trained the same configuration, silently
    "param-of-a-hydra-setting": (["--param", "hydra.job.chdir=choice:true,false"], None,
                                 "sweep param hydra.job.chdir: key hydra.job.chdir is invalid"),
    # YAML syntax in a choice (brackets, an unclosed quote, an alias) was a yaml traceback
    "param-choice-in-brackets": (["--param", "model.d_model=choice:[64,128]"], None, "choice '[64' cannot be read"),
    "param-choice-unclosed-quote": (["--param", "suite=choice:'64"], None, "--param \"suite=choice:'64\" is invalid"),
    "param-choice-an-alias": (["--param", "suite=choice:*x"], None, "choice '*x' cannot be read"),
    # a port that is no number was a ValueError traceback from SQLAlchemy
    "storage-port-not-a-number": (["--storage", "sqlite://:memory:"], None,
                                  "--storage 'sqlite://:memory:' is invalid: it cannot be read as a URL"),
    # a study made with another definition
    "study-other-objectives": ([], {"objectives": ["best_val_acc", "state_size"]}, "objectives"),
    "study-other-param-range": ([], {"params__lr__high": 0.1}, "param lr"),
    "study-param-added": (["--param", "model.d_model=choice:64,128"], None, "param model.d_model"),
    "study-other-overrides": (["model.d_model=32"], None, "overrides"),
    # seeds
    "seeds-not-integers": (["--seeds", "0,x"], None, "--seeds"),
    "seeds-repeated": (["--seeds", "0,0"], None, "seeds"),
    "seeds-negative": ([], {"seeds": [-1]}, "seeds"),
    "seeds-and-a-seed-override": (["--seeds", "0,1", "seed=3"], None, "seed=3"),
    "seeds-and-a-searched-seed": (["--seeds", "0,1", "--param", "seed=choice:0,1"], None, "param seed"),
    "study-other-seeds": (["--seeds", "0,1"], None, "seeds"),
    # workers of one study that disagree on the grace period fail each other's live trials as stale
    "study-other-heartbeat": ([], {"heartbeat": {"interval_s": 1, "grace_s": 2}},  # (safe_dump sorts its keys)
                              "heartbeat {'interval_s': 20, 'grace_s': 60} in the study, {'grace_s': 2, "
                              "'interval_s': 1} now (its workers must agree on when a trial is stale)"),
    # every value a trial can take, not only the first: each choice, both ends of a range, each seed
    "param-later-choice-invalid": (["--param", "model.mixer_options.num_heads=choice:1,3,5,7"], None,
                                   "param model.mixer_options.num_heads: 3 is invalid"),
    "param-high-end-invalid": (["--param", "model.mixer_options.num_heads=int:1:3"], None,
                               "param model.mixer_options.num_heads: 3 is invalid"),
    "seeds-later-one-out-of-range": (["--seeds", "0,1000000"], None, "seeds: 1000000 is invalid"),
    "space-choice-repeated": ([], {"params__shared_memory__choices": [True, True]}, "param shared_memory: choices"),
    # storages that cannot hold a study
    "storage-in-memory": (["--storage", "sqlite://"], None, "--storage 'sqlite://' is invalid: an in-memory"),
    "storage-in-memory-named": (["--storage", "sqlite:///:memory:"], None, "--storage"),
    "storage-empty": (["--storage", ""], None, "--storage '' is invalid"),
}


@pytest.mark.parametrize("case", BAD_SWEEP)
def test_bad_sweep_input_changes_nothing(case, finished_study, tmp_path, capsys):
    """One line naming the setting, exit code 2, no trial created or counted, every file as it was."""
    args, space, named = BAD_SWEEP[case]
    if space is not None:
        path = tmp_path / "space.yaml"
        path.write_text(space if isinstance(space, str) else yaml.safe_dump(edit_routing(**space)))
        args = [*args, "--space", str(path)]
    before = snapshot(finished_study)
    assert main(["--n-trials", "2", "--output-root", str(finished_study), *FAST, *args]) == 2
    assert_one_line_naming(capsys.readouterr().err, named)
    assert snapshot(finished_study) == before


@pytest.mark.parametrize("how", ["study-db-removed", "other-storage"])
def test_trial_folders_of_another_study_are_refused(how, finished_study, tmp_path, capsys):
    """Trial folders are named by number: a new study in the same folder (its study.db removed, or another
    --storage) gave its trial 0 the folder of the earlier trial 0, whose run it returned as its own where the
    configuration was the same (and failed on where not: every trial of the study)."""
    root = tmp_path / "root"
    shutil.copytree(finished_study, root)
    args = ["--n-trials", "1", "--output-root", str(root), *FAST]
    if how == "study-db-removed":
        (root / "sweeps" / "routing" / "study.db").unlink()
    else:
        args += ["--storage", f"sqlite:///{tmp_path / 'other.db'}"]
    before = snapshot(root)
    assert main(args) == 2
    assert_one_line_naming(capsys.readouterr().err, "holds trial folders 0000 that study 'routing' did not make")
    assert snapshot(root) == before


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
    for text in ("optim.lr=float:1e-4", "model.d_model=int:a:b", "model.d_model=int:1.5:3", "=choice:1"):
        with pytest.raises(ConfigError):
            parse_param(text)


def test_a_choice_in_exponent_notation_is_a_number(tmp_path):
    """YAML 1.1 reads 1e-2 (no dot) as a string: the trial's settings then refused `optim.weight_decay=1e-2` as no
    number, where the space file (OmegaConf), Hydra and `float:` read a float."""
    _, spec = parse_param("optim.weight_decay=choice:0,1e-2,5E-3,1e3")
    assert spec["choices"] == [0, 1e-2, 5e-3, 1e3] and all(not isinstance(c, str) for c in spec["choices"])
    space = load_space("routing", ["optim.weight_decay=choice:0,1e-2"])
    sweep.check_space(space)
    sweep.check_trial_config(space, FAST)


def sweep_command(root: Path, *extra: str) -> list[str]:
    """The sweep's command line: the fast settings, then the test's own arguments, which override them."""
    return [sys.executable, "-m", "sandbox.sweep", "--output-root", str(root), *FAST, *extra]


def test_a_worker_that_died_fails_the_sweep_after_its_summary(tmp_path, monkeypatch, capsys):
    """A worker killed (SIGKILL: exit -9) ends `--workers 2` with exit code 1 and says which worker, after the
    study's summary; exit 0 would tell a script that every worker finished its share."""
    monkeypatch.setattr(sweep, "run_workers", lambda commands, env: ([0, -9][:len(commands)], None))
    assert main(["--output-root", str(tmp_path), "--n-trials", "2", "--workers", "2", *FAST]) == 1
    out, err = capsys.readouterr()
    assert out.startswith("study routing:")
    assert err.strip() == ("sandbox-sweep: error: worker 1 exited with code -9; the study holds the other workers' "
                           "trials")


def test_a_trial_another_worker_failed_meanwhile_is_one_line_and_the_worker_goes_on(tmp_path, capsys):
    """Another worker fails a trial whose heartbeat went stale (this worker paused) while this worker still runs
    it: Optuna then cannot record it (an AssertionError ended the worker)."""
    heartbeat = {"interval_s": 1, "grace_s": 2}
    storage = sweep.open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat)
    study = optuna.create_study(storage=storage, study_name="s")

    def objective(trial):
        if trial.number == 0:  # as the other worker's fail_stale_trials, while this one trains
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        return 0.5

    sweep.run_trials(study, objective, {"n_trials": 2, "heartbeat": heartbeat})
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]
    err = capsys.readouterr().err
    assert "sandbox-sweep: trial 0 was failed by another worker while this one ran it" in err
    assert "Traceback" not in err


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


# A sweep command whose workers check a new study's definition at one moment, the worst case of commands started
# together: each, once it has read the study's user attributes (no definition yet), waits until all N have (a file each
# in the barrier folder) before it goes on.
AT_ONCE = """
import os, sys, time
from pathlib import Path
import optuna
from sandbox import sweep
barrier, n = Path(sys.argv[1]), int(sys.argv[2])
read = optuna.Study.user_attrs.fget

def user_attrs(study):
    attrs = read(study)
    (barrier / str(os.getpid())).touch()
    deadline = time.time() + 120
    while len(list(barrier.iterdir())) < n and time.time() < deadline:
        time.sleep(0.001)
    return attrs

optuna.Study.user_attrs = property(user_attrs)
sys.exit(sweep.main(sys.argv[3:]))
"""


def test_commands_started_at_once_join_the_first_definition_or_are_refused(tmp_path):
    """Six commands on a new study at the same moment (a job array, machines sharing a --storage), every other
    one with another override: each saw the study without a definition and stored its own, the last one
    standing, so workers of both definitions ran trials in one study, or a worker opening the study again
    ended in a ConfigError traceback (exit 1). The first definition stored stands; a worker of another one is
    refused in one line (exit 2)."""
    barrier, n = tmp_path / "barrier", 6
    barrier.mkdir()
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.storages.RDBStorage(storage)  # its tables made, as in a storage in use: the workers race on the study
    other = "optim.weight_decay=0.0"
    logs, workers = [], []
    for i in range(n):
        logs.append(tmp_path / f"err{i}.txt")
        command = [sys.executable, "-c", AT_ONCE, str(barrier), str(n), "--output-root", str(tmp_path), *FAST,
                   "--n-trials", "1", "--storage", storage, "--worker-index", str(i), *([other] if i % 2 else [])]
        with logs[-1].open("w") as err:
            workers.append(subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err))
    codes = [worker.wait(timeout=600) for worker in workers]
    stored = optuna.load_study(study_name="routing", storage=storage).user_attrs["definition"]
    for i, (code, log) in enumerate(zip(codes, logs)):
        if (other in stored["overrides"]) == bool(i % 2):
            assert code == 0, log.read_text()[-3000:]
        else:
            assert code == 2, log.read_text()[-3000:]
            assert_one_line_naming(log.read_text(), "study 'routing' was made with another definition: overrides")


def test_a_definition_stored_before_studies_kept_the_heartbeat_takes_any():
    """Such a study goes on with the space's heartbeat, as it did; one stored with the definition must match."""
    requested = sweep.definition(load_space("routing", []), FAST)
    other = {**requested, "heartbeat": {"interval_s": 1, "grace_s": 2}}
    study = optuna.create_study(direction="maximize")
    study.set_user_attr("definition", {key: value for key, value in requested.items() if key != "heartbeat"})
    sweep.check_definition(study, None, other)
    study.set_user_attr("definition", requested)
    with pytest.raises(ConfigError, match="heartbeat {'interval_s': 20, 'grace_s': 60} in the study"):
        sweep.check_definition(study, None, other)


def test_a_bad_storage_url_in_the_environment_is_named_as_such(tmp_path, monkeypatch, capsys):
    """A URL given in $SANDBOX_SWEEP_STORAGE, not on the command line, was refused as "--storage ...", a setting
    the user had not given."""
    monkeypatch.setenv(sweep.STORAGE_ENV, "sqlite://")
    assert main(["--output-root", str(tmp_path), *FAST]) == 2
    assert_one_line_naming(capsys.readouterr().err, "$SANDBOX_SWEEP_STORAGE 'sqlite://' is invalid: an in-memory")
    assert not any(tmp_path.iterdir())


def test_workers_are_given_the_storage_url_off_their_command_lines(tmp_path, monkeypatch):
    """`--workers 2` started its workers with `--storage URL` on their command lines, which `ps` shows every user
    of the machine, a PostgreSQL URL's password with it. They are given it in their environment (a sqlite URL
    stands in for one with a password), and use it: not the sweep folder's study.db."""
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    started, popen = [], subprocess.Popen

    def recorded(command, **kwargs):
        started.append((command, kwargs.get("env")))
        return popen(command, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", recorded)
    root = tmp_path / "out"
    assert main(["--output-root", str(root), "--n-trials", "2", "--workers", "2", "--storage", url, *FAST]) == 0
    assert len(started) == 2
    for command, env in started:
        assert "elsewhere.db" not in " ".join(command)
        assert env[sweep.STORAGE_ENV] == url
    trials = optuna.load_study(study_name="routing", storage=url).get_trials()
    assert len(trials) >= 2 and all(t.state == TrialState.COMPLETE for t in trials)
    assert not (root / "sweeps" / "routing" / "study.db").exists()


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


def test_interrupted_sweep_is_one_line_exit_143(tmp_path):
    """SIGTERM mid-trial: its run saves a checkpoint and records `interrupted`, the sweep says so in one line and
    exits 143, and its trial stays RUNNING, to be retried once its heartbeat is stale (as a killed worker's:
    test_killed_worker_trial_is_failed_and_retried). The sweep ended in a traceback, exit code 1."""
    # a trial of 64 steps
    command = sweep_command(tmp_path, "--n-trials", "1", "task.limit_examples=1024", "trainer.limit_train_batches=1.0")
    worker = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "sweeps" / "routing" / "trials" / "0000"
    deadline = time.time() + 300
    while not (run_dir / "logs" / "metrics.csv").exists() and time.time() < deadline:  # written as the fit starts
        time.sleep(0.2)
    time.sleep(1)  # a few steps
    worker.send_signal(signal.SIGTERM)
    _, err = worker.communicate(timeout=300)
    assert worker.returncode == 143, err[-2000:]
    assert "Traceback" not in err and "sandbox-sweep: interrupted by SIGTERM: run the same command" in err, err[-2000:]
    assert json.loads((run_dir / "result.json").read_text())["status"] == "interrupted"
    assert [t.state for t in load_study(tmp_path).get_trials()] == [TrialState.RUNNING]


def in_process_group(pgid: int) -> list[int]:
    """The live processes of a process group (from /proc: pid (comm) state ppid pgrp ...)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended while we looked
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


@pytest.mark.parametrize("signum, to_group", [(signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["sigterm-to-the-parent", "ctrl-c-to-the-process-group"])
def test_interrupted_workers_sweep_stops_its_workers_one_line(signum, to_group, tmp_path):
    """A signal to `--workers 2` mid-trial, to the parent alone (SIGTERM) or, as Ctrl-C in a terminal, to its
    whole process group (SIGINT): the parent passes it on to the workers, whose running trials record their runs
    as `interrupted` (and stay RUNNING, to be retried); once they have exited it says so in one line and exits
    128 + the signal. It was a KeyboardInterrupt traceback for Ctrl-C, and for SIGTERM the parent died at once
    (exit -15) and left its workers training."""
    command = sweep_command(tmp_path, "--n-trials", "4", "--workers", "2", "task.limit_examples=4096",
                            "trainer.limit_train_batches=1.0")  # trials of 256 steps: both workers are in one
    # Output to files, not pipes, which workers left running would hold open. In a process group of its own: its
    # workers are in it, pytest not.
    out_file, err_file = tmp_path / "out.txt", tmp_path / "err.txt"
    with out_file.open("w") as out, err_file.open("w") as err:
        sweep = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=err, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                running = load_study(tmp_path).get_trials(states=(TrialState.RUNNING,))
            except (KeyError, sqlalchemy.exc.SQLAlchemyError):
                running = []  # no database, tables or study yet
            run_dirs = [Path(t.user_attrs["run_dir"]) for t in running if "run_dir" in t.user_attrs]
            if len(run_dirs) == 2 and all((d / "logs" / "metrics.csv").exists() for d in run_dirs):
                break  # both workers' runs are fitting
            time.sleep(0.5)
        else:
            pytest.fail("never saw both workers training")
        time.sleep(1)  # a few steps
        if to_group:
            os.killpg(sweep.pid, signum)
        else:
            sweep.send_signal(signum)
        sweep.wait(timeout=300)
        assert in_process_group(sweep.pid) == []  # no worker left training
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sweep.pid, signal.SIGKILL)
    out, err = out_file.read_text(), err_file.read_text()
    assert sweep.returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in err and out == "", err[-3000:]
    name = signal.Signals(signum).name
    assert err.count("passed on to its workers") == 1
    assert err.splitlines()[-1].startswith(f"sandbox-sweep: interrupted by {name}, passed on to its workers: run "
                                           "the same command to go on with the study"), err[-3000:]
    for run_dir in run_dirs:
        assert json.loads((run_dir / "result.json").read_text())["status"] == "interrupted"
    still_running = load_study(tmp_path).get_trials(states=(TrialState.RUNNING,))
    assert sorted(Path(t.user_attrs["run_dir"]) for t in still_running) == sorted(run_dirs)


@pytest.mark.parametrize("storage", ["notaurl", "sqlite:///{tmp}/missing/study.db", "sqlite:///{tmp}",
                                     "postgresql://nobody@127.0.0.1:1/none"],
                         ids=["not-a-url", "sqlite-missing-folder", "sqlite-a-folder", "postgres-unreachable"])
def test_storage_that_cannot_be_opened_creates_no_folder(storage, tmp_path, capsys):
    root = tmp_path / "out"
    assert main(["--storage", storage.format(tmp=tmp_path), "--output-root", str(root), *FAST]) == 2
    assert_one_line_naming(capsys.readouterr().err, "--storage")
    assert list(tmp_path.iterdir()) == []  # no output root, no sweep folder


def test_output_root_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for root in (tmp_path / "file", tmp_path / "file" / "below"):
        assert main(["--output-root", str(root), *FAST]) == 2
        assert_one_line_naming(capsys.readouterr().err, f"--output-root {root} is invalid: {tmp_path}/file is a file")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_a_trial_whose_run_did_not_finish_fails_whatever_its_objectives(tmp_path, monkeypatch):
    """A diverged run has a state size and a (short) wall time: scored on those alone it would complete, as the
    fastest trial of a wall_time_s study. With seeds, one run of the trial diverging is enough to fail it."""
    real_step = RecallModule.training_step
    modules = []

    def nan_in_second_run(self, batch, batch_idx):
        if self not in modules:
            modules.append(self)
        loss = real_step(self, batch, batch_idx)
        return loss * float("nan") if self is modules[-1] and len(modules) == 2 else loss

    monkeypatch.setattr(RecallModule, "training_step", nan_in_second_run)
    space = edit_routing(study_name="fast", objectives=["wall_time_s"])
    path = tmp_path / "fast.yaml"
    path.write_text(yaml.safe_dump(space))
    # its only trial failed: the study has no result (test_a_sweep_whose_every_trial_failed_exits_1)
    assert main(["--space", str(path), "--n-trials", "1", "--seeds", "0,1", "--output-root", str(tmp_path),
                 *FAST]) == 1
    (trial,) = load_study(tmp_path, "fast").get_trials()
    assert trial.state == TrialState.FAIL
    assert "seed 1: diverged" in trial.user_attrs["fail_reason"], trial.user_attrs["fail_reason"]


@pytest.mark.parametrize("key, value", [("task.eval_batch_size", None), ("suite", "64"), ("suite", "it's")],
                         ids=["null", "string-of-digits", "string-with-a-quote"])
def test_a_choice_reaches_the_trial_as_the_value_given(key, value):
    """A null choice is null, not the string 'None'; a string of digits stays a string, not an integer."""
    space = load_space("routing", [])
    assert OmegaConf.select(sweep.compose_trial(space, FAST, {key: value}), key) == value


def test_null_choice_passes_the_checks(tmp_path):
    space = load_space("routing", ["task.eval_batch_size=choice:null,32"])
    sweep.check_space(space)
    sweep.check_trial_config(space, FAST)


def test_a_study_made_in_the_other_direction_is_refused(tmp_path, capsys):
    """A study without a stored definition (made with Optuna's API, or before studies kept one) keeps the
    direction it was made with: adopting it would maximise a state size."""
    (tmp_path / "sweeps" / "routing").mkdir(parents=True)
    optuna.create_study(study_name="routing", storage=f"sqlite:///{tmp_path / 'sweeps/routing/study.db'}",
                        direction="maximize")
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(edit_routing(objectives=["state_size"])))
    before = snapshot(tmp_path)
    assert main(["--space", str(path), "--output-root", str(tmp_path), *FAST]) == 2
    assert_one_line_naming(capsys.readouterr().err, "direction")
    assert snapshot(tmp_path) == before
    assert "definition" not in load_study(tmp_path).user_attrs


def test_a_study_continued_after_its_configs_were_edited_is_refused(tmp_path, monkeypatch, capsys):
    """The same command after an edit of a config file (the experiment's task, its step budget) would add
    trials of another configuration to the study and its best trial."""
    conf = tmp_path / "conf"
    shutil.copytree(sweep.CONF_DIR, conf)
    monkeypatch.setattr(sweep, "CONF_DIR", conf)
    root = tmp_path / "out"
    args = ["--space", str(conf / "sweep" / "routing.yaml"), "--output-root", str(root), *FAST]
    assert main(["--n-trials", "1", *args]) == 0
    experiment = conf / "experiment" / "quickstart.yaml"
    experiment.write_text(experiment.read_text().replace("num_kv_pairs: 8,", "num_kv_pairs: 6,"))
    before = snapshot(root)
    assert main(["--n-trials", "2", *args]) == 2
    assert_one_line_naming(capsys.readouterr().err, "task.segments")
    assert snapshot(root) == before
    experiment.write_text(experiment.read_text().replace("num_kv_pairs: 6,", "num_kv_pairs: 8,"))
    assert main(["--n-trials", "2", *args]) == 0  # as it was made: it goes on
    assert len(load_study(root).get_trials(states=(TrialState.COMPLETE,))) == 2


def tied_study(direction: str = "maximize") -> optuna.Study:
    study = optuna.create_study(study_name="ties", direction=direction)
    for lr, value in ((1e-3, 0.5), (2e-3, 1.0), (3e-3, 1.0), (4e-3, 0.25)):
        study.add_trial(optuna.trial.create_trial(
            params={"lr": lr}, distributions={"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2)},
            value=value))
    return study


def test_every_trial_tied_at_the_best_value_is_shown():
    """Optuna's best trial is one of those tied at the best value: printed alone, it read as the winner."""
    lines = sweep.summarise(tied_study(), ["best_val_acc"]).splitlines()
    best = [line for line in lines if "best" in line]
    assert len(best) == 2 and "trial 1:" in best[0] and "trial 2:" in best[1], lines
    assert all("2 trials tie" in line for line in best)


def test_trials_past_the_early_stopping_threshold_tie_at_it(tmp_path, monkeypatch):
    """Both trials' runs stopped at the 0.99 threshold, at 0.9978 and 0.9921: how far past it depends on where a
    validation fell, so both score 0.99 (and tie), as sandbox-report counts them."""
    space = load_space("routing", [])
    space["objectives"] = ["best_val_acc"]
    passed = iter([0.9978, 0.9921])

    def trained(space, overrides, chosen, run_dir, callbacks):
        config = {"callbacks": {"early_stopping": {"threshold": 0.99}}}
        return [{"status": "finished", "best_val_acc": next(passed), "test_acc": 0.99, "state_size": 1,
                 "config": config}]

    monkeypatch.setattr(sweep, "train_trial", trained)
    study = optuna.create_study(direction="maximize")
    study.optimize(sweep.make_objective(space, [], tmp_path), n_trials=2)
    assert [trial.value for trial in study.trials] == [0.99, 0.99]


def test_a_signal_outside_a_run_stops_the_sweep_in_one_line(tmp_path, monkeypatch, capsys):
    """Ctrl-C while a trial is composed (outside its run, which handles signals itself): the sweep stops as in a
    run, one line and exit code 130, its trial RUNNING, to be run again. It was a KeyboardInterrupt traceback,
    and Optuna recorded the trial as failed, never to be run again."""
    real = sweep.train_trial

    def signalled(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep, "train_trial", signalled)
    handlers = [signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)]
    try:
        code = main(["--n-trials", "1", "--output-root", str(tmp_path), *FAST])
    except KeyboardInterrupt:
        pytest.fail("a KeyboardInterrupt traceback")
    assert code == 130
    assert capsys.readouterr().err.strip().startswith("sandbox-sweep: interrupted by SIGINT: run the same command")
    assert [t.state for t in load_study(tmp_path).get_trials()] == [TrialState.RUNNING]
    assert [signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)] == handlers  # restored


def test_a_storage_url_s_password_is_not_printed(tmp_path, capsys):
    """A PostgreSQL URL that cannot be opened was printed whole in the error line, its password with it (a
    shared terminal, a CI log)."""
    url = "postgresql://me:secret@127.0.0.1:1/db"
    assert main(["--n-trials", "1", "--output-root", str(tmp_path), *FAST, "--storage", url]) == 2
    err = capsys.readouterr().err
    assert_one_line_naming(err, "--storage 'postgresql://me:***@127.0.0.1:1/db' cannot be opened")
    assert "secret" not in err


@pytest.mark.skipif(not private_mounts_work(), reason="user namespaces are off here: `unshare -Urm` is refused, "
                    "so a full folder cannot be made without root")
@pytest.mark.parametrize("where", ["output-root", "output-root-below", "storage"])
def test_a_new_study_on_a_full_disk_leaves_nothing_behind(where, tmp_path):
    """A new study whose study.db cannot be written (a full disk) is one line, exit code 2, and leaves nothing
    behind. It left an empty study.db and the sweep's folders (or the --storage file), a half-made study."""
    mnt, out, empty = tmp_path / "mnt", tmp_path / "out", tmp_path / "empty"
    for folder in (mnt, out, empty):
        folder.mkdir()
    args, named = {"output-root": (["--output-root", str(mnt)], "--output-root"),
                   "output-root-below": (["--output-root", str(mnt / "a" / "b")], "--output-root"),
                   "storage": (["--storage", f"sqlite:///{mnt}/study.db", "--output-root", str(mnt)], "--storage"),
                   }[where]
    command = [sys.executable, "-m", "sandbox.sweep", "--n-trials", "1", *args, *FAST]
    env = {**os.environ, "SIZE": "1m", "MNT": str(mnt), "SRC": str(empty), "OUT": str(out), "MODE": "full"}
    subprocess.run(["unshare", "-Urm", "bash", "-c", IN_PRIVATE_MOUNT, "bash", *command], cwd=REPO, env=env,
                   check=True, timeout=300)
    stderr = (out / "stderr").read_text()
    assert (out / "rc").read_text().strip() == "2", stderr
    assert_one_line_naming(stderr, named)
    assert "disk is full" in stderr and "[SQL:" not in stderr
    assert (out / "after").read_text() == (out / "before").read_text()
