"""Run folders: a run's identity, its folder's name, the result and checkpoints it holds, and writability.

A run is its resolved configuration: `config_hash` is the sha256 of that configuration as canonical JSON. The
folder of a command is `${output_root}/${name}/<overrides>-<hash>` (the command-line overrides, shortened, then
the first 12 hex digits of the hash), so two commands whose configurations differ in anything (an edited
experiment file, two experiment files of one name) never share a folder, and the same command finds the same
folder. Every checkpoint carries the hash too: one written for another configuration is never resumed.
"""

import contextlib
import errno
import os
import pickle
import re
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from sandbox.results import RESULT_FILE, TERMINAL, config_hash, read_json, result_problem, status_of
from sandbox.settings import ConfigError, check_run_folder

HASH_DIGITS = 12
# The readable part of a folder name, in bytes; with the hash the name stays far below NAME_MAX (255).
READABLE_BYTES = 120
CHECKPOINTS = "checkpoints"
# What the runs of this process came to, for `sandbox-train`'s exit (sandbox.train.main): one line per bad
# setting, the exit code of each run's status.
CONFIG_ERRORS: list[str] = []
EXIT_CODES_SEEN: list[int] = []
SET_ASIDE_SUFFIX = ".unusable"
# What a checkpoint must hold for Lightning to resume from it.
CHECKPOINT_KEYS = ("state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks", "epoch", "global_step")
# OSErrors that mean the output folder cannot be written: read-only, full, over quota, no permission, a file on
# its path.
UNWRITABLE = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.ENOTDIR}
# The folders that Hydra makes for each run folder (absolute path -> those of it and its parents that did not
# exist), recorded when the folder's name is resolved, just before Hydra makes them: what a run stopped by a bad
# setting removes again, and never a folder that was there before.
NEW_FOLDERS: dict[str, list[Path]] = {}


@rank_zero_only
def say(message: str, error: bool = False) -> None:
    """A line for the user, printed once (by the first process of a multi-GPU run); `error` for stderr."""
    print(f"sandbox-train: {message}", file=sys.stderr if error else sys.stdout, flush=True)


# ---- identity and folder name ----
def folder_name(overrides: str, digest: str) -> str:
    """`<overrides>-<hash>`: the overrides as Hydra joins them (`default` when none), path separators replaced,
    cut to READABLE_BYTES; the hash tells apart the configurations that the cut, or an edited file, hides."""
    readable = (overrides or "default").replace(os.sep, "_")
    if len(readable.encode()) > READABLE_BYTES:
        readable = readable.encode()[:READABLE_BYTES].decode(errors="ignore") + "..."
    return f"{readable}-{digest[:HASH_DIGITS]}"


def folder_of_job(overrides: str, *, _root_: DictConfig) -> str:
    """The `run_id` resolver of conf/train.yaml: the folder name of the Hydra job whose config is `_root_`, called
    before Hydra makes the folder `${output_root}/${name}/<this name>`; checks that path and notes what is new."""
    check_run_folder(_root_)
    job = OmegaConf.masked_copy(_root_, [key for key in _root_ if key != "hydra"])
    name = folder_name(overrides, config_hash(OmegaConf.to_container(job, resolve=True)))
    run_dir = os.path.abspath(os.path.join(str(_root_.output_root), str(_root_.name), name))
    NEW_FOLDERS[run_dir] = missing_folders(Path(run_dir))
    return name


# ---- what a folder holds ----
def set_aside(path: Path, problem: str) -> None:
    """Rename an unusable file to `<name>.unusable` (kept for a look, out of the run's way), saying why."""
    target = path.with_name(path.name + SET_ASIDE_SUFFIX)
    say(f"{path} cannot be used: {problem}; moved to {target.name}")
    with contextlib.suppress(FileNotFoundError):  # another process of a multi-GPU run moved it first
        path.replace(target)


def stored_result(run_dir: Path) -> dict | None:
    """The folder's result.json, or None when it has none; an unreadable, edited or otherwise unreportable one
    (what sandbox-report would skip: a config edited after the run, a finished status without finite accuracies,
    fields of the wrong type) is set aside, and the run goes on from its checkpoints."""
    path = run_dir / RESULT_FILE
    if not path.exists():
        return None
    try:
        result = read_json(path)
        if not isinstance(result, dict) or not isinstance(result.get("config"), dict):
            raise ValueError("it holds no run's config")
    except (OSError, ValueError) as err:
        set_aside(path, f"unreadable ({describe_error(err)})")
        return None
    # The report's own check: a result it would skip (an edited `status: finished` without accuracies, one
    # without test_acc) is no run's end either.
    if problem := result_problem(result):
        set_aside(path, problem)
        return None
    return result


def stored_hash(result: dict) -> str:
    """The config_hash of a stored result (computed from its config for results written before it was stored)."""
    return result.get("config_hash") or config_hash(result["config"])


def ended_result(run_dir: Path, digest: str) -> dict | None:
    """The folder's result when the run has ended (finished, diverged, not trained), said so; None when the run
    is to start or resume. A result of another configuration is a ConfigError."""
    stored = stored_result(run_dir)
    if stored is None:
        return None
    if stored_hash(stored) != digest:
        raise ConfigError(f"{run_dir} holds a run of another configuration (config_hash "
                          f"{stored_hash(stored)[:HASH_DIGITS]}, this one {digest[:HASH_DIGITS]}): give this run its "
                          "own folder (another name or output_root) or remove that one")
    status = status_of(stored)
    if status not in TERMINAL:
        return None
    reason = "" if status == "finished" else f" ({stored.get('status_reason')})"
    # without its result.json the run would resume from its checkpoints, so only removing the folder runs it again
    say(f"{run_dir} already {status.replace('_', ' ')}{reason}; remove that folder to run it again")
    return stored


# ---- checkpoints ----
def first_sentence(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().split(". ")[0]


def describe_error(err: BaseException) -> str:
    """An error as its type and first sentence. torch's text for a file it will not load safely suggests an
    unsafe load (which could run code from the file): such text is never passed on."""
    text = first_sentence(str(err))
    if "weights_only" in text or "weights only" in text.lower():
        text = ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _load_problem(err: Exception, path: Path) -> str:
    """Why torch.load (weights only) failed, in the words of what the file is."""
    if isinstance(err, pickle.UnpicklingError):
        return "not a checkpoint (a safe load refuses its contents)"
    if isinstance(err, OSError) and not _reads(path):
        return f"cannot be read ({err.strerror or describe_error(err)})"
    if isinstance(err, EOFError):
        return "empty or truncated"
    return f"truncated or corrupt ({describe_error(err)})"


def _reads(path: Path) -> bool:
    """Whether the file opens and reads to its end: torch.load raises OSError (EINVAL) on a zip cut in the middle
    too, which is the file's contents, not its reading."""
    try:
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass
    except OSError:
        return False
    return True


def checkpoint_problem(path: Path, digest: str, weights: dict[str, torch.Tensor]) -> str | None:
    """Why this run cannot resume from the checkpoint at `path` (unreadable, truncated, not a training
    checkpoint, another configuration's, weights of other shapes, or it needs a best.ckpt that is gone),
    or None if it can. `weights` is the state_dict of this run's model."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of files it then refuses
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncation and corruption surface as many exception types
        return _load_problem(err, path)
    if not isinstance(checkpoint, dict):
        return f"not a training checkpoint (it holds a {type(checkpoint).__name__})"
    missing = [k for k in CHECKPOINT_KEYS if k not in checkpoint]
    if missing:
        return f"not a training checkpoint (keys {missing} missing)"
    if "config_hash" not in checkpoint:
        return "it records no configuration (written before checkpoints recorded their config_hash)"
    if checkpoint["config_hash"] != digest:
        return (f"it was written by another configuration (config_hash {str(checkpoint['config_hash'])[:HASH_DIGITS]}"
                f", this run's {digest[:HASH_DIGITS]})")
    state = checkpoint["state_dict"]
    if not isinstance(state, dict) or state.keys() != weights.keys():
        return "its weights are not this model's (other parameter names)"
    for key, tensor in weights.items():
        if not isinstance(state[key], torch.Tensor) or state[key].shape != tensor.shape:
            shape = getattr(state[key], "shape", type(state[key]).__name__)
            return f"its weights are not this model's ({key} is {tuple(shape)}, the model's {tuple(tensor.shape)})"
    if not isinstance(checkpoint["callbacks"], dict):
        return "not a training checkpoint (its callbacks' state is not a dict)"
    # The best checkpoint's callback state names the file with the best weights so far, which testing needs.
    needed = {Path(s["best_model_path"]).name for s in checkpoint["callbacks"].values()
              if isinstance(s, dict) and s.get("monitor") and s.get("best_model_path")} - {path.name}
    gone = sorted(name for name in needed if not (path.parent / name).is_file())
    if gone:
        return f"it needs {', '.join(gone)} (the best weights so far), which is gone or unusable"
    return None


def raised_restoring(err: BaseException) -> bool:
    """Whether `err` was raised while Lightning restored a checkpoint (in its checkpoint connector)."""
    frames = traceback.extract_tb(err.__traceback__)
    return any(Path(frame.filename).name == "checkpoint_connector.py" for frame in frames)


def checkpoint_computation(path: Path) -> dict | None:
    """The precision and kernels that wrote the checkpoint at `path` (RunIdentity), None where it does not say."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True).get("computation")


def resume_checkpoint(run_dir: Path, digest: str, weights: dict[str, torch.Tensor]) -> Path | None:
    """The checkpoint to resume from: last.ckpt, else best.ckpt; None to start from scratch. Each one that
    cannot be used is set aside first (best.ckpt before last.ckpt, which may need it)."""
    folder = run_dir / CHECKPOINTS
    candidates = [folder / "best.ckpt", folder / "last.ckpt"]
    set_aside_any = False
    for path in candidates:
        if path.exists():
            problem = checkpoint_problem(path, digest, weights)
            if problem is not None:
                set_aside(path, problem)
                set_aside_any = True
    for path in reversed(candidates):
        if path.exists():
            say(f"resuming from {path}")
            return path
    if set_aside_any:
        say("no usable checkpoint left: starting from scratch")
    return None


# ---- writability ----
def unwritable_problem(run_dir: Path, output_root: str) -> str | None:
    """Why the run folder cannot be written (naming output_root), or None. Makes the folder."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir) as probe:
            probe.write(bytes(4096))
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as err:
        if err.errno not in UNWRITABLE:
            raise
        return unwritable(err, output_root, run_dir)
    return None


def unwritable(err: OSError, output_root: str | None = None, where: Path | None = None) -> str:
    setting = "output_root" if output_root is None else f"output_root={output_root}"
    return (f"{setting} cannot be written ({err.strerror}: {err.filename or where}); "
            "it must be a writable folder with free space")


def missing_folders(folder: Path) -> list[Path]:
    """`folder` and its parents that do not exist, deepest first."""
    return [p for p in (folder, *folder.parents) if not p.exists()]


def new_folders(run_dir: Path) -> list[Path]:
    """The folders of `run_dir` and its parents that this command made or will make, deepest first: those Hydra
    made (NEW_FOLDERS), else those missing now."""
    return NEW_FOLDERS.pop(os.path.abspath(run_dir), None) or missing_folders(Path(os.path.abspath(run_dir)))


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove these folders (`new_folders` of a run that never started), deepest first, while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (another run's folder is in it), gone, or read-only: it and its parents stay
            break
