"""Stacked runs end to end (sandbox/stacked_run.py, the sandbox launcher): each run of a stack ends as it ends
alone (status, reason, steps, accuracies, its metrics.csv), a diverging run does not stop the others, an
interrupted stack resumes, and `sandbox-train -m` stacks or not as asked."""

import csv
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.utils import JobReturn, JobStatus

import sandbox.settings
import sandbox.stacked_run
import sandbox.train
from hydra_plugins.sandbox_launcher.launcher import _finish, _outcomes
from sandbox.callbacks import RunInterrupted, RunPruned
from sandbox.module import RecallModule
from sandbox.results import RESULT_FILE
from sandbox.settings import ConfigError
from sandbox.stacked_run import STACK_PAYS, StackedRecallModule, stack_problem, stacks, train_stack
from sandbox.train import CONF_DIR, OtherComputation, train
from test_faults import snapshot
from test_train import SignalAt, stop_at

REPO = Path(__file__).resolve().parent.parent
SMALL = ["model.d_model=16", "task.params.vocab_size=64", "task.batch_size=16", "callbacks.progress=none",
         "trainer.accelerator=cpu",  # float32 on any machine: the comparisons are to float rounding
         "task.segments.train=[{seq_len: 32, num_kv_pairs: 4, num_examples: 256}]",
         "task.segments.val=[{seq_len: 32, num_kv_pairs: 4, num_examples: 32}]",
         "task.segments.test=[{seq_len: 32, num_kv_pairs: 4, num_examples: 32},"
         "{seq_len: 32, num_kv_pairs: 2, num_examples: 32}]",
         "trainer.max_steps=40", "trainer.val_check_interval=10", "trainer.log_every_n_steps=5"]
SAME = ("status", "status_reason", "steps", "epochs", "state_size", "num_parameters")
CLOSE = ("best_val_acc", "test_acc", "test_loss")
TIMING = ("step", "epoch", "train/tokens_per_s")


def make_cfg(root: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=[*SMALL, f"output_root={root}", *overrides])


def metrics_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "logs" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def assert_same_run(alone: dict, stacked: dict, alone_dir: Path, stacked_dir: Path) -> None:
    for key in SAME:
        assert stacked[key] == alone[key], key
    for key in CLOSE:
        assert stacked[key] == pytest.approx(alone[key], abs=1e-5, nan_ok=True), key
    for key in ("test_acc_per_slice", "test_acc_past_train_per_slice"):
        assert stacked[key] == pytest.approx(alone[key], abs=1e-5), key
    assert stacked["router"].keys() == alone["router"].keys()
    rows, alone_rows = metrics_rows(stacked_dir), metrics_rows(alone_dir)
    # the tokens per second of an epoch are logged at its end, which a run alone that stops early reaches at once
    assert set(rows[0]) - set(TIMING) == set(alone_rows[0]) - set(TIMING)
    rows, alone_rows = ([r for r in x if any(v for k, v in r.items() if k not in TIMING)] for x in (rows, alone_rows))
    assert [r["step"] for r in rows] == [r["step"] for r in alone_rows]
    for row, alone_row in zip(rows, alone_rows):
        for key, value in alone_row.items():
            if value and key not in TIMING:
                # a near-tie of the router's scores may fall the other way: a token or two of load
                tolerance = 2e-3 if key.startswith("router/") else 1e-5
                assert float(row[key]) == pytest.approx(float(value), rel=1e-4, abs=tolerance), (row["step"], key)


@pytest.mark.parametrize("model, stopping", [("mom", "threshold=0.01"), ("attention", "threshold=0.01"),
                                             ("gated_deltanet", "patience=1"), ("attention", "patience=0")])
def test_stacked_runs_end_as_they_end_alone(model, stopping, tmp_path):
    """Seeds and learning rates in one stack; early stopping (threshold 0.01: a run stops at its first
    validation above it; patience 1: at its first validation without a strict improvement) ends some runs and
    leaves the others training. With patience 0 a run stops at its first validation without an improvement, as
    alone (stacked, every run stopped at its first validation)."""
    jobs = [("seed=0", "optim.lr=3e-3"), ("seed=1", "optim.lr=3e-3"), ("seed=0", "optim.lr=1e-2")]
    common = (f"model={model}", f"callbacks.early_stopping.{stopping}")
    alone = [train(make_cfg(tmp_path, *common, *job), tmp_path / "alone" / str(i)) for i, job in enumerate(jobs)]
    stacked = train_stack([make_cfg(tmp_path, *common, *job) for job in jobs],
                          [tmp_path / "stacked" / str(i) for i in range(len(jobs))])
    for i, (a, s) in enumerate(zip(alone, stacked)):
        assert_same_run(a, s, tmp_path / "alone" / str(i), tmp_path / "stacked" / str(i))
        assert s["stack"]["runs"] == 3 and s["backend"] == "torch"
        assert json.loads((tmp_path / "stacked" / str(i) / "result.json").read_text())["status"] == s["status"]


def test_stacked_runs_tested_past_their_training_length_record_the_accuracy_there_as_alone(tmp_path):
    """Trained at L 32, tested at 32 and 64: each run of the stack records its accuracy past the training length
    (positions 32-63) of the slices that have such positions, as it does alone."""
    longer = ("task.segments.test=[{seq_len: 32, num_kv_pairs: 4, num_examples: 32},"
              "{seq_len: 64, num_kv_pairs: 4, num_examples: 32}]", "model=attention")
    jobs = [("seed=0",), ("seed=1",)]
    alone = [train(make_cfg(tmp_path, *longer, *job), tmp_path / "alone" / str(i)) for i, job in enumerate(jobs)]
    stacked = train_stack([make_cfg(tmp_path, *longer, *job) for job in jobs],
                          [tmp_path / "stacked" / str(i) for i in range(len(jobs))])
    for i, (a, s) in enumerate(zip(alone, stacked)):
        assert set(s["test_acc_past_train_per_slice"]) == {"seq_len=64", "num_kv_pairs=4"}
        assert_same_run(a, s, tmp_path / "alone" / str(i), tmp_path / "stacked" / str(i))


def test_a_diverging_run_ends_as_diverged_and_the_others_go_on(tmp_path):
    jobs = [("optim.lr=3e-3",), ("optim.lr=1e30",)]
    alone = [train(make_cfg(tmp_path, *job), tmp_path / "alone" / str(i)) for i, job in enumerate(jobs)]
    assert [a["status"] for a in alone] == ["finished", "diverged"]
    stacked = train_stack([make_cfg(tmp_path, *job) for job in jobs], [tmp_path / "stacked" / str(i) for i in range(2)])
    assert_same_run(alone[0], stacked[0], tmp_path / "alone" / "0", tmp_path / "stacked" / "0")
    assert stacked[1]["status"] == "diverged" and math.isnan(stacked[1]["test_acc"])
    assert stacked[1]["status_reason"].split(" at step ")[1] == alone[1]["status_reason"].split(" at step ")[1]
    # where it diverged, as alone: not the epoch of the validation that took it out of the stack
    assert (stacked[1]["steps"], stacked[1]["epochs"]) == (alone[1]["steps"], alone[1]["epochs"])


def test_weights_made_non_finite_by_the_last_step_end_the_run_diverged_as_alone(tmp_path, monkeypatch):
    """The last step's update is seen by no training loss (and here by no validation): alone and in a stack the run
    ends diverged there (it was `finished`, tested on an earlier best)."""
    def nan_weights_after_last_step(module, run):
        def hook(self, outputs, batch, batch_idx):
            if self.global_step == 40:
                with torch.no_grad():
                    weight = next(self.parameters())
                    weight[run if isinstance(self, StackedRecallModule) else ...] = float("nan")
        return hook

    monkeypatch.setattr(RecallModule, "on_train_batch_end", nan_weights_after_last_step(RecallModule, 0),
                        raising=False)
    alone = train(make_cfg(tmp_path, "optim.lr=1e-2"), tmp_path / "alone")
    monkeypatch.setattr(StackedRecallModule, "on_train_batch_end", nan_weights_after_last_step(StackedRecallModule, 1),
                        raising=False)
    jobs = [("optim.lr=3e-3",), ("optim.lr=1e-2",)]
    stacked = train_stack([make_cfg(tmp_path, *job) for job in jobs], [tmp_path / "stacked" / str(i) for i in range(2)])
    assert (alone["status"], alone["status_reason"]) == ("diverged", "weights not finite after step 40")
    assert stacked[0]["status"] == "finished"
    assert all(stacked[1][key] == alone[key] for key in ("status", "status_reason", "steps", "epochs"))
    assert math.isnan(stacked[1]["test_acc"])


class PruneAtFirstValidation(L.Callback):
    """A search's pruner, as sandbox-sweep's: stops the run at its first validation."""

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            raise RunPruned(f"pruned at step {trainer.global_step}")


def test_a_pruned_run_records_pruned_alone_and_in_a_stack(tmp_path):
    """Alone and in a stack, the runs a pruner stopped record `pruned` at that step (they were `failed`, with the
    pruner's exception as a traceback), and the exception reaches the search."""
    jobs = [("seed=0",), ("seed=1",)]
    with pytest.raises(RunPruned):
        train(make_cfg(tmp_path, *jobs[0]), tmp_path / "alone", extra_callbacks=[PruneAtFirstValidation()])
    with pytest.raises(RunPruned):
        train_stack([make_cfg(tmp_path, *job) for job in jobs], [tmp_path / "stacked" / str(i) for i in range(2)],
                    extra_callbacks=[PruneAtFirstValidation()])
    for run_dir in (tmp_path / "alone", tmp_path / "stacked" / "0", tmp_path / "stacked" / "1"):
        result = json.loads((run_dir / RESULT_FILE).read_text())
        assert (result["status"], result["status_reason"], result["steps"]) == ("pruned", "pruned at step 10", 10)
        assert math.isnan(result["test_acc"])
    # the same command returns a pruned run as it is: the pruner's decision stands
    assert train(make_cfg(tmp_path, *jobs[0]), tmp_path / "alone")["status"] == "pruned"


def stack_checkpoint(run_dir: Path) -> dict:
    stack = Path(json.loads((run_dir / "result.json").read_text())["stack"]["folder"])
    return torch.load(stack / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


EARLY = ("model=gated_deltanet", "callbacks.early_stopping.patience=1")


@pytest.mark.parametrize("jobs, stop, in_stack", [
    ([("seed=0",), ("seed=1",)], 14, [True, True]),
    ([("seed=0",), ("seed=1",), ("optim.lr=1e30",)], 14, [True, True, False]),
    ([(*EARLY, "optim.lr=3e-3"), (*EARLY, "seed=1", "optim.lr=3e-3"), (*EARLY, "optim.lr=1e-2")], 34,
     [True, True, False]),
], ids=["all-running", "one-left", "one-stopped-early"])
def test_an_interrupted_stack_resumes_where_it_stopped(jobs, stop, in_stack, tmp_path, monkeypatch):
    """Interrupted at step `stop` and resumed; in the second case, a run that diverged left the stack at step 10,
    in the third one that stopped early (patience) at step 26, and is tested at the end. Each run's metrics.csv
    is an uninterrupted run's; its wall time and earlier commits go on from its interrupted result. The stops fall
    on steps whose metrics Lightning writes (every 5th)."""
    n = len(jobs)
    whole = train_stack([make_cfg(tmp_path / "whole", *job) for job in jobs],
                        [tmp_path / "whole" / str(i) for i in range(n)])
    step = StackedRecallModule.training_step
    stop_at(monkeypatch, stop, StackedRecallModule)
    cfgs = [make_cfg(tmp_path, *job) for job in jobs]
    dirs = [tmp_path / str(i) for i in range(n)]
    with pytest.raises(BaseException, match="SIGTERM"):
        train_stack(cfgs, dirs)
    for d in dirs:
        interrupted = json.loads((d / "result.json").read_text())
        assert interrupted["status"] == "interrupted"
        interrupted.update(wall_time_s=1000.0, git_commit="abc")  # as if it had run long, at another commit
        (d / "result.json").write_text(json.dumps(interrupted))
    checkpoint = stack_checkpoint(dirs[0])
    assert checkpoint["state_dict"]["in_stack"].tolist() == in_stack
    for d, w, running in zip(dirs, whole, in_stack):  # the signal's step is the stack's: an ended run says its own
        reason = json.loads((d / "result.json").read_text())["status_reason"]
        assert reason.startswith(f"SIGTERM at step {stop + 1}: "), reason  # at the end of the step it came in
        assert (f"(this run had ended at step {w['steps']}: " in reason) != running, reason
    assert checkpoint["state_dict"]["model.embed/weight"].shape[0] == n  # every run, whichever are in the stack
    monkeypatch.setattr(StackedRecallModule, "training_step", step)
    started = time.perf_counter()
    resumed = train_stack(cfgs, dirs)
    segment = time.perf_counter() - started
    for i, (w, r) in enumerate(zip(whole, resumed)):
        assert r["resumed"] and r["status"] == w["status"] and r["steps"] == w["steps"]
        assert r["best_val_acc"] == pytest.approx(w["best_val_acc"], abs=1e-6, nan_ok=True)
        assert r["test_loss"] == pytest.approx(w["test_loss"], abs=1e-5, nan_ok=True)
        assert 1000 < r["wall_time_s"] <= 1000 + segment  # the earlier segment's 1000 s once, and this one's
        assert r["earlier_git_commits"] == ["abc"] and w["earlier_git_commits"] == []
        assert untimed_rows(dirs[i]) == untimed_rows(tmp_path / "whole" / str(i))


def untimed_rows(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.csv, its values to float rounding, without the tokens per second."""
    return [{k: pytest.approx(float(v), rel=1e-4, abs=1e-6, nan_ok=True) if v else v for k, v in row.items()
             if k != "train/tokens_per_s"} for row in metrics_rows(run_dir)]


def test_a_run_given_twice_trains_once(tmp_path):
    """`sandbox-train -m seed=0,0,1 hydra.launcher.stack=true` gives the stack one run twice, in one folder: it
    trained as two runs of a stack of three, writing every row of that folder's metrics.csv twice."""
    jobs = [("seed=0",), ("seed=1",), ("seed=0",)]
    dirs = [tmp_path / "0", tmp_path / "1", tmp_path / "0"]
    results = train_stack([make_cfg(tmp_path, "trainer.max_steps=10", *job) for job in jobs], dirs)
    assert results[0] == results[2] and [r["stack"]["runs"] for r in results] == [2, 2, 2]
    steps = [row["step"] for row in metrics_rows(dirs[0]) if row["train/loss"]]
    assert steps and len(steps) == len(set(steps))
    with pytest.raises(ConfigError, match="is the folder of two runs of other configurations"):
        train_stack([make_cfg(tmp_path, "seed=0"), make_cfg(tmp_path, "seed=1")], [tmp_path / "2", tmp_path / "2"])


def test_runs_that_differ_in_more_than_seed_and_optimizer_are_not_stacked(tmp_path):
    with pytest.raises(ConfigError, match="may differ only in seed, optim.lr, optim.weight_decay"):
        train_stack([make_cfg(tmp_path, "model.d_model=16"), make_cfg(tmp_path, "model.d_model=32")],
                    [tmp_path / "a", tmp_path / "b"])


def test_runs_a_stack_cannot_train_as_alone_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="trainer.devices=2 cannot be stacked"):
        train_stack([make_cfg(tmp_path, "trainer.devices=2", f"seed={seed}") for seed in (0, 1)],
                    [tmp_path / "a", tmp_path / "b"])
    # float16's loss scale would be shared by the runs (a CPU refuses float16 itself, before the stack's check)
    assert "cannot be stacked" in stack_problem(make_cfg(tmp_path, "trainer.precision=16-mixed"))
    assert stack_problem(make_cfg(tmp_path, "trainer.precision=bf16-mixed")) is None
    # CUDA graphs capture one run's model: such runs train alone
    assert "cuda_graphs=true cannot be stacked" in stack_problem(make_cfg(tmp_path, "cuda_graphs=true"))


def sandbox_train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sandbox.train", "-m", *SMALL, "trainer.max_steps=20",
                           f"output_root={tmp_path}", *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


def test_multirun_stacks_when_asked_and_gives_the_runs_it_gives_alone(tmp_path):
    grid = ("model=gated_deltanet", "seed=0,1", "optim.lr=1e-3")
    stacked = sandbox_train(tmp_path / "stacked", *grid, "hydra.launcher.stack=true")
    alone = sandbox_train(tmp_path / "alone", *grid, "hydra.launcher.stack=false")
    for done in (stacked, alone):
        assert done.returncode == 0, done.stderr[-2000:]
    assert "2 runs stacked" in stacked.stdout and "stacked" not in alone.stdout
    for folder in sorted((tmp_path / "alone" / "train").glob("*lr=0.001*")):
        stacked_dir = tmp_path / "stacked" / "train" / folder.name  # the same folder name, stacked or not
        result = json.loads((stacked_dir / "result.json").read_text())
        assert result["stack"]["runs"] == 2
        assert_same_run(json.loads((folder / "result.json").read_text()), result, folder, stacked_dir)


@pytest.mark.parametrize("refusal", [OtherComputation("its earlier segment ran at precision bf16-mixed"),
                                     ConfigError("the seeds of these stacked runs give their data other slices")],
                         ids=["other-computation", "other-config-error"])
def test_a_stack_refused_for_its_computation_fails_its_jobs_and_others_run_alone(refusal, tmp_path, monkeypatch):
    """A stack whose checkpoint was written at another precision would otherwise be run again one run at a time,
    from scratch, past the error that says to resume it elsewhere or remove it: its jobs fail with that error.
    Any other error of the stack (a ConfigError too) has its runs tried alone, each reporting its own."""
    def refuse(cfgs, run_dirs):
        raise refusal

    alone = []
    monkeypatch.setattr(sandbox.stacked_run, "train_stack", refuse)
    monkeypatch.setattr(sandbox.train, "train", lambda cfg, run_dir: alone.append(run_dir) or run_dir)
    jobs = [(JobReturn(), make_cfg(tmp_path, f"seed={seed}"), tmp_path / str(seed)) for seed in (0, 1)]
    outcomes = _outcomes(jobs)
    if isinstance(refusal, OtherComputation):
        assert not alone and outcomes == [("failed", refusal)] * 2
        _finish(jobs, outcomes)
        assert all(ret.status == JobStatus.FAILED and ret._return_value is refusal for ret, _, _ in jobs)
    else:
        assert alone == [tmp_path / "0", tmp_path / "1"]
        assert outcomes == [("result", run_dir) for run_dir in alone]


@pytest.mark.parametrize("setting, named", [("hydra.launcher.stack=maybe", "hydra.launcher.stack='maybe'"),
                                            ("hydra.launcher.stack=1", "hydra.launcher.stack=1"),
                                            ("hydra.launcher.max_runs=0", "hydra.launcher.max_runs=0"),
                                            ("hydra.launcher.processes=0", "hydra.launcher.processes=0"),
                                            ("hydra.launcher.processes=true", "hydra.launcher.processes=True"),
                                            ("hydra.launcher.processes=2 trainer.devices=2",
                                             "hydra.launcher.processes=2 cannot train a job on several devices")])
def test_bad_launcher_settings_are_one_line_errors(setting, named, tmp_path):
    done = sandbox_train(tmp_path, "seed=0,1", *setting.split())
    assert done.returncode == 2 and named in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not list(tmp_path.glob("train/*/")), "a job's folder was left"


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["attention", "gated_deltanet", "mom"])
def test_stacked_runs_on_the_gpu_start_as_the_runs_alone(model, tmp_path):
    """bf16-mixed on the Triton kernels (what `sandbox-train -m` stacks on a GPU): each run of a stack logs the
    first training losses of the same run alone, to bf16 rounding, and ends the same way."""
    jobs = [("seed=0", "optim.lr=3e-3"), ("seed=1", "optim.lr=1e-2")]
    gpu = (f"model={model}", "trainer.accelerator=gpu", "trainer.precision=bf16-mixed", "model.backend=triton")
    alone = [train(make_cfg(tmp_path, *gpu, *job), tmp_path / "alone" / str(i)) for i, job in enumerate(jobs)]
    stacked = train_stack([make_cfg(tmp_path, *gpu, *job) for job in jobs],
                          [tmp_path / "stacked" / str(i) for i in range(len(jobs))])
    for i, (a, s) in enumerate(zip(alone, stacked)):
        assert (s["status"], s["steps"], s["backend"]) == (a["status"], a["steps"], "triton")
        first, first_alone = (next(r for r in metrics_rows(tmp_path / kind / str(i)) if r["train/loss"])
                              for kind in ("stacked", "alone"))
        assert float(first["train/loss"]) == pytest.approx(float(first_alone["train/loss"]), rel=2e-2)


@pytest.mark.parametrize("model", ["attention", "gated_deltanet", "mom"])
def test_auto_stacks_on_a_gpu_only_the_mixers_where_stacking_measured_faster(model, tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, f"model={model}", "trainer.accelerator=auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not stacks(cfg, "auto")  # the CPU: one at a time
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert stacks(cfg, "auto") == (cfg.model.mixer in STACK_PAYS)
    assert stacks(cfg, True) and not stacks(cfg, False)


def test_a_stack_resumed_after_every_run_ended_trains_no_further(tmp_path, monkeypatch):
    """Both runs end at the validation of step 26 (one at its threshold, one for patience); killed while testing
    (its result.json files lost), the same command tests them again and trains no step past that stop, where
    Lightning would train the stack on to its next validation."""
    jobs = [("seed=0",), ("seed=1",)]
    common = ("model=attention", "optim.lr=1e-2", "trainer.max_steps=80", "callbacks.early_stopping.threshold=0.05",
              "callbacks.early_stopping.patience=1")
    dirs = [tmp_path / str(i) for i in range(len(jobs))]
    whole = train_stack([make_cfg(tmp_path, *common, *job) for job in jobs], dirs)
    assert [r["steps"] for r in whole] == [26, 26] and "threshold" in whole[0]["status_reason"]
    for d in dirs:
        (d / "result.json").unlink()
    trained, step = [], StackedRecallModule.training_step
    monkeypatch.setattr(StackedRecallModule, "training_step", lambda self, *a: trained.append(1) or step(self, *a))
    resumed = train_stack([make_cfg(tmp_path, *common, *job) for job in jobs], dirs)
    assert not trained
    for d, w, r in zip(dirs, whole, resumed):
        assert r["resumed"] and {k: r[k] for k in SAME + CLOSE} == {k: w[k] for k in SAME + CLOSE}
        assert sum(1 for row in metrics_rows(d) if row["test/acc"]) == 1  # one test, at the step it stopped


@pytest.mark.parametrize("killed", [False, True], ids=["interrupted", "killed-before-its-results"])
def test_a_stack_is_not_resumed_where_auto_resolves_to_another_precision(killed, tmp_path, monkeypatch):
    """A stack interrupted in bf16 (trainer.precision=auto on a GPU), or killed before its runs wrote their
    results, is not finished in float32 (the same command on the CPU): the command stops, naming the stack's
    folder (whose checkpoint holds the weights) and both precisions, and leaves every file as it was."""
    jobs = [("seed=0",), ("seed=1",)]
    dirs = [tmp_path / str(i) for i in range(len(jobs))]
    with monkeypatch.context() as gpu:
        gpu.setattr(sandbox.settings, "precision_used", lambda setting: "bf16-mixed")
        stop_at(gpu, 4, StackedRecallModule)
        with pytest.raises(BaseException, match="SIGTERM"):
            train_stack([make_cfg(tmp_path, "model=attention", *job) for job in jobs], dirs)
    if killed:
        for run_dir in dirs:
            (run_dir / RESULT_FILE).unlink()
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match=r"\.stacks/\w+: its earlier segment ran at precision bf16-mixed on the "
                                          "torch kernels, this one 32-true on torch"):
        train_stack([make_cfg(tmp_path, "model=attention", *job) for job in jobs], dirs)
    assert snapshot(tmp_path) == before


def test_a_stack_checkpoint_is_not_resumed_after_one_of_its_runs_trained_elsewhere(tmp_path, monkeypatch, capsys):
    """A stack interrupted at step 14, then its first run alone (`sandbox-train seed=0`, from scratch) interrupted
    at step 4, then the stack's command again: resumed from the stack's step 14, that run's metrics.csv would lack
    the rows of steps 5-14 (dropped by the run alone) and its wall time and commits would be those of the run
    alone. The checkpoint is set aside instead and the stack starts again, ending as an uninterrupted one."""
    jobs = [("seed=0",), ("seed=1",)]
    whole = train_stack([make_cfg(tmp_path / "whole", "model=attention", *job) for job in jobs],
                        [tmp_path / "whole" / str(i) for i in range(len(jobs))])
    cfgs = [make_cfg(tmp_path, "model=attention", *job) for job in jobs]
    dirs = [tmp_path / str(i) for i in range(len(jobs))]
    for stop, run in ((14, lambda: train_stack(cfgs, dirs)), (4, lambda: train(cfgs[0], dirs[0]))):
        with monkeypatch.context() as patch:
            stop_at(patch, stop, StackedRecallModule if stop == 14 else RecallModule)
            with pytest.raises(BaseException, match="SIGTERM"):
                run()
    again = train_stack(cfgs, dirs)
    for i, (w, r) in enumerate(zip(whole, again)):
        assert untimed_rows(dirs[i]) == untimed_rows(tmp_path / "whole" / str(i))
        assert not r["resumed"] and r["steps"] == w["steps"] and r["test_loss"] == pytest.approx(w["test_loss"])
    assert "0 was trained elsewhere after it (alone or in another stack); moved to last.ckpt.unusable" in \
        capsys.readouterr().out


class SignalInLastTestBatch(L.Callback):
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx == trainer.num_test_batches[dataloader_idx] - 1:
            signal.raise_signal(signal.SIGTERM)


def test_a_signal_in_a_stacks_last_test_batch_records_its_runs_and_stops(tmp_path, capsys):
    """Lightning ends a test in whose last batch SIGTERM came: each run is recorded as it ended and the command
    stops (RunInterrupted). The signal was lost: a multirun went on to its next stack, and the command exited 0."""
    jobs = [("seed=0",), ("seed=1",)]
    dirs = [tmp_path / str(i) for i in range(len(jobs))]
    with pytest.raises(RunInterrupted, match="SIGTERM"):
        train_stack([make_cfg(tmp_path, "trainer.max_steps=10", *job) for job in jobs], dirs,
                    extra_callbacks=[SignalInLastTestBatch()])
    assert "SIGTERM received as it ended, its end recorded: stopping" in capsys.readouterr().err
    assert [json.loads((d / RESULT_FILE).read_text())["status"] for d in dirs] == ["finished", "finished"]


def test_a_signal_before_a_stacks_checkpoint_is_restored_leaves_its_runs_earlier_records(tmp_path, monkeypatch):
    """A stack interrupted at step 15, then again while Lightning restores its checkpoint: each run's record was
    overwritten with steps 0 and "SIGTERM at step 0", what the trainer knew then; it stays the first segment's."""
    jobs = [("seed=0",), ("seed=1",)]
    cfgs = [make_cfg(tmp_path, "trainer.max_steps=20", *job) for job in jobs]
    dirs = [tmp_path / str(i) for i in range(len(jobs))]
    with monkeypatch.context() as patch:
        stop_at(patch, 14, StackedRecallModule)
        with pytest.raises(RunInterrupted, match="SIGTERM"):
            train_stack(cfgs, dirs)
    first = [(d / RESULT_FILE).read_text() for d in dirs]
    assert [json.loads(f)["steps"] for f in first] == [15, 15]
    with pytest.raises(RunInterrupted, match="SIGTERM"):
        train_stack(cfgs, dirs, extra_callbacks=[SignalAt("on_load_checkpoint")])
    assert [(d / RESULT_FILE).read_text() for d in dirs] == first
    assert [r["steps"] for r in train_stack(cfgs, dirs)] == [20, 20]
