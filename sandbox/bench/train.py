"""`sandbox-bench train`: whole training steps of the sandbox's models, timed, with their GPU busy time.

A step is what `sandbox-train` runs: forward, backward, gradient clipping, the optimizer and schedule, and the
logging of the sandbox's callbacks and logger, through the real RecallModule, RecallDataModule and trainer of
`sandbox.train` on MQAR batches (`--experiment`, default zoology: batch 64, L 512; bf16-mixed on CUDA, float32
on the CPU). For each model (`--models`) and width (`--widths`), in three modes:
  alone   one run in this process;
  packed  N identical runs as N processes at once (`--packed N`), as `sandbox-sweep --workers N` and
          docs/results/zoology/run.sh pack them: each process's steps/s and all of them together;
  stacked R runs of the model in one process as one stacked model (`--stacked R ...`; sandbox.stacked_run, what
          `sandbox-train -m` does on a GPU for runs differing in seed or learning rate): the steps/s of the
          stack and the run-steps/s of all its runs;
  plain   a bare PyTorch loop of the same model (the module's loss, fused AdamW on CUDA, the schedule and
          clipping, batches gathered on the device; no Lightning, no logging): the yardstick.
Variants name the training-step levers that are on (`none`: none of them): `fused` (fused
AdamW, on CUDA only), `nosync` (no host reads inside a step: RecallModule's step against the bench's `HostReads`),
`device_data` (the training set held on the device, RecallDataModule's `device_data`); `all` is the three;
`graphs` is `all` with the loss's forward and backward replayed from CUDA graphs (`cuda_graphs=true`, CUDA only).
`--variants` run at every width, `--ablate-at` adds each single lever at the widths given.

Each run takes `--warmup` steps, then `--steps` timed steps (wall clock and CUDA events, one device sync at each
end, none between), then `--profile-steps` under torch.profiler, whose CUDA kernels summed per step are the GPU
busy time (on the CPU: its CPU ops' time), then on CUDA `--check-steps` counted for host syncs
(torch.cuda.set_sync_debug_mode). Printed per row: wall time per step beside busy time and their ratio, steps/s,
tokens/s, and runs per GPU-hour for the grid of `--grid-runs` runs of `--grid-steps` steps (default:
experiment=zoology's grid and steps, read from its yaml), counting training steps only (no validation or test); then the
ratios between variants and modes measured in this run. `--json` gets every row, rewritten after each.
Each process generates its data once (every segment capped at a few more examples than a run takes batches)
and a run ends before its first validation. A run that fails is one line among the rows (and under `failed` in
`--json`), the others go on, exit code 1; Ctrl-C or SIGTERM stops the bench with a line of the rows measured, exit
code 130 or 143.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

MODELS = ("attention", "gated_deltanet", "mom")
LEVERS = ("fused", "nosync", "device_data")
VARIANTS = ("none", *LEVERS, "all", "graphs")
MODES = ("alone", "packed", "stacked", "plain")


class BadInput(ValueError):
    """A setting of this benchmark that cannot run; one line, exit code 2."""


class Interrupted(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM, raised where the bench is so that it stops and says so: not a KeyboardInterrupt,
    which Lightning's fit turns into exit code 1 without a word."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum, frame):
    raise Interrupted(signum)


# The variants that are several levers (or none); every other variant is its one lever.
COMBINED = {"none": set(), "all": set(LEVERS), "graphs": {*LEVERS, "graphs"}}


def levers_of(variant: str) -> set[str]:
    return set(COMBINED.get(variant, {variant}))


# ---- the windows of a run: warm-up, timed, profiled, sync-checked ----
class Windows:
    """Call `step_start()` before each of `total` steps and once more, before a next step or after the last
    (Lightning runs one step more, so that the epoch's end stays out of the windows). With a `barrier` (packed
    runs), the processes start their timed and profiled windows together."""

    def __init__(self, warmup: int, timed: int, profiled: int, checked: int, barrier=None):
        import torch

        self.cuda = torch.cuda.is_available()
        self.checked = checked if self.cuda else 0
        self.bounds = [warmup, warmup + timed, warmup + timed + profiled, warmup + timed + profiled + self.checked]
        self.timed, self.profiled, self.barrier, self.n = timed, profiled, barrier, 0
        self.result: dict = {}

    @property
    def total(self) -> int:
        return self.bounds[-1]

    def _sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()

    def _together(self) -> None:
        if self.barrier is not None:
            self.barrier.wait(timeout=900)

    def step_start(self) -> None:
        import torch

        n, self.n = self.n, self.n + 1
        begin_timed, begin_profiled, begin_checked, end = self.bounds
        if n == begin_timed:
            self._sync()
            self._together()
            self._t0, self._clock0 = time.perf_counter(), time.time()
            if self.cuda:
                self._events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
                self._events[0].record()
        if n == begin_profiled:
            if self.cuda:
                self._events[1].record()
            self._sync()
            wall_s = time.perf_counter() - self._t0
            self.result.update(wall_ms=1e3 * wall_s / self.timed, clock=(self._clock0, time.time()))
            if self.cuda:
                self.result["event_ms"] = self._events[0].elapsed_time(self._events[1]) / self.timed
            self._together()
            from torch.profiler import ProfilerActivity, profile

            self._profile = profile(activities=[ProfilerActivity.CUDA if self.cuda else ProfilerActivity.CPU])
            self._profile.start()
            self._t0 = time.perf_counter()
        if n == begin_checked:
            self._sync()
            self.result["profiled_wall_ms"] = 1e3 * (time.perf_counter() - self._t0) / self.profiled
            self._profile.stop()
            from sandbox.bench.kernels import times_by_kernel

            times = times_by_kernel(self._profile, self.profiled)
            self.result.update(busy_ms=sum(times.values()), longest_ms=dict(list(times.items())[:5]))
            if self.checked:
                self._caught = warnings.catch_warnings(record=True)
                self._warnings = self._caught.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
        if n == end and self.checked:
            torch.cuda.set_sync_debug_mode("default")  # before anything here syncs
            self._caught.__exit__(None, None, None)
            syncs = [w for w in self._warnings if "synchroniz" in str(w.message)]
            self.result["syncs_per_step"] = len(syncs) / self.checked


def _window_callback(windows: Windows):
    import lightning as L

    class StepWindows(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            windows.step_start()

    return StepWindows()


# ---- the sandbox's step, and the one with host reads (the nosync lever off) ----
def host_reads_module():
    """RecallModule with a training step that reads from the device (the `nosync` lever off): logits at a
    boolean mask of the labelled positions (its selection reads their count), loss and accuracy on the progress
    bar (Lightning reads those to the host after every step), router statistics read as floats."""
    import torch.nn.functional as F

    from sandbox.module import RecallModule
    from tasks import IGNORE

    class HostReads(RecallModule):
        def training_step(self, batch, batch_idx):
            inputs, labels, _ = batch
            mask = labels != IGNORE
            out = self.model(inputs, label_mask=mask)
            targets = labels[mask]
            loss = F.cross_entropy(out.logits.float(), targets)
            self.log("train/loss", loss, prog_bar=True)
            self.log("train/acc", (out.logits.argmax(-1) == targets).float().mean(), prog_bar=True)
            self.log("train/aux_loss", out.aux_loss)
            if self.global_step % self.trainer.log_every_n_steps == 0:
                stats = self.model.router_stats()
                if stats:
                    self.log_dict({f"router/{k}": v for k, v in stats.items()})
            return loss + out.aux_loss

    return HostReads


def zoology_grid() -> dict:
    """experiment=zoology's runs (the product of its sweep's value counts) and each one's steps."""
    from omegaconf import OmegaConf

    from sandbox.train import CONF_DIR

    experiment = OmegaConf.load(CONF_DIR / "experiment" / "zoology.yaml")
    runs = math.prod(len(str(values).split(",")) for values in experiment.hydra.sweeper.params.values())
    return {"runs": runs, "steps": experiment.trainer.max_steps}


# The settings compose() gives every run, with the options that set them: an --override of one timed another
# model or width than its row says, or ran other steps than the bench's windows.
SET_BY_BENCH = {"experiment": "--experiment", "model": "--models", "model.d_model": "--widths",
                "task.batch_size": "--batch", "task.limit_examples": "--batch", "trainer.max_steps": "--steps",
                "trainer.val_check_interval": "--steps",
                "cuda_graphs": "--variants graphs"}  # each row's variant sets the module's graphs, whatever cfg says


def compose(args, model: str, width: int, root: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from sandbox.train import CONF_DIR

    steps = Windows(args.warmup, args.steps, args.profile_steps, args.check_steps).total + 1
    overrides = [
        f"experiment={args.experiment}", f"model={model}", f"model.d_model={width}",
        # enough examples in every segment for more batches than steps, the first validation after the last
        f"task.batch_size={args.batch}", f"task.limit_examples={(steps + 2) * args.batch}",
        f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps + 1}", "callbacks.progress=none",
        f"output_root={root}",
        *args.override,
    ]  # fmt: skip
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def make_module(cfg, datamodule, cls):
    from omegaconf import OmegaConf

    return cls(model=OmegaConf.to_container(cfg.model, resolve=True), vocab_size=datamodule.vocab_size,
               max_seq_len=datamodule.max_seq_len, optim=OmegaConf.to_container(cfg.optim, resolve=True))


class Data:
    """One generated data set for every row of this process (the rows differ in model, not in task)."""

    datamodule = None

    @classmethod
    def get(cls, cfg):
        from sandbox.train import build

        if cls.datamodule is None:
            cls.datamodule, _ = build(cfg)
        return cls.datamodule


def run_lightning(args, model: str, width: int, variant: str, barrier=None) -> dict:
    """One run of `sandbox-train`'s step; the row of its measurements."""
    import lightning as L
    import torch

    from sandbox.module import RecallModule
    from sandbox.train import make_trainer

    levers = levers_of(variant)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as root:
        cfg = compose(args, model, width, root)
        L.seed_everything(cfg.seed, verbose=False)
        datamodule = Data.get(cfg)
        datamodule.device_data = "device_data" in levers
        module = make_module(cfg, datamodule, RecallModule if "nosync" in levers else host_reads_module())
        module.fused_adamw = "fused" in levers
        module.cuda_graphs = "graphs" in levers
        windows = Windows(args.warmup, args.steps, args.profile_steps, args.check_steps, barrier)
        trainer = make_trainer(cfg, Path(root) / "run", [_window_callback(windows)])
        trainer.fit(module, datamodule=datamodule)
        fused = bool(trainer.optimizers[0].defaults.get("fused"))
    del trainer, module
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return _row(args, "alone", model, width, variant, windows, datamodule.max_seq_len, fused=fused)


def run_plain(args, model: str, width: int) -> dict:
    """The yardstick: the same model and loss in a bare PyTorch loop (see the module docstring)."""
    import torch

    from sandbox.data import DeviceLoader, EpochShuffle
    from sandbox.module import RecallModule, WarmupCosine, adamw, most_labelled

    with tempfile.TemporaryDirectory(prefix="bench-train-") as root:
        cfg = compose(args, model, width, root)
    torch.manual_seed(cfg.seed)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    datamodule = Data.get(cfg)
    module = make_module(cfg, datamodule, RecallModule).to(device)
    module.max_labels = most_labelled(datamodule.datasets.values())
    windows = Windows(args.warmup, args.steps, args.profile_steps, args.check_steps)
    optimizer = adamw(module.model, cfg.optim, fused=cuda)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(int(cfg.optim.warmup_ratio * windows.total), windows.total, cfg.optim.min_lr_ratio))
    train = datamodule.datasets["train"]
    loader = DeviceLoader(train, device=device, batch_size=args.batch, drop_last=True,
                          sampler=EpochShuffle(len(train), cfg.seed))
    batches = iter(loader)
    for _ in range(windows.total):
        windows.step_start()
        inputs, labels, _ = next(batches)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss, aux_loss, _, _ = module(inputs, labels)
        (loss + aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.trainer.gradient_clip_val)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    windows.step_start()
    return _row(args, "plain", model, width, "all", windows, datamodule.max_seq_len, fused=cuda)


def run_stacked(args, model: str, width: int, runs: int) -> dict:
    """`runs` runs of `sandbox-train`'s step stacked (seeds 0.., learning rates spread around the configured
    one), the training set on the device; the row of its measurements."""
    import lightning as L
    import torch
    from lightning.pytorch.loggers import CSVLogger
    from omegaconf import OmegaConf

    from sandbox.module import RecallModule
    from sandbox.stacked_run import RunLoggers, StackedDataModule, StackedRecallModule
    from sandbox.train import make_trainer

    with tempfile.TemporaryDirectory(prefix="bench-train-") as root:
        cfg = compose(args, model, width, root)
        datamodule = Data.get(cfg)
        datamodule.device_data = True
        models = []
        for seed in range(runs):
            L.seed_everything(seed, verbose=False)
            models.append(make_module(cfg, datamodule, RecallModule).model)
        optim = OmegaConf.to_container(cfg.optim, resolve=True)
        optims = [{**optim, "lr": optim["lr"] * 2 ** (r - runs // 2)} for r in range(runs)]
        module = StackedRecallModule(models, optims, datamodule.max_seq_len,
                                     OmegaConf.to_container(cfg.callbacks.early_stopping, resolve=True))
        windows = Windows(args.warmup, args.steps, args.profile_steps, args.check_steps)
        loggers = RunLoggers([CSVLogger(Path(root) / str(r), name="logs", version="") for r in range(runs)])
        trainer = make_trainer(cfg, Path(root) / "stack", [_window_callback(windows)], logger=loggers,
                               per_run_selection=True)
        trainer.fit(module, datamodule=StackedDataModule([datamodule], [0] * runs))
    del trainer, module
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    row = _row(args, "stacked", model, width, "all", windows, datamodule.max_seq_len, runs=runs, fused=False)
    total = runs * row["steps_per_s"]
    row.update(total_steps_per_s=total, total_tokens_per_s=total * args.batch * datamodule.max_seq_len,
               runs_per_gpu_hour=3600 * total / args.grid_steps)
    return row


def _row(args, mode, model, width, variant, windows: Windows, seq_len: int, **extra) -> dict:
    r = windows.result
    steps_per_s = 1e3 / r["wall_ms"]
    row = {"mode": mode, "model": model, "d_model": width, "variant": variant, "batch": args.batch,
           "seq_len": seq_len, "timed_steps": args.steps, "profiled_steps": args.profile_steps, **r,
           "busy_kind": "cuda kernels" if windows.cuda else "cpu ops", "wall_over_busy": r["wall_ms"] / r["busy_ms"],
           "steps_per_s": steps_per_s, "tokens_per_s": steps_per_s * args.batch * seq_len, **extra}
    row["runs_per_gpu_hour"] = 3600 * steps_per_s / args.grid_steps
    return row


# ---- packed: N processes at once ----
def _quiet_lightning() -> None:
    import lightning.pytorch  # noqa: F401 (its import sets its logger's level)

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no set-up notes for every run


def _exit_with(parent: int) -> None:
    """End this process once `parent` has gone (killed, or stopped by a signal), so that no packed run goes on
    training for nobody."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def _packed_child(args, plan, barrier, queue, parent: int) -> None:
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    _quiet_lightning()
    try:
        for model, width, variant in plan:
            queue.put(run_lightning(args, model, width, variant, barrier))
    except BaseException as err:  # the parent reports it; the barrier lets the others stop too
        barrier.abort()
        queue.put({"error": f"{type(err).__name__}: {err}"})


def run_packed(args, plan, report, fail) -> None:
    """Every (model, width, variant) of `plan` as `args.packed` processes at once, one row each; a process that
    failed goes to `fail` (the rows after it are not run)."""
    import multiprocessing as mp
    import queue as queues

    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(args.packed), ctx.Queue()
    children = [ctx.Process(target=_packed_child, args=(args, plan, barrier, queue, os.getpid()), daemon=True)
                for _ in range(args.packed)]
    for child in children:
        child.start()
    for model, width, variant in plan:
        try:
            rows = [queue.get(timeout=900) for _ in children]
        except queues.Empty:
            rows = [{"error": "no result within 900 s"}]
        errors = [r["error"] for r in rows if "error" in r]
        if errors:
            fail(f"{_mode_name('packed', args.packed)} {model} d {width} {variant}", errors[0])
            break
        # the rate of all of them: every timed step over the span from the first start to the last end
        start, end = min(r["clock"][0] for r in rows), max(r["clock"][1] for r in rows)
        total = len(rows) * args.steps / (end - start)
        alike = ("model", "d_model", "variant", "batch", "seq_len", "timed_steps", "profiled_steps", "busy_kind",
                 "fused")
        packed = {"mode": "packed", **{k: rows[0][k] for k in alike}, "processes": len(rows)}
        for key in ("wall_ms", "busy_ms", "wall_over_busy", "steps_per_s", "tokens_per_s", "syncs_per_step"):
            if key in rows[0]:
                packed[key] = sum(r[key] for r in rows) / len(rows)  # the mean over the processes
        packed.update(total_steps_per_s=total, total_tokens_per_s=total * rows[0]["batch"] * rows[0]["seq_len"],
                      runs_per_gpu_hour=3600 * total / args.grid_steps, per_process=rows)
        report(packed)
    for child in children:
        child.join(timeout=60)
        if child.is_alive():
            child.kill()


# ---- printing ----
def _mode_name(mode: str, count) -> str:
    """A row's mode as printed: packed and stacked rows with their number of processes or runs."""
    return f"{mode} x{count}" if mode in ("packed", "stacked") else mode


def _describe(row: dict, grid_runs: int) -> str:
    mode = _mode_name(row["mode"], row.get("processes") if row["mode"] == "packed" else row.get("runs"))
    syncs = row.get("syncs_per_step")
    text = (f"{mode:10s} {row['model']:15s} d {row['d_model']:4d} {row['variant']:12s} "
            f"wall {row['wall_ms']:8.2f} ms  busy {row['busy_ms']:8.2f} ms  wall/busy {row['wall_over_busy']:5.2f}  "
            f"{row['steps_per_s']:7.1f} steps/s  {row['tokens_per_s'] / 1e6:6.2f} M tok/s")
    if row["mode"] in ("packed", "stacked"):
        text += f"  total {row['total_steps_per_s']:7.1f} run-steps/s"
    hours = grid_runs / row["runs_per_gpu_hour"]
    text += f"  {row['runs_per_gpu_hour']:6.1f} runs/GPU-h (grid {hours:5.2f} GPU-h)"
    return text + ("" if syncs is None else f"  syncs/step {syncs:g}")


def ratios(rows: list[dict]) -> list[str]:
    """Steps per second (total, for packed) of each variant and mode against the `none` variant run alone, and
    the plain loop against `all` alone, at each (model, width) of this run."""
    def speed(row):
        return row.get("total_steps_per_s", row["steps_per_s"])

    found = {(r["mode"], r["model"], r["d_model"], r["variant"]): r for r in rows}
    lines = []
    for row in rows:
        mode, model, width, variant = row["mode"], row["model"], row["d_model"], row["variant"]
        none, same, everything = (found.get(("alone", model, width, v)) for v in ("none", variant, "all"))
        packed = f"packed x{row.get('processes')} {variant}"
        pairs = []  # (name, the row it is against, a note)
        if mode == "alone" and none is not None and variant != "none":
            pairs.append((f"{variant} / none alone", none, ""))
        if mode == "alone" and everything is not None and variant == "graphs":
            pairs.append(("graphs / all alone", everything, ""))
        if mode == "packed" and same is not None:  # the kernels of a step, measured alone, at the total rate
            busy = "GPU busy" if same["busy_kind"] == "cuda kernels" else "CPU ops busy"
            pairs.append((f"{packed} / {variant} alone", same, f"; {busy} {speed(row) * same['busy_ms'] / 1e3:.0%}"))
        if mode == "packed" and none is not None and variant != "none":
            pairs.append((f"{packed} / none alone", none, ""))
        if mode == "stacked" and everything is not None:  # all of the stack's runs' steps against one run's
            pairs.append((f"stacked x{row['runs']} / all alone", everything, ""))
            packed_all = found.get(("packed", model, width, "all"))
            if packed_all is not None:
                pairs.append((f"stacked x{row['runs']} / packed x{packed_all['processes']} all", packed_all, ""))
        if mode == "plain" and everything is not None:
            pairs.append(("plain loop / all alone", everything, ""))
        for name, other, note in pairs:
            lines.append(f"{model} d {width}: {name}: {speed(row) / speed(other):.2f}x steps/s{note}")
    return lines


# ---- command line ----
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage and message
        raise BadInput(message)


def parse(argv):
    import torch

    from sandbox.bench import repeated_problem, set_by_bench
    from sandbox.results import file_problem, path_argument

    parser = _Parser(prog="sandbox-bench train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--widths", nargs="+", type=int, default=[64, 128, 256])
    parser.add_argument("--modes", nargs="+", default=list(MODES))
    parser.add_argument("--variants", nargs="+", default=["none", "all"], help=f"at every width; of {VARIANTS}")
    parser.add_argument("--ablate-at", nargs="*", type=int, default=[64],
                        help="widths that also get each single lever (alone)")  # fmt: skip
    parser.add_argument("--packed", type=int, default=8, help="processes at once in the packed mode")
    parser.add_argument("--packed-widths", nargs="+", type=int, default=[64])
    parser.add_argument("--stacked", nargs="+", type=int, default=[8],
                        help="runs in one stack in the stacked mode, a row for each (every width)")
    parser.add_argument("--plain-models", nargs="+", default=["attention"])
    parser.add_argument("--experiment", default="zoology")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50, help="timed steps per run")
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--check-steps", type=int, default=3, help="steps counted for host syncs (CUDA)")
    grid = zoology_grid()
    parser.add_argument("--grid-runs", type=int, default=grid["runs"])
    parser.add_argument("--grid-steps", type=int, default=grid["steps"])
    parser.add_argument("--override", nargs="*", default=[], help="more Hydra overrides for every run")
    parser.add_argument("--json", type=path_argument, help="write every row here (rewritten after each)")
    args = parser.parse_args(argv)
    for name in ("models", "plain_models"):
        for model in getattr(args, name):
            if model not in MODELS:
                raise BadInput(f"--{name.replace('_', '-')} {model} is invalid: choose from {', '.join(MODELS)}")
    for name, values, valid in (("modes", args.modes, MODES), ("variants", args.variants, VARIANTS)):
        for value in values:
            if value not in valid:
                raise BadInput(f"--{name} {value} is invalid: choose from {', '.join(valid)}")
    for name in ("models", "widths", "modes", "variants", "ablate_at", "packed_widths", "stacked", "plain_models"):
        problem = repeated_problem(f"--{name.replace('_', '-')}", getattr(args, name))
        if problem:
            raise BadInput(problem)
    for name in ("widths", "ablate_at", "packed_widths"):
        for width in getattr(args, name):
            if width < 1:
                raise BadInput(f"--{name.replace('_', '-')} {width} is invalid: widths must be >= 1")
    for name in ("batch", "steps", "profile_steps", "grid_runs", "grid_steps", "warmup", "check_steps"):
        least = 0 if name in ("warmup", "check_steps") else 1
        if getattr(args, name) < least:
            raise BadInput(f"--{name.replace('_', '-')} {getattr(args, name)} is invalid: must be >= {least}")
    for runs in args.stacked if "stacked" in args.modes else []:
        if runs < 1:
            raise BadInput(f"--stacked {runs} is invalid: must be >= 1 (or leave stacked out of --modes)")
    if "packed" in args.modes and args.packed < 1:
        raise BadInput(f"--packed {args.packed} is invalid: must be >= 1 (or leave packed out of --modes)")
    if "graphs" in args.variants and not torch.cuda.is_available():
        raise BadInput("--variants graphs is invalid on this machine: CUDA graphs need a CUDA device")
    if "fused" in args.variants and not torch.cuda.is_available():
        raise BadInput("--variants fused is invalid on this machine: fused AdamW runs on CUDA only (its row would "
                       "time none's step)")
    # the precision too: the header says bf16-mixed on CUDA and float32 on the CPU, and the plain loop runs that,
    # whatever the Lightning rows were given
    settings = {key: f"use {option}" for key, option in SET_BY_BENCH.items()}
    settings["trainer.precision"] = "bf16-mixed on CUDA, float32 on the CPU, the plain loop's too"
    # a step is one batch on one device, as the plain loop and --grid-steps count them: with accumulation the rows
    # timed batches as steps, and under DDP every process printed its own rows (one run's on several devices)
    settings["trainer.accumulate_grad_batches"] = "one batch a step, as the plain loop and --grid-steps; use --batch"
    settings.update(dict.fromkeys(("trainer", "trainer.devices", "trainer.strategy", "trainer.num_nodes"),
                                  "one device a run, as runs per GPU-hour count"))
    problem = set_by_bench(args.override, settings)
    if problem:
        raise BadInput(f"--override {problem}")
    problem = args.json and file_problem(args.json)
    if problem:
        raise BadInput(f"--json {args.json} is invalid: {problem}")
    return args


def plan(args) -> list[tuple[str, list[tuple]]]:
    """(mode, its runs as (model, width, variant; for stacked, the number of runs)) in the order they run: width
    by width as given, each width's runs alone, then packed, stacked, plain, so that a run cut short has whole
    widths."""
    import torch

    widths = list(dict.fromkeys([*args.widths, *args.ablate_at, *args.packed_widths]))
    # fused AdamW is CUDA's: on the CPU its row would time none's step under another name
    levers = [lever for lever in LEVERS if lever != "fused" or torch.cuda.is_available()]
    steps = []
    for w in widths:
        alone = [(m, w, v) for m in args.models for v in (args.variants if w in args.widths else [])]
        ablated = levers if w in args.ablate_at else []
        alone += [(m, w, v) for m in args.models for v in ablated if (m, w, v) not in alone]
        packed = [(m, w, v) for m in args.models for v in args.variants] if w in args.packed_widths else []
        stacked = [(m, w, r) for m in args.models for r in args.stacked] if w in args.widths else []
        plain = [(m, w, "all") for m in args.plain_models] if w in args.widths else []
        steps += [(mode, runs) for mode, runs in (("alone", alone), ("packed", packed), ("stacked", stacked),
                                                  ("plain", plain)) if runs and mode in args.modes]
    return steps


def check_configs(args, steps: list) -> None:
    """Every run's config composes and passes sandbox-train's checks (its model built on the meta device: no
    weights, no data), checked as a run that validates once, after the bench's last step: so the training set
    holds a batch for every step."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from sandbox.train import check_settings, one_line

    for model, width in dict.fromkeys((m, w) for _, runs in steps for m, w, _ in runs):
        try:
            cfg = compose(args, model, width, tempfile.gettempdir())
            cfg.trainer.max_steps += 1  # the step of that validation
            check_settings(cfg)
        except (HydraException, OmegaConfBaseException, ValueError) as err:
            raise BadInput(f"model={model} model.d_model={width}: {one_line(err)}") from err


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    previous = {signum: signal.signal(signum, _interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    record = {"argv": argv, "rows": []}
    try:
        try:
            args = parse(argv)
            steps = plan(args)
            check_configs(args, steps)
        except BadInput as err:
            print(f"sandbox-bench train: error: {err}", file=sys.stderr)
            return 2
        record["planned"] = sum(len(runs) for _, runs in steps)
        return measure(args, steps, record)
    except Interrupted as stop:
        if "planned" not in record:
            where = "before any run"
        else:  # the rows measured are in --json already: it is rewritten after each
            where = f"after {len(record['rows'])} of {record['planned']} rows"
            where += f" (in {args.json})" if args.json is not None and record["rows"] else ""
        print(f"sandbox-bench train: interrupted by {stop} {where}", file=sys.stderr)
        return 128 + stop.signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def measure(args, steps: list, record: dict) -> int:
    """Every run of `steps`, each row printed and added to `record` (and --json) as it is measured; the exit
    code."""
    import torch

    from sandbox.results import write_json_atomic
    from sandbox.train import one_line

    _quiet_lightning()
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"device: {device}, torch {torch.__version__}; {'bf16-mixed' if cuda else 'float32'}; "
          f"grid: {args.grid_runs} runs x {args.grid_steps} steps (training steps only); busy = "
          f"{'CUDA kernels summed' if cuda else 'CPU ops summed (no GPU)'} per step", flush=True)
    record.update(device=device, torch=torch.__version__, grid={"runs": args.grid_runs, "steps": args.grid_steps})

    def save() -> None:  # after each row: an interrupted bench keeps the rows it measured
        if args.json is not None:
            write_json_atomic(args.json, record)

    def report(row: dict) -> None:
        record["rows"].append(row)
        print(_describe(row, args.grid_runs), flush=True)
        save()

    def fail(label: str, error: str) -> None:
        """A run that failed (out of memory at a large width, say): said on one line, the others go on."""
        record.setdefault("failed", []).append(f"{label}: failed: {error}")
        print(record["failed"][-1], flush=True)
        save()

    for mode, runs in steps:
        if mode == "packed":
            run_packed(args, runs, report, fail)
            continue
        for model, width, variant in runs:
            # as the row would be named; a stacked row's "variant" is its number of runs, at variant all
            label = (f"{_mode_name(mode, variant)} {model} d {width} all" if mode == "stacked"
                     else f"{mode} {model} d {width} {variant}")
            try:
                if mode == "plain":
                    report(run_plain(args, model, width))
                else:
                    report({"alone": run_lightning, "stacked": run_stacked}[mode](args, model, width, variant))
            except Exception as err:
                fail(label, f"{type(err).__name__}: {one_line(err)}")
    record["ratios"] = ratios(record["rows"])
    print("\n".join(["ratios (steps/s, measured in this run):", *record["ratios"]]))
    save()
    return 1 if "failed" in record else 0


if __name__ == "__main__":
    sys.exit(main())
