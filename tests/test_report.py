"""sandbox-report on a fixture folder: runs (several seeds, a MoM run) and an Optuna study."""

import csv
import json
from pathlib import Path

import optuna
import pytest

from sandbox.report import main, mean_ci, report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_result(mixer: str, seed: int, acc4: float, acc8: float, state_size: int, num_memories: int = 0) -> dict:
    options = {"num_heads": 1}
    if mixer == "mom":
        options.update(num_memories=num_memories, top_k=2, shared_memory=True, rule="gated_deltanet")
    router = {f"layer{i}/load_m{m}": 1 / num_memories for i in range(2) for m in range(num_memories)}
    return {
        "config": {"name": "grid", "output_root": "x", "seed": seed,
                   "model": {"mixer": mixer, "d_model": 64, "mixer_options": options}},
        "best_val_acc": (acc4 + acc8) / 2, "test_acc": (acc4 + acc8) / 2,
        "test_acc_per_slice": {"num_kv_pairs=4": acc4, "num_kv_pairs=8": acc8},
        "state_size": state_size, "num_parameters": 1000, "wall_time_s": 1.0, "epochs": 1,
        "router": router,
    }


@pytest.fixture
def fixture_folder(tmp_path: Path) -> Path:
    runs = [("attention", 0, 1.0, 0.98, 16384, 0), ("attention", 1, 1.0, 0.96, 16384, 0),
            ("gated_deltanet", 0, 0.9, 0.5, 8192, 0), ("gated_deltanet", 1, 0.8, 0.4, 8192, 0),
            ("mom", 0, 1.0, 0.9, 40960, 4)]
    for i, (mixer, seed, a4, a8, size, m) in enumerate(runs):
        run_dir = tmp_path / "grid" / f"run{i}"
        run_dir.mkdir(parents=True)
        (run_dir / "result.json").write_text(json.dumps(fake_result(mixer, seed, a4, a8, size, m)))
    study = optuna.create_study(study_name="routing", direction="maximize",
                                storage=f"sqlite:///{tmp_path / 'grid' / 'study.db'}",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("lr", 1e-4, 1e-2, log=True) * 10 + t.suggest_int("m", 1, 8) / 100,
                   n_trials=12)
    failing = study.ask()
    failing.set_user_attr("fail_reason", "RuntimeError: out of memory")
    study.tell(failing, state=optuna.trial.TrialState.FAIL)
    return tmp_path / "grid"


def test_report_files(fixture_folder: Path):
    files = report(fixture_folder)
    rows = list(csv.DictReader(open(files["csv"])))
    assert len(rows) == 5
    assert {"config.model.mixer", "test_acc", "test_acc/num_kv_pairs=8", "state_size"} <= set(rows[0])
    markdown = files["markdown"].read_text()
    # attention over two seeds: test acc 0.99 and 0.98, half-width t(1) * stdev / sqrt(2) = 12.706 * 0.00707 / 1.414;
    # at K = 8: 0.98 and 0.96, half-width 12.706 * 0.01414 / 1.414
    assert "| attention | 2 | 0.985 ± 0.064 | 1.000 | 0.970 ± 0.127 | 16384 |" in markdown
    assert "1 fail" in markdown and "out of memory" in markdown
    for key in ("state_size_png", "pairs_png", "load_png", "study_routing_history", "study_routing_importance"):
        assert files[key].read_bytes()[:8] == PNG_MAGIC, key


def test_mean_ci():
    assert mean_ci([0.5]) == (0.5, 0.0)
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / 3 ** 0.5)


def test_report_cli_errors(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert main([str(tmp_path)]) == 2
    assert "no result.json" in capsys.readouterr().err
