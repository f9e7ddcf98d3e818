"""`sandbox-sweep`: an Optuna search over routing hyperparameters (Optuna >= 4, Hydra's compose API).

    sandbox-sweep --space routing                              # the search space conf/sweep/routing.yaml
    sandbox-sweep --space routing --workers 4                  # four worker processes on one study
    sandbox-sweep --space routing --param model.d_model=choice:64,128 trainer.max_steps=500   # + a key, + overrides
    sandbox-sweep --space routing --seeds 0,1,2                # every trial at 3 seeds, scored by their means

A search space (conf/sweep/<space>.yaml) names the study, its objectives, trial count, sampler, pruner,
the base overrides of every trial and the parameters with their distributions. Before any trial, the space
and one trial's configuration are checked (a bad key or value is one line, exit code 2). The study lives in
a sqlite file in the sweep's folder unless --storage (or $SANDBOX_SWEEP_STORAGE, which keeps a password off the
command line) gives another Optuna storage URL (e.g. PostgreSQL), so workers on one machine or many can share
it, and running the command again continues it with new trials: the trial count is the study's total. The
study keeps its definition (objectives, params, overrides, seeds, heartbeat and the first trial's
configuration, so that an edited config file shows), the first one stored where commands start at once; a
command asking for another one is refused. The pruner sees every validation; a pruned trial is PRUNED, and a
trial that raises, runs out of memory or has a run (any one of its seeds) that did not finish, whatever its
objectives, is recorded as failed with its reason.

With `seeds` (the space's list, or --seeds), a trial trains its configuration at every seed, each run in
`trials/<number>/seed<seed>/`, and scores the means of its objectives over them (MoM's accuracy at one
setting can differ from seed to seed by the whole range); on a GPU its runs train as one stack
(`sandbox.stacked_run`), on the CPU one after the other. The pruner judges a trial by its first seed.
"""

import argparse
import contextlib
import json
import logging
import math
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import optuna
import sqlalchemy
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from optuna.storages._rdb.models import StudyUserAttributeModel  # Optuna's table of study user attributes
from optuna.trial import TrialState

from sandbox.callbacks import RunInterrupted, RunPruned, run_key
from sandbox.results import (NAME_MAX, WORKER_LOST, flatten, folder_problem, identity_key, names_fit,
                             stopping_threshold)
from sandbox.stacked_run import stacks, train_stack
from sandbox.train import CONF_DIR, ConfigError, check_settings, one_line, train

# Heartbeats and retries are marked experimental in Optuna 4/5; they are what keeps a dead worker's trial
# from staying RUNNING for ever.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
# Objectives a trial can report, each with the direction Optuna should push it. Never test accuracy: a study
# selects on validation (test_acc is recorded beside each trial, never chosen on).
OBJECTIVES = {"best_val_acc": "maximize", "state_size": "minimize", "wall_time_s": "minimize"}
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "none")
# The keys of a search space and of each of its params: (required, optional).
SPACE_KEYS = (("study_name", "objectives", "n_trials", "sampler", "params", "heartbeat"),
              ("pruner", "overrides", "seeds"))
PARAM_KEYS = {"categorical": (("choices",), ("key",)),
              "int": (("low", "high"), ("key", "log", "at_most")),
              "float": (("low", "high"), ("key", "log"))}
PARAM_FIELDS = ("key", "choices", "low", "high", "log", "at_most")
# A study's name is its folder's name.
STUDY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# A number in exponent notation without a dot (1e-3), which OmegaConf and Hydra read as a float and YAML 1.1 does not.
EXPONENT_NUMBER = re.compile(r"[-+]?[0-9]+[eE][-+]?[0-9]+")
# What a trial with seeds records of each of its runs.
RUN_ATTRS = ("status", "best_val_acc", "test_acc")
# The storage URL where --storage is not given. The workers of --workers N are given theirs in it: on their command
# lines, which `ps` shows every user of the machine, a PostgreSQL URL's password would show.
STORAGE_ENV = "SANDBOX_SWEEP_STORAGE"


# ---- the search space ----
def parse_param(text: str) -> tuple[str, dict]:
    """`KEY=choice:a,b,c` | `KEY=int:LOW:HIGH[:log]` | `KEY=float:LOW:HIGH[:log]` -> (key, spec)."""
    key, sep, spec = text.partition("=")
    kind, _, rest = spec.partition(":")
    fields = rest.split(":")
    if not key or not sep or kind not in ("choice", "int", "float") or not rest:
        raise ConfigError(f"--param {text!r} is invalid: use KEY=choice:A,B | KEY=int:LOW:HIGH[:log] | "
                          "KEY=float:LOW:HIGH[:log]")
    if kind == "choice":
        choices = rest.split(",")
        if "" in choices:  # YAML reads an empty value as null: a stray comma would add a null choice
            raise ConfigError(f"--param {text!r} is invalid: a choice is empty; give each choice (null for none)")
        values = []
        for choice in choices:
            try:
                values.append(_scalar(choice))
            except yaml.YAMLError:  # [64, '64, *x: YAML's syntax, not a value
                raise ConfigError(f"--param {text!r} is invalid: choice {choice!r} cannot be read as a value; give "
                                  "plain values separated by commas, e.g. choice:64,128 or choice:a,b") from None
        return key, {"type": "categorical", "choices": values}
    if len(fields) not in (2, 3) or (len(fields) == 3 and fields[2] != "log"):
        raise ConfigError(f"--param {text!r} is invalid: {kind} takes LOW:HIGH or LOW:HIGH:log")
    cast = int if kind == "int" else float
    try:
        low, high = cast(fields[0]), cast(fields[1])
    except ValueError:
        raise ConfigError(f"--param {text!r} is invalid: LOW and HIGH of {kind} must be "
                          f"{'integers' if kind == 'int' else 'numbers'}") from None
    return key, {"type": kind, "low": low, "high": high, "log": len(fields) == 3}


def _scalar(text: str):
    """A command-line value as the space file (OmegaConf) and Hydra read it: 1 -> int, 1e-3 -> float, true -> bool."""
    value = yaml.safe_load(text)
    # YAML 1.1 reads a number without a dot (1e-3) as a string, which the trial's settings then refused as no number
    if isinstance(value, str) and EXPONENT_NUMBER.fullmatch(text.strip()):
        return float(text)
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(ok: bool, setting: str, value, valid: str) -> None:
    if not ok:
        raise ConfigError(f"sweep {setting}={value!r} is invalid: must be {valid}")


def _check_keys(where: str, value, required: tuple, optional: tuple) -> None:
    """`value` is a mapping with every required key and no key outside required + optional."""
    valid = sorted([*required, *optional])
    _require(isinstance(value, dict), where, value, f"a mapping with keys among {valid}")
    missing = [key for key in required if key not in value]
    if missing:
        raise ConfigError(f"sweep {where}: {missing[0]} is missing; {where} needs {list(required)}")
    unknown = sorted(str(key) for key in set(value) - set(valid))
    if unknown:
        raise ConfigError(f"sweep {where}: unknown key(s) {unknown}; valid: {valid}")


def int_values(spec: dict) -> list[int] | None:
    """The values a param can take if they are all integers (what `at_most` can name), else None."""
    values = spec["choices"] if spec["type"] == "categorical" else [spec["low"], spec["high"]]
    return values if spec["type"] != "float" and all(_is_int(v) for v in values) else None


def check_param(name: str, spec, earlier: dict) -> None:
    where = f"param {name}"
    _check_keys(where, spec, ("type",), PARAM_FIELDS)
    kind = spec["type"]
    _require(kind in PARAM_KEYS, f"{where}: type", kind, f"one of {list(PARAM_KEYS)}")
    _check_keys(where, spec, ("type", *PARAM_KEYS[kind][0]), PARAM_KEYS[kind][1])
    key = spec.get("key", name)
    _require(isinstance(key, str) and key != "", f"{where}: key", key, "a config key such as optim.lr")
    if kind == "categorical":
        choices = spec["choices"]
        _require(isinstance(choices, list) and len(choices) > 0, f"{where}: choices", choices,
                 "a non-empty list")
        for choice in choices:
            _require(choice is None or isinstance(choice, (bool, int, float, str)), f"{where}: choices", choices,
                     "a list of numbers, strings, booleans or null")
        # by type too: 1 and true are two choices, though Python finds them equal
        _require(len({(type(c), c) for c in choices}) == len(choices), f"{where}: choices", choices,
                 "a list of distinct values (a repeated choice is drawn twice as often; give each once)")
        return
    low, high = spec["low"], spec["high"]
    number = "an integer" if kind == "int" else "a finite number"
    for field, value in (("low", low), ("high", high)):
        _require(_is_int(value) if kind == "int" else _is_number(value), f"{where}: {field}", value, number)
    if not low < high:
        raise ConfigError(f"sweep {where}: low={low}, high={high} is invalid: must be low < high "
                          "(for one value, use an override KEY=VALUE)")
    _require(isinstance(spec.get("log", False), bool), f"{where}: log", spec.get("log"), "true or false")
    if spec.get("log") and low <= 0:
        raise ConfigError(f"sweep {where}: a log scale needs low > 0, got low={low}")
    bound = spec.get("at_most")
    if bound is not None:
        if bound not in earlier:
            raise ConfigError(f"sweep {where}: at_most={bound!r} names no param above it in the space; "
                              f"valid: {sorted(map(str, earlier))}")
        values = int_values(earlier[bound])
        if values is None or min(values) < low:
            raise ConfigError(f"sweep {where}: at_most={bound!r} is invalid: {bound}'s values must be integers "
                              f">= low={low}")


def check_space(space) -> None:
    """Every key of a search space, before anything runs: a ConfigError naming the first bad one."""
    _check_keys("space", space, *SPACE_KEYS)
    name = space["study_name"]
    _require(isinstance(name, str) and STUDY_NAME.fullmatch(name) is not None and names_fit(name), "study_name",
             name, f"a folder name (letters, digits, _ . -; at most {NAME_MAX} bytes)")
    objectives = space["objectives"]
    _require(isinstance(objectives, list) and len(objectives) > 0 and len(set(map(str, objectives))) == len(objectives)
             and all(isinstance(o, str) and o in OBJECTIVES for o in objectives), "objectives", objectives,
             f"a list of distinct names among {list(OBJECTIVES)} (trials are chosen on validation, never on test)")
    _require(_is_int(space["n_trials"]) and space["n_trials"] >= 1, "n_trials", space["n_trials"],
             "an integer >= 1 (the space's n_trials or --n-trials)")
    sampler = space["sampler"]
    _check_keys("sampler", sampler, ("name",), ("seed",))
    _require(sampler["name"] in SAMPLERS, "sampler.name", sampler["name"], f"one of {list(SAMPLERS)}")
    seed = sampler.get("seed")
    _require(seed is None or (_is_int(seed) and seed >= 0), "sampler.seed", seed, "an integer >= 0 or null")
    pruner = space.get("pruner") or {"name": "none"}
    _check_keys("pruner", pruner, ("name",), ("n_startup_trials", "n_warmup_steps"))
    _require(pruner["name"] in PRUNERS, "pruner.name", pruner["name"], f"one of {list(PRUNERS)}")
    for key in ("n_startup_trials", "n_warmup_steps"):
        value = pruner.get(key, 0)
        _require(_is_int(value) and value >= 0, f"pruner.{key}", value, "an integer >= 0")
    seeds = space.get("seeds")
    _require(seeds is None or (isinstance(seeds, list) and len(seeds) > 0 and len(set(map(str, seeds))) == len(seeds)
                               and all(_is_int(s) and s >= 0 for s in seeds)), "seeds", seeds,
             "a list of distinct integers >= 0 (every trial trains at each), or null")
    overrides = space.get("overrides", [])
    _require(isinstance(overrides, list) and all(isinstance(o, str) for o in overrides), "overrides", overrides,
             "a list of Hydra overrides such as [experiment=quickstart]")
    heartbeat = space["heartbeat"]
    _check_keys("heartbeat", heartbeat, ("interval_s", "grace_s"), ())
    _require(_is_number(heartbeat["interval_s"]) and heartbeat["interval_s"] > 0, "heartbeat.interval_s",
             heartbeat["interval_s"], "a number of seconds > 0")
    _require(_is_number(heartbeat["grace_s"]) and heartbeat["grace_s"] > heartbeat["interval_s"], "heartbeat.grace_s",
             heartbeat["grace_s"], f"a number of seconds > interval_s={heartbeat['interval_s']} (or live trials fail)")
    params = space["params"]
    if not params:
        raise ConfigError(f"sweep space {name!r} has no params: nothing to search "
                          "(add some under params: or with --param KEY=SPEC)")
    _require(isinstance(params, dict), "params", params, "a mapping of param names to their specs")
    earlier, keys = {}, {}
    for param, spec in params.items():
        check_param(param, spec, earlier)
        key = override_key(spec.get("key", param))
        if key in keys:
            raise ConfigError(f"sweep param {param}: key {key} is already searched by param {keys[key]}; search "
                              "each key once (for another range, give --space a copy of the space file with it)")
        earlier[param], keys[key] = spec, param


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


def first_choices(params: dict) -> dict:
    """Every param at its first choice or the low end of its range: the first trial checked before any runs."""
    return {spec.get("key", name): spec["choices"][0] if spec["type"] == "categorical" else spec["low"]
            for name, spec in params.items()}


def other_values(space: dict) -> list[tuple[str, object, dict]]:
    """(param or "seeds", value, the params to check it with) for every other value a trial can take: each
    categorical choice and each end of each range with the other params at their first values, and each seed.
    Each value is checked beside those first values only, not in every combination with the others' values
    (a value invalid only beside another sampled one still fails its trial at run time). An `at_most` param's
    value is checked with its bound at the least of the bound's values that admits it."""
    params = space["params"]
    base = first_choices(params)
    found = []
    for name, spec in params.items():
        key = spec.get("key", name)
        values = spec["choices"] if spec["type"] == "categorical" else [spec["low"], spec["high"]]
        for value in values:
            chosen = {**base, key: value}
            bound = spec.get("at_most")
            if bound:  # suggest caps the value at the bound's sampled value
                bound_values = int_values(params[bound])
                value = chosen[key] = min(value, max(bound_values))
                chosen[params[bound].get("key", bound)] = min(b for b in bound_values if b >= value)
            if chosen != base:
                found.append((f"param {name}", value, chosen))
    found += [("seeds", seed, {**base, "seed": seed}) for seed in space.get("seeds") or []]
    return found


def load_space(name: str, extra_params: list[str]) -> dict:
    """A space by name (conf/sweep/<name>.yaml) or by the path of a YAML file, plus --param entries; checked
    by `check_space` once the command line's settings are in."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else CONF_DIR / "sweep" / f"{name}.yaml"
    if not path.is_file():
        valid = sorted(p.stem for p in (CONF_DIR / "sweep").glob("*.yaml"))
        raise ConfigError(f"--space {name!r} is unknown; valid: {valid} or the path of a .yaml file")
    try:
        space = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except yaml.YAMLError as err:
        raise ConfigError(f"--space {name!r} is not valid YAML: {one_line(err)}") from None
    _require(isinstance(space, dict), "space", space, "a mapping (see conf/sweep/routing.yaml)")
    for text in extra_params:
        key, spec = parse_param(text)
        if key in (space.get("params") or {}):  # a dict would keep only the last, silently
            raise ConfigError(f"--param {text!r} is invalid: param {key} is already searched (by the space or an "
                              "earlier --param); search each key once (for another range, give --space a copy of "
                              "the space file with it)")
        space["params"] = {**(space.get("params") or {}), key: spec}
    return space


# ---- one trial's configuration ----
def override_key(override: str) -> str:
    """The config key a Hydra override sets: `+a.b=1` -> `a.b`."""
    return override.partition("=")[0].lstrip("+~")


def is_hydra_key(key: str) -> bool:
    """A key of Hydra's own settings, which compose leaves out of a trial's configuration."""
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def compose_trial(space: dict, overrides: list[str], chosen: dict) -> DictConfig:
    """A trial's configuration: the space's overrides, the command's, then the trial's params."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=[
            *space.get("overrides", []), *overrides, "callbacks.progress=none",
            *(f"{key}={hydra_value(value)}" for key, value in chosen.items())])


def hydra_value(value) -> str:
    """A value as a Hydra override reads it back: null, not the string 'None'; a string quoted, so that '64'
    stays a string."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return "'" + value.replace("'", "\\'") + "'"
    return str(value)


def check_trial_config(space: dict, overrides: list[str]) -> None:
    """Compose and check the first trial's configuration as training would, so that a bad key or value
    stops the sweep before any trial exists instead of failing every trial."""
    searched = {override_key(spec.get("key", name)): name for name, spec in space["params"].items()}
    if space.get("seeds") and "seed" in searched:
        raise ConfigError(f"sweep param {searched['seed']} is invalid with seeds={space['seeds']}: every trial "
                          "trains at each of the seeds; search seed or give seeds, not both")
    for key, name in searched.items():
        if is_hydra_key(key):  # its values would all train the same configuration
            raise ConfigError(f"sweep param {name}: key {key} is invalid: a trial is composed without Hydra's "
                              "settings (hydra.*), so searching it would change nothing; search config keys only")
    for override in [*space.get("overrides", []), *overrides]:
        key = override_key(override)
        if is_hydra_key(key):
            raise ConfigError(f"override {override!r} is invalid: a trial is composed without Hydra's settings "
                              "(hydra.*), so it would change nothing; give config keys only")
        if key == "seed" and space.get("seeds"):
            raise ConfigError(f"override {override!r} is invalid: seeds={space['seeds']} sets each run's seed; "
                              "drop the override or the seeds")
        if key in searched:
            raise ConfigError(f"override {override!r} is invalid: param {searched[key]} searches {key}, so every "
                              f"trial would replace it; drop the override or search {key} over other values")
    compose_trial(space, overrides, {})  # the overrides alone first: their errors read as in sandbox-train
    try:
        cfg = compose_trial(space, overrides, first_choices(space["params"]))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"sweep params: {one_line(err)}") from err
    check_settings(cfg)  # the model and the task through their own checks too
    for name, value, chosen in other_values(space):
        problem = None
        try:
            check_settings(compose_trial(space, overrides, chosen))
        except (ConfigError, HydraException, OmegaConfBaseException) as err:
            problem = one_line(err)
        if problem:  # raised outside the handler: one_line reads a ConfigError in the context as the whole story
            raise ConfigError(f"sweep {name}: {value!r} is invalid: {problem}")


# ---- storage and study ----
def open_storage(url: str, heartbeat: dict, setting: str = "--storage") -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats: a trial whose worker died is failed once its heartbeat is older
    than the grace period, and retried once, instead of staying RUNNING for ever. `setting` names where the URL
    came from in an error.

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
                raise ConfigError(f"{setting} {shown_url(url)!r} cannot be opened: {database_words(err)}") from None
            time.sleep(1 + attempt)


def database_words(err: BaseException) -> str:
    """A storage's error as one line, without the SQL statement and the link SQLAlchemy adds to the database's
    own words."""
    text = one_line(err).split(" [SQL: ")[0]
    return re.sub(r"\s*\(Background on this error at: [^)]*\)", "", text).strip()


def shown_url(url: str) -> str:
    """A storage URL as messages print it: its password masked (a shared terminal, a CI log)."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def check_storage_url(url: str, setting: str) -> None:
    """A URL that can hold a study that outlives this process, shared by its workers (`setting`: where it came from,
    --storage or $SANDBOX_SWEEP_STORAGE)."""
    if not url:
        raise ConfigError(f"{setting} '' is invalid: give an Optuna storage URL such as sqlite:///path/study.db or "
                          f"postgresql://..., or leave {setting} out for the sqlite file in the sweep's folder")
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        return  # open_storage says what is wrong with it
    except ValueError as err:  # a port that is no number (sqlite://:memory:), raised past SQLAlchemy's own errors
        raise ConfigError(f"{setting} {shown_url(url)!r} is invalid: it cannot be read as a URL ({err}); give an "
                          "Optuna storage URL such as sqlite:///path/study.db or postgresql+psycopg://user@host/db"
                          ) from None
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise ConfigError(f"{setting} {shown_url(url)!r} is invalid: an in-memory database cannot hold a study "
                          "across workers and processes (it is lost when the command ends); give a file path, "
                          "sqlite:///path/study.db")


def make_sampler(space: dict, worker: int, trials_so_far: int) -> optuna.samplers.BaseSampler:
    # Seeded from (the space's seed, the worker index, the trials already in the study): parallel workers
    # and each command that continues a study draw new parameters, and the same commands on a new study
    # (one worker) draw the same ones.
    seed = space["sampler"].get("seed")
    if seed is not None:
        seed = int(np.random.SeedSequence([seed, worker, trials_so_far]).generate_state(1)[0])
    if space["sampler"]["name"] == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if len(space["objectives"]) > 1:
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True)


def prunes(space: dict) -> bool:
    """Median pruning, asked for and possible: Optuna prunes single-objective studies only, and the pruner is given
    validation accuracy, which only a best_val_acc study maximises (in a state_size or wall_time_s study, which
    minimises, it would stop the most accurate trials)."""
    return (space.get("pruner") or {}).get("name") == "median" and space["objectives"] == ["best_val_acc"]


def make_pruner(space: dict) -> optuna.pruners.BasePruner:
    if not prunes(space):
        return optuna.pruners.NopPruner()
    # Steps are training steps: the trial's global step at each validation.
    return optuna.pruners.MedianPruner(n_startup_trials=space["pruner"].get("n_startup_trials", 4),
                                       n_warmup_steps=space["pruner"].get("n_warmup_steps", 0))


def definition(space: dict, overrides: list[str]) -> dict:
    """What a study's trials mean, as stored with it (JSON, as Optuna keeps user attributes): with the first
    trial's configuration, key by key, since the same overrides compose another one once a config file is edited,
    and the heartbeat that its workers share."""
    config = OmegaConf.to_container(compose_trial(space, overrides, first_choices(space["params"])), resolve=True)
    config = {key: value for key, value in flatten(config).items() if identity_key(key)}
    return json.loads(json.dumps({"objectives": space["objectives"], "params": space["params"],
                                  "overrides": [*space.get("overrides", []), *overrides],
                                  "seeds": space.get("seeds"), "heartbeat": space["heartbeat"], "config": config}))


def check_definition(study: optuna.Study, storage: optuna.storages.RDBStorage, requested: dict) -> None:
    """A new study stores the requested definition; an existing one must have been made with it."""
    stored = study.user_attrs.get("definition")
    if stored is None:  # a new study, or one made before studies kept their definition (or with Optuna's API)
        # such a study keeps the directions it was made with, whatever create_study is asked for
        directions = [d.name.lower() for d in study.directions]
        wanted = [OBJECTIVES[o] for o in requested["objectives"]]
        if directions != wanted:
            raise ConfigError(f"study {study.study_name!r} was made with direction(s) {directions}, objectives "
                              f"{requested['objectives']} need {wanted}; give --study-name NEW for a new study")
        store_definition(storage, study, requested)
        stored = study.user_attrs["definition"]  # this worker's, or the one another worker stored first
    differences = [f"{part} {stored.get(part)} in the study, {requested[part]} now"
                   for part in ("objectives", "overrides", "seeds") if stored.get(part) != requested[part]]
    for name in sorted(stored["params"].keys() | requested["params"].keys()):
        old, new = stored["params"].get(name, "absent"), requested["params"].get(name, "absent")
        if old != new:
            differences.append(f"param {name} {old} in the study, {new} now")
    # Other overrides or params compose another config too; with the same ones, a config file was edited. A
    # definition stored before definitions kept the config is taken as it is now.
    config = requested["config"] if differences else stored.get("config", requested["config"])
    edited = [f"{key} {config.get(key, 'absent')} in the study, {requested['config'].get(key, 'absent')} now"
              for key in sorted(config.keys() | requested["config"].keys())
              if config.get(key, "absent") != requested["config"].get(key, "absent")]
    if edited:
        differences.append(f"its configuration, with the same overrides (a config file edited?): {', '.join(edited)}")
    # Workers that disagree on the grace period fail each other's live trials as stale. A definition stored
    # before definitions kept the heartbeat is taken as it is now.
    heartbeat = stored.get("heartbeat", requested["heartbeat"])
    if heartbeat != requested["heartbeat"]:
        differences.append(f"heartbeat {heartbeat} in the study, {requested['heartbeat']} now (its workers must "
                           "agree on when a trial is stale)")
    if differences:
        raise ConfigError(f"study {study.study_name!r} was made with another definition: {'; '.join(differences)}; "
                          "give --study-name NEW for a new study, or the space and overrides it was made with")


def store_definition(storage: optuna.storages.RDBStorage, study: optuna.Study, requested: dict) -> None:
    """Store the definition of a study that has none, never over one. Workers started at the same moment all
    find the new study without one: Optuna's set_user_attr writes over another's (the last one stands, and
    workers of two definitions share the study), where this insert is refused by the table's unique (study,
    key) once one is there, so the first one stands and check_definition compares the others with it."""
    row = {"study_id": storage.get_study_id_from_name(study.study_name), "key": "definition",
           "value_json": json.dumps(requested)}
    try:
        with storage.engine.begin() as connection:
            connection.execute(sqlalchemy.insert(StudyUserAttributeModel.__table__).values(row))
    except sqlalchemy.exc.IntegrityError:
        pass  # another worker's definition stands


def check_trial_folders(sweep_dir: Path, storage, study_name: str) -> None:
    """A trial runs in `trials/<number>`: a folder there of a number the study has not given out is another
    study's (its study.db removed, or another --storage), and the trial given that number would return that run's
    result as its own (same configuration) or fail on it (another one)."""
    trials = sweep_dir / "trials"
    if not trials.is_dir():
        return
    # the folders before the study's numbers: a folder that another worker makes in between has its number already
    folders = [p.name for p in trials.iterdir() if p.name.isdigit()]
    numbers = set()
    if storage is not None:
        try:
            study_id = storage.get_study_id_from_name(study_name)
            numbers = {t.number for t in storage.get_all_trials(study_id, deepcopy=False)}
        except KeyError:  # no such study yet
            pass
    foreign = sorted(name for name in folders if int(name) not in numbers)
    if foreign:
        raise ConfigError(f"{trials} holds trial folders {', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}"
                          f" that study {study_name!r} did not make (its study.db removed, or another --storage): "
                          "its new trials would take their numbers; give --study-name NEW or another --output-root, "
                          "or remove that folder")


def open_study(space: dict, storage, overrides: list[str], worker: int = 0) -> optuna.Study:
    # Without Optuna's "A new study created" or "Using an existing study" lines: the error of a refused study
    # is one line.
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(
            study_name=space["study_name"], storage=storage, load_if_exists=True,
            directions=[OBJECTIVES[o] for o in space["objectives"]], pruner=make_pruner(space))
    finally:
        optuna.logging.set_verbosity(verbosity)
    check_definition(study, storage, definition(space, overrides))
    study.sampler = make_sampler(space, worker, len(study.get_trials(deepcopy=False)))
    return study


def open_writable_study(space: dict, url: str, overrides: list[str], setting: str, sweep_dir: Path) -> optuna.Study:
    """`open_study` on the storage at `url`, once `check_trial_folders` has passed. One that cannot be opened, or
    opens but cannot be written (a read-only file or folder, a full disk), is a ConfigError naming `setting`, not a
    traceback: a study is written from its start."""
    db_file = sqlite_file(url)
    new_file = db_file is not None and not db_file.exists()
    try:
        try:
            storage = open_storage(url, space["heartbeat"], setting)
            check_trial_folders(sweep_dir, storage, space["study_name"])
            return open_study(space, storage, overrides)
        except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as err:
            raise ConfigError(f"{setting} cannot be written ({database_words(err.__cause__ or err)}: "
                              f"{shown_url(url)}); it must be a writable storage (folder and file) with free space"
                              ) from None
    except ConfigError:
        if new_file:  # SQLite made the file as it connected (empty, or half its tables on a full disk)
            remove_studyless_sqlite(db_file)
        raise


def sqlite_file(url: str) -> Path | None:
    """The file of an SQLite storage URL, None for another database."""
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def remove_studyless_sqlite(path: Path) -> None:
    """Remove an SQLite file that this command made and that holds no study (with its journal files): a refused
    command leaves no half-made study.db. One that holds a study (another command's, made meanwhile) stays."""
    try:
        if path.stat().st_size > 0:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as connection:
                tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                if "studies" in tables and connection.execute("SELECT COUNT(*) FROM studies").fetchone()[0]:
                    return
    except (OSError, sqlite3.Error):
        return  # cannot tell: leave it
    for part in (path, *(path.with_name(path.name + suffix) for suffix in ("-journal", "-wal", "-shm"))):
        with contextlib.suppress(FileNotFoundError):
            part.unlink()


def remove_empty(folders: list[Path]) -> None:
    """Remove the folders this command made (listed deepest first) that are empty again."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (another command's files), or already gone
            return


# ---- the trial ----
class Pruned(RunPruned, optuna.TrialPruned):
    """The pruner stopped the trial: its run records `pruned` (RunPruned), Optuna marks the trial PRUNED."""


class PruneAtValidation(L.Callback):
    """Reports validation accuracy to the trial at every validation, its step the global step, and stops
    the trial when the pruner finds it behind the finished trials at that step. In a stack, the accuracy of
    its first run (the trial's first seed), while that run trains."""

    def __init__(self, trial: optuna.Trial):
        self.trial = trial

    def on_validation_end(self, trainer, pl_module):
        metrics = trainer.callback_metrics
        acc = next((metrics[key] for key in ("val/acc", run_key(0, "val/acc")) if key in metrics), None)
        if trainer.sanity_checking or acc is None:
            return
        self.trial.report(float(acc), step=trainer.global_step)
        if self.trial.should_prune():
            raise Pruned(f"pruned at step {trainer.global_step}")


def make_objective(space: dict, overrides: list[str], sweep_dir: Path):
    def objective(trial: optuna.Trial):
        chosen = suggest(trial, space["params"])
        run_dir = sweep_dir / "trials" / f"{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        try:
            callbacks = [PruneAtValidation(trial)] if prunes(space) else []
            results = train_trial(space, overrides, chosen, run_dir, callbacks)
        except optuna.TrialPruned:
            raise
        except Exception as err:
            trial.set_user_attr("fail_reason", f"{type(err).__name__}: {one_line(err)}"[:2000])
            raise
        values = [float(np.mean([objective_value(result, o) for result in results])) for o in space["objectives"]]
        trial.set_user_attr("test_acc", float(np.mean([result["test_acc"] for result in results])))
        trial.set_user_attr("state_size", results[0]["state_size"])
        seeds = space.get("seeds")
        if seeds:
            trial.set_user_attr("runs", {f"seed{seed}": {key: result[key] for key in RUN_ATTRS}
                                         for seed, result in zip(seeds, results)})
        # A run that did not finish (diverged, not trained) has no accuracy but a state size and a short wall
        # time: scored on those alone it would complete, as the fastest trial of a wall_time_s study.
        labels = [f"seed {seed}" for seed in seeds] if seeds else ["its run"]
        unfinished = [f"{label}: {r['status']} ({r.get('status_reason')})"
                      for label, r in zip(labels, results) if r["status"] != "finished"]
        if unfinished or not all(math.isfinite(v) for v in values):
            reason = "; ".join(unfinished) or f"objective not finite: {dict(zip(space['objectives'], values))}"
            trial.set_user_attr("fail_reason", reason)
            raise FloatingPointError(reason)
        return values if len(values) > 1 else values[0]

    return objective


def objective_value(result: dict, objective: str) -> float:
    """A run's value of an objective. Its best validation accuracy counts at most its early-stopping threshold
    (as sandbox-report's choice counts it): trials past it tie, rather than ranked by where a validation fell."""
    value = result[objective]
    return min(value, stopping_threshold(result["config"])) if objective == "best_val_acc" else value


def train_trial(space: dict, overrides: list[str], chosen: dict, run_dir: Path, callbacks: list) -> list[dict]:
    """The trial's runs: one in `run_dir`, or one per seed of the space's `seeds` in `run_dir/seed<seed>`, as one
    stack where runs stack by default (`sandbox.stacked_run.stacks`), else one after the other (`callbacks` on
    the first); their results."""
    seeds = space.get("seeds")
    if not seeds:
        return [train(compose_trial(space, overrides, chosen), run_dir, extra_callbacks=callbacks)]
    cfgs = [compose_trial(space, overrides, {**chosen, "seed": seed}) for seed in seeds]
    dirs = [run_dir / f"seed{seed}" for seed in seeds]
    if len(cfgs) > 1 and stacks(cfgs[0]):
        return train_stack(cfgs, dirs, extra_callbacks=callbacks)
    return [train(cfg, run, extra_callbacks=callbacks if i == 0 else ())
            for i, (cfg, run) in enumerate(zip(cfgs, dirs))]


def trial_count(study: optuna.Study) -> int:
    """Trials that count towards the study's total: finished, running or waiting, where a trial failed for
    a dead worker and then retried counts once."""
    trials = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING, TrialState.WAITING))
    retried = {optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) for t in trials} - {None}
    return len(trials) - len(retried)


class OneLineFailures(logging.Filter):
    """Optuna logs a failed trial's traceback (some 40 lines) and then a line "failed with value None": keep
    only its line naming the trial, its parameters and the error (the reason is also in its fail_reason)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info = None
        return "failed with value" not in record.getMessage()


ONE_LINE_FAILURES = OneLineFailures()


def run_worker(space: dict, storage_url: str, storage_setting: str, overrides: list[str], sweep_dir: Path,
               worker: int) -> None:
    """Run trials one at a time until the study's trial count reaches `n_trials`, then wait for the trials
    that other workers run: one whose worker died is failed once its heartbeat is stale, and its retry is
    run here. So while one worker lives, no trial is left RUNNING."""
    study = open_study(space, open_storage(storage_url, space["heartbeat"], storage_setting), overrides, worker)
    objective = make_objective(space, overrides, sweep_dir)
    logging.getLogger("optuna.study._optimize").addFilter(ONE_LINE_FAILURES)
    # A signal outside a run (composing a trial, sampling, waiting for other workers' trials) stops the worker as
    # one in a run does, its trial left RUNNING to be run again: Optuna records a KeyboardInterrupt as the trial
    # failing (never run again), and SIGTERM's default ends the worker without a word.
    previous = {signum: signal.signal(signum, stop_worker) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        run_trials(study, objective, space)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def stop_worker(signum, frame):
    raise RunInterrupted(signum)


def run_trials(study: optuna.Study, objective, space: dict) -> None:
    ran = []  # the trial the last optimize gave the objective

    def tracked(trial):
        ran.append(trial.number)
        return objective(trial)

    while True:
        # Fail (and queue a retry of) trials whose worker died, before counting them as running.
        optuna.storages.fail_stale_trials(study)
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if trial_count(study) < space["n_trials"] or waiting:
            ran.clear()
            try:
                study.optimize(tracked, n_trials=1, catch=(Exception,), gc_after_trial=True)
            except Exception:
                # Optuna cannot record a trial that another worker failed while this one ran it: its heartbeat
                # went stale (this worker paused: the study's workers share one grace_s), and its retry stands
                # for it. The worker goes on with the study. (A signal, RunInterrupted, is no Exception.)
                if not ran or study.get_trials(deepcopy=False)[ran[0]].state != TrialState.FAIL:
                    raise
                print(f"sandbox-sweep: trial {ran[0]} was failed by another worker while this one ran it (its "
                      f"heartbeat was older than heartbeat.grace_s={space['heartbeat']['grace_s']}: this worker "
                      "paused); its result is not recorded, its retry stands for it", file=sys.stderr)
        elif study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            time.sleep(min(2, space["heartbeat"]["interval_s"]))
        else:
            break


def run_workers(commands: list[list[str]], env: dict[str, str]) -> tuple[list[int], int | None]:
    """Start a worker process per command, in environment `env`, and wait for them all: their exit codes, and the
    signal (SIGTERM or SIGINT) that stopped the sweep, or None. A signal is passed on to every worker still
    running, which records its run as a one-worker sweep does and exits: none is left training on its own, and
    Ctrl-C ends this wait without a traceback."""
    workers, received = [], []

    def pass_on(signum, frame):
        received.append(signum)
        for worker in workers:
            worker.send_signal(signum)  # nothing for a worker that has ended

    previous = {signum: signal.signal(signum, pass_on) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        for command in commands:
            workers.append(subprocess.Popen(command, env=env))
        return [worker.wait() for worker in workers], (received[0] if received else None)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def interrupted(signum: int, space: dict, how: str = "") -> int:
    """Say how a sweep stopped by SIGTERM or SIGINT goes on; its exit code. Its running trials stay RUNNING."""
    print(f"sandbox-sweep: interrupted by {signal.Signals(signum).name}{how}: run the same command to go on with "
          "the study; a trial that was running is run again once its heartbeat is older than "
          f"heartbeat.grace_s={space['heartbeat']['grace_s']}", file=sys.stderr)
    return 128 + signum


def summarise(study: optuna.Study, objectives: list[str]) -> str:
    trials = study.get_trials(deepcopy=False)
    counts = {state.name: sum(t.state == state for t in trials) for state in TrialState}
    lines = [f"study {study.study_name}: " + ", ".join(f"{n} {k.lower()}" for k, n in counts.items() if n)]
    for trial in trials:
        if trial.state == TrialState.FAIL:
            lines.append(f"  trial {trial.number} failed: {trial.user_attrs.get('fail_reason', WORKER_LOST)}")
    from sandbox.report import best_trials  # the report's choice of what to show as best

    best = best_trials(study)
    title = "Pareto front" if len(objectives) > 1 else "best" if len(best) == 1 else f"best ({len(best)} trials tie)"
    for trial in best:
        values = ", ".join(f"{o}={v:.4g}" for o, v in zip(objectives, trial.values))
        lines.append(f"  {title}: trial {trial.number}: {values}  {trial.params}")
    return "\n".join(lines)


def seed_list(text: str) -> list[int]:
    """`--seeds 0,1,2` -> [0, 1, 2] (checked with the space's other settings by `check_space`)."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        # A bad option is one line like every other bad setting, not argparse's usage text.
        raise ConfigError(message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="sandbox-sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="routing", help="search space: conf/sweep/<space>.yaml, or a .yaml path")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=SPEC",
                        help="search another config key: choice:A,B | int:LOW:HIGH[:log] | float:LOW:HIGH[:log]")
    parser.add_argument("--n-trials", type=int, default=None, help="the study's total trial count")
    parser.add_argument("--seeds", type=seed_list, default=None, metavar="S,S,...",
                        help="train every trial at each of these seeds and score it by their means")
    parser.add_argument("--storage", default=None,
                        help=f"Optuna storage URL (default: ${STORAGE_ENV}, else sqlite in the sweep folder; the "
                             "variable keeps a password off the command line)")
    parser.add_argument("--study-name", default=None)
    parser.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    parser.add_argument("--output-root", default="outputs")
    parser.add_argument("--worker-index", type=int, default=0,
                        help="index of this machine's first worker (seeds its sampler): give each machine that "
                             "shares a study its own, e.g. 0, 4, 8 with --workers 4")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every trial, e.g. experiment=quickstart")
    args = parser.parse_intermixed_args(argv)
    if args.workers < 1:
        raise ConfigError(f"--workers={args.workers} is invalid: must be >= 1")
    if args.worker_index < 0:
        raise ConfigError(f"--worker-index={args.worker_index} is invalid: must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        args = parse_args(argv)
        space = load_space(args.space, args.param)
        if args.n_trials is not None:
            space["n_trials"] = args.n_trials
        if args.study_name is not None:
            space["study_name"] = args.study_name
        if args.seeds is not None:
            space["seeds"] = args.seeds
        check_space(space)
        check_trial_config(space, args.overrides)
        sweep_dir = Path(args.output_root) / "sweeps" / space["study_name"]
        problem = folder_problem(Path(args.output_root))
        if problem:
            raise ConfigError(f"--output-root {args.output_root} is invalid: {problem}")
        # A storage given, and its study, are opened before any folder is made: one that cannot be opened or
        # written leaves nothing behind.
        storage_url, storage_setting = args.storage, "--storage"
        if storage_url is None and STORAGE_ENV in os.environ:
            storage_url, storage_setting = os.environ[STORAGE_ENV], f"${STORAGE_ENV}"
        if storage_url is not None:
            check_storage_url(storage_url, storage_setting)
            study = open_writable_study(space, storage_url, args.overrides, storage_setting, sweep_dir)
        elif not (sweep_dir / "study.db").exists():  # checked before the new study.db is made
            check_trial_folders(sweep_dir, None, space["study_name"])
        # the folders this command makes: a study that cannot be stored in them (a full disk) leaves none behind
        made = [folder for folder in (sweep_dir.absolute(), *sweep_dir.absolute().parents) if not folder.exists()]
        try:
            sweep_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            remove_empty(made)
            raise ConfigError(f"--output-root {args.output_root} cannot be written ({err.strerror}: "
                              f"{err.filename}); it must be a writable folder with free space") from None
        if storage_url is None:
            storage_url = f"sqlite:///{(sweep_dir / 'study.db').resolve()}"
            storage_setting = f"--output-root {args.output_root}"
            try:
                study = open_writable_study(space, storage_url, args.overrides, storage_setting, sweep_dir)
            except ConfigError:
                remove_empty(made)  # open_writable_study removed the study.db it made without a study in it
                raise
    except (ConfigError, HydraException, OmegaConfBaseException) as err:
        print(f"sandbox-sweep: error: {one_line(err)}", file=sys.stderr)
        return 2
    codes = []
    if args.workers == 1:
        try:
            run_worker(space, storage_url, storage_setting, args.overrides, sweep_dir, args.worker_index)
        except RunInterrupted as stop:  # its run has said where it stopped; the trial stays RUNNING
            return interrupted(stop.signum, space)
    else:
        base = [sys.executable, "-m", "sandbox.sweep", "--space", args.space, "--n-trials", str(space["n_trials"]),
                "--study-name", space["study_name"], "--output-root", args.output_root,
                *(f"--param={p}" for p in args.param),
                *(["--seeds", ",".join(map(str, space["seeds"]))] if space.get("seeds") else [])]
        codes, signum = run_workers([[*base, "--worker-index", str(args.worker_index + i), *args.overrides]
                                     for i in range(args.workers)], {**os.environ, STORAGE_ENV: storage_url})
        if signum is not None:
            return interrupted(signum, space, ", passed on to its workers")
    print(summarise(study, space["objectives"]))
    states = [trial.state for trial in study.get_trials(deepcopy=False)]
    if TrialState.FAIL in states and TrialState.COMPLETE not in states:  # a search with no result is no success
        print(f"sandbox-sweep: error: every finished trial of study {space['study_name']} failed (reasons above)",
              file=sys.stderr)
        return 1
    failed = [f"worker {args.worker_index + i} exited with code {code}" for i, code in enumerate(codes) if code]
    if failed:  # a worker that died took its running trial with it (failed once its heartbeat is stale)
        print(f"sandbox-sweep: error: {', '.join(failed)}; the study holds the other workers' trials", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
