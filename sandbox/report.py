"""`sandbox-report FOLDER`: every run and study below a folder, as tables and plots.

A row of the tables is one configuration: runs that agree on every config key but the seed and the optimiser
settings (`optim.*`: learning rate, weight decay, ...). Within a row the optimiser setting is chosen on
validation (Zoology's protocol for the learning rate, MAD's grid of learning rate x weight decay: the highest
mean best validation accuracy, on the seeds every setting has, a run past its early-stopping threshold
counted at it), and test accuracy is the mean and 95% interval
over the seeds at that setting. Runs that did not finish (diverged, not trained, interrupted, failed) are
counted, never averaged; a configuration run twice counts once; run folders without a result, and results older
than their metrics.csv, are named.

Writes into FOLDER (or --out): `results.csv` (one line per run: status, config flattened, metrics;
`stacked_with`: the runs of its stack, which share its `wall_time_s`), `lr_sensitivity.csv` (mean validation
accuracy per row and optimiser setting), `report.md` and PNG plots:
accuracy against state size per setting, accuracy against the number of key-value pairs, MoM memory load,
and for each Optuna study (a `study.db` below the folder) its optimisation history and parameter
importances. Runs of `experiment=mad` (config `suite: mad`) get a section of their own: one score per task
and model, the mean test accuracy over the task's settings (`mad_scores.csv`, `mad_scores.png`). Files of these
names that an earlier report left there and this one does not make are removed. A result.json or study.db that
cannot be read is named in a warning and left out.
"""

import csv
import functools
import json
import math
import statistics
import sys
import textwrap
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import optuna
import sqlalchemy
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import tasks
from sandbox.results import (
    LOGS,
    MAD_SUITE,
    RESULT_FILE,
    WORKER_LOST,
    atomic_path,
    collect_results,
    flatten,
    folder_problem,
    identity_key,
    path_argument,
    read_json,
    status_of,
    stopping_threshold,
    write_problem,
)

FINISHED = "finished"
# The ends that say something about a run's optimiser setting: a diverged run counts against it; an
# interrupted, failed or untrained run says nothing about it and is left out of the choice.
EVIDENCE = (FINISHED, "diverged")
# What "auto" settings resolved to, from the result: bf16 Triton runs and float32 PyTorch runs are different
# computations, never averaged in one row.
RESOLVED_KEYS = {"config.trainer.precision": "precision", "config.model.backend": "backend"}
# A row averages over seeds and selects over optimiser settings; every other key in which runs differ makes rows.
SEED_KEY, LR_KEY, OPTIM_PREFIX = "config.seed", "config.optim.lr", "config.optim."
OPTIM_NAMES = {"lr": "learning rate", "weight_decay": "weight decay"}
# Runs of MAD_SUITE are scored per task apart from the other runs.
SUITE_KEY, TASK_PREFIX = "config.suite", "config.task."
# A finished run never left chance when its best validation accuracy stays below its validation set's accuracy
# at chance c (`tasks.chance_accuracy`: a guess among the answers the context allows, 1/K on MQAR) plus
# CHANCE_MARGIN of the way from c to 1. Runs stuck on Zoology's MQAR score 0.003-0.065 (c = 1/23 = 0.043 on
# docs/results/zoology_6000_steps' validation set), runs stuck at the format on the capacity task 0.017-0.065
# (c = 0.054); the runs of those reports just above the line (0.095-0.29) were all still rising at their last step.
CHANCE_MARGIN = 0.05
WIDTH_KEY = "config.model.d_model"  # plots put widths on one line (state size) or in panels (pairs)
# A run is still rising when its best validation accuracy grew by more than FLAT_RISE over the last
# FLAT_TAIL of its steps without reaching the early-stopping threshold: its training was too short.
FLAT_RISE, FLAT_TAIL = 0.01, 0.25
# Seeds of a row's chosen setting whose test accuracies span more than SEEDS_APART are listed one by one, with
# the step at which each left chance: a low seed that left it late and was still rising was cut short.
SEEDS_APART = 0.1
NEVER = "never"  # a run's left_chance_step when no validation left chance
# A slice's test accuracy over the positions at or past the run's longest training sequence alone (a test segment
# longer than training: the slice's own accuracy counts the positions it was trained at too), its chance, heading.
PAST_TRAIN, PAST_TRAIN_CHANCE, PAST_TRAIN_HEADING = "test_acc_past_train/", "chance_acc_past_train/", "past train"
METRICS = ("test_acc", "best_val_acc", "state_size", "num_parameters", "wall_time_s", "epochs", "steps")
ABSENT = "—"  # a key a run's config does not have (e.g. one added to other runs with +key=value)



# The config keys that model_label shows, so the tables do not repeat them as columns.
LABEL_KEYS = {"config.model.mixer", *(f"config.model.mixer_options.{k}"
                                      for k in ("rule", "num_memories", "top_k", "shared_memory"))}


def model_label(config: dict) -> str:
    """A short name of the model: the mixer, and for MoM its routing."""
    model = config["model"]
    options = model.get("mixer_options") or {}
    if model["mixer"] == "mom":
        shared = "+shared" if options.get("shared_memory") else ""
        return f"mom[{options.get('rule')}] M={options.get('num_memories')} k={options.get('top_k')}{shared}"
    return model["mixer"]


def model_family(config: dict) -> str:
    model = config["model"]
    if model["mixer"] == "mom":
        return f"mom[{(model.get('mixer_options') or {}).get('rule')}]"
    return model["mixer"]


def val_curve(run_dir: str) -> list[tuple[int, float]]:
    """The run's validation accuracy by step, from its logs/metrics.csv; empty when it has none, or one that cannot
    be read, holds no validation or a value that is not an accuracy (nan, inf: a damaged file, whose maxima would
    mislead); such a file is named in a warning, as its run's curve checks read `?`, as without one."""
    path = Path(run_dir) / LOGS / "metrics.csv"
    try:
        with open(path, newline="") as f:
            curve = sorted((int(line["step"]), float(line["val/acc"])) for line in csv.DictReader(f)
                           if line.get("val/acc") and line.get("step"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError, csv.Error) as err:
        problem = f"cannot be read ({err})"
    else:
        if curve and all(0 <= acc <= 1 for _, acc in curve):
            return curve
        # a finished run validated: a file without its validations is cut short or another's
        problem = "holds a validation accuracy that is not in [0, 1] (nan, inf?)" if curve else "holds no val/acc"
    print(f"sandbox-report: warning: {path} {problem}: its run's curve is not read (still rising, left chance: ?)",
          file=sys.stderr)
    return []


def val_rise(curve: list[tuple[int, float]], steps: int | None = None) -> float | None:
    """How much the best validation accuracy of `curve` grew over the last FLAT_TAIL of the run's steps; None
    without validations both before and inside that tail."""
    if not curve:
        return None
    tail_start = (1 - FLAT_TAIL) * max(steps or 0, curve[-1][0])
    before = [acc for step, acc in curve if step <= tail_start]
    if not before or len(before) == len(curve):
        return None
    return max(acc for _, acc in curve) - max(before)


def chance_line(chance: float) -> float:
    """The validation accuracy below which a run is at chance (CHANCE_MARGIN)."""
    return chance + CHANCE_MARGIN * (1 - chance)


def left_chance_step(curve: list[tuple[int, float]], chance: float | None) -> int | str | None:
    """The step of the first validation above the chance line; NEVER if none was; None when the run has no curve
    or its chance level is not known."""
    if chance is None or not curve:
        return None
    return next((step for step, acc in curve if acc >= chance_line(chance)), NEVER)


def to_runs(results: list[dict]) -> list[dict]:
    """One flat record per run: status, label, config keys (`config.`), metrics, slices, curve check."""
    runs = []
    for result in results:
        config = result["config"]
        run = {"run_dir": result["run_dir"], "status": result.get("status", FINISHED),
               "status_reason": result.get("status_reason", ""),
               "model": model_label(config), "family": model_family(config)}
        run.update({f"config.{k}": v for k, v in flatten(config).items() if identity_key(k)})
        run.update({key: result[field] for key, field in RESOLVED_KEYS.items() if result.get(field) is not None})
        run.update({m: result.get(m) for m in METRICS})
        run["git_commit"] = result.get("git_commit")
        run["earlier_git_commits"] = result.get("earlier_git_commits") or []  # of the segments it resumed after
        run["stacked_with"] = (result.get("stack") or {}).get("runs", 1)  # wall_time_s is the whole stack's
        run.update({f"test_acc/{k}": v for k, v in result.get("test_acc_per_slice", {}).items()})
        run.update({f"{PAST_TRAIN}{k}": v for k, v in result.get("test_acc_past_train_per_slice", {}).items()})
        run.update({f"router/{k}": v for k, v in result.get("router", {}).items()})
        run["chance_acc"] = val_chance(config)
        if config.get("suite") == MAD_SUITE:  # its settings table gives chance beside each tested length
            run.update(test_chance_by_length(config))
        run["val_threshold"] = threshold = stopping_threshold(config)
        if run["status"] == FINISHED:
            chance = run["chance_acc"]
            run["at_chance"] = None if chance is None else run["best_val_acc"] < chance_line(chance)
            curve = val_curve(result["run_dir"])
            rise = val_rise(curve, result.get("steps"))
            run["val_rise_last_quarter"] = rise
            # a run that reached its threshold stopped rising, as its result says, whatever its curve lost
            reached = run["best_val_acc"] >= threshold
            run["still_rising"] = False if reached else None if rise is None else rise > FLAT_RISE
            run["left_chance_step"] = left_chance_step(curve, chance)
        runs.append(run)
    return runs


def val_chance(config: dict) -> float | None:
    """The accuracy at chance of the run's validation split (`tasks.chance_accuracy`); None when its config does
    not give the split (results of older versions)."""
    task = config.get("task")
    try:
        return _chance_of_split(json.dumps(task, sort_keys=True), tasks.split_seed(config["seed"], "val"))
    except (KeyError, TypeError, ValueError):
        return None


@functools.cache
def _chance_of_split(task_json: str, seed: int) -> float:
    task = json.loads(task_json)
    segments = tasks.capped(task["segments"]["val"], task.get("limit_examples"))
    return tasks.chance_accuracy(task["name"], segments, seed=seed, **task["params"])


def test_chance_by_length(config: dict) -> dict[str, float]:
    """The accuracy at chance of the run's test split at each of its lengths, `chance_acc/seq_len=L` (a state-
    tracking task's chance depends on the length), and of a length past the training length over the positions
    past it, `chance_acc_past_train/seq_len=L` (where the config gives the training split), where it was tested at
    more than one length or past the training length; empty otherwise, or when its config does not give the split."""
    task = config.get("task")
    try:
        return dict(_chance_by_length(json.dumps(task, sort_keys=True), tasks.split_seed(config["seed"], "test")))
    except (KeyError, TypeError, ValueError):
        return {}


@functools.cache
def _chance_by_length(task_json: str, seed: int) -> tuple:
    task = json.loads(task_json)
    by_length = defaultdict(list)
    for segment in tasks.capped(task["segments"]["test"], task.get("limit_examples")):
        by_length[tasks.model_shape(task["name"], [segment], **task["params"])["seq_len"]].append(segment)
    # the training length: the evaluation counts the positions past it apart (`test_acc_past_train`)
    past = (tasks.model_shape(task["name"], task["segments"]["train"], **task["params"])["seq_len"]
            if task["segments"].get("train") else math.inf)
    if len(by_length) < 2 and max(by_length) <= past:  # one length, not past training: its chance is chance_acc's
        return ()
    chances = [(f"chance_acc/seq_len={length}", tasks.chance_accuracy(task["name"], segments, seed=seed,
                                                                     **task["params"]))
               for length, segments in sorted(by_length.items())]
    chances += [(f"{PAST_TRAIN_CHANCE}seq_len={length}",
                 tasks.chance_accuracy(task["name"], segments, seed=seed, start=past, **task["params"]))
                for length, segments in sorted(by_length.items()) if length > past]
    return tuple(chances)


def drop_duplicates(runs: list[dict]) -> tuple[list[dict], list[tuple[dict, dict]]]:
    """The runs with one run per configuration (every config key, seed and optimiser settings included): a
    finished one before others, then the newest result; and each run left out, with the run kept for it. The
    same configuration run twice (in two folders, or under two experiment names) would count its seed twice."""
    def preference(run):
        return run["status"] == FINISHED, (Path(run["run_dir"]) / RESULT_FILE).stat().st_mtime

    groups = defaultdict(list)
    for run in runs:
        groups[tuple(sorted((k, repr(comparable(v))) for k, v in run.items() if k.startswith("config.")))].append(run)
    kept, dropped = [], []
    for members in groups.values():
        best = max(members, key=preference)
        kept.append(best)
        dropped += [(run, best) for run in members if run is not best]
    kept_ids = {id(run) for run in kept}
    return [run for run in runs if id(run) in kept_ids], dropped


def comparable(value):
    """A value as rows compare it: 1 and 1.0 are one setting."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def sort_key(value) -> tuple:
    value = comparable(value)
    return (0, value, "") if isinstance(value, float) else (1, 0.0, str(value))


@dataclass
class Row:
    """The runs of one configuration, the optimiser setting chosen for it on validation (the values of
    `tuned`, None when nothing finished), and the finished runs at that setting (`chosen`), which the row's
    accuracies are the mean of."""

    label: str
    values: dict  # the row's value of each key that separates rows
    runs: list[dict]
    tuned: list[str]  # the optimiser keys the choice is over
    choice: tuple | None
    chosen: list[dict]
    stages: list  # the seeds of each comparison of settings (`choose`)
    tied_with: tuple  # the settings tied with the choice on every comparison, ranked below it by steps

    def stat(self, metric: str) -> tuple[float, float]:
        return mean_ci([run.get(metric) for run in self.chosen])


def varies(runs: list[dict], key: str) -> bool:
    return len({repr(comparable(run.get(key, ABSENT))) for run in runs}) > 1


def row_keys(runs: list[dict]) -> list[str]:
    """Config keys in which runs differ (a key some runs lack included), seed and optimiser keys left out."""
    keys = sorted({k for run in runs for k in run if k.startswith("config.") and not k.startswith(OPTIM_PREFIX)}
                  - {SEED_KEY})
    return [k for k in keys if varies(runs, k)]


def tuned_keys(runs: list[dict]) -> list[str]:
    """The optimiser keys that a row's setting is chosen over: the learning rate, and every other optimiser key
    in which the runs differ."""
    others = sorted({k for run in runs for k in run if k.startswith(OPTIM_PREFIX)} - {LR_KEY})
    return [LR_KEY, *(k for k in others if varies(runs, k))]


def shown_keys(runs: list[dict]) -> list[str]:
    """The row keys worth a column: not in the label, and with two values among the runs that have the key
    or between runs of one mixer (a key that only one mixer has, with one value, is implied by the label)."""
    by_mixer = defaultdict(list)
    for run in runs:
        by_mixer[run["config.model.mixer"]].append(run)

    return [k for k in row_keys(runs) if k not in LABEL_KEYS and
            (varies([run for run in runs if k in run], k) or any(varies(m, k) for m in by_mixer.values()))]


def short_names(keys: list[str]) -> list[str]:
    """Each config key by its shortest dotted tail that no other of `keys` shares (model.d_model: d_model)."""
    tails = [k.removeprefix("config.").split(".") for k in keys]
    names = []
    for parts in tails:
        n = 1
        while sum(other[-n:] == parts[-n:] for other in tails) > 1:
            n += 1
        names.append(".".join(parts[-n:]))
    return names


def finished(runs: list[dict]) -> list[dict]:
    return [run for run in runs if run["status"] == FINISHED]


def by_choice(runs: list[dict], tuned: list[str]) -> dict[tuple, list[dict]]:
    """The runs by their optimiser setting: the tuple of their values of `tuned`."""
    groups = defaultdict(list)
    for run in runs:
        groups[tuple(comparable(run.get(k)) for k in tuned)].append(run)
    return dict(sorted(groups.items(), key=lambda item: [sort_key(v) for v in item[0]]))


def choose(runs: list[dict], tuned: list[str]) -> tuple[tuple | None, list, tuple]:
    """The optimiser setting with the highest mean best validation accuracy (never test accuracy), and the seeds
    it was compared on at each stage (below). A setting where a run diverged loses to any where none did. The
    others are compared on the seeds that every one of them finished (a setting run at three seeds against one
    seed of another compares that seed), or on all their finished seeds when they share none. A run that reached
    its early-stopping threshold counts at the threshold: by how much it passed it is where a validation happened
    to fall, not what the setting can reach. Of settings tied at the top, those run at the most seeds are
    compared again on the seeds they all finished, where those are more (two rates that both reached the threshold
    on seed 0, and were both run at seeds 0-2, are told apart by seeds 1 and 2; a third tied on seed 0 and run
    there alone drops out); settings tied still are ranked by the mean step at which their runs on those seeds
    stopped (the fewer, the better), then by how many seeds finished. So the protocol's second pass, the chosen
    setting's seeds, never hands the choice to a tied setting run at seed 0 alone, whose row would stand on one
    seed; its seeds that failed stay in its row. Interrupted, failed and untrained runs say nothing about their
    setting and are left out.
    Also the stages: the seeds of each comparison, the first None where it was on every finished seed; and the
    settings tied with the chosen one on every comparison, which the steps ranked below it. (None, [], ()) if
    nothing finished."""
    candidates = {choice: members for choice, members in by_choice(runs, tuned).items() if finished(members)}
    clean = {choice: members for choice, members in candidates.items()
             if not any(run["status"] == "diverged" for run in members)}
    pool = clean or candidates
    if not pool:
        return None, [], ()
    seeds = {choice: {run.get(SEED_KEY) for run in finished(members)} for choice, members in pool.items()}

    def on(members, common):
        return [run for run in finished(members) if not common or run.get(SEED_KEY) in common]

    def best(settings: dict, common: set) -> dict:
        """The settings of the highest mean accuracy over their runs `on` the `common` seeds (equal to rounding)."""
        accuracy = {choice: mean_ci([min(run["best_val_acc"], run["val_threshold"]) for run in on(members, common)])[0]
                    for choice, members in settings.items()}
        accuracy = {choice: -math.inf if math.isnan(a) else a for choice, a in accuracy.items()}
        return {choice: settings[choice] for choice in settings if accuracy[choice] >= max(accuracy.values()) - 1e-12}

    stages = []
    while True:
        common = set.intersection(*(seeds[choice] for choice in pool))
        every = common == set.union(*(seeds[choice] for choice in pool))
        stages.append(None if not stages and (every or not common) else tuple(sorted(common, key=sort_key)))
        tied = best(pool, common)
        if len(tied) == 1 or not common:
            break
        most = max(len(seeds[choice]) for choice in tied)
        tested = {choice: members for choice, members in tied.items() if len(seeds[choice]) == most}
        if not set.intersection(*(seeds[choice] for choice in tested)) > common:
            break
        pool = tested

    def rank(choice):
        steps, _ = mean_ci([run["steps"] for run in on(tied[choice], common)])
        # steps not recorded say nothing about how soon the runs stopped: such a setting never wins a tie on them
        return -math.inf if math.isnan(steps) else -steps, len(seeds[choice])

    chosen = max(tied, key=rank)
    return chosen, stages, tuple(choice for choice in tied if choice != chosen)


def make_rows(runs: list[dict]) -> list[Row]:
    keys, tuned = row_keys(runs), tuned_keys(runs)
    groups = defaultdict(list)
    for run in runs:
        groups[tuple(repr(comparable(run.get(k, ABSENT))) for k in keys)].append(run)
    rows = []
    for members in groups.values():
        choice, stages, tied_with = choose(members, tuned)
        chosen = [run for run in finished(members) if tuple(comparable(run.get(k)) for k in tuned) == choice]
        rows.append(Row(members[0]["model"], {k: members[0].get(k, ABSENT) for k in keys}, members, tuned, choice,
                        chosen, stages, tied_with))
    return sorted(rows, key=lambda row: (row.label, *(sort_key(v) for v in row.values.values())))


def tuned_names(tuned: list[str]) -> list[str]:
    return [k.removeprefix(OPTIM_PREFIX) for k in tuned]


def choice_cell(row: Row) -> str:
    """The row's chosen optimiser setting, of how many it was chosen, and on which seeds when not all; then how
    many tied there and the seeds they were compared on again; and how many settings had no run to compare."""
    if row.choice is None:
        return ABSENT
    groups = by_choice(row.runs, row.tuned)
    # a setting whose runs all failed or were interrupted was not compared: it is not one the choice was made of
    settings = sum(any(run["status"] in EVIDENCE for run in members) for members in groups.values())
    others = len(groups) - settings
    chosen = ", ".join(_show(v) for v in row.choice)
    if len(groups) == 1:
        return chosen

    def on(seeds):
        return f" on seed{'s' * (len(seeds) > 1)} " + ", ".join(_show(seed) for seed in seeds)

    first, *again = row.stages
    tied = " and ".join(", ".join(_show(v) for v in choice) for choice in row.tied_with)
    return chosen + f" (best of {settings}{'' if first is None else on(first)}" + \
        "".join(f"; of those tied there, best{on(seeds)}" for seeds in again) + \
        (f"; tied with {tied}" if tied else "") + \
        (f"; {others} other{'s' * (others > 1)} without a finished or diverged run" if others else "") + ")"


def known(values: list) -> list[float]:
    """The values a mean is over: those given, and not NaN."""
    return [v for v in values if v is not None and not math.isnan(v)]


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% interval (Student's t); NaN for a single value, which has none."""
    values = known(values)
    if not values:
        return float("nan"), float("nan")
    if len(values) == 1:
        return values[0], float("nan")
    return statistics.fmean(values), t95(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


@functools.cache
def t95(dof: int) -> float:
    """The two-sided 95% critical value of Student's t with `dof` degrees of freedom (by bisection on P(|T| <=
    t), which has a closed form for integer dof: Abramowitz and Stegun 26.7.3-4)."""
    def within(t):
        theta = math.atan(t / math.sqrt(dof))
        c2, total, term = math.cos(theta) ** 2, 0.0, 1.0
        if dof % 2:
            for j in range((dof - 1) // 2):
                total, term = total + term, term * c2 * (2 * j + 2) / (2 * j + 3)
            return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
        for j in range(dof // 2):
            total, term = total + term, term * c2 * (2 * j + 1) / (2 * j + 2)
        return math.sin(theta) * total

    low, high = 0.0, 1000.0
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if within(mid) < 0.95 else (low, mid)
    return (low + high) / 2


def slice_columns(runs: list[dict]) -> list[str]:
    return sorted({k for run in runs for k in run if k.startswith("test_acc/")},
                  key=lambda k: (k.split("=")[0], _number(k.split("=")[-1])))


def setting_columns(runs: list[dict]) -> list[str]:
    """The slices that tell the task's settings apart: those of the slice name with the most values
    (num_kv_pairs on a tie), or none when every name has one value."""
    by_name = defaultdict(list)
    for column in slice_columns(runs):
        by_name[column.removeprefix("test_acc/").split("=")[0]].append(column)
    if not by_name:
        return []
    name = max(sorted(by_name), key=lambda n: (len(by_name[n]), n == "num_kv_pairs"))
    return by_name[name] if len(by_name[name]) > 1 else []


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.inf


def _show(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _cell(value, absent: str = ABSENT) -> str:
    return absent if value is None else _show(value)


def _mean_cell(mean: float, half: float) -> str:
    if math.isnan(mean):
        return ABSENT
    return f"{mean:.3f}" + ("" if math.isnan(half) else f" ± {half:.3f}")


def _stat_cell(row: Row, metric: str) -> str:
    """The row's mean and interval of `metric`, with the seeds it is over where some chosen seed lacks it (a
    slice its test split did not hold, a result of older code): the `runs` cell would overstate its n."""
    counted = len(known([run.get(metric) for run in row.chosen]))
    cell = _mean_cell(*row.stat(metric))
    return cell + (f" ({counted} of {len(row.chosen)} seeds)" if 0 < counted < len(row.chosen) else "")


def _status_cell(runs: list[dict]) -> str:
    counts = Counter(run["status"] for run in runs)
    return ", ".join(f"{counts[s]} {s}" for s in sorted(counts, key=lambda s: (s != FINISHED, s)))


def _chance_cell(runs: list[dict]) -> str:
    known = [run["at_chance"] for run in finished(runs) if run["at_chance"] is not None]
    unknown = len(finished(runs)) - len(known)
    return f"{sum(known)} of {len(known)}" + (f" (? {unknown})" if unknown else "")


def write_csv(records: list[dict], path: Path) -> None:
    columns = list(dict.fromkeys(k for record in records for k in record))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)


def save_figure(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def with_past_train(slices: list[str], runs: list[dict]) -> list[str]:
    """The slice columns, each followed by its accuracy past the training length where some run has it."""
    present = {k for run in runs for k in run if k.startswith(PAST_TRAIN)}
    return [c for s in slices for c in (s, PAST_TRAIN + s.removeprefix("test_acc/")) if c == s or c in present]


def slice_heading(column: str) -> str:
    """A slice column's heading: `seq_len=256`, and `seq_len=256 past train` for its accuracy past the training
    length."""
    if column.startswith(PAST_TRAIN):
        return f"{column.removeprefix(PAST_TRAIN)} {PAST_TRAIN_HEADING}"
    return column.removeprefix("test_acc/")


def summary_table(rows: list[Row], runs: list[dict], slices: list[str] | None = None) -> tuple[list, list]:
    """One line per row: the chosen optimiser setting, its runs, the row's statuses, its runs at chance (all
    settings), runs still rising at the chosen setting, and test accuracy there, overall and per slice in
    `slices` (default: per setting, `setting_columns`, or else per length of a run tested past its training length,
    each with its accuracy past the training length where a run has it)."""
    keys = shown_keys(runs)
    slices = with_past_train(setting_columns(runs) or length_columns(runs), runs) if slices is None else slices
    header = ["model", *short_names(keys), ", ".join(tuned_names(tuned_keys(runs))), "runs", "status", "at chance",
              "still rising", "test_acc", *map(slice_heading, slices), "state_size"]
    body = []
    for row in rows:
        known = [run["still_rising"] for run in row.chosen if run["still_rising"] is not None]
        unknown = len(row.chosen) - len(known)  # as `at chance`: a seed whose curve cannot tell is counted, as `?`
        rising = f"{sum(known)} of {len(known)}" + (f" (? {unknown})" if unknown else "") if known else "?"
        # the chosen setting's seeds that did not finish are not in its mean: named here, not only among all settings'
        left_out = [run for run in by_choice(row.runs, row.tuned).get(row.choice, []) if run["status"] != FINISHED]
        runs_cell = str(len(row.chosen)) + (f" (+ {_status_cell(left_out)})" if left_out else "")
        cells = [row.label, *(_show(row.values[k]) for k in keys), choice_cell(row), runs_cell,
                 _status_cell(row.runs), _chance_cell(row.runs), rising]
        cells += [_stat_cell(row, metric) for metric in ["test_acc", *slices]]
        state_size = (row.chosen or row.runs)[0].get("state_size")
        cells.append(_cell(state_size))
        body.append(cells)
    return header, body


def seeds_apart_table(rows: list[Row], runs: list[dict]) -> tuple[list, list]:
    """A line per seed of each row whose chosen runs' test accuracies span more than SEEDS_APART: its test
    accuracy, the step it left chance at, and whether it was still rising."""
    keys = shown_keys(runs)
    header = ["model", *short_names(keys), ", ".join(tuned_names(tuned_keys(runs))), "seed", "test_acc",
              "left chance at step", "still rising", "steps"]
    body = []
    for row in rows:
        accuracies = [run["test_acc"] for run in row.chosen]
        if len(accuracies) < 2 or max(accuracies) - min(accuracies) <= SEEDS_APART:
            continue
        for run in sorted(row.chosen, key=lambda run: sort_key(run.get(SEED_KEY))):
            rising = run["still_rising"]
            body.append([row.label, *(_show(row.values[k]) for k in keys), ", ".join(_show(v) for v in row.choice),
                         _show(run.get(SEED_KEY)), f"{run['test_acc']:.3f}", _cell(run["left_chance_step"], "?"),
                         "?" if rising is None else "yes" if rising else "", _cell(run.get("steps"))])
    return header, body


def optim_records(rows: list[Row], runs: list[dict]) -> list[dict]:
    """One record per row and optimiser setting: its runs, statuses, runs at chance and mean best validation
    accuracy with its 95% interval over finished seeds; `chosen` marks the row's setting."""
    keys = shown_keys(runs)
    records = []
    for row in rows:
        for choice, members in by_choice(row.runs, row.tuned).items():
            mean, half = mean_ci([run["best_val_acc"] for run in finished(members)])
            records.append({"model": row.label, **{name: row.values[k] for k, name in zip(keys, short_names(keys))},
                            **dict(zip(tuned_names(row.tuned), choice)), "chosen": choice == row.choice,
                            "status": _status_cell(members), "at chance": _chance_cell(members),
                            "best_val_acc": mean, "best_val_acc_ci95": half})
    return records


def lr_table(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = [k for k in records[0] if k != "best_val_acc_ci95"]
    body = [[_mean_cell(r["best_val_acc"], r["best_val_acc_ci95"]) if k == "best_val_acc" else
             ("yes" if r[k] else "") if k == "chosen" else _show(r[k]) for k in header] for r in records]
    return header, body


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def row_name(row: Row, keys: list[str]) -> str:
    """The row's label and its values of `keys` (those it has), for legends and titles."""
    return " ".join([row.label, *(f"{name}={_show(row.values[k])}" for k, name in zip(keys, short_names(keys))
                                  if row.values[k] != ABSENT)])


def _family_colors(rows: list[Row]) -> dict[str, tuple]:
    families = sorted({row.chosen[0]["family"] for row in rows if row.chosen})
    cmap = plt.get_cmap("tab10" if len(families) <= 10 else "tab20")
    return {family: cmap(i % cmap.N) for i, family in enumerate(families)}


def width_series(rows: list[Row], runs: list[dict]) -> dict[str, list[Row]]:
    """The rows grouped by configuration across widths: rows that differ in d_model only share a series, named
    by the row's label and its other shown keys."""
    keys = [k for k in shown_keys(runs) if k != WIDTH_KEY]
    series = defaultdict(list)
    for row in rows:
        series[row_name(row, keys)].append(row)
    return dict(series)


def series_styles(rows: list[Row], runs: list[dict]) -> dict[str, dict]:
    """A style per configuration (`width_series` of the rows with a chosen setting), the same in every plot: the
    colour of its model family, and its own marker and line style within the family (a colour cycle alone repeats
    after ten lines, and two models drawn alike cannot be told apart)."""
    drawn = [row for row in rows if row.chosen]
    colors = _family_colors(drawn)
    styles, seen_in_family = {}, defaultdict(int)
    for name, members in width_series(drawn, runs).items():
        family = members[0].chosen[0]["family"]
        i = seen_in_family[family]
        seen_in_family[family] += 1
        styles[name] = dict(color=colors[family], marker="os^vDP*X"[i % 8], linestyle=["-", "--", ":", "-."][i % 4])
    return styles


def chosen_names(runs: list[dict]) -> str:
    """The optimiser keys chosen per row, for the plots' labels: `lr`, or `lr, weight_decay` where both are."""
    return ", ".join(tuned_names(tuned_keys(runs)))


def plot_accuracy_vs_state_size(rows: list[Row], runs: list[dict], path: Path) -> bool:
    """One panel for all test examples and one per setting; a point per row (its chosen-lr mean and 95%
    interval), a line per configuration through its widths (rows that differ in d_model only), styled by
    `series_styles`."""
    plotted = [row for row in rows if row.chosen and row.chosen[0]["state_size"] is not None]
    if not plotted:
        return False
    panels = ["test_acc", *setting_columns(runs)]
    series = width_series(plotted, runs)
    styles = series_styles(rows, runs)
    cols = min(3, len(panels))
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, figsize=(4.4 * cols + 3.2, 4.0 * math.ceil(
        len(panels) / cols)), squeeze=False, sharey=True)
    for ax, metric in zip(axes.flat, panels):
        for name, members in series.items():
            points = sorted((row.chosen[0]["state_size"], *row.stat(metric)) for row in members)
            points = [p for p in points if not math.isnan(p[1])]
            if points:
                sizes, means, halves = zip(*points)
                ax.errorbar(sizes, means, yerr=halves, capsize=3, label=name, **styles[name])
        ax.set_xscale("log")
        ax.set_xlabel("state size (values, all layers; attention: its KV cache at the longest sequence)",
                      fontsize=7)
        ax.set_title("all test examples" if metric == "test_acc" else metric.removeprefix("test_acc/"))
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel(f"test accuracy (chosen {chosen_names(runs)}, mean ± 95%)")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("Accuracy against state size")
    fig.tight_layout()
    save_figure(fig, path)
    return True


def plot_accuracy_vs_pairs(rows: list[Row], runs: list[dict], path: Path) -> bool:
    """A line per row across the num_kv_pairs slices (chosen-lr mean and 95% interval), a panel per width, styled
    as its configuration in the state-size plot (`series_styles`)."""
    # a slice whose K is not a whole number (a hand-edited result) has no place on this axis: it stays in the table
    columns = [c for c in slice_columns(runs) if c.startswith("test_acc/num_kv_pairs=")
               and c.split("=")[-1].isdigit() and int(c.split("=")[-1]) > 0]
    plotted = [row for row in rows if row.chosen]
    if not columns or not plotted:
        return False
    pairs = [int(c.split("=")[-1]) for c in columns]
    widths = sorted({row.chosen[0].get(WIDTH_KEY) for row in plotted}, key=sort_key)
    keys = [k for k in shown_keys(runs) if k != WIDTH_KEY]
    styles = series_styles(rows, runs)
    fig, axes = plt.subplots(1, len(widths), figsize=(5.2 * len(widths) + 3.2, 4.4), squeeze=False, sharey=True)
    legend = {}
    for ax, width in zip(axes[0], widths):
        for row in (r for r in plotted if r.chosen[0].get(WIDTH_KEY) == width):
            stats = [row.stat(c) for c in columns]
            name = row_name(row, keys)
            legend[name] = ax.errorbar(pairs, [m for m, _ in stats], yerr=[h for _, h in stats], capsize=3,
                                       label=name, **styles[name])
        ax.set_xscale("log", base=2)
        ax.set_xticks(pairs, [str(p) for p in pairs])
        ax.set_xlabel("key-value pairs in the context")
        ax.set_title(f"d_model {_show(width)}")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    # one legend for every panel, beside them: inside a panel it hid the lines
    axes[0][-1].legend(legend.values(), legend.keys(), fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    axes[0][0].set_ylabel(f"test accuracy (chosen {chosen_names(runs)}, mean ± 95%)")
    fig.suptitle("Accuracy against number of key-value pairs")
    fig.tight_layout()
    save_figure(fig, path)
    return True


# The loads a run records (models/mom.py): over its tasks' own tokens where it has them, else over every position
# (older runs), where most positions of a recall task hold the filler token, which every router sends alike.
LOADS = {"content_load_m": "over the tasks' tokens, filler excluded", "load_m": "over every position"}
LOAD_TITLE_WIDTH = 48  # characters of a memory-load panel's title line at fontsize 7 (a panel is 3.6 inches wide)


def memory_loads(run: dict, kind: str = "load_m") -> dict[str, list[float]]:
    """A MoM run's share of routed token slots per memory (`kind`, one of LOADS), per layer, largest first: memory
    indices mean nothing across seeds, the ranked shares (one memory taking all: collapse) do."""
    loads = defaultdict(list)
    for key, value in run.items():
        layer, _, name = key.removeprefix("router/").partition("/")
        if key.startswith("router/") and name.startswith(kind):
            loads[layer].append(value)
    return {layer: sorted(values, reverse=True) for layer, values in sorted(loads.items())}


def load_kind(runs: list[dict]) -> str:
    """The loads (a key of LOADS) that every one of these MoM runs recorded: content loads, unless one lacks them."""
    return next(kind for kind in LOADS if all(memory_loads(run, kind) for run in runs))


def plot_memory_load(rows: list[Row], runs: list[dict], path: Path) -> bool:
    """A panel per MoM row: each layer's ranked memory loads at the chosen lr, mean and 95% interval over
    seeds (bars) and each seed (dots); content loads where every plotted run has them."""
    routed = [row for row in rows if any(memory_loads(run) for run in row.chosen)]
    if not routed:
        return False
    kind = load_kind([run for row in routed for run in row.chosen if memory_loads(run)])
    keys = shown_keys(runs)
    cols = min(4, len(routed))
    nrows = math.ceil(len(routed) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols + 0.6, 3.2 * nrows), squeeze=False)
    for ax, row in zip(axes.flat, routed):
        per_run = [memory_loads(run, kind) for run in row.chosen if memory_loads(run)]
        layers = list(per_run[0])
        width = 0.8 / len(layers)
        for i, layer in enumerate(layers):
            ranks = range(len(per_run[0][layer]))
            stats = [mean_ci([loads[layer][r] for loads in per_run if layer in loads]) for r in ranks]
            x = [r + i * width for r in ranks]
            ax.bar(x, [m for m, _ in stats], width, yerr=[h for _, h in stats], capsize=2, label=layer, alpha=0.7,
                   ecolor="dimgrey")
            for loads in per_run:
                ax.plot(x, loads.get(layer, []), ".", color="black", markersize=4)
        memories = len(per_run[0][layers[0]])
        ax.axhline(1 / memories, color="grey", linestyle="--", linewidth=1)
        ax.set_xticks([r + 0.4 - width / 2 for r in range(memories)], [str(r + 1) for r in range(memories)])
        ax.set_ylim(0, 1.02)
        # wrapped to the panel's width: on one line each, neighbouring panels' titles ran into each other
        title = [row_name(row, keys), f"{', '.join(tuned_names(row.tuned))} {choice_cell(row)}, {len(per_run)} runs"]
        ax.set_title("\n".join(textwrap.fill(part, LOAD_TITLE_WIDTH) for part in title), fontsize=7)
        ax.set_xlabel("memory, ranked by load")
        ax.set_ylabel("share of routed tokens")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(routed):]:
        ax.axis("off")
    fig.suptitle(f"MoM memory load per layer at the chosen {chosen_names(runs)},\n{LOADS[kind]}\n"
                 "(dashed: uniform; dots: runs)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    return True


def find_studies(folder: Path, on_skip) -> list[optuna.Study]:
    """Every study of every study.db below `folder`, opened read-only; a file that is empty or cannot be read
    as an Optuna database goes to `on_skip(path, why)`."""
    studies = []
    for db in sorted(Path(folder).rglob("study.db")):
        if not db.is_file():
            on_skip(db, "a folder, not a database file")
            continue
        if db.stat().st_size == 0:
            on_skip(db, "empty file")
            continue
        url = f"sqlite:///file:{quote(str(db.resolve()))}?mode=ro&uri=true"
        try:
            # Optuna would try to add its tables to another SQLite database, and fail on ours opened read-only
            engine = sqlalchemy.create_engine(url)
            try:
                tables = sqlalchemy.inspect(engine).get_table_names()
            finally:
                engine.dispose()
            if "studies" not in tables:
                on_skip(db, f"an SQLite database without Optuna's tables, not a study (tables: {sorted(tables)})")
                continue
            found = [optuna.load_study(study_name=summary.study_name, storage=url)
                     for summary in optuna.get_all_study_summaries(url, include_best_trial=False)]
            for study in found:
                study.get_trials(deepcopy=False)  # a damaged table surfaces here rather than while writing
        except Exception as err:  # sqlite, SQLAlchemy and Optuna report damage with many exception types
            on_skip(db, f"not a readable Optuna database ({str(err).splitlines()[0]})")
            continue
        studies += found
    return studies


def best_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The Pareto front of a study of several objectives; of one, every complete trial at the best value (Optuna's
    best_trial is any one of them, which shown alone reads as the winner)."""
    if len(study.directions) > 1:
        return study.best_trials
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return [t for t in complete if t.value == study.best_value] if complete else []


def study_section(study: optuna.Study, out: Path) -> tuple[str, list[Path]]:
    """Markdown for one study (trial counts, best trial or Pareto front, failures) and its plots."""
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    counts = ", ".join(f"{sum(t.state == s for t in trials)} {s.name.lower()}" for s in optuna.trial.TrialState
                       if any(t.state == s for t in trials))
    lines = [f"## Study `{study.study_name}`", f"{len(trials)} trials: {counts}."]
    multi = len(study.directions) > 1
    best = best_trials(study)
    definition = study.user_attrs.get("definition") or {}
    seeds = definition.get("seeds")
    objectives = definition.get("objectives") or (["value"] if not multi else [f"value {i}" for i in
                                                                                 range(len(study.directions))])
    if seeds:
        lines.append(f"Each trial trained at seeds {seeds}; its values are the means over them.")
    if best:
        names = sorted({p for t in best for p in t.params})
        header = ["trial", *objectives, *names]
        body = [[str(t.number), *(f"{v:.4g}" for v in t.values), *(_show(t.params.get(n)) for n in names)]
                for t in best]
        if seeds:  # the spread behind each mean
            header.append("best val acc per seed")
            for row, t in zip(body, best):
                row.append(", ".join(f"{run['best_val_acc']:.3f}" for run in t.user_attrs["runs"].values()))
        title = ("Pareto front:" if multi else "Best trial:" if len(best) == 1
                 else f"Best trials ({len(best)} tie at the best value):")
        lines += [title, markdown_table(header, body)]
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    lines += [f"- trial {t.number} failed: {t.user_attrs.get('fail_reason', WORKER_LOST)}" for t in failed]
    running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    lines += [f"- trial {t.number} running: {running_note(t)}" for t in running]
    plots = []
    if complete and not multi:
        path = out / f"study_{study.study_name}_history.png"
        plot_history(study, complete, path)
        plots.append(path)
        importances = param_importances(study)
        if importances:
            path = out / f"study_{study.study_name}_importance.png"
            plot_importances(study.study_name, importances, path)
            plots.append(path)
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    return "\n\n".join(lines), plots


def running_note(trial: optuna.trial.FrozenTrial) -> str:
    """What a RUNNING trial's runs recorded: a trial stays RUNNING when its sweep is interrupted or its worker
    killed, until the study's next command finds its heartbeat stale, fails it and runs it again."""
    run_dir = trial.user_attrs.get("run_dir")
    paths = [Path(run_dir) / RESULT_FILE, *sorted(Path(run_dir).glob(f"seed*/{RESULT_FILE}"))] if run_dir else []
    ended = []
    for path in paths:  # its run's, or its runs' of each seed
        try:
            result = read_json(path)
        except (OSError, ValueError):
            continue
        if isinstance(result, dict) and status_of(result) != FINISHED:
            ended.append(f"{status_of(result)} ({result.get('status_reason') or 'no reason recorded'})")
    if ended:
        return (f"not training: its run recorded {'; '.join(ended)}; the study's next command fails it and runs it "
                "again")
    return ("training, or its worker was killed before its run recorded anything; the study's next command fails it "
            "once its heartbeat is stale and runs it again")


def plot_history(study: optuna.Study, complete: list, path: Path) -> None:
    maximise = study.direction == optuna.study.StudyDirection.MAXIMIZE
    numbers = [t.number for t in complete]
    values = [t.value for t in complete]
    best, best_so_far = None, []
    for v in values:
        best = v if best is None else (max(best, v) if maximise else min(best, v))
        best_so_far.append(best)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.scatter(numbers, values, label="trial", s=18)
    ax.step(numbers, best_so_far, where="post", color="tab:red", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("objective")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Optimisation history: {study.study_name}")
    fig.tight_layout()
    save_figure(fig, path)


def param_importances(study: optuna.Study) -> dict[str, float]:
    """PED-ANOVA importances; empty when the study is too small or too uniform to tell."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len({t.value for t in complete}) < 2:  # every trial at one value: no parameter explains any difference
        return {}
    try:
        # named, as the plot says it: Optuna's default evaluator is not the same in every version
        return optuna.importance.get_param_importances(study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
    except (ValueError, RuntimeError, ZeroDivisionError):
        return {}


def plot_importances(name: str, importances: dict[str, float], path: Path) -> None:
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(6.4, 0.5 * len(names) + 1.5))
    ax.barh(names, [importances[n] for n in names])
    ax.set_xlabel("importance (PED-ANOVA)")
    ax.set_title(f"Parameter importances: {name}")
    fig.tight_layout()
    save_figure(fig, path)


SEEDS_APART_TEXT = (
    "Each seed of such a row: its test accuracy, the step of its first validation above the chance line of `at chance`"
    " (`never`; `?`: no curve in its logs/metrics.csv or no chance level), whether it was still rising at its end (as "
    "`still rising`), and its steps. A low seed still rising when its steps ended was cut short by the budget (it left"
    " chance later than the others, or rose slower); one that stopped rising learned less."
)

PROTOCOL = (
    "A row is one configuration: runs that agree on every config key but `seed` and the optimiser settings "
    "(`optim.*`), with `auto` precision and backend as they resolved (bf16 Triton and float32 PyTorch runs are rows "
    "apart). Its optimiser setting (the learning rate, and every other `optim` key in which the runs differ, such as "
    "the weight decay) is chosen on validation: the highest mean best validation accuracy, compared on the seeds that "
    "every setting finished (`on seed 0`: only those; a setting with more seeds does not win on them, but for a tie), "
    "a setting where a run diverged after those where none did; interrupted, failed and untrained runs say nothing "
    "about their setting. A run that reached its early-stopping threshold counts at the threshold (how far it passed "
    "it depends on where a validation fell). Of settings tied at the top, those run at the most seeds are compared "
    "again on the seeds they all finished, where those are more (`of those tied there, best on seeds 0, 1, 2`: a "
    "setting tied there but run at fewer seeds drops out, so running the chosen setting's seeds never hands the "
    "choice to one left at seed 0), then ranked by the mean step their runs on those seeds stopped at, fewer first, "
    "then by their finished seeds, more first (`tied with 0.01`: the settings it ranked above). "
    "Test accuracy is the mean and 95% interval (Student's t) over the seeds at that setting, overall and per slice "
    "(every slice of every run is in results.csv); a single seed has no interval. `runs`: finished runs at the "
    "chosen setting (`+ 1 diverged`: its runs that did not finish, left out of the mean); `status`: every run of the "
    "row, all settings; runs that did not finish are never averaged. A "
    "configuration run twice (same seed and settings) counts once. "
    f"`at chance`: finished runs (all settings) whose best validation accuracy stayed below the validation "
    f"set's accuracy at chance c plus {CHANCE_MARGIN} (1 - c), where c is a guess among the answers each "
    f"position's context allows (MQAR: 1/K; `?`: runs whose config does not give their validation set). "
    f"`still rising`: runs at the chosen setting whose best validation accuracy grew by more than {FLAT_RISE} "
    f"over the last {FLAT_TAIL:.0%} of their steps without reaching the early-stopping threshold, so longer "
    "training may change them (`?`: too few validations to tell). `state_size`: the values a model holds for one "
    "sequence, all layers (attention: its KV cache at the longest sequence of the run's splits).")

PAST_TRAIN_TEXT = (
    f"`<slice> {PAST_TRAIN_HEADING}` (such as `seq_len=256 {PAST_TRAIN_HEADING}`): the slice's test accuracy over the "
    "positions at or after the run's longest training sequence alone, where a test segment is longer than training "
    "(length extrapolation). The slice's own accuracy counts every position, those inside the training length too: a "
    "parity model trained at L 64, perfect there and at chance after, reads 0.625 at L 256 (chance 0.502) and 0.5 "
    f"{PAST_TRAIN_HEADING}. MAD's `chance per length` gives beside each length the chance over those positions "
    f"(`{PAST_TRAIN_HEADING}`), which differs from the whole length's where the first position's answer is its input "
    "(state tracking).")

MAD_PROTOCOL = (
    "MAD's protocol (Poli et al. 2024) on the runs of `experiment=mad`: a setting is one configuration of a task "
    "(vocabulary, length, training-set size, noise, ...). Each setting of each model is a row of the settings "
    "table below, made by the protocol of every table of rows (given once, with the first): its "
    "optimiser setting (learning rate x weight decay) chosen on validation (MAD chose on test), its accuracy the "
    "mean test accuracy over seeds there. A task's score is the mean of its settings' accuracies over the settings "
    "these runs hold (their number beside the task's name; MAD's full grid has more); `k of n`: only k of them "
    "have finished runs of that model, and the score is their mean (`— (0 of n)`: it ran the task and none "
    "finished; `—` alone: it did not run the task). State size: the "
    "values a model holds for one sequence, all layers (attention: its KV cache at the setting's longest "
    "sequence, so a range over settings). A setting tested at several lengths (state tracking, length "
    "extrapolation) counts as the mean of its accuracies at each length, every length alike. Per-setting "
    "accuracies, with every length a state-tracking task was tested at, follow the scores; the validation "
    "accuracy of every optimiser setting is in lr_sensitivity.csv.")

# The fields of a MAD score record that are not the model's.
SCORE_FIELDS = ("task", "settings_scored", "settings", "score", "state_size_min", "state_size_max")


def optim_phrase(tuned: list[str]) -> str:
    return " and ".join(OPTIM_NAMES.get(name, name) for name in tuned_names(tuned))


def tested_lengths(run: dict) -> list[str]:
    """The run's test accuracies per length, `test_acc/seq_len=L`."""
    return [k for k in run if k.startswith("test_acc/seq_len=")]


def length_columns(runs: list[dict]) -> list[str]:
    """The `seq_len` slices of the runs tested at more than one length (length extrapolation), or at one past
    their training length (where its accuracy past the training length is known)."""
    columns = set()
    for run in runs:
        lengths = tested_lengths(run)
        if len(lengths) > 1 or any(PAST_TRAIN + k.removeprefix("test_acc/") in run for k in lengths):
            columns.update(lengths)
    return sorted(columns, key=lambda k: _number(k.split("=")[-1]))


def settings_table(rows: list[Row], runs: list[dict]) -> tuple[list, list]:
    """The summary table of MAD's settings, with test accuracy at each length of the runs tested at several (and
    past the training length, where they have it), and beside it the test set's accuracy at chance at each
    (`test_chance_by_length`): at 4x the training length a state-tracking task's chance is not the training
    length's, nor is it the same over the positions past the training length."""
    lengths = length_columns(runs)
    columns = with_past_train(lengths, runs)
    header, body = summary_table(rows, runs, slices=columns)
    if lengths:
        header.append("chance per length")
        for row, cells in zip(rows, body):
            cells.append(" / ".join(length_chance_cell(row.runs[0], c, columns) for c in lengths))
    return header, body


def length_chance_cell(run: dict, length: str, columns: list[str]) -> str:
    """The accuracy at chance of the run's test split at a length (`test_acc/seq_len=L`), and past the training
    length beside it where `columns` show the accuracy there."""
    def show(key: str) -> str:
        return ABSENT if run.get(key) is None else f"{run[key]:.3f}"

    at = length.removeprefix("test_acc/")
    past = f" ({PAST_TRAIN_HEADING} {show(PAST_TRAIN_CHANCE + at)})" if PAST_TRAIN + at in columns else ""
    return show(f"chance_acc/{at}") + past


def note_past_train(header: list[str], sections: list[str]) -> None:
    """After the first table with a column of accuracy past the training length, the note that says what it is."""
    if any(h.endswith(f" {PAST_TRAIN_HEADING}") for h in header) and PAST_TRAIN_TEXT not in sections:
        sections.append(PAST_TRAIN_TEXT)


def setting_accuracy(row: Row) -> float:
    """A setting's accuracy in its task's score: its test accuracy; for one tested at several lengths (length
    extrapolation), the mean of its accuracies at each length, every length alike (the pooled test accuracy
    weighs a length by its labelled positions: 256 four times 64)."""
    lengths = tested_lengths(row.chosen[0])
    if len(lengths) > 1:
        return statistics.fmean(row.stat(k)[0] for k in lengths)
    return row.stat("test_acc")[0]


def mad_score_records(rows: list[Row], runs: list[dict]) -> list[dict]:
    """One record per task and model: the score (the mean over the task's settings of each setting's test
    accuracy at its chosen optimiser setting), how many of the task's settings it covers, and the state size.
    A model is the row label and every row key outside `task`; the task keys tell the settings apart."""
    model_keys = [k for k in shown_keys(runs) if not k.startswith(TASK_PREFIX)]
    settings, groups = defaultdict(set), defaultdict(list)
    for row in rows:
        task = row.runs[0].get("config.task.name", ABSENT)
        settings[task].add(tuple(repr(comparable(v)) for k, v in row.values.items() if k.startswith(TASK_PREFIX)))
        groups[(task, row.label, *(sort_key(row.values[k]) for k in model_keys))].append(row)
    records = []
    for (task, label, *_), members in sorted(groups.items()):
        accuracies = [setting_accuracy(row) for row in members if row.chosen]
        sizes = [run["state_size"] for row in members for run in (row.chosen or row.runs)
                 if run.get("state_size") is not None]
        records.append({"task": task, "model": label,
                        **{name: members[0].values[k] for k, name in zip(model_keys, short_names(model_keys))},
                        "settings_scored": len(accuracies), "settings": len(settings[task]),
                        "score": statistics.fmean(accuracies) if accuracies else float("nan"),
                        "state_size_min": min(sizes, default=None), "state_size_max": max(sizes, default=None)})
    return records


def mad_pivot(records: list[dict]) -> tuple[list[str], list[str], list[tuple[list, str, dict]]]:
    """The score records as a grid: the tasks, the names of the model columns, and per model its values of
    those columns, its state size (a range where it differs between settings) and its record per task."""
    tasks = sorted({r["task"] for r in records})
    model_columns = [k for k in records[0] if k not in SCORE_FIELDS]
    by_model = defaultdict(dict)
    for record in records:
        by_model[tuple(record[k] for k in model_columns)][record["task"]] = record
    grid = []
    for model, by_task in by_model.items():
        sizes = [r[k] for r in by_task.values() for k in ("state_size_min", "state_size_max") if r[k] is not None]
        low, high = min(sizes, default=None), max(sizes, default=None)
        size = ABSENT if low is None else _show(low) if low == high else f"{_show(low)}–{_show(high)}"
        grid.append((list(model), size, by_task))
    return tasks, model_columns, grid


def score_cell(record: dict | None) -> str:
    """The score, with `k of n` when only k of the task's n settings were scored: `— (0 of n)` when the model ran
    the task and none of its settings finished (all diverged, say), `—` alone when it never ran the task."""
    if record is None:
        return ABSENT
    covered = record["settings_scored"], record["settings"]
    score = ABSENT if math.isnan(record["score"]) else f"{record['score']:.3f}"
    return score + (f" ({covered[0]} of {covered[1]})" if covered[0] < covered[1] else "")


def mad_table(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    """One line per model: its state size and its score on every task."""
    tasks, model_columns, grid = mad_pivot(records)
    body = [[*(_show(v) for v in model), size, *(score_cell(by_task.get(t)) for t in tasks)]
            for model, size, by_task in grid]
    return [*model_columns, "state size", *task_headings(records, tasks)], body


def task_headings(records: list[dict], tasks: list[str]) -> list[str]:
    """Each task's name with the number of its settings the runs hold, so that a part of MAD's grid is not read
    as the whole."""
    settings = {r["task"]: r["settings"] for r in records}
    return [f"{t} ({settings[t]} setting{'s' * (settings[t] != 1)})" for t in tasks]


def plot_mad_scores(records: list[dict], path: Path) -> None:
    """A heat map of the scores, a line per model (labelled with its state size), a column per task."""
    tasks, model_columns, grid = mad_pivot(records)
    scores = [[by_task[t]["score"] if t in by_task else math.nan for t in tasks] for _, _, by_task in grid]
    # the model columns by name (a bare `True` or `5` says nothing), as in the legends of the other plots
    names = [" ".join([_show(label), *(f"{name}={_show(v)}" for name, v in zip(model_columns[1:], values)
                                       if v != ABSENT)]) for (label, *values), _, _ in grid]
    # wide enough for the longest name beside the cells (7-point text, about 0.06 inch a character)
    width = 1.2 * len(tasks) + 2.5 + 0.06 * max(len(name) for name in names)
    fig, ax = plt.subplots(figsize=(width, 0.55 * len(grid) + 2.0))
    # a cell without a score (not run, or none finished) in light grey with black text, apart from the scale
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    image = ax.imshow(scores, vmin=0.0, vmax=1.0, cmap=cmap, aspect="auto")
    for i, (_, _, by_task) in enumerate(grid):
        for j, task in enumerate(tasks):
            score = scores[i][j]
            ax.text(j, i, score_cell(by_task.get(task)).replace(" (", "\n("), ha="center", va="center", fontsize=7,
                    color="black" if math.isnan(score) or score >= 0.6 else "white")
    ax.set_xticks(range(len(tasks)), task_headings(records, tasks), rotation=30, ha="right")
    ax.set_yticks(range(len(grid)), [f"{name}\nstate size {size}" for name, (_, size, _) in zip(names, grid)],
                  fontsize=7)
    fig.colorbar(image, ax=ax).set_label("mean test accuracy over the task's settings", fontsize=8)
    fig.suptitle("MAD score per task (each setting at its optimiser setting chosen on validation)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def folders_without_result(folder: Path) -> list[Path]:
    """The run folders below `folder` (not hidden ones, like a stack's own) that hold checkpoints or a metrics log
    but no result.json: runs killed before they could write one, or still running."""
    marked = {p.parent for p in folder.rglob("checkpoints") if p.is_dir()}
    marked |= {p.parent.parent for p in folder.rglob("metrics.csv") if p.parent.name == LOGS}
    return sorted(path for path in marked if not (path / RESULT_FILE).exists()
                  and not any(part.startswith(".") for part in path.relative_to(folder).parts))


def last_logged_step(run_dir: str) -> int | None:
    """The last step of the run's logs/metrics.csv, None without one or where it cannot be read (`val_curve`
    names a damaged file)."""
    try:
        with open(Path(run_dir) / LOGS / "metrics.csv", newline="") as f:
            return max((int(line["step"]) for line in csv.DictReader(f) if line.get("step")), default=None)
    except (OSError, ValueError, csv.Error):
        return None


def results_behind_logs(runs: list[dict]) -> list[tuple[dict, int]]:
    """The runs whose metrics.csv logged steps past their result's `steps` (its test row is at that step), each
    with its last logged step: the result is an earlier segment's, and a later one (killed, or still running)
    wrote none."""
    behind = []
    for run in runs:
        last = last_logged_step(run["run_dir"]) if run.get("steps") is not None else None
        if last is not None and last > run["steps"]:
            behind.append((run, last))
    return behind


# Every file a report may write besides report.md (study plots are named after their study).
OUTPUTS = ("results.csv", "lr_sensitivity.csv", "mad_scores.csv", "mad_scores.png", "accuracy_vs_state_size.png",
           "accuracy_vs_kv_pairs.png", "memory_load.png", "study_*_history.png", "study_*_importance.png")


def remove_stale_outputs(out: Path, written: list[Path]) -> None:
    """Remove the files of OUTPUTS in `out` that this report did not write: an earlier report's (of runs since
    removed, or of another folder reported there) would sit beside report.md with data that is not its tables'."""
    for pattern in OUTPUTS:
        for path in out.glob(pattern):
            if path.is_file() and path not in written:
                path.unlink(missing_ok=True)


def report(folder: Path, out: Path | None = None, console: Console | None = None) -> dict:
    """Write the report files; return their paths. Raises ValueError when there is nothing to report."""
    folder = Path(folder)
    out = Path(out or folder)
    if not folder.is_dir():
        raise ValueError(f"folder {str(folder)!r} {'is a file, not a folder' if folder.exists() else 'does not exist'}")
    problem = folder_problem(out)
    if problem:
        raise ValueError(f"--out {out} is invalid: {problem}")
    skipped = []

    def skip(path: Path, why: str) -> None:
        skipped.append(f"`{path}`: {why}")
        print(f"sandbox-report: warning: {path} skipped: {why}", file=sys.stderr)

    results = collect_results(folder, on_skip=skip)
    studies = find_studies(folder, on_skip=skip)
    if not results and not studies:
        raise ValueError(f"no readable result.json or study.db below {str(folder)!r}"
                         + (f" ({len(skipped)} skipped, see the warnings)" if skipped else ": train something first"))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--out {out} cannot be written ({err.strerror}: {err.filename})") from None
    files = {"markdown": out / "report.md"}
    runs, duplicates = drop_duplicates(to_runs(results))
    without_result = folders_without_result(folder)
    behind = results_behind_logs(runs)
    notes = {"Skipped (unreadable)": skipped,
             "Counted once (the same configuration and seed as a run kept)":
                 [f"`{run['run_dir']}`: as `{kept['run_dir']}`" for run, kept in duplicates],
             "Run folders without a result (killed before writing one, or still running)":
                 [f"`{path}`" for path in without_result],
             "Results older than their metrics.csv (an earlier segment's result; a later one, killed or still "
             "running, wrote none)":
                 [f"`{run['run_dir']}`: result of step {_show(run['steps'])}, metrics.csv logged up to step {last}"
                  for run, last in behind]}
    commits = Counter(c for run in runs for c in {run["git_commit"] or "not recorded", *run["earlier_git_commits"]})
    if len(commits) > 1:
        notes["Runs of several commits (results.csv: git_commit, and earlier_git_commits of resumed runs)"] = [
            f"`{c}`: {n} runs" for c, n in commits.items()]
    statuses = f" ({_status_cell(runs)})" if runs else ""
    sections = [f"# Report: {folder}", f"{len(runs)} runs{statuses}, {len(studies)} studies, {len(skipped)} files "
                f"skipped, {len(duplicates)} runs counted once, {len(without_result)} run folders without a result."]
    for title, lines in notes.items():
        if lines:
            sections.append(f"{title}:\n\n" + "\n".join(f"- {line}" for line in lines))
    for run, kept in duplicates:
        print(f"sandbox-report: warning: {run['run_dir']} counted once: the same run as {kept['run_dir']}",
              file=sys.stderr)
    for run, last in behind:
        print(f"sandbox-report: warning: {run['run_dir']}'s {RESULT_FILE} (step {_show(run['steps'])}) is older than "
              f"its logs/metrics.csv (step {last})", file=sys.stderr)
    for path in without_result:
        print(f"sandbox-report: warning: {path} holds a run without a {RESULT_FILE} (killed, or still running)",
              file=sys.stderr)
    for study in studies:
        text, plots = study_section(study, out)
        sections.append(text)
        files.update({p.stem: p for p in plots})
    tables = run_sections(runs, out, sections, files) if runs else []
    remove_stale_outputs(out, list(files.values()))
    with atomic_path(files["markdown"]) as tmp:
        tmp.write_text("\n\n".join(sections) + "\n")
    # a log file or pipe is not 80 columns wide: print the whole table there rather than truncated labels
    console = console or (Console() if sys.stdout.isatty() else Console(width=200))
    for title, (header, body) in tables:
        table = Table(title=f"{title}: {folder}")
        for column in header:
            table.add_column(column)
        for cells in body:
            table.add_row(*(escape(c) for c in cells))  # labels like mom[gla] are not markup
        console.print(table)
    if tables:
        console.print(f"at chance: best validation accuracy below c + {CHANCE_MARGIN} (1 - c), c a guess among the "
                      f"answers the context allows (1/K on MQAR); still rising: best validation accuracy up by more "
                      f"than {FLAT_RISE} over the last {FLAT_TAIL:.0%} of the steps")
    for kind, path in files.items():
        console.print(f"{kind}: {path}")
    return files


def run_sections(runs: list[dict], out: Path, sections: list[str], files: dict) -> list[tuple[str, tuple]]:
    """The runs' CSVs, tables and plots: the configurations of the runs outside MAD's suite, then MAD's
    scores; appends to `sections` and `files`; returns the tables to print, each with its title."""
    files["csv"] = out / "results.csv"
    write_csv(runs, files["csv"])
    mad = [run for run in runs if run.get(SUITE_KEY) == MAD_SUITE]
    others = [run for run in runs if run.get(SUITE_KEY) != MAD_SUITE]
    tables, sensitivity, mad_sensitivity = [], [], []
    if others:
        tables.append(configuration_sections(others, out, sections, files, sensitivity))
    if mad:
        tables.append(mad_sections(mad, out, sections, files, mad_sensitivity))
    if others and mad:  # one file holds both sections' records, whose columns alone may not tell them apart
        sensitivity = [{"suite": ABSENT, **r} for r in sensitivity] + \
            [{"suite": MAD_SUITE, **r} for r in mad_sensitivity]
    else:
        sensitivity += mad_sensitivity
    files["lr_csv"] = out / "lr_sensitivity.csv"
    write_csv(sensitivity, files["lr_csv"])
    unfinished = [run for run in runs if run["status"] != FINISHED]
    if unfinished:
        sections += ["## Runs that did not finish", "\n".join(
            f"- `{run['run_dir']}`: {run['status']}" + (f" ({run['status_reason']})" if run["status_reason"] else "")
            for run in unfinished)]
    return tables


def configuration_sections(runs: list[dict], out: Path, sections: list[str], files: dict,
                           sensitivity: list[dict]) -> tuple[str, tuple]:
    """A row per configuration (the summary table), the validation accuracy of every optimiser setting, and the
    plots; appends the optimiser records to `sensitivity`; returns the summary table with its title."""
    rows = make_rows(runs)
    summary = summary_table(rows, runs)
    phrase = optim_phrase(tuned_keys(runs))
    sections += [f"## Test accuracy at the {phrase} chosen on validation (mean ± 95% interval over seeds)",
                 PROTOCOL, markdown_table(*summary)]
    note_past_train(summary[0], sections)
    apart = seeds_apart_table(rows, runs)
    if apart[1]:
        sections += [f"## Seeds apart: rows whose seeds at the chosen setting differ by more than {SEEDS_APART} in "
                     "test accuracy", SEEDS_APART_TEXT, markdown_table(*apart)]
    records = optim_records(rows, runs)
    sensitivity += records
    if any(len(by_choice(row.runs, row.tuned)) > 1 for row in rows):
        sections += [f"## Validation accuracy per {phrase} (mean ± 95% interval over finished seeds)",
                     markdown_table(*lr_table(records))]
    plots = [("state_size_png", "accuracy_vs_state_size.png", "accuracy against state size",
              lambda p: plot_accuracy_vs_state_size(rows, runs, p)),
             ("pairs_png", "accuracy_vs_kv_pairs.png", "accuracy against key-value pairs",
              lambda p: plot_accuracy_vs_pairs(rows, runs, p)),
             ("load_png", "memory_load.png", "memory load", lambda p: plot_memory_load(rows, runs, p))]
    for key, name, caption, plot in plots:
        if plot(out / name):
            files[key] = out / name
            sections.append(f"![{caption}]({name})")
    return f"Test accuracy at the {phrase} chosen on validation", summary


def mad_sections(runs: list[dict], out: Path, sections: list[str], files: dict,
                 sensitivity: list[dict]) -> tuple[str, tuple]:
    """MAD's scores (table, CSV, heat map), then every setting of every model; appends the optimiser records
    to `sensitivity`; returns the score table with its title."""
    rows = make_rows(runs)
    records = mad_score_records(rows, runs)
    files["mad_csv"] = out / "mad_scores.csv"
    write_csv(records, files["mad_csv"])
    files["mad_png"] = out / "mad_scores.png"
    plot_mad_scores(records, files["mad_png"])
    scores = mad_table(records)
    sections += ["## MAD: one score per task and model (mean test accuracy over the task's settings)",
                 MAD_PROTOCOL, markdown_table(*scores), "![MAD scores](mad_scores.png)",
                 f"### MAD settings: test accuracy at the {optim_phrase(tuned_keys(runs))} chosen on validation"]
    if PROTOCOL not in sections:  # MAD's runs alone: no table of the other runs above says what the columns mean
        sections.append(PROTOCOL)
    settings = settings_table(rows, runs)
    sections.append(markdown_table(*settings))
    note_past_train(settings[0], sections)
    sensitivity += optim_records(rows, runs)
    return "MAD: mean test accuracy over each task's settings", scores


def main(argv: list[str] | None = None) -> int:
    from tasks.cli import OneLineParser

    parser = OneLineParser(prog="sandbox-report", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=path_argument)
    parser.add_argument("--out", type=path_argument, default=None, help="where to write (default: the folder)")
    args = parser.parse_args(argv)
    try:
        out = args.out or args.folder
        problem = out.is_dir() and write_problem(out)  # a folder that is not there yet is made (or refused) by report
        if problem:
            setting = f"--out {args.out}" if args.out else f"folder {str(args.folder)!r} (--out by default)"
            raise ValueError(f"{setting} cannot be written ({problem})")
        report(args.folder, args.out)
    except ValueError as err:
        print(f"sandbox-report: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
