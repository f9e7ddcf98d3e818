"""`sandbox-train`: train one model of the zoo on one synthetic task (a Hydra app).

    sandbox-train experiment=quickstart model=mom              # one run
    sandbox-train -m experiment=quickstart                     # the experiment's grid (Hydra multirun)

The run directory is `${output_root}/${name}/<overrides>`, derived from the command line, so the same
command finds the same directory: a finished run is not repeated, and a crashed one resumes from its
last checkpoint. `train(cfg, run_dir)` does the work and returns the result that it writes to
`result.json`; the Hydra entry point returns the objective (validation accuracy) for sweepers.
"""

import contextlib
import errno
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, RichProgressBar
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import kernels
from sandbox.callbacks import EpochLines, ThroughputMonitor
from sandbox.data import RecallDataModule
from sandbox.module import RecallModule
from sandbox.results import FAILURE_FILE, RESULT_FILE, git_commit, read_json, versions, write_json_atomic
from sandbox.settings import ConfigError, check_settings

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
OBJECTIVE = "best_val_acc"
# OSErrors that mean the output folder cannot be written: read-only, full, over quota, no permission.
UNWRITABLE = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM}
# What a checkpoint must hold for Lightning to resume from it.
CHECKPOINT_KEYS = ("state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks", "epoch", "global_step")


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("run_id"):
        # The run folder of a command without overrides.
        OmegaConf.register_new_resolver("run_id", lambda overrides: overrides or "default")
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


@rank_zero_only
def say(message: str) -> None:
    """A line for the user, printed once (by the first process of a multi-GPU run)."""
    print(f"sandbox-train: {message}", flush=True)


def check_writable(run_dir: Path, output_root: str) -> None:
    """Fail before any training, naming output_root, when the run folder cannot be written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir) as probe:
            probe.write(bytes(4096))
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as err:
        if err.errno not in UNWRITABLE:
            raise
        raise unwritable(output_root, err, run_dir) from err


def unwritable(output_root: str, err: OSError, where: Path) -> ConfigError:
    return ConfigError(f"output_root={output_root} cannot be written ({err.strerror}: {err.filename or where}); "
                       "it must be a writable folder with free space")


def checkpoint_problem(path: Path) -> str | None:
    """Why Lightning could not resume from this checkpoint (truncated, corrupt, not a training checkpoint),
    or None if it can."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncation and corruption surface as many exception types
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]
    return f"keys {missing} missing" if missing else None


def resume_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint to resume from: last.ckpt, else best.ckpt, whichever is first valid; None to start from
    scratch. An invalid one is renamed to `<name>.corrupt` (kept for a look, out of Lightning's way)."""
    folder = run_dir / "checkpoints"
    for path in (folder / "last.ckpt", folder / "best.ckpt"):
        if not path.exists():
            continue
        problem = checkpoint_problem(path)
        if problem is None:
            say(f"resuming from {path}")
            return path
        say(f"{path} is unreadable ({problem}); moved to {path.name}.corrupt")
        with contextlib.suppress(FileNotFoundError):  # another process of a multi-GPU run moved it first
            path.replace(path.with_name(path.name + ".corrupt"))
    if any(folder.glob("*.corrupt")):
        say("no valid checkpoint left: starting from scratch")
    return None


def build(cfg: DictConfig) -> tuple[RecallDataModule, RecallModule]:
    """Data and model from the config; impossible settings become ConfigError before any training."""
    try:
        datamodule = RecallDataModule(
            name=cfg.task.name, params=OmegaConf.to_container(cfg.task.params, resolve=True),
            segments=OmegaConf.to_container(cfg.task.segments, resolve=True), seed=cfg.seed,
            batch_size=cfg.task.batch_size, eval_batch_size=cfg.task.eval_batch_size,
            limit_examples=cfg.task.limit_examples)
        datamodule.generate()
        module = RecallModule(model=OmegaConf.to_container(cfg.model, resolve=True),
                              vocab_size=datamodule.vocab_size, max_seq_len=datamodule.max_seq_len,
                              optim=OmegaConf.to_container(cfg.optim, resolve=True))
    except ValueError as err:
        raise ConfigError(str(err)) from err
    return datamodule, module


def _progress_callbacks(mode: str) -> tuple[list, bool]:
    if mode == "auto":
        mode = "rich" if sys.stdout.isatty() else "lines"
    if mode == "rich":
        return [RichProgressBar()], True
    if mode == "lines":
        return [EpochLines()], False
    return [], False


def _precision(setting: str) -> str:
    if setting == "auto":
        return "bf16-mixed" if torch.cuda.is_available() else "32-true"
    return setting


def make_trainer(cfg: DictConfig, run_dir: Path, extra_callbacks=()) -> L.Trainer:
    best = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor="val/acc", mode="max",
                           save_top_k=1)
    # Lightning's own save_last writes only when the best checkpoint improves; this one writes after every
    # validation, so a resumed run loses at most the steps since the last validation.
    last = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last", monitor=None, save_top_k=1,
                           enable_version_counter=False)
    stopping = EarlyStopping(monitor="val/acc", mode="max", stopping_threshold=cfg.callbacks.early_stopping.threshold,
                             patience=cfg.callbacks.early_stopping.patience)
    progress, show_bar = _progress_callbacks(cfg.callbacks.progress)
    if cfg.logger.kind == "tensorboard":
        logger = TensorBoardLogger(save_dir=run_dir, name="logs", version="")
    else:
        logger = CSVLogger(save_dir=run_dir, name="logs", version="")
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg["precision"] = _precision(trainer_cfg["precision"])
    try:
        return L.Trainer(
            **trainer_cfg,
            default_root_dir=run_dir,
            logger=logger,
            callbacks=[best, last, stopping, ThroughputMonitor(), *progress, *extra_callbacks],
            enable_progress_bar=show_bar,
            enable_model_summary=False,
            use_distributed_sampler=False,  # RecallDataModule gives each process its own shard
        )
    except (ValueError, MisconfigurationException) as err:
        raise ConfigError(f"trainer: {one_line(err)}") from err


def train(cfg: DictConfig, run_dir: Path, extra_callbacks=()) -> dict:
    """Train, test the best checkpoint, write `result.json`; return the result.

    A finished run (its result.json exists) is not repeated; a run with a valid checkpoint resumes from it.
    With several processes (trainer=ddp) every process calls this; the first one writes the files.
    """
    run_dir = Path(run_dir)
    result_path = run_dir / RESULT_FILE
    if result_path.exists():
        say(f"{run_dir} already finished; delete its {RESULT_FILE} to run it again")
        return read_json(result_path)
    try:
        check_settings(cfg)  # before seeding: the seed is a setting too
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        datamodule, module = build(cfg)
        trainer = make_trainer(cfg, run_dir, extra_callbacks)
        processes = trainer.num_devices * trainer.num_nodes
        if cfg.task.batch_size % processes:
            raise ConfigError(f"task.batch_size={cfg.task.batch_size} is invalid with {processes} processes: "
                              f"it is the global batch and must be a multiple of {processes}")
        check_writable(run_dir, cfg.output_root)
    except ConfigError:
        _remove_empty_folders(run_dir, stop_at=Path(cfg.output_root))
        raise
    resume_from = resume_checkpoint(run_dir)
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
        best = trainer.checkpoint_callback.best_model_path or None
        tested = trainer.test(module, datamodule=datamodule, ckpt_path=best, weights_only=True, verbose=False)[0]
    except Exception as err:
        if trainer.is_global_zero:
            with contextlib.suppress(OSError):  # a full disk cannot take the failure note either
                write_json_atomic(run_dir / FAILURE_FILE, {"error": f"{type(err).__name__}: {err}"})
        if isinstance(err, OSError) and err.errno in UNWRITABLE:
            raise unwritable(cfg.output_root, err, run_dir) from err
        raise
    best_score = trainer.checkpoint_callback.best_model_score
    result = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "best_val_acc": float("nan") if best_score is None else float(best_score),
        "test_acc": float(tested["test/acc"]),
        "test_acc_per_slice": {k.removeprefix("test/acc/"): float(v) for k, v in tested.items()
                               if k.startswith("test/acc/")},
        "test_loss": float(tested["test/loss"]),
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "state_size": module.model.state_size(datamodule.max_seq_len),
        "num_parameters": module.model.num_parameters(),
        "router": module.model.router_stats(),
        "backend": kernels.resolve_backend(cfg.model.backend, trainer.strategy.root_device),
        "device": str(trainer.strategy.root_device),
        "wall_time_s": time.perf_counter() - start,
        "resumed": resume_from is not None,
        "versions": versions(),
        "git_commit": git_commit(),
    }
    if trainer.is_global_zero:
        (run_dir / FAILURE_FILE).unlink(missing_ok=True)
        write_json_atomic(result_path, result)
    return result


def _remove_empty_folders(folder: Path, stop_at: Path) -> None:
    """Remove the run folder Hydra made for a run that never started, and its empty parents up to
    `stop_at` (included). Folders with anything in them are left alone."""
    stop_at, folder = stop_at.resolve(), folder.resolve()
    while folder.is_dir() and not any(folder.iterdir()) and folder.is_relative_to(stop_at):
        try:
            folder.rmdir()
        except OSError:  # a read-only folder keeps its empty run folder
            break
        if folder == stop_at:
            break
        folder = folder.parent


# Config errors of the runs of this process: reported by `main` as one line each, exit code 2. They are
# collected rather than raised so that one bad run of a multirun does not stop the others.
_config_errors: list[str] = []


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float:
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        result = train(cfg, Path(run_dir))
    except ConfigError as err:
        _config_errors.append(str(err))
        return float("nan")
    say(f"{run_dir}: best val acc {result['best_val_acc']:.4f}, test acc {result['test_acc']:.4f}")
    return result[OBJECTIVE]


def one_line(err: BaseException) -> str:
    """An exception and its cause as one line, without Hydra's search-path listing."""
    text = re.sub(r"\s+", " ", str(err)).strip()
    cause = "" if err.__cause__ is None else re.sub(r"\s+", " ", str(err.__cause__)).strip()
    if cause not in text:
        text = f"{text} {cause}"
    return text.split("Config search path")[0].strip()


def main() -> int:
    # Let errors reach us instead of Hydra's own multi-line report, so that a bad setting is one line.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    _config_errors.clear()
    try:
        hydra_main()
    except (HydraException, OmegaConfBaseException) as err:
        _config_errors.append(one_line(err))
    except OSError as err:  # Hydra could not make the run folder
        if err.errno not in UNWRITABLE:
            raise
        _config_errors.append(f"output_root cannot be written ({err.strerror}: {err.filename}); "
                              "it must be a writable folder with free space")
    for message in _config_errors:
        print(f"sandbox-train: error: {message}", file=sys.stderr)
    return 2 if _config_errors else 0


if __name__ == "__main__":
    sys.exit(main())
