"""`sandbox-bench kernels`: forward+backward time of the memory rules' Triton chunk kernels (needs a GPU).

For each rule and shape (B, T, H, K, V), in bf16, timed in the same run and printed as ratios (x > 1: ours is
faster): our Triton `chunk` op; the PyTorch chunked form (`naive_chunk`, the `torch` backend); the PyTorch
reference recurrence (`naive_recurrent`, timed once on 2 sequences of 256 tokens, scaled to the whole batch);
and, when the `fla` package is importable (the `bench` extra), fla's chunk op of the same rule, printed after
ours with its first call in this process. fla compiles every config it autotunes over (minutes per op and
shape), so its first calls run first in child processes, several at once (`--fla-jobs`), to fill the Triton
cache; the timed process then autotunes on a GPU it has to itself (fla's on-disk cache of autotuning choices,
made by the children on a shared GPU, is switched off). `--fla-compile-only` stops after the compiling: fla's
GLA compiles for minutes a shape, so where commands have a time limit one command can fill the cache (keep
`TRITON_CACHE_DIR` between the two) and the next one time on a quiet machine. Each rule is first checked against
the float64 reference at the timed shape (relative error below 1e-2; 1e-1 with `--backend triton_bf16`); a rule
that fails prints no speedup. `--backend triton_bf16` times our op with every product on operands rounded to bf16
and the chunk states kept in bf16, as fla computes, in place of the default float32-accurate products.
The achieved bandwidth counts the bytes of the op's inputs and outputs (forward and backward) against the
measured copy ceiling. `--first-call` times each rule's first forward+backward in fresh processes of its own:
cold (empty Triton cache) and warm (the cache the cold process filled). Every row of ours and fla's gives the
wall time of a forward+backward (CUDA events around the call, the median of do_bench's calls: what a training
step waits for, launches and Python included) beside its GPU time (its kernels' time summed, torch.profiler: the
GPU's busy time, which a loaded CPU does not stretch), with the ratio fla/ours of each, then the longest kernels;
`--no-profile` leaves the GPU time out.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

SHAPES = [(8, 2048, 4, 256, 256), (8, 2048, 8, 128, 128), (64, 512, 4, 64, 64)]
RECURRENT_PREFIX = (2, 256)  # sequences, tokens of the token-by-token reference actually timed
CHILD = [sys.executable, "-m", "sandbox.bench.kernels"]  # this benchmark's own child processes (hidden options)
FLA_GUARD_NOTE = (
    "fla refuses its gated backward on Hopper with Triton >= 3.4, < 3.7.1 (fla issue #640: wrong dk/dg); "
    "this benchmark lifts that guard to time fla only, its gradients there may be wrong"
)


def _fla_op(rule):
    """fla's chunk op for `rule` (its counterpart in `kernels.rules`) with our signature, or None when fla is not
    importable or has no counterpart."""
    from kernels.rules import get_rule

    name = get_rule(rule).fla
    if name is None:
        return None
    module, _, function = name.rpartition(".")
    try:
        from fla.ops.common import chunk_o

        fla_op = getattr(importlib.import_module(module), function)
    except ImportError:
        return None
    chunk_o.TRITON_ABOVE_3_7_1 = True  # timing only: see FLA_GUARD_NOTE

    def op(q, k, v, g=None, beta=None, **kw):  # our initial and final states are not fla's layout: left out
        return fla_op(q, k, v, **{n: x for n, x in (("g", g), ("beta", beta)) if x is not None})

    return op


def _fwd_bwd(op, inputs, do):
    import torch

    o, _ = op(**inputs)
    return torch.autograd.grad(o, list(inputs.values()), do)


def _inputs(rule, shape, seed=0):
    import torch

    from kernels.testing import make_inputs

    B, T, H, K, V = shape
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = make_inputs(rule, B, T, H, K, V, dtype=torch.bfloat16, device="cuda", generator=gen)
    do = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16, generator=gen)
    return x, do


def _check(rule, backend, x, do) -> dict[str, float]:
    """Relative errors of our op's output and gradients against the float64 reference."""
    import torch

    import kernels
    from kernels.testing import rel_err

    o, _ = kernels.get_op(rule, backend)(**x)
    grads = torch.autograd.grad(o, list(x.values()), do)
    x64 = {n: t.detach().double().requires_grad_() for n, t in x.items()}
    ref, _ = kernels.get_op(rule, "torch")(**x64)
    ref_grads = torch.autograd.grad(ref, list(x64.values()), do.double())
    errs = {"o": rel_err(o, ref)}
    errs.update({f"d{n}": rel_err(a, b) for n, a, b in zip(x, grads, ref_grads)})
    return errs


def _copy_ceiling_gbs() -> float:
    import torch
    from triton.testing import do_bench

    src = torch.empty(512 * 2**20, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=50, return_mode="median")
    return 2 * src.numel() / ms / 1e6


def run_timings(shapes, rules, backend: str, use_fla: bool, fla_jobs: int, profile: bool) -> list[dict]:
    import torch

    ceiling = _copy_ceiling_gbs()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, copy ceiling {ceiling:.0f} GB/s; "
          f"ours: backend {backend}")
    fla_available = use_fla and _fla_op("gla") is not None
    print(
        "fla:",
        f"importable; {FLA_GUARD_NOTE}" if fla_available else "not importable (or --no-fla): no comparison",
    )
    if fla_available:
        warm_fla(shapes, rules, jobs=fla_jobs)
    rows = []
    for shape in shapes:
        for rule in rules:
            x, do = _inputs(rule, shape)
            rows.append(_time_rule(rule, backend, shape, x, do, ceiling))
            if profile:
                _profile_row(rows[-1], x, do)
            _print_row(rows[-1])  # before fla's autotuning: a run cut short keeps our rows
            if fla_available and rows[-1]["correct"] and _fla_op(rule) is not None:  # a rule fla does not have
                _time_fla(rows[-1], x, do)
                if profile:
                    _profile_row(rows[-1], x, do, fla=True)
                _print_fla(rows[-1])
            del x, do
            torch.cuda.empty_cache()
    return rows


def _time_rule(rule, backend, shape, x, do, ceiling) -> dict:
    from triton.testing import do_bench

    import kernels
    from kernels.testing import BF16_TOLERANCE

    errs = _check(rule, backend, x, do)
    row = {"rule": rule, "backend": backend, "shape": list(shape), "max_rel_err": max(errs.values())}
    row["correct"] = all(e < BF16_TOLERANCE[backend] for e in errs.values())
    ours, ref = kernels.get_op(rule, backend), kernels.get_op(rule, "torch")
    # the median of the calls (what docs/performance.md quotes): do_bench's default is their mean, which a few
    # slow calls on a loaded CPU pull up
    row["ms_ours"] = do_bench(lambda: _fwd_bwd(ours, x, do), warmup=5, rep=50, return_mode="median")
    row["ms_torch"] = do_bench(lambda: _fwd_bwd(ref, x, do), warmup=1, rep=5, return_mode="median")
    row["ms_recurrent"] = _time_recurrent(rule, x, do)
    # inputs read by forward and backward, do read, o written, their gradients written
    nbytes = 3 * sum(t.numel() * t.element_size() for t in x.values()) + 2 * do.numel() * do.element_size()
    row["gbs"] = nbytes / row["ms_ours"] / 1e6
    row["pct_copy"] = 100 * row["gbs"] / ceiling
    return row


def _profile_row(row, x, do, fla: bool = False) -> None:
    """Into the row: the op's kernels, their summed time per call (the GPU's busy time, which a loaded CPU does not
    stretch as it does the wall-clock time) and the longest six."""
    import kernels

    op = _fla_op(row["rule"]) if fla else kernels.get_op(row["rule"], row["backend"])
    who = "fla" if fla else "ours"
    profile = kernel_profile(lambda: _fwd_bwd(op, x, do), longest=6)
    row[f"kernel_sum_ms_{who}"], row[f"kernels_ms_{who}"] = profile["kernel_sum_ms"], profile["kernels_ms"]


def _gpu_cells(row, who: str) -> str:
    """' GPU x ms' and, for fla, its GPU ratio to ours; empty when the row was not profiled."""
    gpu = row.get(f"kernel_sum_ms_{who}")
    if gpu is None:
        return ""
    ratio = f", fla/ours {gpu / row['kernel_sum_ms_ours']:5.2f}x" if who == "fla" else ""
    return f"  GPU {gpu:8.2f} ms{ratio}"


def _print_kernels(row, who: str) -> None:
    if f"kernels_ms_{who}" in row:
        profile = {"kernel_sum_ms": row[f"kernel_sum_ms_{who}"], "kernels_ms": row[f"kernels_ms_{who}"]}
        print(f"  {who} kernels: {describe_kernels(profile)}")


def kernel_profile(fn, longest: int) -> dict:
    """fn's kernels: their summed time per call ("kernel_sum_ms") and the `longest` longest ("kernels_ms")."""
    times = kernel_times(fn)
    return {"kernel_sum_ms": sum(times.values()), "kernels_ms": dict(list(times.items())[:longest])}


def describe_kernels(profile: dict) -> str:
    listed = ", ".join(f"{name} {ms:.2f}" for name, ms in profile["kernels_ms"].items())
    return f"{profile['kernel_sum_ms']:.2f} ms per call; longest, ms: {listed}"


def kernel_times(fn, calls: int = 3) -> dict[str, float]:
    """Milliseconds per call of each of fn's kernels over `calls` calls, longest first (torch.profiler; on a machine
    without CUDA, its CPU ops), Triton kernel names without their leading _ and trailing _kernel, CUDA C++ ones
    without their template and call arguments (PyTorch's elementwise kernels summed by kind)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
    return times_by_kernel(prof, calls)


def times_by_kernel(prof, calls: int) -> dict[str, float]:
    """kernel_times' table from a finished torch.profiler profile of `calls` calls."""
    import torch
    from torch.autograd import DeviceType

    cuda = torch.cuda.is_available()
    device = DeviceType.CUDA if cuda else DeviceType.CPU
    times = {}
    for event in prof.key_averages():
        # A user annotation (record_function, e.g. torch.optim's "Optimizer.step#AdamW.step") is a region, not an
        # op or kernel: on the GPU its span covers the kernels inside it (counted twice) and the gaps between them;
        # on the CPU its self time is Python. torch's own tables leave it out of the device total too.
        if event.device_type == device and not event.is_user_annotation:
            name = event.key.removeprefix("void ").split("<")[0].split("(")[0]
            name = name.removeprefix("_").removesuffix("_kernel")
            total = event.self_device_time_total if cuda else event.self_cpu_time_total
            times[name] = times.get(name, 0.0) + total / 1e3 / calls
    return dict(sorted(times.items(), key=lambda item: -item[1]))


def warm_fla(shapes, rules, jobs: int) -> None:
    """fla's first forward+backward of each (rule, shape) in child processes, `jobs` at a time: they compile
    fla's kernels into the Triton cache that this process then reads."""
    cmds = [[*CHILD, "--_fla-warm-child", json.dumps([shape, rule])] for shape in shapes for rule in rules]
    t0 = time.perf_counter()
    print(f"fla: compiling in {len(cmds)} child processes, {jobs} at a time ...", flush=True)
    with ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(lambda cmd: subprocess.run(cmd, capture_output=True, text=True), cmds))
    failed = [json.loads(cmd[-1]) for cmd, res in zip(cmds, results) if res.returncode != 0]
    failed = ", ".join(f"{rule} {_shape_label(shape)}" for shape, rule in failed)
    print(
        f"fla: compiled in {time.perf_counter() - t0:.0f} s"
        + (f"; failed (timed here anyway): {failed}" if failed else "")
    )


def _time_fla(row, x, do) -> None:
    """fla's op on the row's inputs: its first call in this process (autotuning included) and its time."""
    from triton.testing import do_bench

    fla = _fla_op(row["rule"])
    row["s_fla_first_call"] = _time_once(lambda: _fwd_bwd(fla, x, do)) / 1e3
    row["ms_fla"] = do_bench(lambda: _fwd_bwd(fla, x, do), warmup=5, rep=50, return_mode="median")


def _time_recurrent(rule, x, do) -> float:
    """Milliseconds of the token-by-token reference on the whole batch, measured on the first
    RECURRENT_PREFIX = (sequences, tokens) and scaled by the number of tokens: it steps through one token of
    one sequence at a time, at a fixed cost per step (tens of seconds a row at full size)."""
    import kernels

    B, T = do.shape[:2]
    b, t = min(B, RECURRENT_PREFIX[0]), min(T, RECURRENT_PREFIX[1])
    x_prefix = {n: x_n[:b, :t].detach().requires_grad_() for n, x_n in x.items()}
    op = kernels.get_op(rule, "torch", "recurrent")
    return _time_once(lambda: _fwd_bwd(op, x_prefix, do[:b, :t])) * (B * T) / (b * t)


def _time_once(fn) -> float:
    """Milliseconds of one call (for the token-by-token reference, too slow to repeat)."""
    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0)


def _shape_label(shape, sep: str = "x") -> str:
    """A shape as the rows name it (sep "," as `--shape` takes it)."""
    return sep.join(map(str, shape))


def _print_row(row):
    shape = _shape_label(row["shape"])
    if not row["correct"]:
        print(f"{row['rule']:16s} {shape:22s} WRONG (max rel err {row['max_rel_err']:.2e}): no speedup reported")
        return
    print(
        f"{row['rule']:16s} {shape:22s} ours wall {row['ms_ours']:8.2f} ms{_gpu_cells(row, 'ours')}  "
        f"torch {row['ms_torch']:8.2f} ms (torch/ours {row['ms_torch'] / row['ms_ours']:6.1f}x)  recurrent (scaled) "
        f"{row['ms_recurrent']:9.1f} ms (/ours {row['ms_recurrent'] / row['ms_ours']:7.0f}x)  {row['gbs']:6.0f} GB/s "
        f"({row['pct_copy']:4.1f}% of copy)  max rel err {row['max_rel_err']:.1e}",
        flush=True,
    )
    _print_kernels(row, "ours")


def _print_fla(row):
    shape = _shape_label(row["shape"])
    print(
        f"{row['rule']:16s} {shape:22s} fla  wall {row['ms_fla']:8.2f} ms, "
        f"fla/ours {row['ms_fla'] / row['ms_ours']:5.2f}x{_gpu_cells(row, 'fla')}  "
        f"fla's first call {row['s_fla_first_call']:.0f} s",
        flush=True,
    )
    _print_kernels(row, "fla")


def _first_call(shape, rules, backend) -> dict[str, float]:
    """Seconds of the first forward+backward of each rule in this process (compilation included)."""
    import torch

    import kernels

    out = {}
    for rule in rules:
        x, do = _inputs(rule, shape)
        op = kernels.get_op(rule, backend)  # imports Triton and the chunk module: not the call's time
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        _fwd_bwd(op, x, do)
        torch.cuda.synchronize()
        out[rule] = time.perf_counter() - t0
    return out


def first_call_times(shape, rules, backend) -> None:
    """Cold (fresh Triton cache) and warm (the cache the cold process filled) first-call times, each rule in
    processes and a cache of its own: in one process, what the rules share (Triton's launcher built and loaded,
    kernels common to several rules) would count in the first rule's time only."""
    times = {"cold": {}, "warm": {}}
    for rule in rules:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TRITON_CACHE_DIR": cache}
            cmd = [*CHILD, "--_first-call-child", json.dumps([shape, [rule], backend])]
            for label in ("cold", "warm"):
                res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                times[label].update(json.loads(res.stdout.strip().splitlines()[-1]))
    for label, by_rule in times.items():
        print(
            f"first forward+backward, {label} cache, shape {shape}: "
            + ", ".join(f"{r} {t:.1f} s" for r, t in by_rule.items())
        )


def _shape(text: str) -> tuple[int, ...]:
    """`--shape 8,2048,4,256,256` -> (8, 2048, 4, 256, 256)."""
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 5 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: must be B,T,H,K,V, five integers >= 1")
    return shape


def main(argv: list[str] | None = None) -> int:
    from kernels import TRITON_BACKENDS
    from kernels.rules import RULES
    from sandbox.bench import compile_only_problem, repeated_problem
    from sandbox.results import file_problem, path_argument
    from tasks.cli import OneLineParser

    parser = OneLineParser(prog="sandbox-bench kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    parser.add_argument("--backend", choices=TRITON_BACKENDS, default="triton",
                        help="our op's products: float32-accurate (triton) or on bf16 operands (triton_bf16)")
    parser.add_argument("--shape", action="append", type=_shape,
                        help="B,T,H,K,V (repeatable); default: " + " ".join(",".join(map(str, s)) for s in SHAPES))
    parser.add_argument("--no-fla", action="store_true", help="skip the comparison with fla")
    parser.add_argument("--fla-jobs", type=int, default=8, help="child processes compiling fla's kernels at once")
    parser.add_argument("--fla-compile-only", action="store_true",
                        help="only compile fla's kernels into the Triton cache (time in a later run)")  # fmt: skip
    parser.add_argument("--first-call", action="store_true", help="also time cold and warm first calls")
    parser.add_argument("--no-profile", action="store_true",
                        help="leave out each op's GPU time (its kernels summed) and longest kernels")  # fmt: skip
    parser.add_argument("--json", type=path_argument, help="write the timings to this file")
    parser.add_argument("--_first-call-child", dest="child", help=argparse.SUPPRESS)
    parser.add_argument("--_fla-warm-child", dest="fla_child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fla_jobs < 1:
        parser.error(f"--fla-jobs {args.fla_jobs} is invalid: must be >= 1")
    shapes = [_shape_label(shape, ",") for shape in args.shape or []]
    problem = repeated_problem("--rules", args.rules) or repeated_problem("--shape", shapes)
    if problem:
        parser.error(problem)
    problem = args.json and file_problem(args.json)
    if problem:
        parser.error(f"--json {args.json} is invalid: {problem}")
    problem = args.fla_compile_only and compile_only_problem(
        {"--no-fla": args.no_fla, "--first-call": args.first_call, "--json": args.json})
    if problem:
        parser.error(problem)
    # before fla is imported, here and in the compiling children: fla autotunes in the timing process instead of
    # reusing choices cached on disk by processes that shared the GPU
    os.environ["FLA_CACHE_RESULTS"] = "0"

    import torch

    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (the Triton kernels do not run on the CPU)")
    if args.child:
        shape, rules, backend = json.loads(args.child)
        print(json.dumps(_first_call(tuple(shape), rules, backend)))
        return 0
    if args.fla_child:
        shape, rule = json.loads(args.fla_child)
        x, do = _inputs(rule, tuple(shape))
        _fwd_bwd(_fla_op(rule), x, do)
        return 0
    shapes = args.shape or SHAPES
    if args.fla_compile_only:
        if _fla_op("gla") is None:
            print("sandbox-bench kernels: --fla-compile-only needs fla (the bench extra)", file=sys.stderr)
            return 2
        warm_fla(shapes, args.rules, jobs=args.fla_jobs)
        return 0
    if args.first_call:
        first_call_times(shapes[0], args.rules, args.backend)
    rows = run_timings(shapes, args.rules, args.backend, use_fla=not args.no_fla, fla_jobs=args.fla_jobs,
                       profile=not args.no_profile)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["correct"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
