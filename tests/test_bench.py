"""`sandbox-bench quickstart` runs the README's command and records what it measured."""

import json

from sandbox.bench import quickstart


def test_quickstart_bench_records_its_numbers(tmp_path):
    # debug=fast: a few batches each, so the accuracy targets are missed and the exit code says so
    code = quickstart.main(["--output-root", str(tmp_path), "debug=fast", "callbacks.progress=none"])
    record = json.loads((tmp_path / "quickstart" / "bench.json").read_text())
    assert code == 1
    assert set(record["runs"]) == {"attention", "gated_deltanet", "mom"}
    assert record["exit_code"] == 0 and record["wall_time_s"] > 0 and record["time_limit_s"] == 300
    assert {"attention", "mom"} <= set(record["missed"])  # accuracy below 0.99 after two batches
    assert "exit code" not in record["missed"]
    assert all(run["steps"] == 2 and run["backend"] == "torch" for run in record["runs"].values())
