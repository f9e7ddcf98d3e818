"""Run results on disk: atomic JSON writes, how a run ended, the provenance recorded with every result, and
collection."""

import argparse
import hashlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

RESULT_FILE = "result.json"
LOGS = "logs"  # a run's metrics: <run_dir>/logs/metrics.csv
# Config keys that cannot change what a run computes: where it is written, under which name, how progress and
# metrics are displayed and logged, whether its kernels are launched one by one or replayed from CUDA graphs (the
# same kernels). Everything else, defaults included, is part of the run's identity.
NOT_IDENTITY = ("output_root", "name", "callbacks.progress", "logger", "cuda_graphs")
# How a run ended: `status` in result.json, with a short `status_reason`.
STATUSES = ("finished", "diverged", "not_trained", "pruned", "interrupted", "failed")
# The ends that running the same command again returns as they are; an interrupted or failed run resumes.
TERMINAL = ("finished", "diverged", "not_trained", "pruned")
# A failed trial of a study without a recorded reason is one whose worker stopped sending heartbeats.
WORKER_LOST = "its worker stopped (killed, interrupted or cut off from the storage) before the trial finished"


def _field(result: dict, dotted: str):
    """The value at a dotted key of `result`, None where it or a parent is absent."""
    node = result
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def config_hash(config: dict) -> str:
    """The sha256 of a resolved configuration (a plain dict), without the keys of NOT_IDENTITY."""
    identity = json.loads(json.dumps(config, default=str))
    for dotted in NOT_IDENTITY:
        parent, _, last = dotted.rpartition(".")
        node = _field(identity, parent) if parent else identity
        if isinstance(node, dict):  # a hand-made result may lack the key or hold another type there
            node.pop(last, None)
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1, "c": [2]}} -> {"a.b": 1, "a.c": "[2]"}: one column or key per setting (lists as text)."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, list):
            flat[name] = repr(value)
        else:
            flat[name] = value
    return flat


def identity_key(key: str) -> bool:
    """Whether a flattened config key is part of what a run is (not one of NOT_IDENTITY or below one)."""
    return not any(key == k or key.startswith(k + ".") for k in NOT_IDENTITY)


def stopping_threshold(config: dict) -> float:
    """The validation accuracy at which a run of this config stops early (1.0 where none is set): how far a run
    passes it is where a validation happened to fall, so accuracies are compared up to it."""
    threshold = ((config.get("callbacks") or {}).get("early_stopping") or {}).get("threshold")
    return 1.0 if threshold is None else threshold


def edited_config(result: dict) -> str | None:
    """Why a result's config is not the configuration that ran (edited after the run: its recorded config_hash
    is another's), or None."""
    recorded = result.get("config_hash")
    if recorded is not None and recorded != config_hash(result["config"]):
        return "its config is not the one its config_hash was computed from (edited after the run?)"
    return None


def status_of(result: dict) -> str:
    """A result's status; results written before statuses were recorded are finished runs."""
    return result.get("status", "finished")


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside `path` to write; on success it replaces `path` in one rename, so readers
    never see half a file; on any error it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are for everyone who can read the folder
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def versions() -> dict:
    import lightning
    import torch

    found = {"python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__}
    try:
        import triton

        found["triton"] = triton.__version__
    except ImportError:
        found["triton"] = None
    return found


def git_commit() -> str | None:
    """The commit of the checkout this package runs from, with '+dirty' when it has local changes; for a copy
    made by `git archive` (no .git: a GPU machine's copy, a release tarball), the commit that `git archive` wrote
    into ARCHIVE_COMMIT, with '+archive' (local changes cannot be told there); None when neither says."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, check=False,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return archive_commit()
    return commit + ("+dirty" if dirty else "")


# `git archive` replaces the placeholder in this file by the archived commit (.gitattributes: export-subst).
ARCHIVE_COMMIT = Path(__file__).with_name("ARCHIVE_COMMIT")


def archive_commit() -> str | None:
    """The commit `git archive` wrote into ARCHIVE_COMMIT, with '+archive'; None in a checkout (placeholder)."""
    try:
        text = ARCHIVE_COMMIT.read_text().strip()
    except OSError:
        return None
    return text + "+archive" if re.fullmatch(r"[0-9a-f]{40}", text) else None


def _nearest_existing(path: Path) -> Path:
    """`path` (absolute) if it exists, else the nearest of its parents that does: where it would be made."""
    path = Path(path).absolute()
    return next(p for p in (path, *path.parents) if p.exists())


def folder_problem(path: Path) -> str | None:
    """Why `path` cannot be a folder to write in, found without creating anything: it, or the nearest of its
    parents that exists, is not a folder; None when it can be (a write may still fail, on a full disk say)."""
    path = Path(path).absolute()
    existing = _nearest_existing(path)
    if existing.is_dir():
        return None
    return f"{existing} is a file, not a folder" + ("" if existing == path else f", so {path} cannot be made")


# The longest file or folder name Linux's file systems take (NAME_MAX): a longer one fails with an OSError (File
# name too long) only where it is used, after the folders above it are made, so it is checked up front.
NAME_MAX = 255

# The task suite that sandbox-report scores per task (experiment=mad marks its runs with `suite: mad`).
MAD_SUITE = "mad"


def names_fit(path: str) -> bool:
    """Whether every file or folder name of `path` fits in NAME_MAX bytes."""
    return all(len(name.encode()) <= NAME_MAX for name in path.split(os.sep))


def path_argument(text: str) -> Path:
    """A path given on the command line; an empty one is an error (as a Path it would be the working folder)."""
    if not text:
        raise argparse.ArgumentTypeError("'' is not a path (empty)")
    if not names_fit(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a path (a name longer than {NAME_MAX} bytes)")
    return Path(text)


def write_problem(folder: Path) -> str | None:
    """Why no file can be written in `folder` (where it does not exist yet: in the nearest parent that does, in
    which it would be made), as `reason: path`, or None; found by making an unnamed temporary file there, which
    leaves nothing on disk."""
    existing = _nearest_existing(folder)
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        return f"{err.strerror}: {existing}"
    return None


def file_problem(path: Path) -> str | None:
    """Why no file can be written at `path` (a folder there, no folder to hold it, or one that takes no file), or
    None."""
    if path.is_dir():
        return "it is a folder"
    if not path.parent.is_dir():
        return f"its folder {path.parent} does not exist"
    problem = write_problem(path.parent)
    return problem and f"its folder {path.parent} is not writable ({problem})"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# The other fields a report reads, where present, and what each must be: a result.json edited by hand or written
# by another version may hold anything there. A parent before its children.
FIELDS = {
    # values in the state; plotted on a log axis, where an infinite one is silently left out
    "state_size": ("a finite number >= 1", lambda v: _number(v) and 1 <= v < math.inf),
    # a count of steps: averaged over seeds to rank tied settings, where inf fails (and nan would drop out)
    "steps": ("a finite number >= 0", lambda v: _number(v) and 0 <= v < math.inf),
    "git_commit": ("a string", lambda v: isinstance(v, str)),
    "earlier_git_commits": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v)),
    "stack": ("a mapping", lambda v: isinstance(v, dict)),
    "config.model.mixer_options": ("a mapping", lambda v: isinstance(v, dict)),
    "config.callbacks": ("a mapping", lambda v: isinstance(v, dict)),
    "config.callbacks.early_stopping": ("a mapping", lambda v: isinstance(v, dict)),
    "config.callbacks.early_stopping.threshold": ("a number", _number),
}


def result_problem(result) -> str | None:
    """Why a parsed result.json cannot be reported (not an object, no model config, an unknown status, metrics
    not numbers, an accuracy outside [0, 1], a finished run without finite accuracies, overall and per slice, or
    router statistics, a field of FIELDS of another type), or None if it can. Other statuses may lack the accuracies."""
    if not isinstance(result, dict) or not result:
        return "not a result (an empty or non-object JSON value)"
    config = result.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict) \
            or not isinstance(config["model"].get("mixer"), str):
        return "no config with model.mixer"
    if problem := edited_config(result):
        return problem
    status = status_of(result)
    if status not in STATUSES:
        return f"status={status!r} is not a status; valid: {', '.join(STATUSES)} (absent: finished)"
    finished = status == "finished"
    per_slice = ("test_acc_per_slice", "test_acc_past_train_per_slice")
    for key in (*per_slice, "router"):
        values = result.get(key, {})
        if not isinstance(values, dict) or not all(_number(v) for v in values.values()):
            return f"{key} is not a mapping of numbers"
    accuracies = {key: result.get(key) for key in ("best_val_acc", "test_acc")}
    for key in per_slice:
        accuracies.update({f"{key}[{k!r}]": v for k, v in result.get(key, {}).items()})
    # a finished run's router statistics are averaged over seeds: inf fails there, nan would drop out unnoticed
    for key, value in result.get("router", {}).items():
        if finished and not math.isfinite(value):
            return f"status finished but router[{key!r}]={value!r}"
    for key, value in accuracies.items():
        if value is not None and not _number(value):
            return f"{key}={value!r} is not a number"
        if finished and not (value is not None and math.isfinite(value)):
            return f"status finished but {key}={value!r}"
        if value is not None and math.isfinite(value) and not 0 <= value <= 1:
            return f"{key}={value!r} is not an accuracy in [0, 1]"
    for key, (what, ok) in FIELDS.items():
        value = _field(result, key)
        if value is not None and not ok(value):
            return f"{key}={value!r} is not {what}"
    return None


def collect_results(folder: Path, on_skip=None) -> list[dict]:
    """Every run's result below `folder`, each with its `run_dir`, in a stable order.

    A file that cannot be reported (empty, truncated, not JSON, no config, metrics that are not numbers) is
    left out and passed to `on_skip(path, why)`; by default that prints one warning line on stderr."""
    if on_skip is None:
        def on_skip(path: Path, why: str) -> None:
            print(f"warning: {path} skipped: {why}", file=sys.stderr)
    results = []
    for path in sorted(Path(folder).rglob(RESULT_FILE)):
        try:
            result = read_json(path)
        except OSError as err:
            on_skip(path, f"cannot be read ({err.strerror})")
            continue
        except UnicodeDecodeError:
            on_skip(path, "not a text file")
            continue
        except json.JSONDecodeError as err:
            truncated = f"not valid JSON, perhaps truncated ({err.msg}: line {err.lineno} column {err.colno})"
            on_skip(path, "empty file" if not err.doc.strip() else truncated)
            continue
        problem = result_problem(result)
        if problem:
            on_skip(path, problem)
            continue
        result["run_dir"] = str(path.parent)
        results.append(result)
    return results
