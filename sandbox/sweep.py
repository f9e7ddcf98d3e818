"""`sandbox-sweep`: an Optuna search over routing hyperparameters (Optuna >= 4, Hydra's compose API).

    sandbox-sweep --space routing                              # the search space conf/sweep/routing.yaml
    sandbox-sweep --space routing --workers 4                  # four worker processes on one study
    sandbox-sweep --space routing --param model.d_model=choice:64,128 optim.lr=1e-3   # + a named key, + overrides

A search space (conf/sweep/<space>.yaml) names the study, its objectives, trial count, sampler, pruner,
the base overrides of every trial and the parameters with their distributions. The study lives in a sqlite
file in the sweep's folder unless --storage gives another Optuna storage URL (e.g. PostgreSQL), so workers
on one machine or many can share it, and running the command again continues it: the trial count is the
study's total. A trial that raises, runs out of memory or diverges is recorded as failed with its reason.
"""

import argparse
import math
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna
import sqlalchemy
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from optuna.trial import TrialState

from sandbox.train import CONF_DIR, UNWRITABLE, ConfigError, one_line, train

# Heartbeats and retries are marked experimental in Optuna 4/5; they are what keeps a dead worker's trial
# from staying RUNNING for ever.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
# Objectives a trial can report, each with the direction Optuna should push it.
OBJECTIVES = {"best_val_acc": "maximize", "test_acc": "maximize", "state_size": "minimize",
              "wall_time_s": "minimize"}
DISTRIBUTIONS = ("categorical", "int", "float")
# A failed trial without a recorded reason is one whose worker stopped sending heartbeats.
WORKER_LOST = "its worker stopped (killed, interrupted or cut off from the storage) before the trial finished"


# ---- the search space ----
def parse_param(text: str) -> tuple[str, dict]:
    """`KEY=choice:a,b,c` | `KEY=int:LOW:HIGH[:log]` | `KEY=float:LOW:HIGH[:log]` -> (key, spec)."""
    key, sep, spec = text.partition("=")
    kind, _, rest = spec.partition(":")
    fields = rest.split(":")
    if not sep or kind not in ("choice", "int", "float") or not rest:
        raise ConfigError(f"--param {text!r} is invalid: use KEY=choice:A,B | KEY=int:LOW:HIGH[:log] | "
                          "KEY=float:LOW:HIGH[:log]")
    if kind == "choice":
        return key, {"type": "categorical", "choices": [_scalar(c) for c in rest.split(",")]}
    if len(fields) not in (2, 3) or (len(fields) == 3 and fields[2] != "log"):
        raise ConfigError(f"--param {text!r} is invalid: {kind} takes LOW:HIGH or LOW:HIGH:log")
    cast = int if kind == "int" else float
    return key, {"type": kind, "low": cast(fields[0]), "high": cast(fields[1]), "log": len(fields) == 3}


def _scalar(text: str):
    """A command-line value as YAML would read it (1 -> int, 1e-3 -> float, true -> bool)."""
    return yaml.safe_load(text)


def check_space(space: dict) -> None:
    params = space.get("params") or {}
    if not params:
        raise ConfigError(f"sweep space {space.get('study_name')!r} has no params: nothing to search "
                          "(add some under params: or with --param KEY=SPEC)")
    for name, spec in params.items():
        kind = spec.get("type")
        if kind not in DISTRIBUTIONS:
            raise ConfigError(f"sweep param {name}: type={kind!r} is invalid; use one of {list(DISTRIBUTIONS)}")
        if kind == "categorical" and not spec.get("choices"):
            raise ConfigError(f"sweep param {name}: choices is empty; give at least one value")
        if kind != "categorical" and not spec["low"] <= spec["high"]:
            raise ConfigError(f"sweep param {name}: low={spec['low']} > high={spec['high']}")
        if kind != "categorical" and spec.get("log") and spec["low"] <= 0:
            raise ConfigError(f"sweep param {name}: a log scale needs low > 0, got low={spec['low']}")
        bound = spec.get("at_most")
        if bound is not None and bound not in params:
            raise ConfigError(f"sweep param {name}: at_most={bound!r} names no param of the space; "
                              f"valid: {sorted(params)}")
    for objective in space["objectives"]:
        if objective not in OBJECTIVES:
            raise ConfigError(f"sweep objectives: {objective!r} is invalid; use some of {list(OBJECTIVES)}")
    if space["n_trials"] < 1:
        raise ConfigError(f"sweep n_trials={space['n_trials']} is invalid: must be >= 1")


def suggest(trial: optuna.Trial, params: dict) -> dict:
    """Sample every param in order; `at_most: OTHER` caps an int at OTHER's sampled value (top_k <= M)."""
    chosen = {}
    for name, spec in params.items():
        key = spec.get("key", name)
        if spec["type"] == "categorical":
            chosen[key] = trial.suggest_categorical(name, list(spec["choices"]))
        elif spec["type"] == "int":
            high = spec["high"]
            if spec.get("at_most"):
                high = min(high, chosen[params[spec["at_most"]].get("key", spec["at_most"])])
            chosen[key] = trial.suggest_int(name, spec["low"], high, log=spec.get("log", False))
        else:
            chosen[key] = trial.suggest_float(name, spec["low"], spec["high"], log=spec.get("log", False))
    return chosen


def load_space(name: str, extra_params: list[str]) -> dict:
    """A space by name (conf/sweep/<name>.yaml) or by the path of a YAML file, plus --param entries."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else CONF_DIR / "sweep" / f"{name}.yaml"
    if not path.exists():
        valid = sorted(p.stem for p in (CONF_DIR / "sweep").glob("*.yaml"))
        raise ConfigError(f"--space {name!r} is unknown; valid: {valid} or the path of a .yaml file")
    space = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    space["params"] = dict(space.get("params") or {})
    for text in extra_params:
        key, spec = parse_param(text)
        space["params"][key] = spec
    check_space(space)
    return space


# ---- storage and study ----
def open_storage(url: str, heartbeat: dict) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats: a trial whose worker died is failed once its heartbeat is older
    than the grace period, and retried once, instead of staying RUNNING for ever.

    Workers that open a new database at the same moment race to create its tables and write its schema
    version; a loser ("already exists", or a UNIQUE constraint on that version) tries again and finds them."""
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat["interval_s"],
                grace_period=heartbeat["grace_s"],
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
        except Exception as err:  # SQLAlchemy raises many kinds; all mean the same to the user
            lost_race = "already exists" in str(err) or isinstance(err, sqlalchemy.exc.IntegrityError)
            if attempt == 2 or not lost_race:
                raise ConfigError(f"--storage {url!r} cannot be opened: {one_line(err)}") from err
            time.sleep(1 + attempt)


def make_sampler(space: dict, worker: int) -> optuna.samplers.BaseSampler:
    # Each worker gets its own seed, or parallel workers would propose the same parameters.
    seed = space["sampler"].get("seed")
    seed = None if seed is None else seed + worker
    if space["sampler"]["name"] == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if len(space["objectives"]) > 1:
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True)


def make_pruner(space: dict) -> optuna.pruners.BasePruner:
    spec = space.get("pruner") or {"name": "none"}
    if spec["name"] == "median" and len(space["objectives"]) == 1:
        return optuna.pruners.MedianPruner(n_startup_trials=spec.get("n_startup_trials", 4),
                                           n_warmup_steps=spec.get("n_warmup_steps", 1))
    return optuna.pruners.NopPruner()


def open_study(space: dict, storage, worker: int = 0) -> optuna.Study:
    return optuna.create_study(
        study_name=space["study_name"], storage=storage, load_if_exists=True,
        directions=[OBJECTIVES[o] for o in space["objectives"]],
        sampler=make_sampler(space, worker), pruner=make_pruner(space))


# ---- the trial ----
def make_objective(space: dict, overrides: list[str], sweep_dir: Path):
    pruning = (space.get("pruner") or {}).get("name") == "median" and len(space["objectives"]) == 1

    def objective(trial: optuna.Trial):
        from optuna_integration import PyTorchLightningPruningCallback

        chosen = suggest(trial, space["params"])
        run_dir = sweep_dir / "trials" / f"{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        try:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = compose(config_name="train", overrides=[
                    *space.get("overrides", []), *overrides, "callbacks.progress=none",
                    *(f"{key}={value}" for key, value in chosen.items())])
            callbacks = [PyTorchLightningPruningCallback(trial, monitor="val/acc")] if pruning else []
            result = train(cfg, run_dir, extra_callbacks=callbacks)
        except optuna.TrialPruned:
            raise
        except Exception as err:
            trial.set_user_attr("fail_reason", f"{type(err).__name__}: {one_line(err)}"[:2000])
            raise
        values = [float(result[o]) for o in space["objectives"]]
        trial.set_user_attr("test_acc", result["test_acc"])
        trial.set_user_attr("state_size", result["state_size"])
        if not all(math.isfinite(v) for v in values):
            reason = f"objective not finite: {dict(zip(space['objectives'], values))}"
            trial.set_user_attr("fail_reason", reason)
            raise FloatingPointError(reason)
        return values if len(values) > 1 else values[0]

    return objective


def trial_count(study: optuna.Study) -> int:
    """Trials that count towards the study's total: finished, running or waiting, where a trial failed for
    a dead worker and then retried counts once."""
    trials = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING, TrialState.WAITING))
    retried = {optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) for t in trials} - {None}
    return len(trials) - len(retried)


def run_worker(space: dict, storage_url: str, overrides: list[str], sweep_dir: Path, worker: int) -> None:
    """Run trials one at a time until the study's trial count reaches `n_trials`, then wait for the trials
    that other workers run: one whose worker died is failed once its heartbeat is stale, and its retry is
    run here. So while one worker lives, no trial is left RUNNING."""
    study = open_study(space, open_storage(storage_url, space["heartbeat"]), worker)
    objective = make_objective(space, overrides, sweep_dir)
    while True:
        # Fail (and queue a retry of) trials whose worker died, before counting them as running.
        optuna.storages.fail_stale_trials(study)
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if trial_count(study) < space["n_trials"] or waiting:
            study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)
        elif study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            time.sleep(min(2, space["heartbeat"]["interval_s"]))
        else:
            break


def summarise(study: optuna.Study, objectives: list[str]) -> str:
    trials = study.get_trials(deepcopy=False)
    counts = {state.name: sum(t.state == state for t in trials) for state in TrialState}
    lines = [f"study {study.study_name}: " + ", ".join(f"{n} {k.lower()}" for k, n in counts.items() if n)]
    for trial in trials:
        if trial.state == TrialState.FAIL:
            lines.append(f"  trial {trial.number} failed: {trial.user_attrs.get('fail_reason', WORKER_LOST)}")
    best = study.best_trials if len(objectives) > 1 else ([study.best_trial] if counts["COMPLETE"] else [])
    title = "Pareto front" if len(objectives) > 1 else "best"
    for trial in best:
        values = ", ".join(f"{o}={v:.4g}" for o, v in zip(objectives, trial.values))
        lines.append(f"  {title}: trial {trial.number}: {values}  {trial.params}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sandbox-sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="routing", help="search space: conf/sweep/<space>.yaml, or a .yaml path")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=SPEC",
                        help="search another config key: choice:A,B | int:LOW:HIGH[:log] | float:LOW:HIGH[:log]")
    parser.add_argument("--n-trials", type=int, default=None, help="the study's total trial count")
    parser.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite in the sweep folder)")
    parser.add_argument("--study-name", default=None)
    parser.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    parser.add_argument("--output-root", default="outputs")
    parser.add_argument("--worker-index", type=int, default=0,
                        help="index of this machine's first worker (seeds its sampler): give each machine that "
                             "shares a study its own, e.g. 0, 4, 8 with --workers 4")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every trial, e.g. experiment=quickstart")
    args = parser.parse_intermixed_args(argv)
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        if args.workers < 1:
            raise ConfigError(f"--workers={args.workers} is invalid: must be >= 1")
        space = load_space(args.space, args.param)
        if args.n_trials is not None:
            space["n_trials"] = args.n_trials
        if args.study_name:
            space["study_name"] = args.study_name
        check_space(space)
        sweep_dir = Path(args.output_root) / "sweeps" / space["study_name"]
        # Compose one trial's config up front, so a bad override fails here, not in every trial.
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            compose(config_name="train", overrides=[*space.get("overrides", []), *args.overrides])
        try:
            sweep_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            if err.errno not in UNWRITABLE:
                raise
            raise ConfigError(f"--output-root {args.output_root} cannot be written ({err.strerror}: "
                              f"{err.filename}); it must be a writable folder with free space") from None
        storage_url = args.storage or f"sqlite:///{(sweep_dir / 'study.db').resolve()}"
        study = open_study(space, open_storage(storage_url, space["heartbeat"]))
    except (ConfigError, HydraException, OmegaConfBaseException) as err:
        print(f"sandbox-sweep: error: {one_line(err)}", file=sys.stderr)
        return 2
    if args.workers == 1:
        run_worker(space, storage_url, args.overrides, sweep_dir, args.worker_index)
    else:
        base = [sys.executable, "-m", "sandbox.sweep", "--space", args.space, "--n-trials", str(space["n_trials"]),
                "--study-name", space["study_name"], "--storage", storage_url, "--output-root", args.output_root,
                *(f"--param={p}" for p in args.param)]
        workers = [subprocess.Popen([*base, "--worker-index", str(args.worker_index + i), *args.overrides])
                   for i in range(args.workers)]
        codes = [w.wait() for w in workers]
        if any(codes):
            print(f"sandbox-sweep: worker exit codes {codes}", file=sys.stderr)
    print(summarise(study, space["objectives"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
