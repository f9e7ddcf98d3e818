"""`sandbox-bench quickstart` runs the README's command and records what it measured."""

import json
import os
from pathlib import Path

import pytest
import torch

from sandbox.bench import quickstart
from commands import exit_code


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


def test_kernel_bench_scales_the_recurrent_reference_from_its_prefix(monkeypatch):
    import torch

    from kernels.testing import make_inputs
    from sandbox.bench import kernels as bench

    seen = []

    def run_once(fn):  # stands in for the CUDA-timed call: runs it and records the prefix's shape
        o, *_ = fn()
        seen.append(tuple(o.shape))
        return 1.0

    monkeypatch.setattr(bench, "_time_once", run_once)
    x = make_inputs("gated_deltanet", 3, 300, 2, 16, 16)
    do = torch.randn(3, 300, 2, 16)
    assert bench._time_recurrent("gated_deltanet", x, do) == 3 * 300 / (2 * 256)
    assert seen == [(2, 256, 2, 16)]  # dq of the first 2 sequences' first 256 tokens


def test_kernel_bench_times_are_medians(monkeypatch):
    """docs/performance.md quotes the median of do_bench; do_bench returns the mean unless asked, so every time
    of the table (ours, the torch chunk form, fla; the copy ceiling too, CUDA only) was the mean of its calls."""
    import torch
    import triton.testing

    from sandbox.bench import kernels as bench

    def fake_do_bench(fn, warmup=25, rep=100, return_mode="mean"):  # calls of 1, 1, 1 and 9 ms (a loaded CPU)
        return {"mean": 3.0, "median": 1.0}[return_mode]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    monkeypatch.setattr(bench, "_check", lambda rule, backend, x, do: {"o": 0.0})
    monkeypatch.setattr(bench, "_time_recurrent", lambda rule, x, do: 100.0)
    x, do = {"q": torch.zeros(2, 2)}, torch.zeros(2, 2)
    row = bench._time_rule("gla", "triton", (1, 2, 1, 2, 2), x, do, ceiling=1.0)
    assert row["ms_ours"] == 1.0 and row["ms_torch"] == 1.0
    monkeypatch.setattr(bench, "_fla_op", lambda rule: lambda **kw: None)
    monkeypatch.setattr(bench, "_time_once", lambda fn: 5.0)
    bench._time_fla(row, x, do)
    assert row["ms_fla"] == 1.0


def test_kernel_bench_compiles_fla_in_children_and_names_the_failures(monkeypatch, capsys):
    import subprocess

    from sandbox.bench import kernels as bench

    asked = []

    def fake_run(cmd, **kwargs):  # a child per (shape, rule); the one for deltanet fails
        shape, rule = json.loads(cmd[cmd.index("--_fla-warm-child") + 1])
        asked.append((tuple(shape), rule))
        return subprocess.CompletedProcess(cmd, 1 if rule == "deltanet" else 0)

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    shapes = [(1, 64, 1, 16, 16), (2, 128, 1, 32, 32)]
    bench.warm_fla(shapes, ["gla", "deltanet"], jobs=3)
    assert sorted(asked) == sorted((s, r) for s in shapes for r in ["gla", "deltanet"])
    out = capsys.readouterr().out
    assert "failed (timed here anyway): deltanet 1x64x1x16x16, deltanet 2x128x1x32x32" in out


def test_kernel_times_names_the_longest_ops_per_call():
    """On this CPU-only machine the profile falls back to CPU ops: a matmul must dominate three calls of fn."""
    import torch

    from sandbox.bench.kernels import kernel_profile, kernel_times

    a = torch.randn(300, 300)
    profile = kernel_profile(lambda: (a @ a @ a).sum(), longest=2)
    times = profile["kernels_ms"]
    assert len(times) == 2 and list(times)[0] in ("aten::mm", "aten::matmul")
    assert all(t > 0 for t in times.values()) and list(times.values()) == sorted(times.values(), reverse=True)
    assert profile["kernel_sum_ms"] > sum(times.values())  # the ops past the longest two count too
    every = kernel_times(lambda: (a @ a @ a).sum(), calls=3)  # the sum op too
    assert len(every) > 2 and any("sum" in name for name in every)


def test_kernel_times_leave_out_record_function_regions():
    """A record_function region (torch.optim's "Optimizer.step#AdamW.step" in every training step) is no op: its
    self time on the CPU is Python (here a 50 ms sleep) and on the GPU its span repeats the kernels inside it. It
    counted as an op, so a step's busy time held the optimizer's Python and wall/busy read low."""
    import time

    import torch

    from sandbox.bench.kernels import kernel_times

    a = torch.randn(64, 64)

    def fn():
        with torch.profiler.record_function("region"):
            time.sleep(0.05)
            (a @ a).sum()

    times = kernel_times(fn, calls=2)
    assert "region" not in times and any("mm" in name for name in times)
    assert sum(times.values()) < 25  # ms per call: the ops, not the 50 ms the region spent asleep


def test_kernel_bench_rows_give_wall_and_gpu_time_and_their_ratios(monkeypatch, capsys):
    """On the CPU the profile sums CPU ops; fla's op is stood in for by the PyTorch reference, ours by the
    chunked PyTorch form: both rows get their summed kernel time, printed beside the wall time, fla's with the
    ratios fla/ours of each, then the longest kernels."""
    import torch

    import kernels
    from kernels.testing import make_inputs
    from sandbox.bench import kernels as bench

    get_op = kernels.get_op
    monkeypatch.setattr(kernels, "get_op", lambda rule, backend: get_op(rule, "torch"))
    monkeypatch.setattr(bench, "_fla_op", lambda rule: get_op(rule, "torch", mode="recurrent"))
    x = make_inputs("gla", 1, 80, 1, 16, 16)
    do = torch.randn(1, 80, 1, 16)
    row = {"rule": "gla", "backend": "triton", "shape": [1, 80, 1, 16, 16], "correct": True, "max_rel_err": 1e-3,
           "ms_ours": 2.0, "ms_torch": 4.0, "ms_recurrent": 100.0, "gbs": 10.0, "pct_copy": 1.0, "ms_fla": 3.0,
           "s_fla_first_call": 5.0}
    bench._profile_row(row, x, do)
    bench._profile_row(row, x, do, fla=True)
    assert row["kernel_sum_ms_ours"] > 0 and row["kernel_sum_ms_fla"] > 0
    assert 0 < len(row["kernels_ms_ours"]) <= 6
    bench._print_row(row)
    bench._print_fla(row)
    out = capsys.readouterr().out
    ours, fla = row["kernel_sum_ms_ours"], row["kernel_sum_ms_fla"]
    assert f"ours wall     2.00 ms  GPU {ours:8.2f} ms  torch" in out
    assert f"fla  wall     3.00 ms, fla/ours  1.50x  GPU {fla:8.2f} ms, fla/ours {fla / ours:5.2f}x" in out
    assert f"ours kernels: {ours:.2f} ms per call; longest" in out
    assert f"fla kernels: {fla:.2f} ms per call; longest" in out
    del row["kernel_sum_ms_ours"], row["kernels_ms_ours"]  # --no-profile: wall time only
    bench._print_row(row)
    assert "GPU" not in capsys.readouterr().out


def test_kernel_bench_first_calls_time_each_rule_in_processes_of_its_own(monkeypatch, capsys):
    """In one process and one cache for all the rules, the first rule's cold and warm times held what the rules
    share (Triton's launcher built and loaded, kernels common to several rules) and the later rules' left it out:
    at 97e058e, GLA's warm first call 4.2 s, gated DeltaNet's after it 0.0 s."""
    import subprocess

    from sandbox.bench import kernels as bench

    children = []

    def fake_run(cmd, env, **kwargs):  # a child's times: 2.0 s for the first child, 3.0 s the next, ...
        _, rules, _ = json.loads(cmd[cmd.index("--_first-call-child") + 1])
        children.append((rules, env["TRITON_CACHE_DIR"]))
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps({r: 1.0 + len(children) for r in rules}) + "\n")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    bench.first_call_times((1, 64, 1, 16, 16), ["gla", "gated_deltanet"], "triton")
    assert [rules for rules, _ in children] == [["gla"], ["gla"], ["gated_deltanet"], ["gated_deltanet"]]
    caches = [cache for _, cache in children]
    assert caches[0] == caches[1] != caches[2] == caches[3]  # a warm child reads what its rule's cold one filled
    out = capsys.readouterr().out
    assert "cold cache, shape (1, 64, 1, 16, 16): gla 2.0 s, gated_deltanet 4.0 s\n" in out
    assert "warm cache, shape (1, 64, 1, 16, 16): gla 3.0 s, gated_deltanet 5.0 s\n" in out


def test_kernel_bench_first_call_leaves_the_import_out(monkeypatch):
    """The op was looked up inside the timed region: importing Triton and the chunk module (seconds) went to the
    first rule's first forward+backward."""
    import time

    import kernels
    from kernels.testing import make_inputs
    from sandbox.bench import kernels as bench

    get_op = kernels.get_op

    def slow_import(rule, backend):  # the import that the Triton op's first lookup does
        time.sleep(1.0)
        return get_op(rule, "torch")

    monkeypatch.setattr(kernels, "get_op", slow_import)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(bench, "_inputs", lambda rule, shape: (make_inputs(rule, *shape), torch.randn(*shape[:3], 16)))
    assert bench._first_call((1, 16, 1, 16, 16), ["gla"], "triton")["gla"] < 0.5


def test_fla_compile_only_fills_the_cache_and_times_nothing(monkeypatch):
    import os

    import torch

    from sandbox.bench import kernels as bench

    warmed = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "_fla_op", lambda rule: object())
    monkeypatch.setattr(bench, "warm_fla", lambda shapes, rules, jobs: warmed.append((shapes, rules, jobs)))
    monkeypatch.setattr(bench, "run_timings", lambda *a, **k: pytest.fail("timed in --fla-compile-only"))
    monkeypatch.setenv("FLA_CACHE_RESULTS", "1")  # restored after the test
    argv = ["--fla-compile-only", "--rules", "gla", "--shape", "1,64,1,16,16", "--fla-jobs", "3"]
    assert bench.main(argv) == 0
    assert warmed == [([(1, 64, 1, 16, 16)], ["gla"], 3)]
    assert os.environ["FLA_CACHE_RESULTS"] == "0"  # the compiling children write no autotuning choices
    monkeypatch.setattr(bench, "_fla_op", lambda rule: None)
    assert bench.main(argv) == 2


def test_mom_bench_fla_compile_only_compiles_and_times_nothing(monkeypatch):
    import importlib.util

    import torch

    from sandbox.bench import mom as bench

    compiled = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(bench, "compile_fla", lambda names, timeout: compiled.append((names, timeout)))
    monkeypatch.setattr(bench, "run_ours", lambda *a, **k: pytest.fail("timed in --fla-compile-only"))
    assert bench.main(["--fla-compile-only", "--shapes", "paper", "--fla-timeout", "30"]) == 0
    assert compiled == [(["paper"], 30.0)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert bench.main(["--fla-compile-only"]) == 2


def test_mom_bench_prints_kernel_times_and_their_ratio(capsys):
    from sandbox.bench import mom as bench

    def layer(ms, kernel_ms):
        return {"ms": ms, "peak_mib": 100.0, "kernel_sum_ms": kernel_ms, "kernels_ms": {"chunk": kernel_ms / 2}}

    row = {"shape": "paper", "correct": True, "max_rel_err": 1e-3, "ours": layer(10.0, 8.0), "single": layer(5.0, 4.0)}
    bench._print_row(row)
    bench._print_fla(row, layer(30.0, 20.0))
    out = capsys.readouterr().out
    assert "kernels 8.00 ms per call; longest, ms: chunk 4.00" in out
    assert "ours   wall    10.00 ms  GPU     8.00 ms  peak      100 MiB" in out
    assert "ours/single wall 2.00x, GPU 2.00x" in out
    assert "fla/ours wall 3.00x, GPU 2.50x  peak ours/fla 1.00" in out


def test_saved_for_backward_counts_each_saved_activation_once_and_no_leaf():
    from sandbox.bench.mom import saved_for_backward

    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    y = lin(x).relu()  # linear saves x and its weight (leaves: not counted); relu saves its output
    saved = saved_for_backward((y * y).sum())  # saves y twice: one storage, for the op that saved it first
    mib = 4 * 8 * 4 / 2**20
    assert saved["saved_mib"] == pytest.approx(mib)
    assert saved["saved_by_dtype_mib"] == {"float32": pytest.approx(mib)}
    assert saved["saved_by_op_mib"] == {"Mul": pytest.approx(mib)}
    assert saved["saved_largest"] == [["Mul", (4, 8), "float32", pytest.approx(mib)]]


def test_mom_bench_prints_what_a_layer_saves_for_backward(capsys):
    from sandbox.bench import mom as bench

    bench._print_layer("ours", {"ms": 1.0, "peak_mib": 10.0, "saved_mib": 96.0,
                                "saved_by_dtype_mib": {"bfloat16": 32.0, "float32": 64.0},
                                "saved_by_op_mib": {"ChunkFunction": 64.0, "Mm": 32.0},
                                "saved_largest": [["ChunkFunction", (8, 2048, 4, 256), "float32", 64.0]]})
    out = capsys.readouterr().out
    assert "saved for backward 96 MiB (bfloat16 32, float32 64); by op, MiB: ChunkFunction 64, Mm 32" in out
    assert "largest saved, MiB: ChunkFunction float32[8, 2048, 4, 256] 64" in out


def test_train_bench_times_every_mode_and_writes_its_rows(tmp_path, capsys):
    """Tiny runs on the CPU: every mode's rows, their derived numbers, and the ratios between them."""
    from sandbox.bench import train as bench

    out = tmp_path / "train.json"
    argv = ["--models", "attention", "--widths", "16", "--packed-widths", "16", "--ablate-at", "--batch", "4",
            "--experiment", "quickstart", "--override", "model.n_layers=1", "--warmup", "1", "--steps", "2",
            "--profile-steps", "1", "--packed", "2", "--stacked", "3", "2", "--grid-runs", "10", "--grid-steps", "100",
            "--json", str(out)]
    assert bench.main(argv) == 0
    record = json.loads(out.read_text())
    rows = record["rows"]
    assert [(r["mode"], r["variant"]) for r in rows] == [
        ("alone", "none"), ("alone", "all"), ("packed", "none"), ("packed", "all"), ("stacked", "all"),
        ("stacked", "all"), ("plain", "all")]
    measured = [r for r in rows if r["mode"] != "packed"] + [p for r in rows for p in r.get("per_process", [])]
    assert len(measured) == 5 + 2 * 2
    for row in measured:
        assert row["busy_kind"] == "cpu ops" and row["busy_ms"] > 0 and row["wall_ms"] > 0
        assert row["profiled_wall_ms"] >= row["busy_ms"]  # the profiled steps' ops fit in those steps' wall time
        assert row["steps_per_s"] == pytest.approx(1e3 / row["wall_ms"])
        assert row["tokens_per_s"] == pytest.approx(row["steps_per_s"] * 4 * row["seq_len"])
        assert row["wall_over_busy"] == pytest.approx(row["wall_ms"] / row["busy_ms"])
        assert not row["fused"] and "syncs_per_step" not in row  # CPU: no fused AdamW, no sync count
    for row in rows[2:4]:
        starts, ends = zip(*(p["clock"] for p in row["per_process"]))
        assert max(starts) < min(ends)  # the two processes' timed windows overlap
        assert row["total_steps_per_s"] == pytest.approx(2 * 2 / (max(ends) - min(starts)))
        assert row["runs_per_gpu_hour"] == pytest.approx(3600 * row["total_steps_per_s"] / 100)
    stacked = rows[4]
    assert stacked["runs"] == 3 and stacked["total_steps_per_s"] == pytest.approx(3 * stacked["steps_per_s"])
    assert stacked["runs_per_gpu_hour"] == pytest.approx(3600 * stacked["total_steps_per_s"] / 100)
    ratio = stacked["total_steps_per_s"] / rows[1]["steps_per_s"]
    assert f"attention d 16: stacked x3 / all alone: {ratio:.2f}x steps/s" in record["ratios"]
    assert any(line.startswith("attention d 16: stacked x3 / packed x2 all:") for line in record["ratios"])
    assert rows[5]["runs"] == 2 and any(line.startswith("attention d 16: stacked x2 / all alone:")
                                        for line in record["ratios"])
    assert rows[0]["runs_per_gpu_hour"] == pytest.approx(3600 * rows[0]["steps_per_s"] / 100)
    assert record["grid"] == {"runs": 10, "steps": 100}
    ratio = rows[1]["steps_per_s"] / rows[0]["steps_per_s"]
    assert f"attention d 16: all / none alone: {ratio:.2f}x steps/s" in record["ratios"]
    assert any(line.startswith("attention d 16: plain loop / all alone:") for line in record["ratios"])
    assert any(line.startswith("attention d 16: packed x2 all / all alone:") for line in record["ratios"])
    printed = capsys.readouterr().out
    assert f"wall {rows[0]['wall_ms']:8.2f} ms  busy {rows[0]['busy_ms']:8.2f} ms" in printed
    assert f"(grid {10 / rows[0]['runs_per_gpu_hour']:5.2f} GPU-h)" in printed


def test_train_bench_ablates_on_the_cpu_only_the_levers_that_act_there():
    """Fused AdamW is CUDA's: a `fused` row on the CPU would time none's step and print a ratio for nothing."""
    from sandbox.bench import train as bench

    args = bench.parse(["--models", "attention", "--widths", "16", "--modes", "alone", "--variants", "none",
                        "--ablate-at", "16"])
    assert [variant for _, runs in bench.plan(args) for _, _, variant in runs] == ["none", "nosync", "device_data"]


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps 0 is invalid: must be >= 1"),
    (["--models", "gla"], "--models gla is invalid: choose from attention, gated_deltanet, mom"),
    (["--variants", "fast"], "--variants fast is invalid: choose from none, fused, nosync, device_data, all, graphs"),
    (["--variants", "graphs"], "--variants graphs is invalid on this machine: CUDA graphs need a CUDA device"),
    (["--variants", "none", "fused"], "--variants fused is invalid on this machine: fused AdamW runs on CUDA only"),
    (["--widths", "wide"], "argument --widths: invalid int value: 'wide'"),
    (["--modes", "packed", "--packed", "0"], "--packed 0 is invalid: must be >= 1"),
    (["--modes", "stacked", "--stacked", "0"], "--stacked 0 is invalid: must be >= 1"),
    (["--json", "/nonexistent/train.json"], "--json /nonexistent/train.json is invalid: its folder"),
    (["--override", "model.no_such_key=1"], "model=attention model.d_model=64: Could not override 'model.no_such_key'"),
    (["--models", "mom", "--widths", "65", "--override", "model.mixer_options.num_heads=2"],
     "model=mom model.d_model=65: "),
    (["--json", ""], "argument --json: '' is not a path (empty)"),
], ids=["steps", "model", "variant", "graphs-on-cpu", "fused-on-cpu", "width-type", "packed", "stacked",
        "json-folder", "override", "width-heads", "json-empty"])
def test_train_bench_bad_input_is_one_line_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    from sandbox.bench import train as bench

    monkeypatch.chdir(tmp_path)
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"sandbox-bench train: error: {message}")
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("argv, message", [
    (["--json", "/proc/train.json"], "--json /proc/train.json is invalid: its folder /proc is not writable (No such"),
    (["--json", "."], "--json . is invalid: it is a folder"),
    (["--override", "optim.lr=-1"], "model=attention model.d_model=16: optim.lr=-1 is invalid: must be a finite"),
    (["--override", "seed=-1"], "model=attention model.d_model=16: seed=-1 is invalid: must be an integer in"),
    (["--batch", "100000"], "model=attention model.d_model=16: trainer.val_check_interval=4 is more than the 1 "
                            "training batches of an epoch"),
    # a setting the bench gives every run: a row named attention d 16 timed mom, or d 128; or a message about a
    # trainer.max_steps=2 the command did not give
    (["--override", "model=mom"], "--override model=mom is invalid: the bench sets model itself (use --models)"),
    (["--override", "model.d_model=128"],
     "--override model.d_model=128 is invalid: the bench sets model.d_model itself (use --widths)"),
    (["--override", "trainer.max_steps=1"],
     "--override trainer.max_steps=1 is invalid: the bench sets trainer.max_steps itself (use --steps)"),
    # the variant sets each run's graphs: cuda_graphs=false still replayed the graphs rows from graphs (and true
    # left the other rows op by op), without a word
    (["--override", "cuda_graphs=false"],
     "--override cuda_graphs=false is invalid: the bench sets cuda_graphs itself (use --variants graphs)"),
    # the Lightning rows trained at that precision, the plain loop and the header kept the bench's
    (["--override", "trainer.precision=bf16-mixed"], "--override trainer.precision=bf16-mixed is invalid: the bench "
                                                     "sets trainer.precision itself (bf16-mixed on CUDA, float32 on"),
    # a value given twice: two rows of one label, the ratios against whichever came last
    (["--variants", "none", "none"], "--variants none is invalid: given twice"),
    (["--models", "attention", "mom", "attention"], "--models attention is invalid: given twice"),
    (["--modes", "stacked", "--stacked", "2", "2"], "--stacked 2 is invalid: given twice"),
    (["--plain-models", "attention", "attention"], "--plain-models attention is invalid: given twice"),
    (["--widths", "64", "64"], "--widths 64 is invalid: given twice"),
    # the rows timed a batch as a step (runs per GPU-hour twice too many at 2), the plain loop one step a batch
    (["--override", "+trainer.accumulate_grad_batches=2"], "--override +trainer.accumulate_grad_batches=2 is invalid: "
                                                           "the bench sets trainer.accumulate_grad_batches itself"),
    # every DDP process printed its rows and wrote --json: one run on two devices counted as a run per device
    (["--override", "trainer=ddp"], "--override trainer=ddp is invalid: the bench sets trainer itself (one device"),
    (["--override", "trainer.devices=2"], "--override trainer.devices=2 is invalid: the bench sets trainer.devices"),
], ids=["json-unwritable-folder", "json-a-folder", "override-bad-value", "override-bad-seed", "batch-above-the-data",
        "override-model", "override-width", "override-steps", "override-graphs", "override-precision", "variants-twice",
        "models-twice", "stacked-twice", "plain-models-twice", "widths-twice", "override-accumulation", "override-ddp",
        "override-devices"])
def test_small_train_bench_bad_input_is_one_line_before_any_run(argv, message, capsys, tmp_path, monkeypatch):
    """Found before any run: not a traceback after the runs (--json) or at their first step."""
    from sandbox.bench import train as bench

    monkeypatch.chdir(tmp_path)
    small = ["--models", "attention", "--widths", "16", "--modes", "alone", "--variants", "none", "--ablate-at",
             "--warmup", "0", "--steps", "1", "--profile-steps", "1", "--batch", "2", "--experiment", "quickstart"]
    assert bench.main(small + argv) == 2  # argv after the small options: its values win
    captured = capsys.readouterr()
    assert_one_error_line(captured.err, f"sandbox-bench train: error: {message}")
    assert captured.out == "" and list(tmp_path.iterdir()) == []  # nothing run or written


def test_train_bench_a_failing_run_is_one_line_and_the_others_go_on(tmp_path, capsys, monkeypatch):
    """A run that raises (out of memory at a large width) is said on one line, in --json too, the runs after it
    are measured, exit code 1 (as a failed packed run): it was a traceback that ended the command there."""
    from sandbox.bench import train as bench

    run_lightning = bench.run_lightning

    def fails_for_all(args, model, width, variant, barrier=None):
        if variant == "all":
            raise RuntimeError("out of memory")
        return run_lightning(args, model, width, variant, barrier)

    monkeypatch.setattr(bench, "run_lightning", fails_for_all)
    out = tmp_path / "train.json"
    argv = ["--models", "attention", "--widths", "16", "--modes", "alone", "plain", "--variants", "all", "none",
            "--ablate-at", "--warmup", "0", "--steps", "1", "--profile-steps", "1", "--batch", "2",
            "--experiment", "quickstart", "--override", "model.n_layers=1", "--json", str(out)]
    assert bench.main(argv) == 1
    printed = capsys.readouterr().out
    assert "alone attention d 16 all: failed: RuntimeError: out of memory\n" in printed
    record = json.loads(out.read_text())
    assert [(r["mode"], r["variant"]) for r in record["rows"]] == [("alone", "none"), ("plain", "all")]
    assert record["failed"] == ["alone attention d 16 all: failed: RuntimeError: out of memory"]


@pytest.mark.parametrize("signum", [2, 15], ids=["SIGINT", "SIGTERM"])
def test_train_bench_stopped_by_a_signal_says_so(signum, tmp_path, capsys, monkeypatch):
    """Ctrl-C or SIGTERM in a run: one line naming the signal and the rows measured (in --json), exit code
    128 + the signal. Ctrl-C in Lightning's fit was exit code 1 without a word (a KeyboardInterrupt traceback
    elsewhere); SIGTERM killed it without a word."""
    import signal

    from sandbox.bench import train as bench

    calls = []
    step_start = bench.Windows.step_start

    def signal_in_the_second_run(self):
        calls.append(self.n)
        if len(calls) == 5:  # the first run's 3 calls, then the second run's second step
            os.kill(os.getpid(), signum)
        step_start(self)

    monkeypatch.setattr(bench.Windows, "step_start", signal_in_the_second_run)
    out = tmp_path / "train.json"
    argv = ["--models", "attention", "--widths", "16", "--modes", "alone", "--variants", "none", "all", "--ablate-at",
            "--warmup", "0", "--steps", "1", "--profile-steps", "1", "--batch", "2", "--experiment", "quickstart",
            "--override", "model.n_layers=1", "--json", str(out)]
    previous = signal.getsignal(signum)
    assert bench.main(argv) == 128 + signum
    name = signal.Signals(signum).name
    assert_one_error_line(capsys.readouterr().err, f"sandbox-bench train: interrupted by {name} after 1 of 2 rows "
                                                   f"(in {out})")
    assert [row["variant"] for row in json.loads(out.read_text())["rows"]] == ["none"]
    assert signal.getsignal(signum) == previous  # the command's handlers are its own


@pytest.mark.parametrize("name, argv, message", [
    ("kernels", ["--shape", "8,2048,4"], "argument --shape: '8,2048,4' is invalid: must be B,T,H,K,V, five integers"),
    ("kernels", ["--fla-jobs", "0"], "--fla-jobs 0 is invalid: must be >= 1"),
    ("kernels", ["--json", "/proc/k.json"], "--json /proc/k.json is invalid: its folder /proc is not writable"),
    ("kernels", ["--bogus"], "unrecognized arguments: --bogus"),
    ("mom", ["--reps", "0"], "--reps 0 is invalid: must be >= 1"),
    ("mom", ["--fla-timeout", "0"], "--fla-timeout 0.0 is invalid: must be a number of seconds > 0"),
    # an OverflowError traceback from subprocess's wait on a GPU, after every timing of ours
    ("mom", ["--fla-timeout", "inf"], "--fla-timeout inf is invalid: must be a number of seconds > 0 and at most 1e6"),
    ("mom", ["--fla-timeout", "1e7"], "--fla-timeout 10000000.0 is invalid: must be a number of seconds > 0 and at"),
    ("mom", ["--json", "."], "--json . is invalid: it is a folder"),
    ("mom", ["--bogus"], "unrecognized arguments: --bogus"),
    # no file was written, without a word
    ("kernels", ["--json", ""], "argument --json: '' is not a path (empty)"),
    ("mom", ["--json", ""], "argument --json: '' is not a path (empty)"),
    # --fla-compile-only times nothing: on a GPU it compiled fla anyway, skipped --first-call, wrote no --json
    ("kernels", ["--fla-compile-only", "--no-fla"], "--fla-compile-only is invalid with --no-fla: it only "
                                                    "compiles fla's kernels (time in a later run without it)"),
    ("kernels", ["--fla-compile-only", "--first-call"], "--fla-compile-only is invalid with --first-call"),
    ("kernels", ["--fla-compile-only", "--json", "k.json"], "--fla-compile-only is invalid with --json"),
    ("mom", ["--fla-compile-only", "--no-fla"], "--fla-compile-only is invalid with --no-fla"),
    ("mom", ["--fla-compile-only", "--json", "m.json"], "--fla-compile-only is invalid with --json"),
    # a value given twice: on a GPU two rows of one label (mom: fla compiled twice, its row printed twice)
    ("kernels", ["--rules", "gla", "gla"], "--rules gla is invalid: given twice"),
    ("kernels", ["--shape", "1,64,1,16,16", "--shape", "1,64,1,16,16"], "--shape 1,64,1,16,16 is invalid: given twice"),
    ("mom", ["--shapes", "paper", "paper"], "--shapes paper is invalid: given twice"),
], ids=["kernels-shape-of-three", "kernels-fla-jobs-0", "kernels-json-unwritable", "kernels-unknown-option",
        "mom-reps-0", "mom-fla-timeout-0", "mom-fla-timeout-inf", "mom-fla-timeout-too-long", "mom-json-a-folder",
        "mom-unknown-option", "kernels-json-empty",
        "mom-json-empty", "kernels-compile-only-no-fla", "kernels-compile-only-first-call",
        "kernels-compile-only-json", "mom-compile-only-no-fla", "mom-compile-only-json", "kernels-rules-twice",
        "kernels-shape-twice", "mom-shapes-twice"])
def test_gpu_bench_bad_input_is_one_line_exit_2_on_any_machine(name, argv, message, capsys):
    """Checked before the GPU is asked for, so on any machine: not a ZeroDivisionError, a ValueError or a failed
    write after the timings on a GPU, nor argparse's usage text."""
    import importlib

    assert exit_code(importlib.import_module(f"sandbox.bench.{name}").main, argv) == 2
    assert_one_error_line(capsys.readouterr().err, f"sandbox-bench {name}: error: {message}")


def test_bench_help_lists_the_benchmarks(capsys):
    from sandbox import bench

    for flag in ("--help", "-h"):
        assert bench.main([flag]) == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: sandbox-bench {kernels,mom,packing,quickstart,tasks,train}")


@pytest.mark.parametrize("name", ["kernels", "mom", "packing", "quickstart", "tasks", "train"])
def test_bench_help_describes_the_benchmark_in_whole_sentences(name, capsys):
    """The description under each benchmark's usage is its docstring's first paragraph, not cut at a line end."""
    from sandbox import bench

    assert exit_code(bench.main, [name, "--help"]) == 0
    out = capsys.readouterr().out
    description = " ".join(out.split("\n\n")[1].split())
    assert description.endswith((".", ")")), description


def test_kernel_bench_help_names_its_default_shapes(capsys):
    from sandbox.bench import kernels

    assert exit_code(kernels.main, ["--help"]) == 0
    out = capsys.readouterr().out
    assert all(",".join(map(str, shape)) in out for shape in kernels.SHAPES), out


def assert_one_error_line(err: str, start: str) -> None:
    assert err.count("\n") == 1 and "Traceback" not in err and err.startswith(start), err


@pytest.mark.parametrize("argv, message", [
    (["--num-examples", "0"], "mqar: num_examples=0 is out of range"),
    (["--num-examples", "-5"], "mqar: num_examples=-5 is out of range"),
    (["--seed", "-1"], "mqar: seed=-1 is out of range"),
    # more than memory holds: numpy's MemoryError traceback (or the OOM killer) at the first setting
    (["--num-examples", str(10**12)], f"mqar: num_examples={10**12} is out of range; valid: integer 1 <= "
                                      "num_examples <= "),
], ids=["num-examples-0", "num-examples-negative", "seed-negative", "num-examples-above-memory"])
def test_tasks_bench_bad_input_is_one_line_exit_2(argv, message, capsys):
    from sandbox import bench

    assert bench.main(["tasks", *argv]) == 2
    captured = capsys.readouterr()
    assert_one_error_line(captured.err, f"sandbox-bench tasks: error: {message}")
    assert captured.out == ""  # nothing generated


@pytest.mark.parametrize("argv, message", [
    (["model.nope=1"], "Could not override 'model.nope'"),
    (["optim.lr=-1"], "optim.lr=-1 is invalid"),
    (["--output-root", "{tmp}/file"], "--output-root {tmp}/file is invalid: {tmp}/file is a file, not a folder"),
    (["--output-root", "{tmp}/file/below"], "--output-root {tmp}/file/below is invalid: {tmp}/file is a file"),
    # below: found before sandbox-train runs (not its tracebacks and then quickstart's, exit code 1)
    (["--output-root", "/proc/quickstart"], "--output-root /proc/quickstart cannot be written (No such file or "
                                            "directory: /proc)"),
    # one line, without argparse's usage text
    (["--output-root", ""], "argument --output-root: '' is not a path (empty)"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    # runs of an earlier command there: sandbox-train returned them as they were (or resumed them), so the bench
    # printed a wall time of seconds and their accuracies, "all targets met"
    (["--output-root", "{tmp}/earlier"], "--output-root {tmp}/earlier is invalid: {tmp}/earlier/quickstart already "
                                         "holds runs, which sandbox-train would return or resume instead of training"),
    # a setting the bench gives the command itself: timed the zoology grid as the quickstart, or ran the models
    # where the bench does not read them (every target missed), or left some models out
    (["experiment=zoology"], "experiment=zoology is invalid: the bench sets experiment itself (it times "
                             "experiment=quickstart)"),
    (["output_root={tmp}/elsewhere"], "output_root={tmp}/elsewhere is invalid: the bench sets output_root itself "
                                      "(use --output-root)"),
    (["name=other"], "name=other is invalid: the bench sets name itself"),
    (["hydra.sweeper.params.model=attention"], "hydra.sweeper.params.model=attention is invalid: the bench sets "
                                               "hydra.sweeper.params.model itself"),
], ids=["unknown-key", "bad-value", "output-root-file", "output-root-below-a-file", "output-root-unwritable",
        "output-root-empty", "unknown-option", "output-root-with-runs", "override-experiment", "override-output-root",
        "override-name", "override-models"])
def test_quickstart_bench_bad_input_is_one_line_exit_2(argv, message, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    earlier_run = tmp_path / "earlier" / "quickstart" / "model=mom-0123456789ab"
    earlier_run.mkdir(parents=True)
    (earlier_run / "result.json").write_text("{}")
    argv = [a.format(tmp=tmp_path) for a in argv]
    if "--output-root" not in argv:
        argv += ["--output-root", str(tmp_path / "out")]
    monkeypatch.setattr(quickstart.subprocess, "run", lambda *a, **k: pytest.fail("sandbox-train ran"))
    assert exit_code(quickstart.main, argv) == 2
    assert_one_error_line(capsys.readouterr().err, f"sandbox-bench quickstart: error: {message.format(tmp=tmp_path)}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "file"]  # nothing trained, no bench.json
    assert [p.name for p in (tmp_path / "earlier" / "quickstart").iterdir()] == ["model=mom-0123456789ab"]


@pytest.mark.parametrize("argv, message", [
    (["--workers", "0"], "--workers 0 is invalid: must be >= 1"),
    (["--runs", "0"], "--runs 0 is invalid: must be >= 1"),
    (["model.nope=1"], "Could not override 'model.nope'"),
    (["--workers", "x"], "argument --workers: invalid int value: 'x'"),
    # more workers than runs: fewer at once than the row says
    (["--runs", "2", "--workers", "4"], "--workers 4 is invalid: must be <= --runs 2"),
], ids=["workers-0", "runs-0", "unknown-key", "workers-not-a-number", "workers-above-runs"])
def test_packing_bench_bad_input_is_one_line_exit_2(argv, message, tmp_path, capsys, monkeypatch):
    import tempfile

    from sandbox.bench import packing

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where its temporary folder would be made
    monkeypatch.setattr(packing.subprocess, "run", lambda *a, **k: pytest.fail("a sweep ran"))
    assert exit_code(packing.main, argv) == 2
    assert_one_error_line(capsys.readouterr().err, f"sandbox-bench packing: error: {message}")
    assert list(tmp_path.iterdir()) == []


def test_packing_bench_failed_sweep_is_one_line_and_its_folder_goes(tmp_path, capsys, monkeypatch):
    import subprocess
    import tempfile

    from sandbox.bench import packing

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(packing.subprocess, "run", lambda cmd, **k: subprocess.CompletedProcess(cmd, 1))
    assert packing.main(["--runs", "1", "--workers", "1", "debug=fast"]) == 1
    assert_one_error_line(capsys.readouterr().err, "sandbox-bench packing: error: the sweep with 1 worker(s) failed")
    assert list(tmp_path.iterdir()) == []


def _children(pid: int) -> list[int]:
    """The packed runs started by `pid` (multiprocessing's spawned processes)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid and b"spawn_main" in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except (OSError, ValueError):
            continue  # ended while we looked
    return found


def _running(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_packed_train_bench_runs_end_with_their_parent(tmp_path):
    """SIGTERM to `sandbox-bench train` (as `timeout` sends) ends its packed processes too."""
    import signal
    import subprocess
    import sys
    import time

    command = [sys.executable, "-m", "sandbox.bench.train", "--models", "attention", "--widths", "16", "--ablate-at",
               "--packed-widths", "16", "--modes", "packed", "--packed", "2", "--variants", "none", "--batch", "4",
               "--experiment", "quickstart", "--override", "model.n_layers=1", "--steps", "3000"]
    parent = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children = []
    try:
        deadline = time.time() + 120
        while len(children := _children(parent.pid)) < 2 and time.time() < deadline:
            time.sleep(0.5)
        assert len(children) == 2, "the packed processes never started"
        time.sleep(10)  # into their runs
        parent.send_signal(signal.SIGTERM)
        parent.wait(timeout=30)
        deadline = time.time() + 20
        while any(map(_running, children)) and time.time() < deadline:
            time.sleep(0.5)
        assert not any(map(_running, children))
    finally:
        parent.kill()
        for child in filter(_running, children):
            os.kill(child, signal.SIGKILL)
