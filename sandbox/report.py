"""`sandbox-report FOLDER`: every run and study below a folder, as tables and plots.

Writes into FOLDER (or --out): `results.csv` (one row per run: config flattened, metrics), `report.md`
(summary tables grouped by the keys that vary, mean and 95% interval over seeds) and PNG plots:
accuracy against state size, accuracy against the number of key-value pairs, MoM memory load, and for
each Optuna study (a `study.db` below the folder) its optimisation history and parameter importances.
"""

import argparse
import csv
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import optuna
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sandbox.results import atomic_path, collect_results

# Config keys that never define what a run is (where it is written, how it is shown).
IGNORED_KEYS = {"output_root", "name", "callbacks.progress"}
METRICS = ("test_acc", "best_val_acc", "state_size", "num_parameters", "wall_time_s", "epochs")
# Two-sided 95% critical values of Student's t by degrees of freedom; past 30 the normal value is close.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
       10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042}


def flatten(tree: dict, prefix: str = "") -> dict:
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


def to_rows(results: list[dict]) -> list[dict]:
    rows = []
    for result in results:
        row = {"run_dir": result["run_dir"], "model": model_label(result["config"]),
               "family": model_family(result["config"])}
        row.update({f"config.{k}": v for k, v in flatten(result["config"]).items() if k not in IGNORED_KEYS})
        row.update({m: result.get(m) for m in METRICS})
        row.update({f"test_acc/{k}": v for k, v in result.get("test_acc_per_slice", {}).items()})
        rows.append(row)
    return rows


def varied_keys(rows: list[dict]) -> list[str]:
    """Config keys whose value differs between runs, seeds left out (they are averaged over)."""
    keys = sorted({k for row in rows for k in row if k.startswith("config.")} - {"config.seed"})
    return [k for k in keys if len({repr(row.get(k)) for row in rows}) > 1]


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% interval (Student's t); 0 for a single value."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    if len(values) == 1:
        return values[0], 0.0
    dof = len(values) - 1
    t = T95[max(k for k in T95 if k <= dof)] if dof <= 30 else 1.96
    return statistics.fmean(values), t * statistics.stdev(values) / math.sqrt(len(values))


def group(rows: list[dict], keys: list[str]) -> dict[tuple, list[dict]]:
    groups = defaultdict(list)
    for row in rows:
        groups[tuple(row.get(k) for k in keys)].append(row)
    return dict(sorted(groups.items(), key=lambda item: repr(item[0])))


def slice_columns(rows: list[dict]) -> list[str]:
    return sorted({k for row in rows for k in row if k.startswith("test_acc/")},
                  key=lambda k: (k.split("=")[0], _number(k.split("=")[-1])))


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.inf


def write_csv(rows: list[dict], path: Path) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def save_figure(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def summary_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Rows grouped by model and the varied keys: runs, mean ± 95% interval of test accuracy per slice."""
    keys = ["model"] + [k for k in varied_keys(rows) if not k.startswith("config.model.")]
    slices = slice_columns(rows)
    header = [k.removeprefix("config.") for k in keys] + ["runs", "test_acc"] + \
        [s.removeprefix("test_acc/") for s in slices] + ["state_size"]
    body = []
    for values, members in group(rows, keys).items():
        cells = [str(v) for v in values] + [str(len(members))]
        for metric in ["test_acc", *slices]:
            mean, half = mean_ci([m.get(metric) for m in members])
            cells.append(f"{mean:.3f}" + (f" ± {half:.3f}" if half else ""))
        cells.append(str(members[0].get("state_size")))
        body.append(cells)
    return header, body


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def plot_accuracy_vs_state_size(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for family, members in group(rows, ["family"]).items():
        points = defaultdict(list)
        for row in members:
            points[row["state_size"]].append(row["test_acc"])
        sizes = sorted(points)
        means = [mean_ci(points[s]) for s in sizes]
        ax.errorbar(sizes, [m for m, _ in means], yerr=[h for _, h in means], marker="o", capsize=3,
                    label=family[0])
    ax.set_xscale("log")
    ax.set_xlabel("recurrent state size per sequence (values, all layers)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Accuracy against state size")
    fig.tight_layout()
    save_figure(fig, path)


def plot_accuracy_vs_pairs(rows: list[dict], path: Path) -> bool:
    columns = [c for c in slice_columns(rows) if c.startswith("test_acc/num_kv_pairs=")]
    if not columns:
        return False
    pairs = [int(c.split("=")[-1]) for c in columns]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for (label,), members in group(rows, ["model"]).items():
        means = [mean_ci([m.get(c) for m in members]) for c in columns]
        ax.errorbar(pairs, [m for m, _ in means], yerr=[h for _, h in means], marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(pairs, [str(p) for p in pairs])
    ax.set_xlabel("key-value pairs in the context")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Accuracy against number of key-value pairs")
    fig.tight_layout()
    save_figure(fig, path)
    return True


def plot_memory_load(results: list[dict], path: Path) -> bool:
    """Per-memory share of routed token slots per layer, one panel per MoM run."""
    routed = [r for r in results if any("/load_m" in k for k in r.get("router", {}))]
    if not routed:
        return False
    fig, axes = plt.subplots(1, len(routed), figsize=(3.2 * len(routed) + 1, 3.4), squeeze=False)
    for ax, result in zip(axes[0], routed):
        loads = defaultdict(dict)
        for key, value in result["router"].items():
            layer, _, name = key.partition("/")
            if name.startswith("load_m"):
                loads[layer][int(name.removeprefix("load_m"))] = value
        layers = sorted(loads)
        width = 0.8 / max(len(layers), 1)
        for i, layer in enumerate(layers):
            memories = sorted(loads[layer])
            ax.bar([m + i * width for m in memories], [loads[layer][m] for m in memories], width, label=layer)
        ax.axhline(1 / len(loads[layers[0]]), color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("memory")
        ax.set_ylabel("share of routed tokens")
        ax.set_title(Path(result["run_dir"]).name[:40], fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle("MoM memory load per layer (dashed: uniform)")
    fig.tight_layout()
    save_figure(fig, path)
    return True


def find_studies(folder: Path) -> list[optuna.Study]:
    studies = []
    for db in sorted(Path(folder).rglob("study.db")):
        url = f"sqlite:///{db.resolve()}"
        for summary in optuna.get_all_study_summaries(url, include_best_trial=False):
            studies.append(optuna.load_study(study_name=summary.study_name, storage=url))
    return studies


def study_section(study: optuna.Study, out: Path) -> tuple[str, list[Path]]:
    """Markdown for one study (trial counts, best trial or Pareto front, failures) and its plots."""
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    counts = ", ".join(f"{sum(t.state == s for t in trials)} {s.name.lower()}" for s in optuna.trial.TrialState
                       if any(t.state == s for t in trials))
    lines = [f"## Study `{study.study_name}`", f"{len(trials)} trials: {counts}."]
    multi = len(study.directions) > 1
    best = study.best_trials if multi else ([study.best_trial] if complete else [])
    if best:
        names = sorted({p for t in best for p in t.params})
        header = ["trial", *(["value"] if not multi else [f"value {i}" for i in range(len(study.directions))]), *names]
        body = [[str(t.number), *(f"{v:.4g}" for v in t.values), *(_show(t.params.get(n)) for n in names)]
                for t in best]
        lines += ["Pareto front:" if multi else "Best trial:", markdown_table(header, body)]
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    lines += [f"- trial {t.number} failed: {t.user_attrs.get('fail_reason', 'no reason recorded')}" for t in failed]
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


def _show(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


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
    """fANOVA importances; empty when the study is too small or too uniform to tell."""
    try:
        return optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError, ZeroDivisionError):
        return {}


def plot_importances(name: str, importances: dict[str, float], path: Path) -> None:
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(6.4, 0.5 * len(names) + 1.5))
    ax.barh(names, [importances[n] for n in names])
    ax.set_xlabel("importance (fANOVA)")
    ax.set_title(f"Parameter importances: {name}")
    fig.tight_layout()
    save_figure(fig, path)


def report(folder: Path, out: Path | None = None, console: Console | None = None) -> dict:
    """Write the report files; return their paths. Raises ValueError when there is nothing to report."""
    folder = Path(folder)
    out = Path(out or folder)
    if not folder.is_dir():
        raise ValueError(f"folder {str(folder)!r} does not exist")
    results = collect_results(folder)
    studies = find_studies(folder)
    if not results and not studies:
        raise ValueError(f"no result.json or study.db below {str(folder)!r}: train something first")
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out / "report.md"}
    sections = [f"# Report: {folder}", f"{len(results)} finished runs, {len(studies)} studies."]
    for study in studies:
        text, plots = study_section(study, out)
        sections.append(text)
        files.update({p.stem: p for p in plots})
    if results:
        header, body = run_sections(results, out, sections, files)
    with atomic_path(files["markdown"]) as tmp:
        tmp.write_text("\n\n".join(sections) + "\n")
    # a log file or pipe is not 80 columns wide: print the whole table there rather than truncated labels
    console = console or (Console() if sys.stdout.isatty() else Console(width=200))
    if results:
        table = Table(title=f"Test accuracy: {folder}")
        for column in header:
            table.add_column(column)
        for cells in body:
            table.add_row(*(escape(c) for c in cells))  # labels like mom[gla] are not markup
        console.print(table)
    for kind, path in files.items():
        console.print(f"{kind}: {path}")
    return files


def run_sections(results: list[dict], out: Path, sections: list[str], files: dict) -> tuple[list, list]:
    """The runs' CSV, summary table and plots; appends to `sections` and `files`."""
    rows = to_rows(results)
    files["csv"] = out / "results.csv"
    write_csv(rows, files["csv"])
    header, body = summary_table(rows)
    sections += ["## Test accuracy (mean ± 95% interval over seeds)", markdown_table(header, body)]
    files["state_size_png"] = out / "accuracy_vs_state_size.png"
    plot_accuracy_vs_state_size(rows, files["state_size_png"])
    sections.append(f"![accuracy against state size]({files['state_size_png'].name})")
    if plot_accuracy_vs_pairs(rows, out / "accuracy_vs_kv_pairs.png"):
        files["pairs_png"] = out / "accuracy_vs_kv_pairs.png"
        sections.append(f"![accuracy against key-value pairs]({files['pairs_png'].name})")
    if plot_memory_load(results, out / "memory_load.png"):
        files["load_png"] = out / "memory_load.png"
        sections.append(f"![memory load]({files['load_png'].name})")
    return header, body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sandbox-report", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the folder)")
    args = parser.parse_args(argv)
    try:
        report(args.folder, args.out)
    except ValueError as err:
        print(f"sandbox-report: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
