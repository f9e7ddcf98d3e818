"""`sandbox-train`: train one model of the zoo on one synthetic task (a Hydra app).

    sandbox-train experiment=quickstart model=mom              # one run
    sandbox-train -m experiment=quickstart                     # the experiment's grid (Hydra multirun)

The run directory is `${output_root}/${name}/<overrides>-<config hash>` (sandbox.runs), so the same command
finds the same directory and another configuration never does: a finished run is not repeated, and an
interrupted or crashed one resumes from its last checkpoint. `train(cfg, run_dir)` does the work and returns
the result that it writes to `result.json`, with how the run ended (`status`); the Hydra entry point returns
the objective (validation accuracy) for sweepers, and `main` exits with the code of the status (EXIT_CODES).
"""

import contextlib
import csv
import logging
import math
import os
import shutil
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from lightning.pytorch.callbacks import EarlyStopping, RichProgressBar, Timer
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sandbox import runs
from sandbox.callbacks import (Diverged, EpochLines, FolderCheckpoint, Interruption, RunIdentity, RunInterrupted,
                               RunPruned, StopOnDivergence, ThroughputMonitor, computation)
from sandbox.data import RecallDataModule
from sandbox.module import RecallModule
from sandbox.results import LOGS, RESULT_FILE, config_hash, git_commit, status_of, versions, write_json_atomic
from sandbox.runs import UNWRITABLE, say
from sandbox.settings import ConfigError, check_settings, one_line, trainer_arguments, uses_cuda_graphs

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
OBJECTIVE = "best_val_acc"
# sandbox-train's exit code for each status; 2 is a bad setting, and an interrupted run exits with 128 + the
# signal's number, as a shell reports a process ended by it (130 for Ctrl-C, 143 for SIGTERM).
EXIT_CODES = {"finished": 0, "failed": 1, "diverged": 3, "not_trained": 4, "pruned": 5}
# The commit of the code this process runs, read once as it is imported: the checkout may change while a run
# trains (a pull, another branch, edits), and the result must name the code that trained it.
CODE_COMMIT = git_commit()


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("run_id"):
        # The run folder's name: the overrides and the configuration's hash.
        OmegaConf.register_new_resolver("run_id", runs.folder_of_job)
    if not OmegaConf.has_resolver("min"):
        # For settings bounded by another, e.g. top_k: ${min:2,${model.mixer_options.num_memories}}.
        OmegaConf.register_new_resolver("min", min)


register_resolvers()
# Library noise that says nothing about the run.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
# Under DDP: the module sums its evaluation counts over processes itself (RecallModule._eval_epoch_end).
warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting.*")
# A run resumed in the middle of an epoch: RecallDataModule's state puts the train loader where it was.
warnings.filterwarnings("ignore", message=r".*your dataloader is not resumable.*")
# Lightning's "Received SIGTERM" (also for SIGINT, which Interruption passes on to it): the run says it once.
logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector").setLevel(logging.WARNING)


def build(cfg: DictConfig) -> tuple[RecallDataModule, RecallModule]:
    """Data and model from the config; impossible settings become ConfigError before any training."""
    datamodule = build_data(cfg)
    return datamodule, build_module(cfg, datamodule)


def data_module(cfg: DictConfig) -> RecallDataModule:
    """The run's data module, its data not generated yet."""
    return RecallDataModule(
        name=cfg.task.name, params=OmegaConf.to_container(cfg.task.params, resolve=True),
        segments=OmegaConf.to_container(cfg.task.segments, resolve=True), seed=cfg.seed,
        batch_size=cfg.task.batch_size, eval_batch_size=cfg.task.eval_batch_size,
        limit_examples=cfg.task.limit_examples)


def build_data(cfg: DictConfig) -> RecallDataModule:
    """The run's data, generated; impossible task settings become ConfigError."""
    try:
        datamodule = data_module(cfg)
        datamodule.generate()
    except ValueError as err:
        raise ConfigError(str(err)) from err
    return datamodule


def build_module(cfg: DictConfig, datamodule: RecallDataModule) -> RecallModule:
    """The run's model for this data (its weights drawn from torch's generator as it stands); impossible model
    settings become ConfigError."""
    try:
        return RecallModule(model=OmegaConf.to_container(cfg.model, resolve=True), vocab_size=datamodule.vocab_size,
                            max_seq_len=datamodule.max_seq_len, optim=OmegaConf.to_container(cfg.optim, resolve=True),
                            cuda_graphs=uses_cuda_graphs(cfg))
    except ValueError as err:
        raise ConfigError(str(err)) from err


def _progress_callbacks(mode: str) -> tuple[list, bool]:
    if mode == "auto":
        mode = "rich" if sys.stdout.isatty() else "lines"
    if mode == "rich":
        return [RichProgressBar()], True
    if mode == "lines":
        return [EpochLines()], False
    return [], False


def run_logger(cfg: DictConfig, run_dir: Path):
    """The logger of a run: its metrics in `run_dir`/logs (a resumed run's metrics.csv goes on; TensorBoard's
    event files add up by themselves)."""
    if cfg.logger.kind == "tensorboard":
        return TensorBoardLogger(save_dir=run_dir, name=LOGS, version="")
    return ResumableCSVLogger(save_dir=run_dir, name=LOGS, version="")


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger, whose metrics.csv keeps the rows of a resumed run's earlier segments."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumableWriter(log_dir=self.log_dir)
        return self._experiment


class _ResumableWriter(ExperimentWriter):
    """Lightning's writer deletes an existing metrics.csv; this one keeps it and, at its first save, drops the
    rows that this segment writes again: the test's, and those at or after the first step it trains or validates.
    The test's row does not count: a run resumed with nothing left to train (stopped in a last step that
    validated) logs it at that step, whose training and validation rows are the earlier segment's."""

    def _check_log_dir_exists(self) -> None:  # called by __init__ instead of Lightning's, which deletes the file
        self._continues = self._fs.isfile(self.metrics_file_path)

    def save(self) -> None:
        if self._continues and self.metrics:
            self._continues = False
            first = min((row["step"] for row in self.metrics if not _tested(row)), default=math.inf)
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                reader = csv.DictReader(file)
                kept = [row for row in reader if _step(row) < first and not _tested(row)]
                self.metrics_keys = list(reader.fieldnames or [])
            with self._fs.open(self.metrics_file_path, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)
        super().save()


def _tested(row: dict) -> bool:
    """A row of the test's metrics (a row read back from the file has every column, most of them empty)."""
    return any(key.startswith("test/") and value not in ("", None) for key, value in row.items())


def _step(row: dict) -> float:
    try:
        return int(row["step"])
    except (TypeError, ValueError):  # a row cut short by a killed process
        return math.inf


class StayStopped(EarlyStopping):
    """Lightning's EarlyStopping, whose stop outlives the process: restored from the checkpoint of the validation
    that stopped the run (killed while testing, or its result.json lost), it ends the fit before another step,
    where Lightning would train on past the stop."""

    def on_train_start(self, trainer, pl_module):
        if self.stopping_reason != EarlyStoppingReason.NOT_STOPPED:
            trainer.should_stop = True
            # Lightning ends the epoch that a stop came in and counts it (the result's epochs, the test row's
            # epoch); stopped here, before that epoch goes on, the fit would end without counting it.
            trainer.fit_loop.epoch_progress.current.completed = self.stopped_epoch + 1


def make_trainer(cfg: DictConfig, run_dir: Path, callbacks=(), *, logger=None, per_run_selection: bool = False
                 ) -> L.Trainer:
    """The run's trainer: checkpoints in `run_dir`, the best one and early stopping on val/acc, its logger.
    `per_run_selection`: the module keeps each run's best weights and stops each run itself (stacked runs,
    `sandbox.stacked_run`), so only the last checkpoint is a callback; `logger` then routes each run's metrics."""
    folder = run_dir / runs.CHECKPOINTS
    # Lightning's own save_last writes only when the best checkpoint improves; this one writes after every
    # validation, so a resumed run loses at most the steps since the last validation.
    last = FolderCheckpoint(dirpath=folder, filename="last", monitor=None, save_top_k=1, enable_version_counter=False)
    checkpointing = [last]
    if not per_run_selection:
        best = FolderCheckpoint(dirpath=folder, filename="best", monitor="val/acc", mode="max", save_top_k=1)
        stopping = StayStopped(monitor="val/acc", mode="max",
                               stopping_threshold=cfg.callbacks.early_stopping.threshold,
                               patience=cfg.callbacks.early_stopping.patience)
        checkpointing = [best, last, stopping]  # best first: last.ckpt records the best checkpoint of its validation
    progress, show_bar = _progress_callbacks(cfg.callbacks.progress)
    try:
        return L.Trainer(
            **trainer_arguments(cfg),
            default_root_dir=run_dir,
            logger=run_logger(cfg, run_dir) if logger is None else logger,
            callbacks=[*checkpointing, ThroughputMonitor(), *progress, *callbacks],
            enable_progress_bar=show_bar,
        )
    except (ValueError, MisconfigurationException) as err:
        raise ConfigError(f"trainer: {one_line(err)}") from err


def train(cfg: DictConfig, run_dir: Path, extra_callbacks=()) -> dict:
    """Train, test the best checkpoint, write `result.json` with how the run ended; return the result.

    A folder holds one configuration: a result of another one there is a ConfigError. A finished, diverged
    or untrained run is returned as it is; an interrupted or failed one resumes from its last usable
    checkpoint. A signal ends the run with RunInterrupted, an error with that error, once result.json
    records them. With several processes (trainer=ddp) every process calls this; the first one writes.
    """
    run_dir = Path(run_dir)
    try:
        check_settings(cfg)  # before an ended run is returned: the settings outside a run's identity are checked too
    except ConfigError:
        runs.remove_empty_folders(runs.new_folders(run_dir))
        raise
    digest = config_hash(OmegaConf.to_container(cfg, resolve=True))
    ended = runs.ended_result(run_dir, digest)
    if ended is not None:
        return ended
    with Interruption(run_dir / runs.CHECKPOINTS / "last.ckpt") as interruption:
        return _train(cfg, run_dir, digest, interruption, extra_callbacks)


def _train(cfg: DictConfig, run_dir: Path, digest: str, interruption: Interruption, extra_callbacks) -> dict:
    start = time.perf_counter()
    made = runs.new_folders(run_dir)
    try:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        datamodule, module = build(cfg)
        trainer = make_trainer(cfg, run_dir, [RunIdentity(digest, cfg.model.backend), StopOnDivergence(), interruption,
                                              *extra_callbacks])
        problem = runs.unwritable_problem(run_dir, cfg.output_root)
        if problem is not None:
            raise ConfigError(problem)
        resume_from = runs.resume_checkpoint(run_dir, digest, module.state_dict())
    except ConfigError:
        runs.remove_empty_folders(made)
        raise
    except RunInterrupted as stop:
        say(f"{run_dir}: interrupted by {stop} before training; run the same command to run it", error=True)
        raise
    tested, earlier, fitted, pruned = None, None, False, None
    try:
        if resume_from is None and trainer.is_global_zero:
            # From scratch, the logs of an earlier history (its checkpoints set aside, or another configuration's
            # in a reused folder) are not this run's: the resumable CSV writer keeps rows logged before this
            # run's first one, so they would stay in its metrics.csv.
            shutil.rmtree(run_dir / LOGS, ignore_errors=True)
        if resume_from is not None:
            earlier = runs.stored_result(run_dir)  # of the segment it resumes after (none if killed outright)
            check_same_computation(run_dir, resume_from, [earlier], computation(trainer, cfg.model.backend))
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
        fitted = True
        status, reason = _fit_status(cfg, trainer)
        if status == "finished":
            best = trainer.checkpoint_callback.best_model_path or None
            tested = trainer.test(module, datamodule=datamodule, ckpt_path=best, weights_only=True, verbose=False)[0]
    except Diverged as err:
        status, reason = "diverged", str(err)
    except RunPruned as err:
        status, reason, pruned = "pruned", str(err), err
    except (SIGTERMException, RunInterrupted):
        stop_if_not_resumed(run_dir, interruption, trainer, resume_from)
        status, reason = "interrupted", interrupted_reason(interruption, trainer)
    except ConfigError:  # nothing ran: the folder stays as the earlier segment left it
        raise
    except Exception as err:
        # Only an error of Lightning's restore is the checkpoint's: one of the run (a full disk, a failing test)
        # would set aside good checkpoints, and the run would start again from scratch.
        if resume_from is not None and not fitted and runs.raised_restoring(err):
            runs.set_aside(resume_from, f"it cannot be restored ({runs.describe_error(err)})")
            return _train(cfg, run_dir, digest, interruption, extra_callbacks)
        failure = _result(cfg, digest, "failed", runs.describe_error(err), trainer, module, datamodule,
                          resume_from is not None, earlier, start, tested)
        if trainer.is_global_zero:
            with contextlib.suppress(OSError):  # a full disk cannot take the failure either
                write_json_atomic(run_dir / RESULT_FILE, failure)
        if isinstance(err, OSError) and err.errno in UNWRITABLE:
            raise ConfigError(runs.unwritable(err, cfg.output_root, run_dir)) from err
        raise
    result = _result(cfg, digest, status, reason, trainer, module, datamodule, resume_from is not None, earlier,
                     start, tested)
    if trainer.is_global_zero:
        write_json_atomic(run_dir / RESULT_FILE, result)
    if status == "interrupted":
        say(f"{run_dir}: interrupted by {reason}; run the same command to resume", error=True)
        raise RunInterrupted(interruption.signum)
    if status != "finished":
        say(f"{run_dir}: {status.replace('_', ' ')}: {reason} (recorded in {RESULT_FILE})", error=True)
    if pruned is not None:  # the search that pruned it is told so
        raise pruned
    stop_if_signalled(run_dir, interruption)
    return result


def stop_if_not_resumed(where: Path, interruption: Interruption, trainer: L.Trainer, resume_from: Path | None) -> None:
    """RunInterrupted, without a record, for a signal that came before Lightning restored the checkpoint
    `resume_from` (none is of step 0): the trainer knows nothing of the run yet (its record would say step 0),
    which stays as its earlier segment recorded it."""
    if resume_from is not None and trainer.global_step == 0:
        say(f"{where}: interrupted by {signal.Signals(interruption.signum).name} before it resumed; run the same "
            "command to resume", error=True)
        raise RunInterrupted(interruption.signum) from None


def stop_if_signalled(where: Path, interruption: Interruption) -> None:
    """RunInterrupted for a signal that the run's end did not stop on (Lightning ends a test in whose last batch a
    signal came), once the end is recorded: the command stops all the same (a multirun or a sweep would start its
    next run)."""
    if interruption.signum is not None:
        say(f"{where}: {signal.Signals(interruption.signum).name} received as it ended, its end recorded: stopping",
            error=True)
        raise RunInterrupted(interruption.signum)


class OtherComputation(ConfigError):
    """A checkpoint written at another precision or on other kernels than this machine gives: neither its stack nor
    its runs alone can go on here."""


def check_same_computation(run_dir: Path, checkpoint: Path, earlier: list[dict | None], now: dict) -> None:
    """OtherComputation (a ConfigError) when the checkpoint a run resumes from was written at another precision
    or on other kernels than `now` (RunIdentity's stamp; for a checkpoint without one, the results of the
    `earlier` segment): its weights would be of two computations and its result would name the last one only."""
    stamp = runs.checkpoint_computation(checkpoint)
    for then in [stamp] if stamp else [e for e in earlier if e]:
        if any(then.get(key) not in (None, now[key]) for key in ("precision", "backend")):
            raise OtherComputation(
                f"{run_dir}: its earlier segment ran at precision {then.get('precision')} on the {then.get('backend')} "
                f"kernels, this one {now['precision']} on {now['backend']}: resume it on a machine like that one, or "
                "remove its folder to run it here from scratch")


def _fit_status(cfg: DictConfig, trainer: L.Trainer) -> tuple[str, str]:
    """`fit_status` of a run alone, read from its checkpoint and early-stopping callbacks."""
    stopped = {EarlyStoppingReason.STOPPING_THRESHOLD: "threshold", EarlyStoppingReason.PATIENCE_EXHAUSTED: "patience"}
    return fit_status(cfg, trainer, validated=trainer.checkpoint_callback.best_model_score is not None,
                      stopped=stopped.get(trainer.early_stopping_callback.stopping_reason))


def fit_status(cfg: DictConfig, trainer: L.Trainer, validated: bool, stopped: str | None) -> tuple[str, str]:
    """finished, or not_trained for a fit that took no step or never `validated`; and why it ended (`stopped`
    early at the "threshold" or for "patience", or None)."""
    steps = trainer.global_step
    # Lightning's Timer (+trainer.max_time) may stop a run before its other limits: the reason then names it
    timer = next((c for c in getattr(trainer, "callbacks", []) if isinstance(c, Timer)), None)
    out_of_time = timer is not None and timer.time_remaining() <= 0
    time_limit = f"trainer.max_time={cfg.trainer.get('max_time')}"
    if steps == 0:
        why = f"{time_limit} ran out" if out_of_time else "trainer.limit_train_batches, task.limit_examples"
        return "not_trained", f"it took no training step ({why})"
    if not validated:
        return "not_trained", (f"it never validated in its {steps} steps (trainer.val_check_interval="
                               f"{cfg.trainer.val_check_interval}, trainer.check_val_every_n_epoch="
                               f"{cfg.trainer.check_val_every_n_epoch}, trainer.limit_val_batches="
                               f"{cfg.trainer.limit_val_batches}" + (f", {time_limit}" if out_of_time else "") + ")")
    early = {"threshold": "validation accuracy reached callbacks.early_stopping."
                          f"threshold={cfg.callbacks.early_stopping.threshold}",
             "patience": "validation accuracy stopped improving (callbacks."
                         f"early_stopping.patience={cfg.callbacks.early_stopping.patience})"}
    reason = early.get(stopped)
    if reason is None and steps == trainer.max_steps:
        reason = f"reached trainer.max_steps={trainer.max_steps}"
    elif reason is None:
        reason = f"reached {time_limit}" if out_of_time else f"reached trainer.max_epochs={trainer.max_epochs}"
    return "finished", reason


def interrupted_reason(interruption: Interruption, trainer: L.Trainer) -> str:
    name = interruption.checkpoint.name
    if interruption.saved_step is not None:
        saved = f"saved {interruption.checkpoint} to resume from"
    elif interruption.validated_step is not None:  # every validation writes last.ckpt
        saved = f"it resumes from {name}, of its validation at step {interruption.validated_step}"
    elif interruption.checkpoint.exists():  # the one this segment resumed from: an earlier validation's or signal's
        saved = f"it resumes from {name}, as this segment did"
    else:
        saved = "nothing to resume from yet: it starts again"
    return f"{signal.Signals(interruption.signum).name} at step {trainer.global_step}: {saved}"


def _result(cfg: DictConfig, digest: str, status: str, reason: str, trainer: L.Trainer, module: RecallModule,
            datamodule: RecallDataModule, resumed: bool, earlier: dict | None, start: float,
            tested: dict | None) -> dict:
    best_score = trainer.checkpoint_callback.best_model_score
    return result_record(cfg, digest, status, reason, trainer, best_val_acc=best_score,
                         tested=tested, steps=trainer.global_step, epochs=trainer.current_epoch, model=module.model,
                         router=result_router(tested, module.model.router_stats()), max_seq_len=datamodule.max_seq_len,
                         backend=computation(trainer, cfg.model.backend)["backend"],
                         cuda_graphs=module.cuda_graphs, resumed=resumed, earlier=earlier, start=start)


def result_router(tested: dict | None, last_forward: dict) -> dict:
    """A run's router statistics for its result: over the test split where it was tested (its best weights),
    else those of its last forward."""
    if tested is None:
        return last_forward
    return {k.removeprefix("router/"): float(v) for k, v in tested.items() if k.startswith("router/")}


def result_record(cfg: DictConfig, digest: str, status: str, reason: str, trainer: L.Trainer, *, best_val_acc,
                  tested: dict | None, steps: int, epochs: int, model, router: dict, max_seq_len: int, backend: str,
                  cuda_graphs: bool, resumed: bool, earlier: dict | None, start: float, **extra) -> dict:
    """What result.json records for one run. Accuracies are measured for finished runs only (NaN otherwise);
    `tested`: the test metrics (test/acc, test/loss, test/acc/<slice>, test/acc_past_train/<slice>). `earlier`: the
    result of the segment that a resumed run continues (interrupted or failed), whose wall time and commits this
    segment's extend."""
    nan = float("nan")

    def per_slice(prefix: str) -> dict[str, float]:
        return {} if tested is None else {k.removeprefix(prefix): float(v) for k, v in tested.items()
                                          if k.startswith(prefix)}

    earlier = earlier or {}
    commit = CODE_COMMIT
    earlier_commits = [*earlier.get("earlier_git_commits", []), earlier.get("git_commit")]
    return {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "config_hash": digest,
        "status": status,
        "status_reason": reason,
        "best_val_acc": nan if tested is None else float(best_val_acc),
        "test_acc": nan if tested is None else float(tested["test/acc"]),
        "test_acc_per_slice": per_slice("test/acc/"),
        # over the positions at or past the longest training sequence: a longer test segment's extrapolation alone
        "test_acc_past_train_per_slice": per_slice("test/acc_past_train/"),
        "test_loss": nan if tested is None else float(tested["test/loss"]),
        "epochs": epochs,
        "steps": steps,
        "state_size": model.state_size(max_seq_len),
        "num_parameters": model.num_parameters(),
        "router": router,
        "backend": backend,
        "cuda_graphs": cuda_graphs,
        "device": str(trainer.strategy.root_device),
        "precision": trainer.precision,
        "wall_time_s": earlier.get("wall_time_s", 0.0) + time.perf_counter() - start,
        "resumed": resumed,
        "versions": versions(),
        "git_commit": commit,
        # the code that trained the weights in earlier segments, where it was another commit
        "earlier_git_commits": list(dict.fromkeys(c for c in earlier_commits if c and c != commit)),
        **extra,
    }


# Config errors of the runs of this process: reported by `main` as one line each, exit code 2. They are
# collected rather than raised so that one bad run of a multirun does not stop the others; so are the exit
# codes of the statuses of its runs. Kept in `sandbox.runs`, so that the launcher (hydra_plugins) adds to the same
# lists when this module runs as `python -m sandbox.train` (as __main__, a second copy of this module).
_config_errors, _exit_codes = runs.CONFIG_ERRORS, runs.EXIT_CODES_SEEN


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float:
    return run_alone(cfg, Path(HydraConfig.get().runtime.output_dir))


def run_alone(cfg: DictConfig, run_dir: Path) -> float:
    """One run of `sandbox-train`: trained, its end reported; the objective for sweepers (NaN for a bad setting)."""
    try:
        result = train(cfg, run_dir)
    except ConfigError as err:
        return bad_setting(str(err))
    return report_result(run_dir, result)


def bad_setting(message: str) -> float:
    """Keep a bad setting that a run found for `main` (exit code 2); the run's objective, NaN."""
    _config_errors.append(message)
    return float("nan")


def report_result(run_dir: Path, result: dict) -> float:
    """Say how a run ended, keep its exit code for `main`, return its objective."""
    _exit_codes.append(EXIT_CODES[status_of(result)])
    if status_of(result) == "finished":
        say(f"{run_dir}: best val acc {result['best_val_acc']:.4f}, test acc {result['test_acc']:.4f}")
    return result[OBJECTIVE]


def check_group_overrides(args: list[str]) -> None:
    """A config group set to null (`model=null`), whose error from Hydra names no group, as a ConfigError."""
    for arg in args:
        key, _, value = arg.partition("=")
        group = key.lstrip("+")
        if value.lower() == "null" and (CONF_DIR / group).is_dir():
            options = ", ".join(sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")))
            raise ConfigError(f"{arg} is invalid: {group} is a config group: choose one of {options} "
                              f"(conf/{group}/), or leave it out for its default")


def main() -> int:
    """sandbox-train: 0 when every run finished, else the highest exit code of its runs (EXIT_CODES, 2 for a
    bad setting, 128 + the signal for an interrupted run, which also ends a multirun); a failed run's error is
    printed with its traceback."""
    # Let errors reach us instead of Hydra's own multi-line report, so that a bad setting is one line.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    _config_errors.clear()
    _exit_codes.clear()
    try:
        check_group_overrides(sys.argv[1:])
        hydra_main()
    except ConfigError as err:
        _config_errors.append(str(err))
    except (HydraException, OmegaConfBaseException) as err:
        _config_errors.append(one_line(err))
    except OSError as err:  # Hydra could not make the run folder
        if err.errno not in UNWRITABLE:
            raise
        _config_errors.append(runs.unwritable(err))
    except RunInterrupted as stop:
        _exit_codes.append(128 + stop.signum)
    except Exception:
        # a run that failed: in a multirun Hydra raises the first failed job's error once every job has ended, and
        # the other jobs' ends (a bad setting, a higher exit code) are still the command's
        traceback.print_exc()
        _exit_codes.append(EXIT_CODES["failed"])
    for message in _config_errors:
        print(f"sandbox-train: error: {message}", file=sys.stderr)
    return max([*_exit_codes, 2 if _config_errors else 0])


if __name__ == "__main__":
    sys.exit(main())
