"""Run folders hold one configuration each, every end of a run is recorded as what it is, and no checkpoint
that cannot be used for a run stops it (docs/bad_inputs.md, "Faults that are not errors")."""

import csv
import errno
import json
import math
import shutil
import signal
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import sandbox.settings
import sandbox.train
from sandbox import runs
from sandbox.callbacks import RunInterrupted
from sandbox.module import RecallModule
from sandbox.results import RESULT_FILE, config_hash
from sandbox.train import CONF_DIR, ConfigError, train
from test_faults import snapshot

FAST = ["debug=fast", "task.limit_examples=64", "model.n_layers=1"]
# Three epochs of four steps, two validation batches after each: last.ckpt and best.ckpt, a few seconds.
SMALL = ["model=deltanet", "model.n_layers=1", "task.params.vocab_size=64", "task.limit_examples=64",
         "task.batch_size=16", "task.eval_batch_size=32", "trainer.max_epochs=3", "trainer.limit_test_batches=1",
         "optim.lr=1e-2", "callbacks.early_stopping.threshold=1.0"]
METRICS = ("best_val_acc", "test_acc", "test_loss", "test_acc_per_slice", "steps", "epochs")


def make_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=[*overrides, "callbacks.progress=none"])


def train_cli(monkeypatch, *args: str) -> int:
    """`sandbox-train ARGS` in this process (the exit code it would have)."""
    monkeypatch.setattr(sys, "argv", ["sandbox-train", *args, "callbacks.progress=none"])
    try:
        return sandbox.train.main()
    finally:
        GlobalHydra.instance().clear()


def read_result(folder: Path) -> dict:
    (path,) = folder.rglob("result.json")
    return json.loads(path.read_text())


def sandbox_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("sandbox-train:")]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> tuple[Path, dict]:
    """SMALL, finished: its folder and result."""
    folder = tmp_path_factory.mktemp("small") / "run"
    return folder, train(make_cfg(*SMALL), folder)


def copy_of(small_run, tmp_path: Path) -> Path:
    """A copy of the small run's folder without its result.json: a run that has checkpoints to resume from."""
    folder = tmp_path / "run"
    shutil.copytree(small_run[0], folder)
    (folder / "result.json").unlink()
    return folder


# ---- identity ----
def test_config_hash_is_every_setting_but_output_and_display():
    def digest(*overrides):
        return config_hash(OmegaConf.to_container(make_cfg(*SMALL, *overrides), resolve=True))

    base = digest()
    for same in ("output_root=/elsewhere", "name=other", "callbacks.progress=lines", "logger=tensorboard"):
        assert digest(same) == base, same
    for other in ("optim.lr=2e-2", "seed=1", "trainer.max_epochs=4", "model.mixer_options.expand_v=2"):
        assert digest(other) != base, other


def test_ten_overrides_make_a_short_readable_folder(tmp_path, monkeypatch):
    overrides = [*FAST, "model=deltanet", "optim.lr=2e-3", "optim.weight_decay=0.01", "seed=3",
                 "task.params.vocab_size=64", "task.batch_size=8",
                 "task.segments.train=[{seq_len: 64, num_kv_pairs: 4, num_examples: 64},"
                 "{seq_len: 32, num_kv_pairs: 2, num_examples: 64}]"]
    assert len(overrides) == 10
    assert train_cli(monkeypatch, *overrides, f"output_root={tmp_path}") == 0
    (folder,) = (tmp_path / "train").iterdir()
    assert len(folder.name.encode()) <= 255 and folder.name.startswith("debug=fast,model.n_layers=1,model=deltanet")
    assert folder.name.endswith("-" + read_result(folder)["config_hash"][:12]), folder.name
    # Any length, any separator in a value: one folder name within the limit.
    name = runs.folder_name("task.params.path=a/b," + "x" * 1000, "0" * 64)
    assert len(name.encode()) <= 255 and "/" not in name and name.startswith("task.params.path=a_b,x")


def test_edited_or_namesake_experiment_never_gets_another_configurations_result(tmp_path, monkeypatch, capsys):
    experiments = tmp_path / "conf" / "experiment"
    experiments.mkdir(parents=True)

    def run(file: str, lr: float) -> str:
        (experiments / f"{file}.yaml").write_text(f"# @package _global_\nname: mine\noptim:\n  lr: {lr}\n")
        assert train_cli(monkeypatch, f"hydra.searchpath=[file://{tmp_path / 'conf'}]", f"experiment={file}",
                         *FAST, f"output_root={tmp_path / 'out'}") == 0
        return capsys.readouterr().out

    assert "already finished" not in run("a", 1e-3) + run("a", 2e-3) + run("b", 3e-3)  # edited; same name
    stored = [json.loads(p.read_text()) for p in (tmp_path / "out" / "mine").glob("*/result.json")]
    assert sorted(r["config"]["optim"]["lr"] for r in stored) == [1e-3, 2e-3, 3e-3]
    assert "already finished" in run("a", 1e-3)


def test_folder_of_another_configuration_is_refused_untouched(small_run, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(small_run[0], folder)
    before = snapshot(folder)
    with pytest.raises(ConfigError, match="holds a run of another configuration"):
        train(make_cfg(*SMALL, "optim.lr=2e-2"), folder)
    assert snapshot(folder) == before


def test_result_written_before_statuses_counts_as_finished(small_run, tmp_path, capsys):
    folder = tmp_path / "run"
    shutil.copytree(small_run[0], folder)
    old = {k: v for k, v in small_run[1].items() if k not in ("status", "status_reason", "config_hash")}
    (folder / "result.json").write_text(json.dumps(old))
    assert train(make_cfg(*SMALL), folder) == json.loads(json.dumps(old))
    assert "already finished" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="another configuration"):  # its config still says what it is
        train(make_cfg(*SMALL, "seed=1"), folder)


def test_result_whose_config_was_edited_is_not_returned_as_this_run(small_run, tmp_path, capsys):
    """A result.json whose config was edited by hand (its learning rate) is not the record of the run that its
    config_hash says: set aside, and the run is tested again from its checkpoints."""
    folder = tmp_path / "run"
    shutil.copytree(small_run[0], folder)
    edited = json.loads((folder / "result.json").read_text())
    edited["config"]["optim"]["lr"] = 2e-2
    (folder / "result.json").write_text(json.dumps(edited))
    result = train(make_cfg(*SMALL), folder)
    assert "its config is not the one its config_hash was computed from" in capsys.readouterr().out
    assert result["config"]["optim"]["lr"] == 1e-2 and (folder / "result.json.unusable").exists()
    for key in METRICS:
        assert result[key] == small_run[1][key], key


@pytest.mark.parametrize("edit", ["test-acc-removed", "accuracies-nan"])
def test_result_edited_by_hand_into_an_unreportable_one_is_set_aside(edit, small_run, tmp_path, capsys):
    """A result.json that sandbox-report would skip (a finished status without accuracies: edited by hand, an
    interrupted run's made `finished`) is not returned as the run's end: set aside, and the run is tested again
    from its checkpoints. It was returned as finished (best val acc nan), or stopped the command with a
    KeyError."""
    folder = tmp_path / "run"
    shutil.copytree(small_run[0], folder)
    edited = json.loads((folder / "result.json").read_text())
    if edit == "test-acc-removed":
        del edited["test_acc"]
    else:
        edited.update(best_val_acc=float("nan"), test_acc=float("nan"))
    (folder / "result.json").write_text(json.dumps(edited))
    assert sandbox.train.run_alone(make_cfg(*SMALL), folder) == small_run[1]["best_val_acc"]
    out = capsys.readouterr().out
    assert "already finished" not in out and "result.json cannot be used: status finished but" in out, out
    assert (folder / "result.json.unusable").exists()
    result = read_result(folder)
    for key in METRICS:
        assert result[key] == small_run[1][key], key


# ---- how runs end ----
def test_divergence_stops_the_run_is_recorded_and_not_repeated(tmp_path, monkeypatch, capsys):
    real_step = RecallModule.training_step

    def nan_from_step_2(self, batch, batch_idx):
        loss = real_step(self, batch, batch_idx)
        return loss * float("nan") if self.global_step >= 2 else loss

    monkeypatch.setattr(RecallModule, "training_step", nan_from_step_2)
    command = [*SMALL, f"output_root={tmp_path}"]
    assert train_cli(monkeypatch, *command) == 3
    (line,) = sandbox_lines(capsys.readouterr().err)
    assert "diverged: training loss nan at step 3" in line, line
    result = read_result(tmp_path)
    assert result["status"] == "diverged" and result["steps"] == 3  # of 12: stopped at once
    assert math.isnan(result["test_acc"]) and math.isnan(result["best_val_acc"])
    assert train_cli(monkeypatch, *command) == 3
    assert "already diverged (training loss nan at step 3)" in capsys.readouterr().out
    assert read_result(tmp_path) == result


def test_weights_made_non_finite_by_the_last_step_are_diverged_not_finished(tmp_path, monkeypatch):
    # The last step's update is seen by no training loss (lr 1e8 on MoM did this), only by the weights at the end.
    def nan_weights_after_last_step(self, outputs, batch, batch_idx):
        if self.global_step == 12:  # the last of SMALL: 3 epochs of 4 steps
            with torch.no_grad():
                next(self.parameters()).fill_(float("nan"))

    monkeypatch.setattr(RecallModule, "on_train_batch_end", nan_weights_after_last_step, raising=False)
    command = [*SMALL, f"output_root={tmp_path}"]
    assert train_cli(monkeypatch, *command) == 3
    result = read_result(tmp_path)
    assert result["status"] == "diverged", result["status"]
    assert result["status_reason"] == "weights not finite after step 12"
    assert math.isnan(result["test_acc"]) and math.isnan(result["best_val_acc"])


def test_run_without_a_training_step_or_a_validation_is_not_trained(tmp_path, monkeypatch, capsys):
    # Settings that make such a run are refused before any work (sandbox/settings.py) ...
    assert train_cli(monkeypatch, *FAST, "trainer.limit_train_batches=0", f"output_root={tmp_path}") == 2
    (line,) = sandbox_lines(capsys.readouterr().err)
    assert "trainer.limit_train_batches" in line, line
    # ... and a fit that still ends that way is recorded as not trained, never as finished.
    from types import SimpleNamespace

    from sandbox.train import fit_status
    cfg = make_cfg(*FAST)
    assert fit_status(cfg, SimpleNamespace(global_step=0), validated=False, stopped=None)[0] == "not_trained"
    status, reason = fit_status(cfg, SimpleNamespace(global_step=3), validated=False, stopped=None)
    assert status == "not_trained" and reason.startswith("it never validated in its 3 steps")


def test_run_failing_on_its_kernels_backend_still_records_its_failure(tmp_path, monkeypatch):
    """model.backend=triton without CUDA is refused before work; a run that fails on it anyway (the check
    skipped) gets its result.json, although the backend it asked for cannot be resolved here."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the tests' Triton interpreter (conftest.py)
    monkeypatch.setattr(sandbox.train, "check_settings", lambda cfg: None)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        train(make_cfg(*FAST, "model.backend=triton"), tmp_path / "run")
    result = read_result(tmp_path)
    assert result["status"] == "failed" and "needs a CUDA device" in result["status_reason"]
    assert result["backend"] == "triton"


class CrashInSecondEpoch(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 1:
            raise RuntimeError("injected crash")


@pytest.mark.parametrize("killed", [False, True], ids=["failed", "killed-before-its-result"])
def test_run_is_not_resumed_where_auto_resolves_to_another_precision(killed, tmp_path, monkeypatch, capsys):
    """A run whose first segment ran in bf16 (trainer.precision=auto on a GPU) and failed, or was killed before
    it wrote its result, is not finished in float32 (the same command on the CPU): its weights would be of two
    computations, and its result would say float32 only. The command stops, naming both, and leaves the folder
    as it was."""
    with monkeypatch.context() as gpu:
        gpu.setattr(sandbox.settings, "precision_used", lambda setting: "bf16-mixed")
        with pytest.raises(RuntimeError, match="injected crash"):
            train(make_cfg(*SMALL), tmp_path, extra_callbacks=[CrashInSecondEpoch()])
    assert read_result(tmp_path)["precision"] == "bf16-mixed"
    if killed:
        (tmp_path / RESULT_FILE).unlink()
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match="precision bf16-mixed on the torch kernels, this one 32-true on torch"):
        train(make_cfg(*SMALL), tmp_path)
    assert snapshot(tmp_path) == before


class SignalAtStep(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            signal.raise_signal(signal.SIGTERM)


def test_run_started_from_scratch_in_a_reused_folder_logs_only_its_own_metrics(tmp_path):
    """A folder that held another configuration's run, killed before its result.json (`train(cfg, folder)`, as
    sweeps give their trials' folders): its checkpoints are set aside, and the run's metrics.csv holds its own
    rows alone. The other run's rows logged before this run's first one stayed (its train/loss at steps 0-2)."""
    folder = tmp_path / "run"
    with pytest.raises(RunInterrupted):
        train(make_cfg(*SMALL, "trainer.log_every_n_steps=1", "optim.lr=2e-2"), folder,
              extra_callbacks=[SignalAtStep(6)])
    (folder / RESULT_FILE).unlink()  # killed outright: nothing says whose folder it is but its checkpoints
    result = train(make_cfg(*SMALL), folder)
    reference = train(make_cfg(*SMALL), tmp_path / "reference")
    assert not result["resumed"] and result["best_val_acc"] == reference["best_val_acc"]

    def rows(run_dir: Path) -> list[dict]:
        with open(run_dir / "logs" / "metrics.csv") as f:
            return [{k: v for k, v in row.items() if k != "train/tokens_per_s"} for row in csv.DictReader(f)]

    assert rows(folder) == rows(tmp_path / "reference")


# ---- what a bad setting leaves: no folder made, none removed ----
@pytest.mark.parametrize("existing", [["e"], ["e", "e/train"]], ids=["output-root-empty", "name-folder-empty"])
def test_bad_setting_removes_only_the_folders_its_command_made(existing, tmp_path, monkeypatch):
    """`mkdir e && cd e && sandbox-train output_root=. model.d_model=0` once removed `e` itself."""
    for folder in existing:
        (tmp_path / folder).mkdir()
    monkeypatch.chdir(tmp_path / "e")
    assert train_cli(monkeypatch, *FAST, "output_root=.", "model.d_model=0") == 2
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == existing
    # an output root that the command made is removed again: nothing was there, nothing is
    assert train_cli(monkeypatch, *FAST, f"output_root={tmp_path}/new", "model.d_model=0") == 2
    assert not (tmp_path / "new").exists()


class SignalInValidation(L.Callback):
    """Sends this process SIGTERM after the first batch of the validation at `step`."""

    def __init__(self, step: int):
        self.step = step

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if trainer.global_step == self.step and batch_idx == 0:
            signal.raise_signal(signal.SIGTERM)


def test_signal_in_validation_resumes_from_the_last_validation(small_run, tmp_path):
    with pytest.raises(RunInterrupted):
        train(make_cfg(*SMALL), tmp_path, extra_callbacks=[SignalInValidation(8)])
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == "interrupted" and "resumes from last.ckpt" in result["status_reason"], result
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    resumed = train(make_cfg(*SMALL), tmp_path)
    assert resumed["resumed"]
    for key in METRICS:
        assert resumed[key] == small_run[1][key], key


def test_run_killed_after_its_early_stop_is_not_trained_further(tmp_path):
    """Killed after the validation that stopped it at its threshold (while testing, say), before its result.json:
    the same command tests it again and trains no step past that stop."""
    stopping = [*SMALL[:-1], "callbacks.early_stopping.threshold=0.015"]
    reference = train(make_cfg(*stopping), tmp_path / "reference")
    assert "reached callbacks.early_stopping.threshold" in reference["status_reason"] and reference["epochs"] < 3
    folder = copy_of((tmp_path / "reference", reference), tmp_path)
    resumed = train(make_cfg(*stopping), folder)
    assert resumed["resumed"] and resumed["status_reason"] == reference["status_reason"]
    for key in METRICS:
        assert resumed[key] == reference[key], key
    with open(folder / "logs" / "metrics.csv") as f:
        assert sum(1 for row in csv.DictReader(f) if row["test/acc"]) == 1  # one test, at the step it stopped


class SignalInLastTestBatch(L.Callback):
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        signal.raise_signal(signal.SIGTERM)  # SMALL tests one batch: the last


def test_signal_in_the_last_test_batch_records_the_run_and_stops(small_run, tmp_path, capsys):
    """Lightning ends a test in whose last batch SIGTERM came: the run is recorded as it ended (finished) and the
    command stops with RunInterrupted, as for a signal at any other moment. The signal was lost: the command went
    on (a multirun to its next run) and exited 0."""
    with pytest.raises(RunInterrupted, match="SIGTERM"):
        train(make_cfg(*SMALL), tmp_path, extra_callbacks=[SignalInLastTestBatch()])
    assert "SIGTERM received as it ended, its end recorded: stopping" in capsys.readouterr().err
    result = read_result(tmp_path)
    assert result["status"] == "finished"
    for key in METRICS:
        assert result[key] == small_run[1][key], key


# ---- checkpoints that cannot be used ----
def rewrite(path: Path, change) -> None:
    checkpoint = torch.load(path, weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, path)


def other_shape(checkpoint: dict) -> None:
    key = next(iter(checkpoint["state_dict"]))
    checkpoint["state_dict"][key] = torch.zeros(3, 5)


def unreadable(path: Path) -> None:
    path.unlink()
    path.mkdir()


# (file broken, how, what the message says, where the run goes on from). A last.ckpt is used only with the
# best.ckpt it names, so with best.ckpt set aside, last.ckpt is too and the run starts again.
BROKEN = {
    "truncated-last": ("last.ckpt", lambda p: p.write_bytes(p.read_bytes()[:1000]), "truncated or corrupt", "best"),
    "garbage-best": ("best.ckpt", lambda p: p.write_bytes(b"not a checkpoint"), "a safe load refuses", "scratch"),
    "empty-last": ("last.ckpt", lambda p: p.write_bytes(b""), "empty or truncated", "best"),
    "not-a-dict-last": ("last.ckpt", lambda p: torch.save([1, 2], p), "it holds a list", "best"),
    "keys-missing-best": ("best.ckpt", lambda p: torch.save({"state_dict": {}}, p), "keys [", "scratch"),
    "other-config-last": ("last.ckpt", lambda p: rewrite(p, lambda c: c.update(config_hash="0" * 64)),
                          "written by another configuration", "best"),
    "no-config-hash-best": ("best.ckpt", lambda p: rewrite(p, lambda c: c.pop("config_hash")),
                            "it records no configuration", "scratch"),
    "other-shapes-last": ("last.ckpt", lambda p: rewrite(p, other_shape), "its weights are not this model's", "best"),
    "unreadable-last": ("last.ckpt", unreadable, "cannot be read", "best"),
    "not-restorable-last": ("last.ckpt", lambda p: rewrite(p, lambda c: c.update(loops={"fit_loop": 1})),
                            "it cannot be restored", "best"),
}


def test_a_checkpoint_cut_in_the_middle_is_truncated_not_unreadable(tmp_path):
    """torch.load raises OSError (EINVAL) on some zips cut in the middle, which read as "cannot be read (Invalid
    argument)", the words of a file that cannot be opened or read."""
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.randn(20000)}}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(OSError):  # the case itself, as this torch gives it
        torch.load(path, map_location="cpu", weights_only=True)
    assert runs.checkpoint_problem(path, "0" * 64, {}).startswith("truncated or corrupt (OSError")
    unreadable(path)
    assert runs.checkpoint_problem(path, "0" * 64, {}).startswith("cannot be read")


@pytest.mark.parametrize("case", BROKEN)
def test_unusable_checkpoint_is_set_aside_and_the_run_goes_on(case, small_run, tmp_path, capsys):
    name, breaking, says, goes_on_from = BROKEN[case]
    folder = copy_of(small_run, tmp_path)
    broken = folder / "checkpoints" / name
    breaking(broken)
    result = train(make_cfg(*SMALL), folder)
    out = capsys.readouterr()
    assert f"{broken} cannot be used: " in out.out and says in out.out, out.out
    assert (folder / "checkpoints" / f"{name}.unusable").exists()
    assert "weights_only" not in out.out + out.err
    if goes_on_from == "best":
        assert f"resuming from {folder / 'checkpoints' / 'best.ckpt'}" in out.out and result["resumed"]
    else:
        assert "starting from scratch" in out.out and not result["resumed"]
    for key in METRICS:
        assert result[key] == small_run[1][key], key
    assert train(make_cfg(*SMALL), folder) == json.loads(json.dumps(result))  # and the next command is done


def test_last_checkpoint_without_its_best_starts_again(small_run, tmp_path, capsys):
    folder = copy_of(small_run, tmp_path)
    (folder / "checkpoints" / "best.ckpt").unlink()
    result = train(make_cfg(*SMALL), folder)
    out = capsys.readouterr().out
    assert "last.ckpt cannot be used: it needs best.ckpt" in out and "starting from scratch" in out, out
    for key in METRICS:
        assert result[key] == small_run[1][key], key


class FailingTest(L.Callback):
    def on_test_start(self, trainer, pl_module):
        raise RuntimeError("injected test failure")


def fill_the_disk(monkeypatch) -> None:
    """Every write of the run's logger fails as on a full disk (the first comes before the checkpoint is restored)."""
    def save(writer):
        raise OSError(errno.ENOSPC, "No space left on device", writer.metrics_file_path)
    monkeypatch.setattr(sandbox.train._ResumableWriter, "save", save)


@pytest.mark.parametrize("fault", ["test-fails", "disk-full"])
def test_an_error_of_a_resumed_run_keeps_its_checkpoints(fault, small_run, tmp_path, monkeypatch, capsys):
    """A resumed run that fails before its first step for a reason not its checkpoints' (its test raises, the disk is
    full) is recorded as failed and keeps them: the same command resumes from them. They were set aside as `cannot be
    restored`, and the run trained again from scratch."""
    folder = copy_of(small_run, tmp_path)
    with monkeypatch.context() as patch, pytest.raises((RuntimeError, ConfigError)):
        if fault == "disk-full":
            fill_the_disk(patch)
        train(make_cfg(*SMALL), folder, extra_callbacks=[FailingTest()] if fault == "test-fails" else [])
    assert "cannot be used" not in capsys.readouterr().out
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    if fault == "test-fails":
        assert read_result(folder)["status"] == "failed"
    resumed = train(make_cfg(*SMALL), folder)
    assert resumed["resumed"]
    for key in METRICS:
        assert resumed[key] == small_run[1][key], key
