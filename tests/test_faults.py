"""Nothing lost, nothing wrong: bad inputs, killed and interrupted processes, determinism, atomic writes.

The bad-input cases here are the table in docs/bad_inputs.md: each command runs against an output root
that already holds a finished run and a finished one-trial study, and must end with one line naming the
setting, exit code 2, no traceback, and every file and folder of that root as it was.
"""

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import sandbox.sweep
import sandbox.train
from sandbox.callbacks import RunInterrupted
from sandbox.data import SPLITS, RecallDataModule
from sandbox.report import report
from sandbox.results import write_json_atomic
from sandbox.train import CONF_DIR, train

REPO = Path(__file__).resolve().parent.parent
FAST = ["debug=fast", "task.limit_examples=64", "model.n_layers=1"]
# Metrics that must come out the same when a run is repeated, resumed or restarted.
METRICS = ("best_val_acc", "test_acc", "test_loss", "test_acc_per_slice", "steps", "epochs", "router")


def make_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=[*overrides, "callbacks.progress=none"])


def snapshot(root: Path) -> dict[str, str]:
    """Every folder and file below root: its relative path -> 'dir' or the sha256 of its bytes."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def train_cli(monkeypatch, *args: str) -> int:
    """`sandbox-train ARGS` in this process (the exit code it would have)."""
    monkeypatch.setattr(sys, "argv", ["sandbox-train", *args])
    try:
        return sandbox.train.main()
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def finished_root(tmp_path_factory) -> Path:
    """An output root with a finished run and a finished one-trial study (whose trial is a run too)."""
    root = tmp_path_factory.mktemp("finished")
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert train_cli(monkeypatch, *FAST, "callbacks.progress=none", f"output_root={root}") == 0
    assert sandbox.sweep.main(["--n-trials", "1", "--output-root", str(root), *FAST]) == 0
    assert len(list(root.rglob("result.json"))) == 2 and len(list(root.rglob("study.db"))) == 1
    return root


def assert_one_line_naming(err: str, named: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "error:" in lines[0], err
    assert "Traceback" not in err


# ---- bad inputs (docs/bad_inputs.md) ----
BAD_TRAIN = {
    # tasks
    "task-impossible-size": (["task.segments.train=[{seq_len: 16, num_kv_pairs: 9, num_examples: 8}]"],
                             "num_kv_pairs"),
    "task-vocab-too-small": (["task.params.vocab_size=8"], "vocab_size"),
    "task-unknown-name": (["task.name=mqra"], "mqra"),
    "task-missing-split": (["task.segments.val=[]"], "task.segments"),
    "task-limit-zero": (["task.limit_examples=0"], "task.limit_examples"),
    "task-batch-zero": (["task.batch_size=0"], "task.batch_size"),
    "task-fuzzy-too-many-pairs": (["task=fuzzy_recall",
                                   "task.segments.train=[{seq_len: 64, num_kv_pairs: 8, num_examples: 8}]"],
                                  "num_kv_pairs"),
    "task-copy-too-long": (["task=selective_copying",
                            "task.segments.train=[{seq_len: 32, num_tokens_to_copy: 16, num_examples: 8}]"],
                           "num_tokens_to_copy"),
    "task-memorization-map-seed": (["task=memorization", "task.params.map_seed=-1"], "map_seed"),
    "task-labels-at-unknown": (["task=parity", "task.params.labels_at=end"], "labels_at"),
    "task-modulus-above-vocab": (["task=modular_sum", "task.params.modulus=10"], "vocab_size"),
    "task-s5-vocab-too-small": (["task=s5", "task.params.vocab_size=100"], "vocab_size"),
    "task-param-set-by-every-segment": (["+task.params.seq_len=16"], "task.params.seq_len"),
    # models
    "model-top-k-above-memories": (["model.mixer_options.top_k=5"], "top_k"),
    "model-top-k-zero": (["model.mixer_options.top_k=0"], "top_k"),
    "model-unknown-mixer": (["model.mixer=mamba"], "mixer"),
    "model-unknown-rule": (["model.mixer_options.rule=delta"], "rule"),
    "model-width-not-divisible": (["model.d_model=63", "model.mixer_options.num_heads=2"], "num_heads"),
    "model-unknown-option": (["+model.mixer_options.topk=2"], "topk"),
    "model-neg-eigval-without-delta": (["model=gla", "model.mixer_options.allow_neg_eigval=true"], "allow_neg_eigval"),
    "model-misspelt-group": (["model=mamba9"], "mamba9"),
    # training
    "train-lr-zero": (["optim.lr=0"], "optim.lr"),
    "train-lr-negative": (["optim.lr=-1e-3"], "optim.lr"),
    "train-zero-epochs": (["trainer.max_epochs=0"], "trainer.max_epochs"),
    "train-zero-steps": (["trainer.max_steps=0"], "trainer.max_steps"),
    "train-unknown-key": (["model.nope=1"], "nope"),
    "train-misspelt-key": (["trainer.max_epoch=3"], "max_epoch"),
    "train-unknown-precision": (["trainer.precision=bf17"], "precision"),
    "train-misspelt-trainer": (["trainer=ddpp"], "ddpp"),
    "train-batch-not-divisible": (["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                                   "task.batch_size=63"], "task.batch_size"),
    "train-trainer-flag-a-number": (["+trainer.benchmark=2"], "trainer.benchmark"),
    "train-trainer-flag-a-word": (["+trainer.inference_mode=maybe"], "trainer.inference_mode"),
    # a multirun with one bad job: no job trains, the good one included
    "multirun-one-bad-job": (["-m", "optim.lr=1e-3,0"], "optim.lr=0"),
    "multirun-bad-job-first": (["-m", "model.mixer_options.top_k=5,2"], "top_k=5"),
    "multirun-param-set-by-every-segment": (["-m", "+task.params.seq_len=16,32"], "task.params.seq_len=16"),
    # a sweep of no values: no job, exit code 0 without a word
    "multirun-empty-range": (["-m", "seed=range(3,0)"], "seed=range(3,0)"),
    "multirun-glob-matching-nothing": (["-m", "model=glob(mamba*)"], "model=glob(mamba*)"),
    # a value Lightning refuses: the good job trained first, then the bad one failed
    "multirun-bad-trainer-argument": (["-m", "+trainer.gradient_clip_algorithm=norm,foo"],
                                      "trainer.gradient_clip_algorithm=foo"),
}


@pytest.mark.parametrize("case", BAD_TRAIN)
def test_bad_train_input(case, finished_root, monkeypatch, capsys):
    overrides, named = BAD_TRAIN[case]
    flags = [arg for arg in overrides if arg.startswith("-")]  # Hydra's flags (-m) go before the overrides
    settings = [arg for arg in overrides if not arg.startswith("-")]
    before = snapshot(finished_root)
    assert train_cli(monkeypatch, *flags, *FAST, *settings, f"output_root={finished_root}") == 2
    assert_one_line_naming(capsys.readouterr().err, named)
    after = snapshot(finished_root)
    if flags:  # Hydra's sweeper writes the multirun's record before any job is composed
        for files in (before, after):
            files.pop("train/multirun.yaml", None)
    assert after == before


def edit_space(**changes) -> dict:
    """The routing space with changes; a key `a__b` sets space[a][b]."""
    space = yaml.safe_load((CONF_DIR / "sweep" / "routing.yaml").read_text())
    for key, value in changes.items():
        *parents, last = key.split("__")
        node = space
        for part in parents:
            node = node[part]
        node[last] = value
    return space


BAD_SWEEP = {
    "sweep-unknown-space": (["--space", "nope"], None, "--space"),
    "sweep-low-above-high": (["--param", "optim.lr=float:1e-2:1e-4"], None, "optim.lr"),
    "sweep-unknown-distribution": (["--param", "optim.lr=between:1:2"], None, "optim.lr"),
    "sweep-log-scale-from-zero": (["--param", "optim.lr=float:0:1e-2:log"], None, "optim.lr"),
    "sweep-zero-workers": (["--workers", "0"], None, "--workers"),
    "sweep-zero-trials": (["--n-trials", "0"], None, "n_trials"),
    "sweep-unreachable-storage": (["--storage", "postgresql://nobody@127.0.0.1:1/none"], None, "--storage"),
    "sweep-storage-without-driver": (["--storage", "mysql://nobody@127.0.0.1/none"], None, "--storage"),
    "sweep-bad-override": (["model.nope=1"], None, "nope"),
    "sweep-empty-space": ([], {"params": {}}, "params"),
    "sweep-unknown-objective": ([], {"objectives": ["val_acc"]}, "objectives"),
    "sweep-at-most-names-nothing": ([], {"params__top_k__at_most": "memories"}, "at_most"),
}


@pytest.mark.parametrize("case", BAD_SWEEP)
def test_bad_sweep_input(case, finished_root, tmp_path, capsys):
    args, space_changes, named = BAD_SWEEP[case]
    if space_changes is not None:
        space = tmp_path / "space.yaml"
        space.write_text(yaml.safe_dump(edit_space(**space_changes)))
        args = [*args, "--space", str(space)]
    before = snapshot(finished_root)
    assert sandbox.sweep.main(["--output-root", str(finished_root), *FAST, *args]) == 2
    assert_one_line_naming(capsys.readouterr().err, named)
    assert snapshot(finished_root) == before


def private_mounts_work() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-Urm", "true"], capture_output=True).returncode == 0


# Inside a private user and mount namespace (no root needed, nothing outside sees it): a tmpfs holding a copy
# of the finished root, made full or read-only, then the command, with a listing and hashes before and after.
IN_PRIVATE_MOUNT = r"""
set -e
mount -t tmpfs -o size=$SIZE tmpfs "$MNT"
cp -a "$SRC/." "$MNT/"
if [ "$MODE" = full ]; then dd if=/dev/zero of="$MNT/filler" bs=64k 2>/dev/null || true; fi
if [ "$MODE" = read-only ]; then mount -o remount,ro "$MNT"; fi
listing() { (cd "$MNT" && find . -printf '%y %p\n' | sort && find . -type f -exec sha256sum {} + | sort); }
listing > "$OUT/before"
set +e
"$@" > "$OUT/stdout" 2> "$OUT/stderr"
echo $? > "$OUT/rc"
listing > "$OUT/after"
"""


@pytest.mark.skipif(not private_mounts_work(), reason="user namespaces are off here: `unshare -Urm` is refused, "
                    "so a read-only or full folder cannot be made without root")
@pytest.mark.parametrize("tool, mode, named, says", [
    ("train", "read-only", "output_root", "Read-only file system"),
    ("train", "full", "output_root", "No space left"),
    ("sweep", "read-only", "--output-root", "Read-only file system"),
    # its folder and study.db exist and open, but the study cannot be written (was a traceback)
    ("sweep-continued", "read-only", "--output-root", "attempt to write a readonly database"),
])
def test_unwritable_output_root(tool, mode, named, says, finished_root, tmp_path):
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    size_mb = sum(p.stat().st_size for p in finished_root.rglob("*") if p.is_file()) // 2**20 + 16
    if tool == "train":
        command = [sys.executable, "-m", "sandbox.train", "model=deltanet", *FAST, f"output_root={mnt}"]
    elif tool == "sweep":  # a new study: its folder cannot be made
        command = [sys.executable, "-m", "sandbox.sweep", "--study-name", "other", "--output-root", str(mnt), *FAST]
    else:  # the finished study, continued
        command = [sys.executable, "-m", "sandbox.sweep", "--n-trials", "2", "--output-root", str(mnt), *FAST]
    env = {**os.environ, "SIZE": f"{size_mb}m", "MNT": str(mnt), "SRC": str(finished_root), "OUT": str(out),
           "MODE": mode}
    subprocess.run(["unshare", "-Urm", "bash", "-c", IN_PRIVATE_MOUNT, "bash", *command], cwd=REPO, env=env,
                   check=True, timeout=300)
    stderr = (out / "stderr").read_text()
    assert (out / "rc").read_text().strip() == "2", stderr
    assert_one_line_naming(stderr, named)
    assert says in stderr
    assert (out / "after").read_text() == (out / "before").read_text()


# ---- killed, interrupted and crashed runs ----
# A run checkpoints (last.ckpt, and best.ckpt when validation improves) after every validation; LONG_RUN
# validates every 3 of its 8 steps per epoch, so its checkpoints are mostly in the middle of an epoch. A
# resumed run skips the batches of the epoch that its checkpoint had trained on (the train loader's position
# is in the checkpoint, and the order of an epoch depends only on seed and epoch), so it ends exactly where
# an uninterrupted run ends.
LONG_RUN = ["model=deltanet", "model.n_layers=1", "task.params.vocab_size=64", "task.limit_examples=512",
            "trainer.max_epochs=8", "trainer.val_check_interval=3", "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1", "optim.lr=1e-2", "callbacks.early_stopping.threshold=1.0"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> dict:
    """LONG_RUN, uninterrupted."""
    return train(make_cfg(*LONG_RUN), tmp_path_factory.mktemp("reference"))


def test_same_seed_same_metrics(reference_run, tmp_path):
    again = train(make_cfg(*LONG_RUN), tmp_path)
    for key in METRICS:
        assert again[key] == reference_run[key], key
    assert reference_run["test_acc"] > 0.3  # it learned: the comparison is not of two constants


def test_data_for_a_seed_is_pinned():
    """The data of a seed is the same on every machine: a hash of a small generated set, pinned."""
    data = RecallDataModule(
        name="mqar", params={"vocab_size": 8192, "power_a": 0.01, "random_filler": False}, seed=0, batch_size=8,
        segments={"train": [{"seq_len": 64, "num_kv_pairs": 4, "num_examples": 32},
                            {"seq_len": 32, "num_kv_pairs": 2, "num_examples": 16}],
                  "val": [{"seq_len": 64, "num_kv_pairs": 4, "num_examples": 8}],
                  "test": [{"seq_len": 64, "num_kv_pairs": 8, "num_examples": 8}]})
    data.generate()
    digest = hashlib.sha256()
    for split in SPLITS:
        dataset = data.datasets[split]
        for tensor in (dataset.inputs, dataset.labels, dataset.slice_bins):
            digest.update(tensor.numpy().astype("<i8").tobytes())
    assert digest.hexdigest() == "e887d19b26ceddad08621eb74f3cd1f466910455b99e57f6a908012627720140"


class CrashAtStep(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("injected crash")


def test_crash_mid_epoch_resumes_exactly(reference_run, tmp_path):
    with pytest.raises(RuntimeError, match="injected crash"):
        train(make_cfg(*LONG_RUN), tmp_path, extra_callbacks=[CrashAtStep(13)])
    # The last checkpoint is from the validation after step 11: epoch 1, 3 of its 8 batches trained.
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 11
    assert checkpoint["RecallDataModule"] == {"train_position": {"epoch": 1, "served": 3}}
    resumed = train(make_cfg(*LONG_RUN), tmp_path)
    assert resumed["resumed"]
    for key in METRICS:
        assert resumed[key] == reference_run[key], key


def test_sigkill_then_same_command_resumes_to_the_same_result(reference_run, tmp_path):
    """SIGKILL at a random point of a random epoch after the first checkpoint; the same command resumes."""
    command = [sys.executable, "-m", "sandbox.train", *LONG_RUN, "callbacks.progress=lines",
               f"output_root={tmp_path}"]
    chooser = random.Random()
    kill_after_epoch, delay = chooser.randrange(0, 5), chooser.uniform(0, 0.3)
    print(f"killing after epoch {kill_after_epoch} + {delay:.3f} s")
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith(f"epoch {kill_after_epoch} "):
            # the line comes before that validation's checkpoint (Lightning runs checkpoint callbacks last)
            deadline = time.monotonic() + 60
            while not list(tmp_path.glob("train/*/checkpoints/last.ckpt")) and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    (run_dir,) = (tmp_path / "train").iterdir()
    assert (run_dir / "checkpoints" / "last.ckpt").exists() and not (run_dir / "result.json").exists()

    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from" in rerun.stdout
    resumed = json.loads((run_dir / "result.json").read_text())
    assert resumed["resumed"]
    for key in METRICS:
        assert resumed[key] == reference_run[key], key


class SignalAt(L.Callback):
    """Sends this process a real signal at the end of training step `step`."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            signal.raise_signal(self.signum)


def test_signal_at_any_step_checkpoints_it_and_resumes_exactly(reference_run, tmp_path):
    """One run stopped five times, by SIGTERM or SIGINT: at a step between validations, at a step that
    validates, at the end of an epoch (8 batches an epoch), again there, and at the last step (an epoch's end
    too); each time it resumes where it stopped, except after an epoch's last batch, where it resumes from the
    last validation (6): Lightning restores a checkpoint taken there into the next epoch with its batches counted
    as done."""
    stops = ((5, signal.SIGTERM, 5), (6, signal.SIGINT, 6), (8, signal.SIGTERM, 6), (16, signal.SIGTERM, 14),
             (64, signal.SIGINT, 62))
    for step, signum, saved in stops:
        with pytest.raises(RunInterrupted) as stopped:
            train(make_cfg(*LONG_RUN), tmp_path, extra_callbacks=[SignalAt(step, signum)])
        assert stopped.value.signum == signum
        interrupted = json.loads((tmp_path / "result.json").read_text())
        assert interrupted["status"] == "interrupted" and interrupted["steps"] == step, interrupted
        assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == saved
    resumed = train(make_cfg(*LONG_RUN), tmp_path)
    assert resumed["resumed"] and resumed["status"] == "finished"
    for key in METRICS:
        assert resumed[key] == reference_run[key], key


def test_signal_from_outside_saves_says_so_and_the_same_command_resumes(reference_run, tmp_path):
    """A scheduler's SIGTERM, then a Ctrl-C in the resumed run: each time a checkpoint, one line saying how to
    resume, exit code 128 + the signal; the same command then ends with the result of an uninterrupted run."""
    command = [sys.executable, "-m", "sandbox.train", *LONG_RUN, "callbacks.progress=lines",
               f"output_root={tmp_path}"]
    for signum, after_epoch in ((signal.SIGTERM, 1), (signal.SIGINT, 4)):
        proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for line in proc.stdout:
            if line.startswith(f"epoch {after_epoch} "):
                proc.send_signal(signum)
                break
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 128 + signum, err[-3000:]
        (said,) = [line for line in err.splitlines() if line.startswith("sandbox-train:")]
        name = signal.Signals(signum).name
        assert f"interrupted by {name} at step" in said and "run the same command to resume" in said, said
        assert "Traceback" not in err
        (run_dir,) = (tmp_path / "train").iterdir()
        assert json.loads((run_dir / "result.json").read_text())["status"] == "interrupted"

    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from" in rerun.stdout
    resumed = json.loads((run_dir / "result.json").read_text())
    assert resumed["resumed"] and resumed["status"] == "finished"
    for key in METRICS:
        assert resumed[key] == reference_run[key], key


class Unprintable:
    def __str__(self):
        raise RuntimeError("cannot be written")


def test_result_and_report_writes_are_atomic(finished_root, tmp_path, monkeypatch):
    """A write that fails half-way leaves the previous file whole and no temporary file behind."""
    path = tmp_path / "result.json"
    write_json_atomic(path, {"test_acc": 0.5})
    with pytest.raises(RuntimeError):
        write_json_atomic(path, {"test_acc": 0.9, "bad": Unprintable()})
    assert json.loads(path.read_text()) == {"test_acc": 0.5}

    out = tmp_path / "report"
    report(finished_root, out)
    csv_before = (out / "results.csv").read_bytes()

    def half_then_full_disk(writer, rows):
        writer.writerow(rows[0])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("csv.DictWriter.writerows", half_then_full_disk)
    with pytest.raises(OSError):
        report(finished_root, out)
    assert (out / "results.csv").read_bytes() == csv_before
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [] == \
        [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
