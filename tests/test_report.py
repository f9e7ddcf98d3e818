"""sandbox-report on folders of synthetic result.json files (no training): tables, statuses, rows, Zoology's
learning-rate protocol and its choice over learning rate x weight decay, MAD's per-task scores, curve checks,
unreadable files, plots and an Optuna study; and experiment=mad's sweep, composed, with one cut-down job run
and reported."""

import csv
import itertools
import json
import math
import os
import random
import sqlite3
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib.colors
import optuna
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from tasks.registry import resolve as resolve_task
from sandbox.report import (CHANCE_MARGIN, FLAT_RISE, collect_results, load_kind, main, make_rows, mean_ci,
                            memory_loads, report, study_section, t95, to_runs, width_series)
from sandbox.results import config_hash
from sandbox.train import CONF_DIR
from commands import exit_code

REPO = Path(__file__).resolve().parent.parent

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
T95_DOF2 = 4.303  # Student's t, two-sided 95%, 2 degrees of freedom (three seeds)
# MQAR at K = 4 (accuracy at chance 1/4): what write_run's runs validate on unless told otherwise
MQAR_K4 = {"name": "mqar", "params": {"vocab_size": 64, "power_a": 0.01, "random_filler": False},
           "segments": {"val": [{"seq_len": 16, "num_kv_pairs": 4, "num_examples": 20}]}, "limit_examples": None}


def write_run(folder: Path, name: str, mixer: str = "gated_deltanet", seed: int = 0, lr: float = 3e-3,
              val: float = 0.9, test: float = 0.9, slices: dict | None = None, state_size: int = 8192,
              status: str | None = None, options: dict | None = None, curve: list | None = None, d_model=64,
              weight_decay: float | None = None, task: dict | None = None, suite: str | None = None,
              **extra) -> Path:
    """A result.json as train() writes it; `status` None leaves the key out (results from before statuses);
    `curve` [(step, val_acc), ...] becomes logs/metrics.csv; `weight_decay` and `suite` (None: left out) and
    `task` (None: MQAR_K4) go into the config."""
    mixer_options = {"num_heads": 1, **(options or {})}
    if mixer == "mom":
        mixer_options = {"num_memories": 4, "top_k": 2, "shared_memory": True, "rule": "gated_deltanet",
                         **mixer_options}
    result = {
        "config": {"name": "grid", "output_root": "x", "seed": seed, "optim": {"lr": lr, "warmup_ratio": 0.05},
                   "model": {"mixer": mixer, "d_model": d_model, "mixer_options": mixer_options},
                   "callbacks": {"early_stopping": {"threshold": 0.99}},
                   "task": task or MQAR_K4, **({"suite": suite} if suite else {})},
        "best_val_acc": val, "test_acc": test, "test_acc_per_slice": slices or {},
        "state_size": state_size, "num_parameters": 1000, "wall_time_s": 1.0, "epochs": 1, "steps": 1000,
        "router": {}, **extra,
    }
    if weight_decay is not None:
        result["config"]["optim"]["weight_decay"] = weight_decay
    if status is not None:
        result["status"] = status
    run_dir = folder / name
    run_dir.mkdir(parents=True)
    (run_dir / "result.json").write_text(json.dumps(result))
    if curve:
        (run_dir / "logs").mkdir()
        lines = ["epoch,step,train/loss,val/acc", *(f"0,{s},1.0," for s, _ in curve),
                 *(f"0,{s},,{a}" for s, a in curve)]
        (run_dir / "logs" / "metrics.csv").write_text("\n".join(lines) + "\n")
    return run_dir


def table_lines(markdown: str, heading: str) -> list[list[str]]:
    """The cells of the lines of the table in the section whose heading starts with `heading` (header left out)."""
    section = markdown.split(f"## {heading}")[1].split("\n## ")[0]
    return [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| model")]


def summary_lines(markdown: str) -> list[list[str]]:
    return table_lines(markdown, "Test accuracy")


def column(markdown: str, name: str) -> int:
    section = markdown.split("## Test accuracy")[1]
    header = next(line for line in section.splitlines() if line.startswith("| model"))
    return [c.strip() for c in header.strip("|").split("|")].index(name)


@pytest.fixture
def fixture_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "grid"
    runs = [("attention", 0, 1.0, 0.98, 16384), ("attention", 1, 1.0, 0.96, 16384),
            ("gated_deltanet", 0, 0.9, 0.5, 8192), ("gated_deltanet", 1, 0.8, 0.4, 8192), ("mom", 0, 1.0, 0.9, 40960)]
    for i, (mixer, seed, a4, a8, size) in enumerate(runs):
        router = {f"layer{layer}/load_m{m}": (0.4, 0.3, 0.2, 0.1)[m] for layer in range(2) for m in range(4)}
        write_run(folder, f"run{i}", mixer, seed, val=(a4 + a8) / 2, test=(a4 + a8) / 2, state_size=size,
                  slices={"num_kv_pairs=4": a4, "num_kv_pairs=8": a8}, router=router if mixer == "mom" else {})
    study = optuna.create_study(study_name="routing", direction="maximize", storage=f"sqlite:///{folder / 'study.db'}",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("lr", 1e-4, 1e-2, log=True) * 10 + t.suggest_int("m", 1, 8) / 100,
                   n_trials=12)
    failing = study.ask()
    failing.set_user_attr("fail_reason", "RuntimeError: out of memory")
    study.tell(failing, state=optuna.trial.TrialState.FAIL)
    return folder


def test_report_files(fixture_folder: Path):
    files = report(fixture_folder)
    rows = list(csv.DictReader(open(files["csv"])))
    assert len(rows) == 5
    assert {"status", "config.model.mixer", "test_acc", "test_acc/num_kv_pairs=8", "state_size"} <= set(rows[0])
    markdown = files["markdown"].read_text()
    # attention over two seeds: test acc 0.99 and 0.98, half-width t(1) * stdev / sqrt(2) = 12.706 * 0.00707 / 1.414;
    # at K = 8: 0.98 and 0.96, half-width 12.706 * 0.01414 / 1.414
    # at K = 4 both are 1.0: an interval of width 0, shown (a single seed shows none)
    # still rising: seed 0 reached the 0.99 threshold (validation 0.99), seed 1 (0.98) has no curve to tell
    assert ("| attention | 0.003 | 2 | 2 finished | 0 of 2 | 0 of 1 (? 1) | 0.985 ± 0.064 | 1.000 ± 0.000 "
            "| 0.970 ± 0.127 | 16384 |") in markdown
    assert f"plus {CHANCE_MARGIN} (1 - c)" in markdown and f"more than {FLAT_RISE}" in markdown
    assert "1 fail" in markdown and "out of memory" in markdown
    for key in ("state_size_png", "pairs_png", "load_png", "study_routing_history", "study_routing_importance"):
        assert files[key].read_bytes()[:8] == PNG_MAGIC, key


def test_a_study_whose_trials_all_tie_has_no_importance_plot(tmp_path):
    """Every trial at one value (all at chance, or all at the early-stopping threshold): the importances came out
    equal, and were plotted as if each parameter mattered as much as the others."""
    study = optuna.create_study(study_name="flat", direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: 0 * t.suggest_float("lr", 1e-4, 1e-2, log=True) + 0 * t.suggest_int("m", 1, 8) + 0.5,
                   n_trials=12)
    markdown, plots = study_section(study, tmp_path)
    assert [p.name for p in plots] == ["study_flat_history.png"] and "importance" not in markdown


def test_a_running_trial_says_what_its_runs_recorded(tmp_path):
    """A sweep interrupted (or its worker killed) leaves its trial RUNNING until the study's next command: the
    report counted it as running, as if it trained, and said nothing more. Each running trial's line says what its
    run recorded."""
    study = optuna.create_study(study_name="stopped", direction="maximize")
    study.optimize(lambda t: t.suggest_float("lr", 1e-4, 1e-2, log=True), n_trials=1)
    for name, status in (("0001", "interrupted"), ("0002", None)):
        trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
        trial.set_user_attr("run_dir", str(tmp_path / "trials" / name))
        if status:
            write_run(tmp_path / "trials", name, status=status, status_reason="SIGTERM at step 20")
    markdown, _ = study_section(study, tmp_path)
    assert "3 trials: 2 running, 1 complete." in markdown
    assert ("- trial 1 running: not training: its run recorded interrupted (SIGTERM at step 20); the study's next "
            "command fails it and runs it again") in markdown
    assert "- trial 2 running: training, or its worker was killed before its run recorded anything" in markdown


def test_a_study_with_seeds_shows_each_seed_behind_the_best_mean(tmp_path):
    study = optuna.create_study(study_name="seeds", direction="maximize")
    study.set_user_attr("definition", {"seeds": [0, 1]})
    for accs in ((0.9, 0.1), (0.2, 0.3)):
        trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)})
        trial.set_user_attr("runs", {f"seed{s}": {"best_val_acc": a} for s, a in enumerate(accs)})
        study.tell(trial, sum(accs) / 2)
    markdown, _ = study_section(study, tmp_path)
    assert "Each trial trained at seeds [0, 1]; its values are the means over them." in markdown
    assert "best val acc per seed" in markdown and "| 0.5 |" in markdown and "0.900, 0.100 |" in markdown


def test_memory_load_plot_takes_content_loads_where_every_run_has_them():
    """Runs record loads over every position and, since the content loads, over their tasks' tokens: the plot
    ranks the content loads, unless one of its runs (an older one) has only the others."""
    both = {f"router/layer0/{kind}{m}": value for kind, values in (("load_m", (0.1, 0.5, 0.4)),
                                                                   ("content_load_m", (0.3, 0.3, 0.4)))
            for m, value in enumerate(values)}
    older = {key: value for key, value in both.items() if "content" not in key}
    assert memory_loads(both, "content_load_m") == {"layer0": [0.4, 0.3, 0.3]}
    assert memory_loads(both) == {"layer0": [0.5, 0.4, 0.1]}
    assert load_kind([both, both]) == "content_load_m" and load_kind([both, older]) == "load_m"


def test_mean_ci():
    mean, half = mean_ci([0.5])
    assert mean == 0.5 and math.isnan(half)  # one value has no interval
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(T95_DOF2 * 1.0 / 3 ** 0.5, rel=1e-4)
    assert mean_ci([0.7, 0.7]) == (0.7, 0.0)


@pytest.mark.parametrize("dof,t", [(1, 12.7062), (2, 4.3027), (5, 2.5706), (11, 2.2010), (13, 2.1604),
                                   (24, 2.0639), (31, 2.0395), (60, 2.0003), (1000, 1.9623)])
def test_t95_is_student_s_two_sided_critical_value(dof, t):
    assert t95(dof) == pytest.approx(t, abs=1e-4)


def test_report_cli_errors(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert main([str(tmp_path)]) == 2
    assert "no readable result.json" in capsys.readouterr().err


def test_unreadable_files_are_named_skipped_and_the_rest_reported(tmp_path, capsys):
    good = write_run(tmp_path, "good", test=0.7)
    text = (good / "result.json").read_text()
    bad = {"truncated": text[: len(text) // 2], "empty": "", "empty-object": "{}", "list": "[1, 2]",
           "no-model": json.dumps({"config": {"seed": 0}, "test_acc": 0.5, "best_val_acc": 0.5}),
           "text-metric": text.replace('"test_acc": 0.7', '"test_acc": "high"'),
           "finished-nan": text.replace('"test_acc": 0.7', '"test_acc": NaN'),
           "not-utf8": b"\xff\xfe\x00garbage",
           **{f"status-{name}": text.replace('"test_acc": 0.7', f'"test_acc": 0.7, "status": {status}')
              for name, status in (("unknown", '"weird"'), ("number", "3"), ("null", "null"))}}
    for name, content in bad.items():
        path = tmp_path / name / "result.json"
        path.parent.mkdir()
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "study.db").write_bytes(b"not a database " * 300)
    (tmp_path / "empty_db").mkdir()
    (tmp_path / "empty_db" / "study.db").write_bytes(b"")
    (tmp_path / "folder_db" / "study.db").mkdir(parents=True)
    (tmp_path / "other_db").mkdir()
    with sqlite3.connect(tmp_path / "other_db" / "study.db") as other:  # an SQLite database, not Optuna's
        other.execute("CREATE TABLE notes (text)")
    other.close()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    assert main([str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    warnings = err.strip().splitlines()
    names = [*bad, "corrupt", "empty_db", "folder_db", "other_db"]
    assert len(warnings) == len(names)
    for name in names:
        assert any(f"/{name}/" in line and "skipped" in line for line in warnings), name
    valid = "valid: finished, diverged, not_trained, pruned, interrupted, failed (absent: finished)"
    for value in ("'weird'", "3", "None"):
        assert any(f"skipped: status={value} is not a status; {valid}" in line for line in warnings), value
    assert any("/folder_db/study.db skipped: a folder, not a database file" in line for line in warnings)
    assert any("/other_db/study.db skipped: an SQLite database without Optuna's tables" in line for line in warnings)
    assert sum("skipped: empty file" in line for line in warnings) == 2  # the empty result.json and study.db
    assert all(p.read_bytes() == content for p, content in before.items())  # the study.db files too
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [row["run_dir"] for row in rows] == [str(good)]
    markdown = (tmp_path / "report.md").read_text()
    assert f"{len(names)} files skipped" in markdown and "/truncated/result.json" in markdown


def test_only_unreadable_files_is_one_error_line(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "result.json").write_text('{"config": ')
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "skipped" in err[0] and err[1].startswith("sandbox-report: error:")
    assert "1 skipped" in err[1]


def test_status_is_shown_and_only_finished_runs_are_averaged(tmp_path):
    write_run(tmp_path, "s0", seed=0, test=0.8, status="finished")
    write_run(tmp_path, "s1", seed=1, test=0.6)  # no status: a result from before statuses, finished
    write_run(tmp_path, "s2", seed=2, test=0.0, val=0.0, status="diverged", status_reason="loss nan at step 40")
    write_run(tmp_path, "s3", seed=3, test=None, val=None, status="interrupted")
    for seed in range(2):
        write_run(tmp_path, f"gla{seed}", mixer="gla", seed=seed, test=0.0, val=0.0, status="diverged")
    files = report(tmp_path)
    markdown = files["markdown"].read_text()
    lines = {cells[0]: cells for cells in summary_lines(markdown)}
    status, runs, acc = column(markdown, "status"), column(markdown, "runs"), column(markdown, "test_acc")
    assert lines["gated_deltanet"][status] == "2 finished, 1 diverged, 1 interrupted"
    assert lines["gated_deltanet"][runs] == "2 (+ 1 diverged, 1 interrupted)"
    assert lines["gated_deltanet"][acc].startswith(f"{statistics.fmean([0.8, 0.6]):.3f} ± ")
    assert lines["gla"][status] == "2 diverged" and lines["gla"][acc] == "—"
    assert "loss nan at step 40" in markdown.split("## Runs that did not finish")[1]
    statuses = {row["run_dir"]: row["status"] for row in csv.DictReader(open(files["csv"]))}
    assert statuses[str(tmp_path / "s1")] == "finished" and statuses[str(tmp_path / "s3")] == "interrupted"


def test_the_chosen_setting_s_seeds_that_did_not_finish_are_named_beside_its_mean(tmp_path):
    """Every rate has a seed that diverged, so the choice is among them: the mean at 1e-3 is over its two finished
    seeds, and its third, diverged, was told only in `status`, mixed with the other rate's."""
    for seed in range(3):
        write_run(tmp_path, f"a{seed}", seed=seed, lr=1e-3, val=0.9, test=0.9, status="diverged" if seed == 2 else None)
        write_run(tmp_path, f"b{seed}", seed=seed, lr=3e-3, val=0.5, test=0.5, status="diverged" if seed == 1 else None)
    write_run(tmp_path, "a3", seed=3, lr=1e-3, val=None, test=None, status="failed")
    markdown = report(tmp_path)["markdown"].read_text()
    (cells,) = summary_lines(markdown)
    assert cells[column(markdown, "lr")].startswith("0.001 ")
    assert cells[column(markdown, "runs")] == "2 (+ 1 diverged, 1 failed)"
    assert cells[column(markdown, "status")] == "4 finished, 2 diverged, 1 failed"


def test_a_slice_mean_over_fewer_seeds_than_the_row_says_so(tmp_path):
    """Seed 2's test split held no K = 8 example: the K = 8 mean is over two seeds, not the three of `runs`."""
    for seed in range(3):
        slices = {"num_kv_pairs=4": 0.9, **({} if seed == 2 else {"num_kv_pairs=8": 0.8}),
                  "num_kv_pairs=16": 0.7}
        write_run(tmp_path, f"s{seed}", seed=seed, slices=slices)
    markdown = report(tmp_path)["markdown"].read_text()
    (cells,) = summary_lines(markdown)
    assert cells[column(markdown, "runs")] == "3"
    assert cells[column(markdown, "num_kv_pairs=8")] == "0.800 ± 0.000 (2 of 3 seeds)"
    assert cells[column(markdown, "num_kv_pairs=4")] == "0.900 ± 0.000"


def test_results_csv_says_how_many_runs_shared_a_stacked_run_s_wall_time(tmp_path):
    write_run(tmp_path, "alone", seed=0)
    write_run(tmp_path, "stacked", seed=1, stack={"folder": "x/.stacks/abc", "runs": 4})
    report(tmp_path, tmp_path / "out")
    with open(tmp_path / "out" / "results.csv") as f:
        rows = {Path(r["run_dir"]).name: r for r in csv.DictReader(f)}
    assert rows["alone"]["stacked_with"] == "1" and rows["stacked"]["stacked_with"] == "4"


def test_runs_differing_in_an_added_key_are_separate_rows(tmp_path):
    for seed in range(2):
        write_run(tmp_path, f"plain{seed}", seed=seed, test=0.5 + seed / 10)
        write_run(tmp_path, f"expanded{seed}", seed=seed, test=0.9, options={"expand_v": 5}, state_size=40960)
    write_run(tmp_path, "plain2", seed=2, test=0.7, d_model=64.0)  # 64 and 64.0 are one setting
    markdown = report(tmp_path)["markdown"].read_text()
    lines = summary_lines(markdown)
    expand = column(markdown, "expand_v")
    by_expand = {cells[expand]: cells for cells in lines}
    assert len(lines) == 2 and set(by_expand) == {"—", "5"}
    assert by_expand["5"][column(markdown, "runs")] == "2"
    assert by_expand["—"][column(markdown, "runs")] == "3"


def test_state_size_plot_draws_a_configuration_across_its_widths(tmp_path):
    """One series per configuration: its rows at every width, never another configuration's rows, so that a
    line in the state-size plot is one model growing, not a zigzag through variants."""
    for width in (16, 32, 64):
        write_run(tmp_path, f"single{width}", d_model=width, state_size=2 * width * width)
        write_run(tmp_path, f"expanded{width}", d_model=width, options={"expand_v": 5}, state_size=10 * width * width)
        write_run(tmp_path, f"mom{width}", "mom", d_model=width, state_size=10 * width * width)
        write_run(tmp_path, f"noshared{width}", "mom", d_model=width, options={"shared_memory": False},
                  state_size=8 * width * width)
    write_run(tmp_path, "attention16", "attention", d_model=16)
    runs = to_runs(collect_results(tmp_path, on_skip=print))
    series = width_series(make_rows(runs), runs)
    assert len(series) == 5
    widths = {name: sorted(row.values["config.model.d_model"] for row in rows) for name, rows in series.items()}
    assert sorted(widths.values()) == [[16], [16, 32, 64], [16, 32, 64], [16, 32, 64], [16, 32, 64]]
    for rows in series.values():
        assert len({(r.label, str(r.values.get("config.model.mixer_options.expand_v"))) for r in rows}) == 1


def drawn_figures(monkeypatch) -> dict:
    """The report's figures by file name, kept open instead of saved."""
    figures = {}
    monkeypatch.setattr("sandbox.report.save_figure", lambda fig, path: figures.__setitem__(Path(path).name, fig))
    return figures


def test_pairs_plot_gives_every_row_its_own_style_as_the_state_size_plot_does(tmp_path, monkeypatch):
    """Twelve configurations (Zoology's models at one width): the pairs plot drew them in matplotlib's ten-colour
    cycle, so attention and the eleventh row shared a colour and marker and a legend entry could not be told
    apart. Each line is now styled as in the state-size plot: unique, and alike in both plots."""
    slices = {"num_kv_pairs=4": 0.9, "num_kv_pairs=8": 0.8}
    for i in range(4):
        write_run(tmp_path, f"gdn{i}", options={"expand_v": i + 1}, slices=slices)
        write_run(tmp_path, f"mom{i}", "mom", options={"num_memories": 2 ** (i + 1)}, slices=slices)
    for mixer in ("attention", "gla", "deltanet", "linear_attention"):
        write_run(tmp_path, mixer, mixer, slices=slices)
    figures = drawn_figures(monkeypatch)
    report(tmp_path)

    def styles(name):
        ax = next(ax for ax in figures[name].axes if ax.get_legend_handles_labels()[1])
        return {label: (handle[0].get_color(), handle[0].get_marker(), handle[0].get_linestyle())
                for handle, label in zip(*ax.get_legend_handles_labels())}

    pairs = styles("accuracy_vs_kv_pairs.png")
    assert len(pairs) == 12 and len(set(pairs.values())) == 12
    assert pairs == styles("accuracy_vs_state_size.png")


def test_plots_name_every_optimiser_key_chosen_on_validation(tmp_path, monkeypatch):
    """Learning rate x weight decay chosen per row: the plots' axes said `chosen lr`, as if the weight decay were
    one for all."""
    router = {f"layer0/load_m{m}": 0.25 for m in range(4)}
    for lr, wd in itertools.product((1e-3, 3e-3), (0.0, 0.1)):
        write_run(tmp_path, f"{lr}-{wd}", "mom", lr=lr, weight_decay=wd, router=router,
                  slices={"num_kv_pairs=4": 0.9, "num_kv_pairs=8": 0.8})
    figures = drawn_figures(monkeypatch)
    report(tmp_path)
    for name in ("accuracy_vs_state_size.png", "accuracy_vs_kv_pairs.png"):
        assert figures[name].axes[0].get_ylabel() == "test accuracy (chosen lr, weight_decay, mean ± 95%)"
    assert "at the chosen lr, weight_decay," in figures["memory_load.png"]._suptitle.get_text()


def test_learning_rate_is_chosen_on_validation_not_test(tmp_path):
    """At 1e-3 validation is best and test is not; 3e-3 would win on test; 1e-2 has the best validation
    mean over its finished runs but one of its runs diverged; at 3e-4 two runs never left chance."""
    grid = {3e-4: [(0.002, 0.001), (0.004, 0.002), (0.5, 0.4)],
            1e-3: [(0.90, 0.50), (0.92, 0.55), (0.88, 0.60)],
            3e-3: [(0.80, 0.95), (0.82, 0.96), (0.78, 0.97)],
            1e-2: [(0.97, 0.99), (0.98, 0.99), None]}
    for lr, seeds in grid.items():
        for seed, outcome in enumerate(seeds):
            if outcome is None:
                write_run(tmp_path, f"lr{lr}-s{seed}", seed=seed, lr=lr, val=0.0, test=0.0, status="diverged")
            else:
                val, test = outcome
                write_run(tmp_path, f"lr{lr}-s{seed}", seed=seed, lr=lr, val=val, test=test,
                          slices={"num_kv_pairs=16": test, "num_kv_pairs=64": test / 2})
    files = report(tmp_path)
    markdown = files["markdown"].read_text()
    (cells,) = summary_lines(markdown)
    chosen = [test for _, test in grid[1e-3]]
    half = T95_DOF2 * statistics.stdev(chosen) / math.sqrt(len(chosen))
    assert cells[column(markdown, "lr")] == "0.001 (best of 4)"
    assert cells[column(markdown, "runs")] == "3"
    assert cells[column(markdown, "status")] == "11 finished, 1 diverged"
    assert cells[column(markdown, "at chance")] == "2 of 11"
    assert cells[column(markdown, "test_acc")] == f"{statistics.fmean(chosen):.3f} ± {half:.3f}"
    assert cells[column(markdown, "num_kv_pairs=64")] == f"{statistics.fmean(chosen) / 2:.3f} ± {half / 2:.3f}"
    sensitivity = list(csv.DictReader(open(files["lr_csv"])))
    assert [(float(row["lr"]), row["chosen"]) for row in sensitivity] == [
        (3e-4, "False"), (1e-3, "True"), (3e-3, "False"), (1e-2, "False")]
    assert float(sensitivity[3]["best_val_acc"]) == pytest.approx(statistics.fmean([0.97, 0.98]))
    assert sensitivity[3]["status"] == "2 finished, 1 diverged"
    assert "## Validation accuracy per learning rate" in markdown


def test_curves_still_rising_at_the_end_are_counted(tmp_path):
    steps = list(range(100, 1001, 100))
    write_run(tmp_path, "rising", seed=0, val=0.6, curve=[(s, 0.1 + 0.5 * (s >= 900)) for s in steps])
    write_run(tmp_path, "flat", seed=1, val=0.6, curve=[(s, 0.6 - 0.5 * (s < 300)) for s in steps])
    write_run(tmp_path, "reached", seed=2, val=0.995, curve=[(s, 0.2 + 0.795 * (s == 1000)) for s in steps])
    write_run(tmp_path, "no-curve", seed=3, val=0.6)
    # its result reached the threshold, its curve lost the rows after step 700 (a resumed run, docs/results/
    # zoology_6000_steps/d256's M2): it stopped rising, which its result says, not `?`
    write_run(tmp_path, "reached-rows-lost", seed=4, val=1.0, curve=[(s, 0.2 + 0.6 * (s == 700)) for s in steps[:7]])
    files = report(tmp_path)
    rising = {Path(row["run_dir"]).name: row["still_rising"] for row in csv.DictReader(open(files["csv"]))}
    assert rising == {"rising": "True", "flat": "False", "reached": "False", "no-curve": "",
                      "reached-rows-lost": "False"}
    markdown = files["markdown"].read_text()
    (cells,) = summary_lines(markdown)
    # the seed without a curve is counted as `?`, as `at chance` counts one it cannot tell (it was left out unseen)
    assert cells[column(markdown, "still rising")] == "1 of 4 (? 1)"


def test_learning_rate_and_weight_decay_are_chosen_together_on_validation(tmp_path):
    """MAD's grid: (lr 1e-3, wd 0.1) has the best validation mean, (1e-3, 0.0) the best test accuracy; a choice
    over the learning rate alone would average the two."""
    grid = {(1e-4, 0.0): [(0.30, 0.30), (0.32, 0.31)], (1e-4, 0.1): [(0.40, 0.42), (0.38, 0.40)],
            (1e-3, 0.0): [(0.80, 0.99), (0.82, 0.98)], (1e-3, 0.1): [(0.90, 0.85), (0.92, 0.83)]}
    for (lr, wd), seeds in grid.items():
        for seed, (val, test) in enumerate(seeds):
            write_run(tmp_path, f"lr{lr}-wd{wd}-s{seed}", seed=seed, lr=lr, weight_decay=wd, val=val, test=test)
    files = report(tmp_path)
    markdown = files["markdown"].read_text()
    (cells,) = summary_lines(markdown)
    chosen = [test for _, test in grid[(1e-3, 0.1)]]
    assert cells[column(markdown, "lr, weight_decay")] == "0.001, 0.1 (best of 4)"
    assert cells[column(markdown, "runs")] == "2"
    assert cells[column(markdown, "test_acc")].startswith(f"{statistics.fmean(chosen):.3f} ± ")
    sensitivity = list(csv.DictReader(open(files["lr_csv"])))
    assert [(float(r["lr"]), float(r["weight_decay"]), r["chosen"]) for r in sensitivity] == [
        (lr, wd, str((lr, wd) == (1e-3, 0.1))) for lr, wd in grid]
    assert "## Validation accuracy per learning rate and weight decay" in markdown


def mad_task(name: str, vocab_size: int) -> dict:
    return {"name": name, "params": {"vocab_size": vocab_size, "seq_len": 64},
            "segments": {"train": [{"num_examples": 100}], "test": [{"num_examples": 50}]}}


def write_mad_grid(folder: Path, settings: list[tuple[str, int]], mixers: list[str], diverged=()) -> dict:
    """Two seeds of every setting x mixer x (lr, wd) in MAD's grid, with drawn accuracies; the (setting, mixer)
    pairs in `diverged` only diverge. Returns, per (task, mixer), each setting's test accuracy at the pair with
    the best validation mean, recomputed here."""
    draw = random.Random(0)
    expected = defaultdict(list)
    for name, vocab in settings:
        for mixer in mixers:
            results = {}
            for lr, wd in itertools.product([1e-4, 5e-4, 1e-3], [0.0, 0.1]):
                results[lr, wd] = [(draw.random(), draw.random()) for _ in range(2)]
                for seed, (val, test) in enumerate(results[lr, wd]):
                    failed = (name, vocab, mixer) in diverged
                    write_run(folder, f"{name}-v{vocab}-{mixer}-lr{lr}-wd{wd}-s{seed}", mixer, seed, lr=lr,
                              weight_decay=wd, val=0.0 if failed else val, test=0.0 if failed else test,
                              status="diverged" if failed else "finished", task=mad_task(name, vocab),
                              suite="mad", state_size=1000 * vocab if mixer == "attention" else 8192)
            if (name, vocab, mixer) not in diverged:
                best = max(results.values(), key=lambda seeds: statistics.fmean(val for val, _ in seeds))
                expected[name, mixer].append(statistics.fmean(test for _, test in best))
    return expected


def mad_lines(markdown: str) -> dict[str, dict[str, str]]:
    """The MAD score table: per model, its cells by column name."""
    section = markdown.split("## MAD: one score")[1].split("\n## ")[0].split("###")[0]
    lines = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("| ")]
    header, *body = lines
    return {cells[0]: dict(zip(header, cells)) for cells in body}


def test_mad_score_is_the_mean_over_settings_at_each_settings_chosen_pair(tmp_path):
    settings = [("mqar", 16), ("mqar", 32), ("noisy_ar", 32)]
    expected = write_mad_grid(tmp_path, settings, ["attention", "gated_deltanet"],
                              diverged={("mqar", 32, "gated_deltanet")})
    files = report(tmp_path)
    table = mad_lines(files["markdown"].read_text())
    assert set(table) == {"attention", "gated_deltanet"}
    # each task's column says how many of its settings the runs hold, so a partial grid is not read as MAD's score
    assert table["attention"]["mqar (2 settings)"] == f"{statistics.fmean(expected['mqar', 'attention']):.3f}"
    assert table["attention"]["noisy_ar (1 setting)"] == f"{statistics.fmean(expected['noisy_ar', 'attention']):.3f}"
    (alone,) = expected["mqar", "gated_deltanet"]  # its other setting only diverged
    assert table["gated_deltanet"]["mqar (2 settings)"] == f"{alone:.3f} (1 of 2)"
    assert table["attention"]["state size"] == "16000–32000" and table["gated_deltanet"]["state size"] == "8192"
    scores = {(r["task"], r["model"]): r for r in csv.DictReader(open(files["mad_csv"]))}
    assert len(scores) == 4
    for (task, mixer), accuracies in expected.items():
        record = scores[task, mixer]
        assert float(record["score"]) == pytest.approx(statistics.fmean(accuracies))
        assert int(record["settings_scored"]) == len(accuracies)
    assert files["mad_png"].read_bytes()[:8] == PNG_MAGIC
    sensitivity = list(csv.DictReader(open(files["lr_csv"])))
    assert len(sensitivity) == len(settings) * 2 * 6 and sum(r["chosen"] == "True" for r in sensitivity) == 5


def test_mad_section_appears_only_with_mad_runs_and_keeps_them_out_of_the_other_tables(tmp_path):
    for seed in range(2):
        write_run(tmp_path, f"zoology-s{seed}", seed=seed, test=0.5)
    markdown = report(tmp_path)["markdown"].read_text()
    assert "## MAD" not in markdown and not (tmp_path / "mad_scores.csv").exists()
    write_mad_grid(tmp_path / "mad", [("mqar", 16)], ["attention"])
    files = report(tmp_path)
    markdown = files["markdown"].read_text()
    assert "## MAD: one score per task and model" in markdown and files["mad_png"].exists()
    (cells,) = summary_lines(markdown)  # the MQAR table holds the one configuration outside MAD's suite
    assert cells[column(markdown, "runs")] == "2"
    assert set(mad_lines(markdown)) == {"attention"}


def test_experiment_mad_sweeps_distinct_valid_settings():
    """Every task the sweep's glob picks composes under experiment=mad, is a valid task setting, and no two
    are the same setting."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        sweep = compose(config_name="train", overrides=["experiment=mad"], return_hydra_config=True).hydra.sweeper
        task_glob = OverridesParser.create().parse_override(f"task={sweep.params.task}").value()
        names = task_glob.filter([p.stem for p in (CONF_DIR / "task").glob("*.yaml")])
        assert {"mad_recall", "mad_fuzzy", "mad_noisy", "mad_copy", "mad_memorize", "parity", "s5"} <= set(names)
        settings = set()
        for name in names:
            cfg = compose(config_name="train", overrides=["experiment=mad", f"task={name}"])
            task = OmegaConf.to_container(cfg.task, resolve=True)
            for segment in (s for split in task["segments"].values() for s in split):
                resolve_task(task["name"], {**task["params"], **{k: v for k, v in segment.items()
                                                                  if k != "num_examples"}})
            settings.add(json.dumps([task["name"], task["params"], task["segments"]], sort_keys=True))
            assert cfg.suite == "mad", name
    assert len(settings) == len(names)


def test_experiment_mad_multirun_of_one_cut_down_job_is_scored(tmp_path):
    swept = ["task=mad_recall", "model=attention", "optim.lr=1e-3", "optim.weight_decay=0.0", "seed=0"]
    proc = subprocess.run([sys.executable, "-m", "sandbox.train", "-m", "experiment=mad", *swept, "debug=fast",
                           "model.n_layers=1", "callbacks.progress=none", f"output_root={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list((tmp_path / "mad").rglob("result.json"))) == 1
    table = mad_lines(report(tmp_path / "mad")["markdown"].read_text())
    assert list(table) == ["attention"] and table["attention"]["mqar (1 setting)"] != "—"


def test_a_configuration_run_twice_counts_once(tmp_path, capsys):
    for seed in range(3):
        write_run(tmp_path / "grid", f"s{seed}", seed=seed, test=0.5 + 0.1 * seed)
    # seed 0 again: in another folder, and under another experiment name (not part of what a run is), older
    for name, test in (("again", 0.1), ("probe", 0.2)):
        copy = write_run(tmp_path / name, "s0", seed=0, test=test)
        result = json.loads((copy / "result.json").read_text())
        result["config"]["name"] = name
        (copy / "result.json").write_text(json.dumps(result))
        os.utime(copy / "result.json", (1e9, 1e9))
    files = report(tmp_path)
    markdown = files["markdown"].read_text()
    (cells,) = summary_lines(markdown)
    assert cells[column(markdown, "runs")] == "3"
    assert cells[column(markdown, "test_acc")].startswith(f"{statistics.fmean([0.5, 0.6, 0.7]):.3f} ± ")
    assert "2 runs counted once" in markdown and f"`{tmp_path / 'again' / 's0'}`: as" in markdown
    assert capsys.readouterr().err.count("counted once") == 2


def test_settings_are_compared_on_the_seeds_they_all_have(tmp_path):
    """1e-3 ran at three seeds, 1e-2 at seed 0 only: on seed 0, 1e-3 validates better (0.9 against 0.8), although
    its mean over three seeds (0.63) is below 1e-2's one seed."""
    for seed, val in enumerate([0.9, 0.5, 0.5]):
        write_run(tmp_path, f"a{seed}", seed=seed, lr=1e-3, val=val, test=val)
    write_run(tmp_path, "b0", seed=0, lr=1e-2, val=0.8, test=0.8)
    markdown = report(tmp_path)["markdown"].read_text()
    (cells,) = summary_lines(markdown)
    assert cells[column(markdown, "lr")] == "0.001 (best of 2 on seed 0)"
    assert cells[column(markdown, "runs")] == "3"


def test_settings_past_the_early_stopping_threshold_tie_and_the_sooner_wins(tmp_path):
    """Every run at 1e-3 and 1e-2 stopped at the 0.99 threshold: 1e-3 crossed it later and further (0.999 at
    step 2000), 1e-2 sooner (0.992 at step 750), so 1e-2 wins; 3e-4 stopped sooner still but short of it."""
    for seed in range(3):
        write_run(tmp_path, f"a{seed}", seed=seed, lr=1e-3, val=0.999, test=0.999, steps=2000)
        write_run(tmp_path, f"b{seed}", seed=seed, lr=1e-2, val=0.992, test=0.99, steps=750)
        write_run(tmp_path, f"c{seed}", seed=seed, lr=3e-4, val=0.985, test=0.985, steps=500)
    markdown = report(tmp_path)["markdown"].read_text()
    (cells,) = summary_lines(markdown)
    assert cells[column(markdown, "lr")] == "0.01 (best of 3; tied with 0.001)"


@pytest.mark.parametrize("seeded_lr", [1e-3, 1e-2])
def test_settings_tied_at_the_threshold_and_in_steps_go_to_the_one_with_more_seeds(seeded_lr, tmp_path):
    """Seed 0 reached the 0.99 threshold at step 500 at both rates; seeds 1 and 2 ran at one of them only (as
    after a first pass on seed 0) and reached it too: that rate wins, whichever sorts first."""
    for lr in (1e-3, 1e-2):
        for seed in range(3 if lr == seeded_lr else 1):
            write_run(tmp_path, f"{lr}-{seed}", seed=seed, lr=lr, val=0.995, test=0.99, steps=500)
    markdown = report(tmp_path)["markdown"].read_text()
    (cells,) = summary_lines(markdown)
    tie = "of those tied there, best on seeds 0, 1, 2"
    assert cells[column(markdown, "lr")] == f"{seeded_lr:g} (best of 2 on seed 0; {tie})"
    assert cells[column(markdown, "runs")] == "3"


def test_settings_tied_on_seed_0_are_told_apart_by_the_seeds_they_share(tmp_path):
    """Four rates on seed 0, two run at seeds 0-2 after that: both reached the threshold on seed 0, 2.2e-3
    sooner, but seed 2 failed at 2.2e-3 and no seed at 1e-2, so 1e-2 wins (on seed 0 alone 2.2e-3 did)."""
    write_run(tmp_path, "a", seed=0, lr=1e-4, val=0.03, test=0.03, steps=3000)
    write_run(tmp_path, "b", seed=0, lr=4.6e-4, val=0.89, test=0.89, steps=3000)
    for seed, (val, steps) in enumerate([(0.992, 1000), (0.97, 3000), (0.26, 3000)]):
        write_run(tmp_path, f"c{seed}", seed=seed, lr=2.2e-3, val=val, test=val, steps=steps)
        write_run(tmp_path, f"d{seed}", seed=seed, lr=1e-2, val=0.993, test=0.99, steps=2000)
    markdown = report(tmp_path)["markdown"].read_text()
    (cells,) = summary_lines(markdown)
    assert cells[column(markdown, "lr")] == "0.01 (best of 4 on seed 0; of those tied there, best on seeds 0, 1, 2)"
    assert cells[column(markdown, "runs")] == "3"


def test_the_chosen_setting_keeps_the_choice_after_its_seeds_over_settings_tied_at_seed_0(tmp_path):
    """Seed 0 reached the threshold at every rate, 1e-2 soonest; 1e-2 then ran seeds 1 and 2 (the protocol's
    second pass), and seed 2 failed. 1e-2 stays chosen, its failure in its row: had each rate been judged on its
    own seeds, the choice would go to a rate run at seed 0 alone, and the row would stand on one seed."""
    write_run(tmp_path, "a0", seed=0, lr=1e-3, val=0.995, test=0.99, steps=1000)
    write_run(tmp_path, "b0", seed=0, lr=3e-3, val=0.995, test=0.99, steps=800)
    for seed, val in enumerate([0.995, 0.995, 0.3]):
        write_run(tmp_path, f"c{seed}", seed=seed, lr=1e-2, val=val, test=val, steps=500)
    markdown = report(tmp_path)["markdown"].read_text()
    (cells,) = summary_lines(markdown)
    assert cells[column(markdown, "lr")] == "0.01 (best of 3 on seed 0; of those tied there, best on seeds 0, 1, 2)"
    assert cells[column(markdown, "runs")] == "3"


def test_settings_that_share_no_seed_are_not_compared_again_on_fewer(tmp_path):
    """No seed is common to all three rates, so each is judged on its own seeds: 1e-3 and 3e-3 tie (both reached
    the threshold on each seed) and share seed 1 only; seed 1 alone is less than each one's seeds, so the tie
    goes on to steps (3e-3 stopped sooner), not to a comparison on seed 1."""
    for seed, steps in ((0, 1000), (1, 1000)):
        write_run(tmp_path, f"a{seed}", seed=seed, lr=1e-3, val=0.995, test=0.99, steps=steps)
    for seed, steps in ((1, 500), (2, 500)):
        write_run(tmp_path, f"b{seed}", seed=seed, lr=3e-3, val=0.995, test=0.99, steps=steps)
    write_run(tmp_path, "c3", seed=3, lr=1e-2, val=0.5, test=0.5)
    markdown = report(tmp_path)["markdown"].read_text()
    (cells,) = summary_lines(markdown)
    assert cells[column(markdown, "lr")] == "0.003 (best of 3; tied with 0.001)"


def test_seeds_far_apart_are_listed_with_the_step_each_left_chance(tmp_path):
    """Three seeds at one rate: two left chance (about 0.29 on MQAR_K4's validation set) by step 250 and
    finished, the third only at step 750 and was still rising at its end: each is listed with that step. A row
    whose seeds agree is not listed."""
    early = [(250, 0.5), (500, 0.95), (750, 0.99), (1000, 0.99)]
    late = [(250, 0.2), (500, 0.25), (750, 0.4), (1000, 0.6)]
    for seed, curve in enumerate([early, early, late]):
        write_run(tmp_path, f"g{seed}", seed=seed, val=curve[-1][1], test=curve[-1][1], curve=curve)
        write_run(tmp_path, f"a{seed}", mixer="attention", seed=seed, val=0.99, test=0.99, curve=early)
    lines = table_lines(report(tmp_path)["markdown"].read_text(), "Seeds apart")
    assert [(cells[0], cells[2], cells[3], cells[4], cells[5]) for cells in lines] == [
        ("gated_deltanet", "0", "0.990", "250", ""), ("gated_deltanet", "1", "0.990", "250", ""),
        ("gated_deltanet", "2", "0.600", "750", "yes")]


def test_seeds_apart_tell_a_run_that_never_left_chance_from_one_without_a_curve(tmp_path):
    write_run(tmp_path, "learned", seed=0, val=0.99, test=0.99)  # no logs/metrics.csv
    write_run(tmp_path, "stuck", seed=1, val=0.2, test=0.2, curve=[(250, 0.2), (500, 0.2), (750, 0.2), (1000, 0.2)])
    lines = table_lines(report(tmp_path)["markdown"].read_text(), "Seeds apart")
    assert [cells[4] for cells in lines] == ["?", "never"]


def test_no_seeds_apart_section_when_seeds_agree(tmp_path):
    for seed in range(3):
        write_run(tmp_path, f"g{seed}", seed=seed, val=0.9 + 0.01 * seed, test=0.9 + 0.01 * seed)
    assert "## Seeds apart" not in report(tmp_path)["markdown"].read_text()


@pytest.mark.parametrize("status, val", [("interrupted", None), ("pruned", 0.95)])
def test_an_interrupted_or_pruned_run_says_nothing_about_its_setting(status, val, tmp_path):
    """Neither is compared nor averaged: a pruned run's best validation accuracy is of the steps before the
    search's pruner stopped it, and is never tested."""
    for seed in range(3):
        ended = seed == 2
        write_run(tmp_path, f"a{seed}", seed=seed, lr=1e-3, val=val if ended else 0.9,
                  test=None if ended else 0.9, status=status if ended else "finished")
        write_run(tmp_path, f"b{seed}", seed=seed, lr=1e-2, val=0.5, test=0.5)
    markdown = report(tmp_path)["markdown"].read_text()
    (cells,) = summary_lines(markdown)
    assert cells[column(markdown, "lr")] == "0.001 (best of 2 on seeds 0, 1)"
    assert cells[column(markdown, "runs")] == f"2 (+ 1 {status})"
    assert cells[column(markdown, "status")] == f"5 finished, 1 {status}"


def test_runs_of_another_precision_or_backend_are_rows_apart(tmp_path):
    """Both ran with precision and backend `auto`: one resolved to bf16 on Triton, the other to float32 on
    PyTorch, which are different computations."""
    write_run(tmp_path, "gpu", seed=0, precision="bf16-mixed", backend="triton", git_commit="abc")
    write_run(tmp_path, "cpu", seed=1, precision="32-true", backend="torch", git_commit="def",
              earlier_git_commits=["abc"])  # resumed: its first segment ran at abc
    markdown = report(tmp_path)["markdown"].read_text()
    lines = summary_lines(markdown)
    assert len(lines) == 2
    assert sorted(cells[column(markdown, "precision")] for cells in lines) == ["32-true", "bf16-mixed"]
    assert "Runs of several commits" in markdown and "`abc`: 2 runs" in markdown and "`def`: 1 runs" in markdown


def test_accuracies_that_are_not_accuracies_are_skipped(tmp_path, capsys):
    write_run(tmp_path, "good", seed=0)
    write_run(tmp_path, "bool", seed=1, test=True)
    write_run(tmp_path, "above-one", seed=2, test=1.7)
    write_run(tmp_path, "nan-slice", seed=3, slices={"num_kv_pairs=4": 0.5, "num_kv_pairs=8": float("nan")})
    write_run(tmp_path, "negative-slice", seed=4, slices={"num_kv_pairs=4": -0.1})
    write_run(tmp_path, "past-train", seed=5, test_acc_past_train_per_slice={"seq_len=64": 1.5})
    assert main([str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "test_acc=True is not a number" in err and "test_acc=1.7 is not an accuracy in [0, 1]" in err
    assert "status finished but test_acc_per_slice['num_kv_pairs=8']=nan" in err
    assert "test_acc_per_slice['num_kv_pairs=4']=-0.1 is not an accuracy" in err
    assert "test_acc_past_train_per_slice['seq_len=64']=1.5 is not an accuracy" in err
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [Path(row["run_dir"]).name for row in rows] == ["good"]


@pytest.mark.parametrize("key, value, warning", [  # a result.json edited by hand or written by another version
    ("stack", [2], "stack=[2] is not a mapping"),
    ("earlier_git_commits", 3, "earlier_git_commits=3 is not a list of strings"),
    ("git_commit", ["abc"], "git_commit=['abc'] is not a string"),
    ("steps", "many", "steps='many' is not a finite number >= 0"),
    ("steps", math.inf, "steps=inf is not a finite number >= 0"),  # was a traceback when it ranked a tie
    ("router", {"layer0/load_m0": math.inf}, "status finished but router['layer0/load_m0']=inf"),  # traceback too
    ("router", {"layer0/load_m0": math.nan}, "status finished but router['layer0/load_m0']=nan"),  # dropped out
    ("state_size", -1, "state_size=-1 is not a finite number >= 1"),  # was a log-scale warning from matplotlib
    ("state_size", math.inf, "state_size=inf is not a finite number >= 1"),  # was left out of the plot silently
    ("config.model.mixer_options", "x", "config.model.mixer_options='x' is not a mapping"),
    ("config.callbacks.early_stopping", "on", "config.callbacks.early_stopping='on' is not a mapping"),
    ("config.callbacks.early_stopping.threshold", "high",
     "config.callbacks.early_stopping.threshold='high' is not a number"),
])
def test_a_result_field_of_another_type_is_skipped_not_a_traceback(key, value, warning, tmp_path, capsys):
    write_run(tmp_path, "good", seed=0)
    path = write_run(tmp_path, "odd", seed=1) / "result.json"
    result = json.loads(path.read_text())
    *parents, last = key.split(".")
    node = result
    for part in parents:
        node = node[part]
    node[last] = value
    path.write_text(json.dumps(result))
    assert main([str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert err == f"sandbox-report: warning: {path} skipped: {warning}\n"
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [Path(row["run_dir"]).name for row in rows] == ["good"]


def test_run_folders_without_a_result_are_named(tmp_path, capsys):
    write_run(tmp_path, "good", seed=0)
    for folder in ("killed/checkpoints", ".stacks/abc/checkpoints", "logs-only/logs"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "logs-only" / "logs" / "metrics.csv").write_text("step,val/acc\n")
    markdown = report(tmp_path)["markdown"].read_text()
    assert "2 run folders without a result" in markdown
    assert f"`{tmp_path / 'killed'}`" in markdown and f"`{tmp_path / 'logs-only'}`" in markdown
    assert ".stacks" not in markdown  # a stack's own folder holds its checkpoint, its runs hold their results
    assert capsys.readouterr().err.count("without a result.json") == 2


def test_a_result_older_than_its_metrics_log_is_named(tmp_path, capsys):
    """A result.json of step 1000 beside a metrics.csv that logged validations up to step 3000 is an earlier
    segment's: a later one ran (killed, or still running) without writing its own; the report reads that result
    as the run's end, and said nothing."""
    write_run(tmp_path, "current", seed=0, curve=[(500, 0.5), (999, 0.9)])
    write_run(tmp_path, "behind", seed=1, curve=[(500, 0.5), (999, 0.9), (2000, 0.95), (3000, 0.97)])
    markdown = report(tmp_path)["markdown"].read_text()
    assert f"`{tmp_path / 'behind'}`: result of step 1000, metrics.csv logged up to step 3000" in markdown
    assert "current" not in markdown.split("Results older than their metrics.csv")[1].split("\n\n", 2)[1]
    assert capsys.readouterr().err.count("older than its logs/metrics.csv") == 1


def test_an_earlier_report_s_files_that_this_one_does_not_make_are_removed(tmp_path):
    """A report of MoM, MAD and a study into a folder, then one of attention runs alone into it: the memory-load,
    K and MAD plots, mad_scores.csv and the study's plot of the first stayed beside the second's report.md, with
    data that is not its tables'. Other files there are kept."""
    first, second, out = tmp_path / "first", tmp_path / "second", tmp_path / "out"
    router = {f"layer0/load_m{m}": 0.25 for m in range(4)}
    slices = {"num_kv_pairs=4": 0.9, "num_kv_pairs=8": 0.8}
    for seed in range(2):
        write_run(first, f"mom{seed}", "mom", seed=seed, router=router, slices=slices)
        write_run(first, f"mad{seed}", seed=seed, suite="mad", task=mad_task("mqar", 16))
        write_run(second, f"attention{seed}", "attention", seed=seed)
    study = optuna.create_study(study_name="s", direction="maximize", storage=f"sqlite:///{first / 'study.db'}")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    out.mkdir()
    (out / "notes.md").write_text("mine")
    earlier = report(first, out)
    assert {"load_png", "pairs_png", "mad_png", "mad_csv", "study_s_history"} <= set(earlier)
    files = report(second, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(["notes.md", *(p.name for p in files.values())])
    assert (out / "notes.md").read_text() == "mine"


def test_a_slice_of_pairs_that_is_not_a_whole_number_stays_out_of_the_pairs_plot(tmp_path, capsys):
    """A hand-edited slice `num_kv_pairs=four` stopped the report with `invalid literal for int()` (exit 2, no file
    named), after results.csv was rewritten and before report.md was."""
    for seed in range(2):
        write_run(tmp_path, f"s{seed}", seed=seed, slices={"num_kv_pairs=4": 0.9, "num_kv_pairs=8": 0.8,
                                                           **({"num_kv_pairs=four": 0.7} if seed else {})})
    assert main([str(tmp_path)]) == 0
    assert "error" not in capsys.readouterr().err
    markdown = (tmp_path / "report.md").read_text()
    assert column(markdown, "num_kv_pairs=four") and (tmp_path / "accuracy_vs_kv_pairs.png").exists()


def test_at_chance_is_measured_from_the_validation_set_s_chance(tmp_path):
    """0.2 on MQAR at K = 4 (chance 1/4) is at chance; 0.1 at K = 64 (chance 1/64) is not."""
    k64 = {"name": "mqar", "params": {"vocab_size": 256, "power_a": 0.01, "random_filler": False},
           "segments": {"val": [{"seq_len": 256, "num_kv_pairs": 64, "num_examples": 4}]}}
    write_run(tmp_path, "k4", seed=0, val=0.2, test=0.2)
    write_run(tmp_path, "k64", seed=0, val=0.1, test=0.1, task=k64)
    rows = {Path(row["run_dir"]).name: row for row in csv.DictReader(open(report(tmp_path)["csv"]))}
    assert float(rows["k4"]["chance_acc"]) == 0.25 and rows["k4"]["at_chance"] == "True"
    assert float(rows["k64"]["chance_acc"]) == 1 / 64 and rows["k64"]["at_chance"] == "False"


def test_report_paths_that_cannot_be_used_are_one_line(tmp_path, capsys):
    write_run(tmp_path / "runs", "good")
    (tmp_path / "file").write_text("x")
    runs, file = tmp_path / "runs", tmp_path / "file"
    for argv, message in (([str(file)], f"folder '{file}' is a file, not a folder"),
                          ([str(runs), "--out", str(file)], f"--out {file} is invalid: {file} is a file, not a folder"),
                          ([str(runs), "--out", str(file / "x")], f"--out {file / 'x'} is invalid: {file} is a file"),
                          ([str(runs), "--out", "/proc/x"], "--out /proc/x cannot be written (No such file")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"sandbox-report: error: {message}"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "runs"] and file.read_text() == "x"
    assert not (runs / "report.md").exists()


def test_a_setting_whose_steps_are_not_recorded_does_not_win_a_tie(tmp_path):
    """Both settings stopped at the 0.99 threshold; 1e-3's results record no steps (written before steps were),
    so nothing says they stopped sooner: 1e-2, which stopped at step 750, wins, whichever comes first."""
    for seed in range(2):
        write_run(tmp_path, f"a{seed}", seed=seed, lr=1e-3, val=0.995, test=0.5, steps=None)
        write_run(tmp_path, f"b{seed}", seed=seed, lr=1e-2, val=0.995, test=0.99, steps=750)
    markdown = report(tmp_path)["markdown"].read_text()
    (cells,) = summary_lines(markdown)
    assert cells[column(markdown, "lr")] == "0.01 (best of 2; tied with 0.001)"


def test_a_run_without_an_early_stopping_threshold_is_checked_for_a_rising_curve(tmp_path):
    """A result whose config sets no threshold (null: it trains to the end) and whose curve still rises."""
    steps = list(range(100, 1001, 100))
    run_dir = write_run(tmp_path, "rising", val=0.6, curve=[(s, 0.1 + 0.5 * (s >= 900)) for s in steps])
    result = json.loads((run_dir / "result.json").read_text())
    result["config"]["callbacks"]["early_stopping"]["threshold"] = None
    (run_dir / "result.json").write_text(json.dumps(result))
    rows = list(csv.DictReader(open(report(tmp_path)["csv"])))
    assert rows[0]["still_rising"] == "True"


def test_a_result_whose_config_was_edited_is_skipped(tmp_path, capsys):
    """A result.json whose config no longer gives its config_hash (its seed edited by hand to fill a gap in the
    grid) is not reported under the edited config."""
    for seed in range(2):
        run_dir = write_run(tmp_path, f"s{seed}", seed=seed)
        result = json.loads((run_dir / "result.json").read_text())
        result["config_hash"] = config_hash(result["config"])
        result["config"]["seed"] = seed + 5 * (seed == 1)
        (run_dir / "result.json").write_text(json.dumps(result))
    rows = list(csv.DictReader(open(report(tmp_path)["csv"])))
    assert [Path(row["run_dir"]).name for row in rows] == ["s0"]
    err = capsys.readouterr().err
    assert "s1/result.json skipped: its config is not the one its config_hash was computed from" in err


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: folder"),  # without argparse's usage text
    (["{runs}", "--bogus"], "unrecognized arguments: --bogus"),
    ([""], "argument folder: '' is not a path (empty)"),  # not a report of the working folder
    (["{runs}", "--out", ""], "argument --out: '' is not a path (empty)"),  # not written to the working folder
    (["{runs}", "--out", "/proc"], "--out /proc cannot be written (No such file or directory: /proc)"),  # a traceback
    # an OSError traceback (File name too long); --out's made the folders above it
    (["a" * 256], f"argument folder: '{'a' * 256}' is not a path (a name longer than 255 bytes)"),
    (["{runs}", "--out", f"new/{'a' * 256}"], f"argument --out: 'new/{'a' * 256}' is not a path (a name longer than "
                                              "255 bytes)"),
], ids=["no-folder", "unknown-option", "folder-empty", "out-empty", "out-takes-no-file", "folder-name-too-long",
        "out-name-too-long"])
def test_report_arguments_that_cannot_be_used_are_one_line_before_any_work(argv, message, tmp_path, capsys,
                                                                          monkeypatch):
    write_run(tmp_path / "runs", "good")
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    code = exit_code(main, [arg.format(runs=tmp_path / "runs") for arg in argv])
    err = capsys.readouterr().err
    assert code == 2 and err == f"sandbox-report: error: {message}\n"
    assert sorted(tmp_path.rglob("*")) == before


def test_a_study_shows_every_trial_tied_at_the_best_value_and_names_its_objectives(tmp_path):
    """Optuna's best trial is one of those tied at the best value; shown alone, it read as the winner. The
    values are headed by the objectives the study was made with."""
    study = optuna.create_study(study_name="ties", direction="maximize")
    study.set_user_attr("definition", {"objectives": ["best_val_acc"], "seeds": None})
    for lr, value in ((1e-3, 0.5), (2e-3, 1.0), (3e-3, 1.0)):
        study.add_trial(optuna.trial.create_trial(
            params={"lr": lr}, distributions={"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2)}, value=value))
    markdown, _ = study_section(study, tmp_path)
    assert "Best trials (2 tie at the best value):" in markdown
    assert "| trial | best_val_acc | lr |" in markdown
    assert "| 1 | 1 | 0.002 |" in markdown and "| 2 | 1 | 0.003 |" in markdown


def test_a_mad_task_whose_every_setting_diverged_says_so_rather_than_looking_not_run(tmp_path):
    # gla ran noisy_ar and diverged at every optimiser setting; it never ran selective_copying: the two cells
    # must differ, the first saying that none of the task's settings has a finished run (0 of 1)
    write_mad_grid(tmp_path, [("mqar", 16), ("noisy_ar", 32)], ["attention", "gla"],
                   diverged={("noisy_ar", 32, "gla")})
    write_mad_grid(tmp_path / "copy", [("selective_copying", 16)], ["attention"])
    table = mad_lines(report(tmp_path)["markdown"].read_text())
    assert table["gla"]["noisy_ar (1 setting)"] == "— (0 of 1)"
    assert table["gla"]["selective_copying (1 setting)"] == "—"
    assert table["attention"]["noisy_ar (1 setting)"] not in ("—", "— (0 of 1)")


def test_mad_heat_map_shows_the_cells_of_tasks_not_run_or_not_finished_and_names_the_model_columns(tmp_path,
                                                                                                  monkeypatch):
    """A task a model never ran (`—`) or ran without a finished setting (`— (0 of 1)`) has no score: its cell was
    drawn white on the white of a missing value, so the PNG showed nothing there; and a model column (expand_v)
    was shown by its value alone, `gla 5`, which does not say what 5 is."""
    write_mad_grid(tmp_path, [("mqar", 16), ("noisy_ar", 32)], ["attention", "gla"],
                   diverged={("noisy_ar", 32, "gla")})
    write_mad_grid(tmp_path / "copy", [("selective_copying", 16)], ["attention"])
    write_run(tmp_path, "wide", "gla", task=mad_task("mqar", 16), suite="mad", options={"expand_v": 5})
    figures = drawn_figures(monkeypatch)
    report(tmp_path)
    (ax, _) = figures["mad_scores.png"].axes
    cells = {text.get_text(): text for text in ax.texts}
    for cell in ("—", "—\n(0 of 1)"):
        assert matplotlib.colors.to_rgb(cells[cell].get_color()) != (1.0, 1.0, 1.0), cell
    labels = [label.get_text() for label in ax.get_yticklabels()]
    assert any(label.startswith("gla expand_v=5\n") for label in labels), labels


@pytest.mark.parametrize("bad", [math.nan, math.inf, 1.5])
def test_a_curve_with_a_validation_that_is_not_an_accuracy_tells_nothing(bad, tmp_path):
    """A logs/metrics.csv whose first validation reads nan (or inf, or 1.5): with nan first, the best of the
    curve was nan and a run that rose from 0.6 to 0.9 in its last quarter was marked not rising; with inf it was
    rising by inf and had left chance at its first step. The curve is not read: `?`, as for a run without one."""
    steps = list(range(100, 1001, 100))
    write_run(tmp_path, "odd", val=0.9, curve=[(s, bad if s == 100 else 0.6 + 0.3 * (s >= 900)) for s in steps])
    (row,) = csv.DictReader(open(report(tmp_path)["csv"]))
    assert (row["still_rising"], row["val_rise_last_quarter"], row["left_chance_step"]) == ("", "", "")


def test_a_metrics_csv_that_cannot_be_read_is_named_and_its_run_kept(tmp_path, capsys):
    """A damaged logs/metrics.csv read as `?`, like a run without one, and nothing said which file or why."""
    damaged = {"binary": b"\xff\xfe\x00garbage", "empty": b"", "nan": b"step,val/acc\n100,nan\n",
               "text": b"step,val/acc\n100,high\n"}
    for seed, (name, content) in enumerate(damaged.items()):
        (write_run(tmp_path, name, seed=seed, curve=[(100, 0.5)]) / "logs" / "metrics.csv").write_bytes(content)
    write_run(tmp_path, "good", seed=9, curve=[(100, 0.5), (1000, 0.9)])
    assert main([str(tmp_path)]) == 0
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == len(damaged)
    for name, line in zip(sorted(damaged), warnings):
        assert line.startswith(f"sandbox-report: warning: {tmp_path / name / 'logs' / 'metrics.csv'} ")
    rows = {Path(row["run_dir"]).name: row for row in csv.DictReader(open(tmp_path / "results.csv"))}
    assert sorted(rows) == sorted([*damaged, "good"]) and rows["good"]["left_chance_step"] == "100"
    assert all(rows[name]["left_chance_step"] == "" for name in damaged)


def test_mad_settings_give_each_tested_length_with_its_chance(tmp_path):
    """State tracking trained at L = 64 and tested at 64 and 256: the settings table gives the test accuracy at
    each length and the test set's chance at each, and the score their mean (S5: the first state is read from
    the input, so chance is (1 + 63/120)/64 at 64 and (1 + 255/120)/256 at 256): S5's untrained 0.025 and 0.012
    are at chance."""
    s5 = {"name": "s5", "params": {"vocab_size": 121, "labels_at": "every"},
          "segments": {"val": [{"seq_len": 64, "num_examples": 8}],
                       "test": [{"seq_len": 64, "num_examples": 8}, {"seq_len": 256, "num_examples": 8}]}}
    write_run(tmp_path, "s5", "deltanet", val=0.025, test=0.014, task=s5, suite="mad",
              slices={"seq_len=64": 0.025, "seq_len=256": 0.012})
    files = report(tmp_path)
    section = files["markdown"].read_text().split("### MAD settings")[1]
    header, _, cells = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
                        if line.startswith("|")]
    line = dict(zip(header, cells))
    assert (line["seq_len=64"], line["seq_len=256"]) == ("0.025", "0.012")
    assert line["chance per length"] == f"{(1 + 63 / 120) / 64:.3f} / {(1 + 255 / 120) / 256:.3f}"
    (row,) = csv.DictReader(open(files["csv"]))
    assert float(row["chance_acc/seq_len=256"]) == pytest.approx((1 + 255 / 120) / 256)
    # the task's score: each length alike, not the pooled test accuracy (0.014, which weighs 256 four times 64)
    (score,) = csv.DictReader(open(files["mad_csv"]))
    assert float(score["score"]) == pytest.approx((0.025 + 0.012) / 2)


def test_accuracy_past_the_training_length_is_shown_beside_each_length_with_its_chance(tmp_path):
    """Parity trained at L 64, tested at 64 and 256: the accuracy at 256 counts positions 0-63, inside the training
    length, so a model perfect to 64 and at chance after reads 0.625 there, above the length's chance (0.502). Its
    accuracy past the training length (0.5) is shown beside each length, with the chance over those positions
    (0.5: the first position, whose answer is its input, is not among them), in MAD's settings and in the table of
    other runs, and the notes say what it is."""
    parity = {"name": "parity", "params": {"vocab_size": 3, "labels_at": "every"},
              "segments": {"train": [{"seq_len": 64, "num_examples": 8}], "val": [{"seq_len": 64, "num_examples": 8}],
                           "test": [{"seq_len": 64, "num_examples": 8}, {"seq_len": 256, "num_examples": 8}]}}
    for folder, suite in ((tmp_path / "mad", "mad"), (tmp_path / "grid", None)):
        write_run(folder, "parity", "deltanet", val=1.0, test=(64 + 160) / 320, task=parity, suite=suite,
                  slices={"seq_len=64": 1.0, "seq_len=256": 0.625},
                  test_acc_past_train_per_slice={"seq_len=256": 0.5})
    files = report(tmp_path / "mad")
    markdown = files["markdown"].read_text()
    section = markdown.split("### MAD settings")[1]
    header, _, cells = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
                        if line.startswith("|")]
    assert header[header.index("seq_len=64"):header.index("seq_len=64") + 3] == [
        "seq_len=64", "seq_len=256", "seq_len=256 past train"]
    line = dict(zip(header, cells))
    assert (line["seq_len=256"], line["seq_len=256 past train"]) == ("0.625", "0.500")
    assert line["chance per length"] == f"{(1 + 63 / 2) / 64:.3f} / {(1 + 255 / 2) / 256:.3f} (past train 0.500)"
    (row,) = csv.DictReader(open(files["csv"]))
    assert float(row["test_acc_past_train/seq_len=256"]) == 0.5
    assert float(row["chance_acc_past_train/seq_len=256"]) == pytest.approx(0.5)
    assert "chance_acc_past_train/seq_len=64" not in row  # no position of L 64 is past the training length
    assert markdown.count("`<slice> past train`") == 1
    markdown = report(tmp_path / "grid")["markdown"].read_text()
    (cells,) = summary_lines(markdown)
    assert cells[column(markdown, "seq_len=256 past train")] == "0.500"
    assert column(markdown, "seq_len=256 past train") == column(markdown, "seq_len=256") + 1
    assert "`<slice> past train`" in markdown
    # runs tested at their training length alone: no such column, no note
    write_run(tmp_path / "plain", "mqar", slices={"num_kv_pairs=4": 0.9, "num_kv_pairs=8": 0.8})
    markdown = report(tmp_path / "plain")["markdown"].read_text()
    assert "past train" not in markdown


def test_a_run_tested_at_one_length_past_its_training_length_shows_its_accuracy_past_it(tmp_path):
    """Parity trained at L 64 and tested at L 256 alone: its one length tells no settings apart, but its test_acc
    counts positions 0-63, inside the training length, so its accuracy past the training length is shown all the
    same, in the table of other runs and in MAD's settings with the chance at that length and past it."""
    parity = {"name": "parity", "params": {"vocab_size": 3, "labels_at": "every"},
              "segments": {"train": [{"seq_len": 64, "num_examples": 8}], "val": [{"seq_len": 64, "num_examples": 8}],
                           "test": [{"seq_len": 256, "num_examples": 8}]}}
    for folder, suite in ((tmp_path / "mad", "mad"), (tmp_path / "grid", None)):
        write_run(folder, "parity", "deltanet", val=1.0, test=0.625, task=parity, suite=suite,
                  slices={"seq_len=256": 0.625}, test_acc_past_train_per_slice={"seq_len=256": 0.5})
    markdown = report(tmp_path / "grid")["markdown"].read_text()
    (cells,) = summary_lines(markdown)
    assert (cells[column(markdown, "seq_len=256")], cells[column(markdown, "seq_len=256 past train")]) == (
        "0.625", "0.500")
    assert "`<slice> past train`" in markdown
    section = report(tmp_path / "mad")["markdown"].read_text().split("### MAD settings")[1]
    header, _, cells = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
                        if line.startswith("|")]
    line = dict(zip(header, cells))
    assert (line["seq_len=256"], line["seq_len=256 past train"]) == ("0.625", "0.500")
    assert line["chance per length"] == f"{(1 + 255 / 2) / 256:.3f} (past train 0.500)"


def chosen_rates(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "docs/results/zoology/chosen_rates.py", str(folder)],
                          cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, check=True)


def test_chosen_rates_gives_the_report_s_choice_once_every_rate_finished_seed_0(tmp_path):
    """docs/results/zoology/chosen_rates.py, which protocol.sh runs seeds 1 and 2 at: per model the rate of the
    best validation on seed 0; a model one of whose rates has not ended seed 0 (interrupted) gets no rate yet."""
    for lr, val in [(1e-3, 0.5), (1e-2, 0.8)]:
        write_run(tmp_path, f"model.d_model=64,model=gla,optim.lr={lr},seed=0", "gla", lr=lr, val=val)
    for lr, val, status in [(1e-3, 0.9, "finished"), (1e-2, 0.2, "interrupted")]:
        write_run(tmp_path, f"model.d_model=64,model=mom,optim.lr={lr},seed=0", "mom", lr=lr, val=val,
                  status=status)
    done = chosen_rates(tmp_path)
    assert done.stdout.split() == ["gla:0.01"]
    assert "not every rate has ended on seed 0" in done.stderr and done.stderr.startswith("mom")


def test_a_mad_only_report_defines_the_columns_of_its_settings_table(tmp_path):
    """The MAD section said its settings were rows "as above", and a report of MAD's runs alone has nothing above
    it: `at chance`, `still rising`, `runs`, `tied with` were left undefined. The protocol is given once, with the
    first table that needs it."""
    write_mad_grid(tmp_path, [("mqar", 16)], ["attention"])
    markdown = report(tmp_path)["markdown"].read_text()
    assert markdown.count("`at chance`: finished runs") == 1
    assert markdown.index("`at chance`: finished runs") > markdown.index("### MAD settings")
    for seed in range(2):
        write_run(tmp_path / "zoology", f"s{seed}", seed=seed)
    markdown = report(tmp_path)["markdown"].read_text()
    assert markdown.count("`at chance`: finished runs") == 1
    assert markdown.index("`at chance`: finished runs") < markdown.index("## MAD")


def test_a_setting_whose_runs_all_failed_is_not_counted_among_those_the_choice_was_made_of(tmp_path):
    """MAD's in-context recall at L 1024: DeltaNet at lr 5e-4 ran out of memory as it started, so its setting
    stands on lr 1e-3 alone; the cell said `0.001 (best of 2)`, a choice on validation that was not made."""
    task = mad_task("mqar", 16)
    write_run(tmp_path, "done", "deltanet", lr=1e-3, weight_decay=0.0, task=task, suite="mad")
    write_run(tmp_path, "oom", "deltanet", lr=5e-4, weight_decay=0.0, task=task, suite="mad", status="failed",
              val=None, test=None)
    write_run(tmp_path, "lost", "deltanet", lr=1e-4, weight_decay=0.0, task=task, suite="mad", status="diverged",
              val=0.0, test=0.0)
    section = report(tmp_path)["markdown"].read_text().split("### MAD settings")[1]
    assert "| 0.001 (best of 2; 1 other without a finished or diverged run) |" in section
    (tmp_path / "lost" / "result.json").unlink()
    section = report(tmp_path)["markdown"].read_text().split("### MAD settings")[1]
    assert "| 0.001 (best of 1; 1 other without a finished or diverged run) |" in section


def test_lr_sensitivity_tells_mad_s_rows_from_the_other_runs_rows(tmp_path):
    """MAD's runs beside Zoology's: lr_sensitivity.csv held both sections' records; with one configuration in
    each, attention's records of the two read alike (model, lr, chosen, ...), with different accuracies."""
    write_run(tmp_path / "zoology", "a", "attention", val=0.2)
    write_run(tmp_path / "mad", "a", "attention", val=0.8, task=mad_task("mqar", 16), suite="mad")
    records = list(csv.DictReader(open(report(tmp_path)["lr_csv"])))
    assert sorted((r["suite"], float(r["best_val_acc"])) for r in records) == [("mad", 0.8), ("—", 0.2)]


def test_memory_load_panel_titles_do_not_run_into_each_other(tmp_path, monkeypatch):
    """Zoology's MoM rows at four rates on seed 0 and the chosen one's seeds 1 and 2: a panel's title (its
    configuration and `lr 0.0022 (best of 4 on seed 0; of those tied there, best on seeds 0, 1, 2), 3 runs`) was
    one line wider than the panel and ran into its neighbours', unreadable in docs/results/zoology_6000_steps."""
    router = {f"layer0/{kind}{m}": 0.25 for kind in ("load_m", "content_load_m") for m in range(8)}
    for memories, shared in itertools.product((2, 4, 8), (True, False)):
        options = {"num_memories": memories, "shared_memory": shared}
        name = f"m{memories}{shared}"
        for lr in (1e-4, 4.6e-4, 2.2e-3, 1e-2):
            write_run(tmp_path, f"{name}-{lr}", "mom", lr=lr, val=0.995 if lr > 1e-3 else 0.5, options=options,
                      router=router, d_model=128)
        for seed in (1, 2):
            write_run(tmp_path, f"{name}-s{seed}", "mom", seed=seed, lr=2.2e-3, val=0.995, options=options,
                      router=router, d_model=128)
    figures = drawn_figures(monkeypatch)
    report(tmp_path)
    fig = figures["memory_load.png"]
    renderer = fig.canvas.get_renderer()
    titles = [ax.title.get_window_extent(renderer) for ax in fig.axes if ax.get_title()]
    assert len(titles) == 6 and "best of 4 on seed 0; of those tied there" in " ".join(fig.axes[0].get_title().split())
    assert not any(a.overlaps(b) for a, b in itertools.combinations(titles, 2))
