"""Lightning callbacks of the sandbox: throughput, plain progress lines, and how a run ends (its checkpoints'
identity, divergence, signals)."""

import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

import kernels


def run_key(run: int, key: str) -> str:
    """The name under which a stacked run (sandbox.stacked_run) logs its metric `key`."""
    return f"run{run}/{key}"


def split_run_key(key: str) -> tuple[int, str] | None:
    """(run, metric) of a stacked run's metric name (`run_key`), or None for a metric of no run."""
    match = re.fullmatch(r"run(\d+)/(.+)", key)
    return None if match is None else (int(match[1]), match[2])


class ThroughputMonitor(L.Callback):
    """Logs `train/tokens_per_s` once per training epoch (all tokens of the batch, labelled or not)."""

    def on_train_start(self, trainer, pl_module):
        # A run resumed in the middle of an epoch starts counting here (no on_train_epoch_start for that epoch).
        self.on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer, pl_module):
        self._tokens, self._start = 0, time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._tokens += batch[0].numel() // pl_module.runs  # one run's tokens

    def on_train_epoch_end(self, trainer, pl_module):
        elapsed = time.perf_counter() - self._start
        if elapsed > 0 and self._tokens:
            pl_module.log("train/tokens_per_s", self._tokens * trainer.world_size / elapsed)


class EpochLines(L.Callback):
    """One plain line per validation, for logs that are not a terminal (no progress-bar redraws)."""

    KEYS = ("train/loss", "train/acc", "val/loss", "val/acc", "train/tokens_per_s")

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        shown = "  ".join(f"{k} {float(metrics[k]):.4g}" for k in self.KEYS if k in metrics)
        runs = {key: split_run_key(key) for key in metrics}
        stacked = sorted((split[0], float(metrics[key])) for key, split in runs.items()
                         if split is not None and split[1] == "val/acc")  # a stack's runs (sandbox.stacked_run)
        if stacked:
            shown += "  val/acc by run " + " ".join(f"{r}:{acc:.3f}" for r, acc in stacked)
        print(f"epoch {trainer.current_epoch}  step {trainer.global_step}  {shown}", file=sys.stdout, flush=True)


class FolderCheckpoint(ModelCheckpoint):
    """A ModelCheckpoint that resumes in a run folder that was moved or copied. Lightning keeps the absolute
    paths of the checkpoints in their state and, when the folder differs, drops the best score and keeps the
    best path, which then names the other folder's file; here the paths are read as names in this folder."""

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("dirpath")
        if saved and saved != self.dirpath:
            def here(path: str) -> str:
                return os.path.join(self.dirpath, os.path.basename(path)) if path else path

            state_dict = {**state_dict, "dirpath": self.dirpath,
                          "best_model_path": here(state_dict["best_model_path"]),
                          "kth_best_model_path": here(state_dict.get("kth_best_model_path", "")),
                          "last_model_path": here(state_dict.get("last_model_path", "")),
                          "best_k_models": {here(k): v for k, v in state_dict.get("best_k_models", {}).items()}}
        super().load_state_dict(state_dict)


def computation(trainer: L.Trainer, backend: str) -> dict:
    """The precision and the kernels (model.backend=`backend` resolved on the trainer's device) a run computes
    with: outside its config_hash (`auto` resolves by machine), so recorded beside it. Where the setting cannot
    run on that device, the setting itself: the run failed on it, and its failure must still be recorded."""
    try:
        resolved = kernels.resolve_backend(backend, trainer.strategy.root_device)
    except ValueError:
        resolved = backend
    return {"precision": trainer.precision, "backend": resolved}


class RunIdentity(L.Callback):
    """Stamps every checkpoint with the run's config_hash, so that no other configuration resumes from it, and
    with its computation, so that none resumes it at another precision or on other kernels."""

    def __init__(self, config_hash: str, backend: str):
        self.config_hash = config_hash
        self.backend = backend

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint["config_hash"] = self.config_hash
        checkpoint["computation"] = computation(trainer, self.backend)


class Diverged(Exception):
    """The training loss, or the weights after the last step, were not finite."""


class StopOnDivergence(L.Callback):
    """Ends training at the first step whose loss is not finite on any process, by raising Diverged: the
    weights are then not finite either, so nothing after that step is worth running or keeping."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"].detach()
        if trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss)), all=False):
            raise Diverged(f"training loss {float(loss):.4g} at step {trainer.global_step}")

    def on_train_end(self, trainer, pl_module):
        # The last step's update is seen by no training loss: weights it made non-finite would leave the run
        # "finished", tested on an earlier best checkpoint.
        finite = bool(torch.stack([torch.isfinite(p).all() for p in pl_module.parameters()]).all())  # one read
        if trainer.strategy.reduce_boolean_decision(not finite, all=False):
            raise Diverged(f"weights not finite after step {trainer.global_step}")


class RunPruned(Exception):
    """A search's pruner stopped the run at a validation (it was behind the search's other trials there): the run
    records `pruned`, not a failure, and the exception goes on to the search."""


class RunInterrupted(BaseException):
    """SIGTERM or SIGINT ended the run. A BaseException, like KeyboardInterrupt, so that no `except Exception`
    takes it for a failure."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Interruption(L.Callback):
    """SIGTERM (a scheduler's time limit, a preemption) and SIGINT (Ctrl-C) stop a run at the end of its current
    training step, with a checkpoint to resume from.

    Used as a context manager around a run, it handles both signals. While Lightning runs, Lightning handles
    SIGTERM as well (calling this handler too) and stops at the end of the step, after that step's validation
    if it has one, by raising SIGTERMException; SIGINT goes to that same handler. `on_exception` then writes
    the checkpoint, unless the run is to resume from its last validation's. A signal while Lightning does not
    run (building the data, saving the result) raises RunInterrupted at once. `signum` is the signal received,
    `saved_step` the step of the checkpoint written, `validated_step` that of this segment's last validation.
    """

    def __init__(self, checkpoint: Path):
        self.checkpoint = checkpoint
        self.signum: int | None = None
        self.saved_step: int | None = None
        self.validated_step: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "Interruption":
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for signum, handler in ((signal.SIGTERM, self._on_sigterm), (signal.SIGINT, self._on_sigint)):
                self._previous[signum] = signal.signal(signum, handler)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _on_sigterm(self, signum, frame):
        self.signum = signum
        if signal.getsignal(signal.SIGTERM) == self._on_sigterm:  # Lightning is not running: stop here
            raise RunInterrupted(signum)

    def _on_sigint(self, signum, frame):
        signal.getsignal(signal.SIGTERM)(signum, frame)

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.validated_step = trainer.global_step

    def on_exception(self, trainer, pl_module, exception):
        # Stopped in training, the state is whole: checkpoint it. Stopped in validation, the run resumes from
        # its checkpoint of the last validation instead (a half-counted validation cannot be resumed); so it does
        # when stopped after an epoch's last batch, whose checkpoint Lightning restores into the next epoch with
        # that epoch's batches counted as done (it would skip a whole epoch of data), and after a step that
        # validated: that validation's checkpoint is of this step, and Lightning, which counts the step for its
        # loggers on restoring it, would count it twice from one written now (every later row one step late).
        epoch_done = trainer.fit_loop.epoch_loop.batch_progress.current.completed >= trainer.num_training_batches
        validated = self.validated_step == trainer.global_step
        if isinstance(exception, SIGTERMException) and trainer.training and not epoch_done and not validated:
            trainer.save_checkpoint(self.checkpoint, weights_only=False)
            self.saved_step = trainer.global_step
