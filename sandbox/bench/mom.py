"""`sandbox-bench mom`: forward+backward time and peak memory of the routed MoM layer (needs a GPU).

In bf16, at the paper's size (batch 8, length 2048, hidden 1024, 4 heads of 256) and a sandbox size (batch 64,
length 512, hidden 256, 4 heads of 64), 4 memories, top-2, shared memory, gated DeltaNet: our MoM (backend
triton, the routed path), our single-memory gated DeltaNet layer of the same size, and, when `fla` is
importable, fla's `MomAttention` with the same settings, all timed in the same run; printed as ratios with the
peak memory of one forward+backward (above what the layer's parameters, gradients and inputs hold) and what it
keeps for the backward (the saved tensors by dtype, the largest named).

Our MoM is first checked against the zoo's PyTorch MoM (float32, backend torch) on one sequence of the timed
shape (output and input gradient within 2e-2; 2e-1 with `--backend triton_bf16`, whose chunk kernels take
every product on bf16 operands and keep their chunk states in bf16, as fla computes); a layer that fails prints
no ratio. fla compiles every config it
autotunes over on its first calls (minutes): one child process per shape compiles them, all at once, into the
Triton cache, then one child times fla, autotuning at each timed shape on a GPU it has to itself (fla's on-disk
cache of autotuning choices is switched off, as the compiling children share the GPU); each step has a time
limit (`--fla-timeout`), and fla is reported as not measured when the timing cannot finish. fla 0.6.0 refuses
its gated backward on Hopper with Triton < 3.7.1 (fla issue #640: wrong dk/dg there); this benchmark lifts that
guard to time fla only. `--fla-compile-only` runs the compiling children and stops, so that a later command
(same `TRITON_CACHE_DIR`) times without compiling. Each layer's row gives its wall time per forward+backward
(CUDA events around the call: launches and Python included) beside its GPU time (its kernels' time summed,
torch.profiler: the GPU's busy time, which a loaded CPU does not stretch), the ratios of each, and its longest
kernels; `--no-profile` leaves the GPU time out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

# name -> (batch, length, hidden, heads)
SHAPES = {"paper": (8, 2048, 1024, 4), "sandbox": (64, 512, 256, 4)}
MOM = {"num_memories": 4, "top_k": 2, "shared_memory": True}
TARGETS = "targets: fla/ours >= 3.0 at the paper's size; ours/single <= 2.5; our peak memory <= fla's"


def _inputs(shape, seed=0):
    import torch

    B, T, d, _ = shape
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(B, T, d, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    return x, torch.randn(B, T, d, device="cuda", dtype=torch.bfloat16, generator=gen)


def _fwd_bwd(layer, x, dy) -> None:
    y = layer(x)
    (y[0] if isinstance(y, tuple) else y).backward(dy)  # fla's layers return (y, attentions, cache)


def saved_for_backward(output, largest: int = 6) -> dict:
    """What autograd keeps for the backward of `output`'s graph: every tensor an op or autograd function of it
    saved that is not a leaf or a view of one (the weights and the layer's input are held anyway), each storage
    counted once (under one of the ops that saved it). MiB in all, by dtype and by op, and the `largest` as (op,
    shape, dtype, MiB)."""
    import torch

    storages: dict[int, tuple] = {}
    nodes, seen = [output.grad_fn], set()
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.extend(next_node for next_node, _ in node.next_functions)
        saved = list(getattr(node, "saved_tensors", None) or ())  # custom autograd functions
        for attribute in dir(node):  # built-in ops: _saved_<name>, a tensor or a list of them
            if attribute.startswith("_saved_"):
                value = getattr(node, attribute)
                saved.extend(value if isinstance(value, (list, tuple)) else [value])
        op = node.name().removesuffix("Backward").removesuffix("Backward0")
        for t in saved:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            base = t if t._base is None else t._base  # a weight is often saved as a view (its transpose)
            if not (base.is_leaf and base.requires_grad):
                storage = t.untyped_storage()
                storages.setdefault(storage.data_ptr(), (op, tuple(t.shape), str(t.dtype).removeprefix("torch."),
                                                         storage.nbytes() / 2**20))
    by_dtype: dict[str, float] = {}
    by_op: dict[str, float] = {}
    for op, _, dtype, mib in storages.values():
        by_dtype[dtype] = by_dtype.get(dtype, 0.0) + mib
        by_op[op] = by_op.get(op, 0.0) + mib
    ranked = sorted(storages.values(), key=lambda entry: -entry[3])
    return {"saved_mib": sum(by_dtype.values()), "saved_by_dtype_mib": by_dtype,
            "saved_by_op_mib": dict(sorted(by_op.items(), key=lambda item: -item[1])),
            "saved_largest": [list(entry) for entry in ranked[:largest]]}


def _measure(layer, shape, reps: int, profile: bool) -> dict:
    """Milliseconds of one forward+backward (CUDA events, after warm-up), its peak memory and what it keeps for
    the backward (`saved_for_backward`) in MiB; with `profile`, also its kernels' summed time and the longest
    eight (ms per forward+backward)."""
    import torch

    x, dy = _inputs(shape)

    def fwd_bwd():
        _fwd_bwd(layer, x, dy)

    for _ in range(3):
        fwd_bwd()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fwd_bwd()
    end.record()
    torch.cuda.synchronize()
    y = layer(x)
    y = y[0] if isinstance(y, tuple) else y
    result = {"ms": start.elapsed_time(end) / reps, "peak_mib": peak, **saved_for_backward(y)}
    y.backward(dy)
    if profile:
        from sandbox.bench.kernels import kernel_profile

        result.update(kernel_profile(fwd_bwd, longest=8))
    return result


def _check(mom, shape) -> float:
    """Largest relative error of our bf16 MoM's output and input gradient against the PyTorch MoM (float32)
    on the first sequence of the shape."""
    import torch

    from kernels.testing import rel_err
    from models.mom import MoM

    ref = MoM(shape[2], num_heads=shape[3], backend="torch", **MOM).cuda()
    ref.load_state_dict(mom.state_dict())
    x, dy = _inputs(shape)
    x, dy = x[:1].detach(), dy[:1]
    results = []
    for layer, dtype in ((mom, x.dtype), (ref, torch.float32)):
        inp = x.detach().to(dtype).requires_grad_()
        y = layer(inp)
        y.backward(dy.to(dtype))
        results.append((y, inp.grad))
    mom.zero_grad()
    return max(rel_err(a, b) for a, b in zip(*results))


def run_ours(name: str, reps: int, profile: bool, backend: str) -> dict:
    import torch

    from kernels.testing import BF16_TOLERANCE
    from models.gated_deltanet import GatedDeltaNet
    from models.mom import MoM

    shape = SHAPES[name]
    torch.manual_seed(0)
    mom = MoM(shape[2], num_heads=shape[3], backend=backend, **MOM).cuda().bfloat16()
    single = GatedDeltaNet(shape[2], num_heads=shape[3], backend=backend).cuda().bfloat16()
    row = {"shape": name, "backend": backend, "max_rel_err": _check(mom, shape)}
    # twice an op's tolerance: bf16 activations alone give about 7e-3 (tests/test_mom_routed.py)
    row["correct"] = row["max_rel_err"] < 2 * BF16_TOLERANCE[backend]
    row["ours"] = _measure(mom, shape, reps, profile)
    row["single"] = _measure(single, shape, reps, profile)
    return row


def fla_worker(names: list[str], reps: int, compile_only: bool, profile: bool) -> int:
    """Child process: time fla's MomAttention at each shape, one JSON line per shape (or, `compile_only`, run
    one forward+backward)."""
    import torch

    try:
        import fla.ops.common.chunk_o as chunk_o
        from fla.layers.mom import MomAttention
    except ImportError as err:
        print(json.dumps({"error": f"fla not importable: {err}"}), flush=True)
        return 0
    chunk_o.TRITON_ABOVE_3_7_1 = True  # timing only: see the module docstring
    for name in names:
        B, T, d, H = SHAPES[name]
        torch.manual_seed(0)
        layer = MomAttention(
            hidden_size=d, head_dim=d // H, num_heads=H, expand_v=1, num_memories=MOM["num_memories"],
            topk=MOM["top_k"], shared_mem=MOM["shared_memory"],
        ).cuda().bfloat16()  # fmt: skip
        if compile_only:
            _fwd_bwd(layer, *_inputs(SHAPES[name]))
            continue
        t0 = time.time()
        result = _measure(layer, SHAPES[name], reps, profile)
        print(json.dumps({"shape": name, "fla": result, "s": time.time() - t0}))
        sys.stdout.flush()
    return 0


FLA_ENV = {"FLA_CACHE_RESULTS": "0"}
FLA_WORKER = [sys.executable, "-m", "sandbox.bench.mom", "--fla-worker"]


def compile_fla(names: list[str], timeout: float) -> None:
    """fla's first forward+backward at each shape, one child process per shape, all at once: they compile its
    kernels into the Triton cache. A child that fails or runs out of time leaves its compiling to the timing."""
    env = {**os.environ, **FLA_ENV}
    print(f"fla MomAttention: compiling in {len(names)} child processes ...", flush=True)
    with ThreadPoolExecutor(len(names)) as pool:
        cmds = [[*FLA_WORKER, "--compile-only", "--shapes", name] for name in names]
        list(pool.map(lambda cmd: _run_quietly(cmd, env, timeout), cmds))


def run_fla(names: list[str], reps: int, timeout: float, profile: bool) -> dict:
    """fla's timings from a child process (name -> result), or the reason there are none."""
    env = {**os.environ, **FLA_ENV}
    cmd = [*FLA_WORKER, "--reps", str(reps), *([] if profile else ["--no-profile"])]
    compile_fla(names, timeout)
    try:
        done = subprocess.run(cmd + ["--shapes", *names], capture_output=True, text=True, timeout=timeout, env=env)
        out, note = done.stdout, "" if done.returncode == 0 else f"exit {done.returncode}: {done.stderr[-2000:]}"
    except subprocess.TimeoutExpired as err:  # what it printed before (bytes, whatever `text` says)
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        note = f"not finished within {timeout:.0f} s (fla autotunes on its first calls)"
    results = {}
    for line in out.splitlines():
        if line.startswith("{"):
            item = json.loads(line)
            if "error" in item:
                note = item["error"]
            else:
                results[item["shape"]] = item
    return {"results": results, "note": note}


def _run_quietly(cmd, env, timeout) -> None:
    try:
        subprocess.run(cmd, capture_output=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        pass


def _print_layer(who: str, result: dict) -> None:
    gpu = f"  GPU {result['kernel_sum_ms']:8.2f} ms" if "kernel_sum_ms" in result else ""
    print(f"         {who:6s} wall {result['ms']:8.2f} ms{gpu}  peak {result['peak_mib']:8.0f} MiB")
    if "saved_mib" in result:
        dtypes = ", ".join(f"{dtype} {mib:.0f}" for dtype, mib in result["saved_by_dtype_mib"].items())
        ops = ", ".join(f"{op} {mib:.0f}" for op, mib in result["saved_by_op_mib"].items() if mib >= 0.5)
        largest = ", ".join(f"{op} {dtype}{list(shape)} {mib:.0f}" for op, shape, dtype, mib in result["saved_largest"])
        print(f"           saved for backward {result['saved_mib']:.0f} MiB ({dtypes}); by op, MiB: {ops}")
        print(f"           largest saved, MiB: {largest}")
    if "kernel_sum_ms" in result:
        from sandbox.bench.kernels import describe_kernels

        print(f"           kernels {describe_kernels(result)}")


def _ratios(name: str, a: dict, b: dict) -> str:
    """'name a/b' of wall time, and of GPU time where both layers were profiled."""
    both = "kernel_sum_ms" in a and "kernel_sum_ms" in b
    gpu = f", GPU {a['kernel_sum_ms'] / b['kernel_sum_ms']:.2f}x" if both else ""
    return f"{name} wall {a['ms'] / b['ms']:.2f}x{gpu}"


def _print_row(row: dict) -> None:
    ours, single = row["ours"], row["single"]
    status = "ok" if row["correct"] else "FAILED (no ratios)"
    print(f"{row['shape']:8s} check vs PyTorch MoM: max rel err {row['max_rel_err']:.2e} {status}")
    _print_layer("ours", ours)
    _print_layer("single", single)
    if row["correct"]:
        print(f"         {_ratios('ours/single', ours, single)}")


def _print_fla(row: dict, fla: dict) -> None:
    ours = row["ours"]
    print(f"{row['shape']:8s}")
    _print_layer("fla", fla)
    if row["correct"]:
        print(f"         {_ratios('fla/ours', fla, ours)}  peak ours/fla {ours['peak_mib'] / fla['peak_mib']:.2f}")


def main(argv: list[str] | None = None) -> int:
    from kernels import TRITON_BACKENDS
    from sandbox.bench import compile_only_problem, repeated_problem
    from sandbox.results import file_problem, path_argument
    from tasks.cli import OneLineParser

    parser = OneLineParser(prog="sandbox-bench mom", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--backend", choices=TRITON_BACKENDS, default="triton",
                        help="our layers' chunk products: float32-accurate (triton) or on bf16 operands (triton_bf16)")
    parser.add_argument("--no-fla", action="store_true", help="skip the comparison with fla")
    parser.add_argument("--fla-timeout", type=float, default=300.0,
                        help="seconds for fla's compiling, then as many for its timing")  # fmt: skip
    parser.add_argument("--fla-compile-only", action="store_true",
                        help="only compile fla's kernels into the Triton cache (time in a later run)")  # fmt: skip
    parser.add_argument("--no-profile", action="store_true",
                        help="leave out each layer's GPU time (its kernels summed) and longest kernels")  # fmt: skip
    parser.add_argument("--fla-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=path_argument, help="write the results to this file")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"--reps {args.reps} is invalid: must be >= 1")
    problem = repeated_problem("--shapes", args.shapes)
    if problem:
        parser.error(problem)
    # subprocess's wait overflows past about 2**31 ms (inf too): a traceback after every timing of ours
    if not 0 < args.fla_timeout <= 1e6:
        parser.error(f"--fla-timeout {args.fla_timeout} is invalid: must be a number of seconds > 0 and at most 1e6")
    problem = args.json and file_problem(args.json)
    if problem:
        parser.error(f"--json {args.json} is invalid: {problem}")
    problem = args.fla_compile_only and compile_only_problem({"--no-fla": args.no_fla, "--json": args.json})
    if problem:
        parser.error(problem)
    if args.fla_worker:
        return fla_worker(args.shapes, args.reps, args.compile_only, not args.no_profile)

    import torch

    if not torch.cuda.is_available():
        parser.error("needs a CUDA device (its Triton kernels do not run on the CPU)")
    if args.fla_compile_only:
        if importlib.util.find_spec("fla") is None:
            print("sandbox-bench mom: --fla-compile-only needs fla (the bench extra)", file=sys.stderr)
            return 2
        compile_fla(args.shapes, args.fla_timeout)
        return 0
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; bf16, forward+backward; ours: "
          f"backend {args.backend}")
    print(TARGETS)
    rows = []
    for name in args.shapes:
        rows.append(run_ours(name, args.reps, not args.no_profile, args.backend))
        _print_row(rows[-1])
        torch.cuda.empty_cache()
    fla = {"results": {}, "note": "--no-fla"}
    if not args.no_fla:
        fla = run_fla(args.shapes, args.reps, args.fla_timeout, not args.no_profile)
    print(f"fla MomAttention: {fla['note'] or 'measured (its Hopper guard lifted for timing only)'}")
    for row in rows:
        if row["shape"] in fla["results"]:
            _print_fla(row, fla["results"][row["shape"]]["fla"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "fla": fla}, f, indent=1)
    return 0 if all(row["correct"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
