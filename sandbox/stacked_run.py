"""Stacked runs end to end: runs of a grid that differ only in `seed`, `optim.lr` and `optim.weight_decay`, trained
in one process as one stacked model (`sandbox.stacked`), each recorded as it would be alone.

Each run keeps the folder `sandbox-train` gives it alone (so the same command finds it, stacked or not) with its
own `result.json` and `logs/`; the stack's checkpoint lives in `.stacks/<hash of its runs>/` in the folder that
holds the runs' folders (`<output_root>/<name>/` for `sandbox-train -m`).
What a run alone gets from Lightning's callbacks, the module does per run: the best weights on val/acc (kept as
buffers; the test runs on them), early stopping (`callbacks.early_stopping`, with EarlyStopping's rules: stop when
val/acc > threshold, or after `patience` validations without a strict improvement) and divergence (a non-finite
training loss ends the run as `diverged`, with the step and loss; found on the device, read at validation; or
weights that the last step's update made non-finite, checked at the end).
A run that has ended leaves the stack at that validation (its weights, moments and batches are taken out of the
step), and nothing more is logged for it; the stack stops when every run has ended. The stack's checkpoint holds
every run (each ended run on its best weights) and which runs are still in it. Stacks run on one device. On the
Triton backend the rule's chunked op runs once for all runs (`kernels.runs`); the short conv, norms and MoM's
routing run in their PyTorch forms, whose Triton kernels take each run's weights (MoM then takes its dense form,
`models.routing.dense`).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from models.backbone import common_part
from sandbox import runs
from sandbox.callbacks import (Interruption, RunIdentity, RunInterrupted, RunPruned, computation, run_key,
                               split_run_key)
from sandbox.data import RecallDataModule
from sandbox.module import WarmupCosine, add_eval_counts, add_router_sums, eval_metrics, most_labelled
from sandbox.results import RESULT_FILE, config_hash, write_json_atomic
from sandbox.runs import say
from sandbox.settings import FLOAT16, ConfigError, check_settings, one_device
from sandbox.stacked import StackedModel, clip_per_run, stacked_adamw
from sandbox.train import (build_data, build_module, check_same_computation, fit_status, interrupted_reason,
                           make_trainer, result_record, result_router, run_logger, stop_if_not_resumed,
                           stop_if_signalled)
from tasks import SPLITS

# The settings in which the runs of one stack may differ; everything else must be equal.
STACKED_KEYS = ("seed", "optim.lr", "optim.weight_decay")
STACKS = ".stacks"
# How a run of the stack has ended (ended_how), with its status_reason as a run alone would give it.
RUNNING, THRESHOLD, PATIENCE, DIVERGED = range(4)


def stack_key(cfg: DictConfig) -> str:
    """What the runs of one stack share: the resolved config without STACKED_KEYS, as canonical text."""
    config = OmegaConf.to_container(cfg, resolve=True)
    for dotted in STACKED_KEYS:
        *parents, last = dotted.split(".")
        node = config
        for part in parents:
            node = node[part]
        node.pop(last)
    return OmegaConf.to_yaml(OmegaConf.create(config), sort_keys=True)


class RunLoggers(Logger):
    """The stack's logger: a metric `run<r>/<key>` goes to run r's own logger as `<key>`, a metric without a run
    prefix (the epoch, tokens per second) to every run. After its end (`ended[r]`: the step and epoch where it
    ended) a run logs only its test, at that step and epoch, as it would alone."""

    def __init__(self, loggers: list[Logger]):
        super().__init__()
        self.loggers = loggers
        self.ended: dict[int, tuple[int, int]] = {}

    @property
    def name(self) -> str:
        return "runs"

    @property
    def version(self) -> str:
        return ""

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        per_run: dict[int, dict] = {r: {} for r in range(len(self.loggers))}
        shared = {}
        for key, value in metrics.items():
            split = split_run_key(key)
            if split is None:
                shared[key] = value
            else:
                per_run[split[0]][split[1]] = value
        for r, values in per_run.items():
            ended_step, ended_epoch = self.ended.get(r, (math.inf, None))
            if any(key.startswith("test/") for key in values) and ended_epoch is not None:
                self.loggers[r].log_metrics({**shared, "epoch": ended_epoch, **values}, ended_step)
            elif (values or set(shared) - {"epoch"}) and (step is None or step < ended_step):
                self.loggers[r].log_metrics({**shared, **values}, step)

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        """Each run's own settings are given to its logger by the stack (`train_stack`)."""

    def save(self) -> None:
        for logger in self.loggers:
            logger.save()

    def finalize(self, status: str) -> None:
        for logger in self.loggers:
            logger.finalize(status)


class _Samplers:
    """The samplers of the stacked loaders, for Lightning's `set_epoch` before each training epoch."""

    def __init__(self, samplers):
        self.samplers = samplers

    def set_epoch(self, epoch: int) -> None:
        for sampler in self.samplers:
            sampler.set_epoch(epoch)


class StackedLoader:
    """Batches of R runs: run r takes loader `of_run[r]`'s batch; each field is stacked [R, ...]."""

    batch_sampler = None  # what Lightning reads beside `sampler`

    def __init__(self, loaders: list, of_run: list[int]):
        self.loaders, self.of_run = loaders, of_run
        samplers = [loader.sampler for loader in loaders if hasattr(loader.sampler, "set_epoch")]
        if samplers:  # the training loaders: Lightning sets their epoch through this
            self.sampler = _Samplers(samplers)

    def __len__(self) -> int:
        return len(self.loaders[0])

    def __iter__(self):
        for batches in zip(*self.loaders, strict=True):
            yield tuple(torch.stack([batches[i][field] for i in self.of_run]) for field in range(len(batches[0])))


class StackedDataModule(L.LightningDataModule):
    """The data of R runs: one RecallDataModule per distinct seed (`of_run[r]`: run r's), batches stacked."""

    def __init__(self, datamodules: list[RecallDataModule], of_run: list[int]):
        super().__init__()
        self.datamodules, self.of_run = datamodules, of_run
        if any(len({str(dm.datasets[split].slice_table) for dm in datamodules}) > 1 for split in SPLITS):
            raise ConfigError("the seeds of these stacked runs give their data other slices; run them alone")

    def setup(self, stage: str | None = None) -> None:
        for dm in self.datamodules:  # their loaders read the trainer's device (RecallDataModule.device_data)
            dm.trainer = self.trainer

    @property
    def datasets(self):
        return self.datamodules[0].datasets

    @property
    def max_seq_len(self) -> int:
        return self.datamodules[0].max_seq_len

    @property
    def train_seq_len(self) -> int:
        return self.datamodules[0].train_seq_len

    def state_dict(self) -> dict:
        return {"datamodules": [dm.state_dict() for dm in self.datamodules]}

    def load_state_dict(self, state: dict) -> None:
        for dm, dm_state in zip(self.datamodules, state["datamodules"], strict=True):
            dm.load_state_dict(dm_state)

    def _stacked(self, method: str) -> StackedLoader:
        return StackedLoader([getattr(dm, method)() for dm in self.datamodules], self.of_run)

    def train_dataloader(self):
        return self._stacked("train_dataloader")

    def val_dataloader(self):
        return self._stacked("val_dataloader")

    def test_dataloader(self):
        return self._stacked("test_dataloader")


class StackedRecallModule(L.LightningModule):
    """RecallModule's training and evaluation for R runs at once, with each run's selection and stopping."""

    def __init__(self, models: list, optims: list[dict], max_seq_len: int, early_stopping: dict):
        super().__init__()
        self.model = StackedModel(models)
        self.runs = len(models)
        self.optims = optims
        self.max_labels = max_seq_len  # per example; made exact from the data in `setup`
        self.train_seq_len = max_seq_len  # evaluation counts apart the positions past it; set in `setup`
        self.threshold, self.patience = early_stopping["threshold"], early_stopping["patience"]
        R = self.runs
        # each run's selection and stopping state: buffers, so that a resumed stack goes on where it was
        self.register_buffer("best_val_acc", torch.full((R,), -math.inf, dtype=torch.float64))
        self.register_buffer("stale_validations", torch.zeros(R, dtype=torch.long))
        self.register_buffer("ended_how", torch.zeros(R, dtype=torch.long))
        self.register_buffer("ended_step", torch.full((R,), -1, dtype=torch.long))
        self.register_buffer("ended_epoch", torch.full((R,), -1, dtype=torch.long))
        self.register_buffer("diverged_step", torch.full((R,), -1, dtype=torch.long))
        self.register_buffer("diverged_epoch", torch.full((R,), -1, dtype=torch.long))  # recorded as alone
        self.register_buffer("diverged_loss", torch.zeros(R))
        # the last step's update is seen by no training loss: its weights are checked at the end (on_train_end)
        self.register_buffer("diverged_after_last_step", torch.zeros(R, dtype=torch.bool))
        self.register_buffer("in_stack", torch.ones(R, dtype=torch.bool))  # the runs the model's weights hold
        for name, value in self.model.named_parameters():
            self.register_buffer(f"best/{name}", value.detach().clone())
        self.register_state_dict_post_hook(_every_run_in_state)
        self.register_load_state_dict_pre_hook(_stack_of_state)
        self._sums: dict[str, torch.Tensor] = {}
        # router statistics: of the last forward ({name: [runs in the stack then]}, with their positions), and of
        # each run that left the stack, its last forward's
        self._router: tuple[dict[str, torch.Tensor], dict[int, int]] = ({}, {})
        self._router_of_ended: dict[int, dict[str, torch.Tensor]] = {}
        self._refresh_stack()

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        self.max_labels = most_labelled(d for dm in datamodule.datamodules for d in dm.datasets.values())
        self.train_seq_len = datamodule.train_seq_len

    def running(self) -> list[int]:
        return [r for r, how in enumerate(self.ended_how.tolist()) if how == RUNNING]

    def on_train_start(self) -> None:
        self._refresh_stack()
        self._update_running()
        if not self._running:  # resumed after every run ended (as StayStopped): Lightning would train on
            self.trainer.should_stop = True

    def _refresh_stack(self) -> None:
        """The runs in the stack (in the model's order), their index there and their position of each."""
        self._stack = self.in_stack.nonzero().flatten().tolist()
        self._stack_index = torch.tensor(self._stack, device=self.in_stack.device)
        self._position = {r: p for p, r in enumerate(self._stack)}

    def _of_stack(self, batch):
        """The rows of the batch ([R, ...] each) of the runs in the stack."""
        if len(self._stack) == self.runs:
            return batch
        return tuple(x.index_select(0, self._stack_index.to(x.device)) for x in batch)

    def _forward(self, inputs, labels):
        """The losses of the stack's rows of a batch (`_of_stack`); its router statistics kept."""
        loss, aux, hits, mask, router = self.model.losses(inputs, labels, self.max_labels)
        self._router = ({key: value.detach() for key, value in router.items()}, self._position)  # no graph kept
        return loss, aux, hits, mask

    def router_of(self, run: int) -> dict[str, torch.Tensor]:
        """Run `run`'s router statistics of its last forward ({} before any)."""
        router, position = self._router
        if run in position:
            return {key: value[position[run]] for key, value in router.items()}
        return self._router_of_ended.get(run, {})

    def _update_running(self) -> None:
        """The runs still training, and for the logger the step and epoch where each other one ended."""
        self._running = self.running()
        ended = [r for r in range(self.runs) if r not in self._running]
        self.trainer.logger.ended = {r: (int(self.ended_step[r]), int(self.ended_epoch[r])) for r in ended}

    def training_step(self, batch, batch_idx):
        inputs, labels, _ = self._of_stack(batch)
        loss, aux, hits, mask = self._forward(inputs, labels)
        total = loss + aux
        with torch.no_grad():  # the first non-finite loss of each run, on the device (read at validation)
            index = self._stack_index
            step, epoch, loss_then = (x[index] for x in (self.diverged_step, self.diverged_epoch, self.diverged_loss))
            first = (step < 0) & ~torch.isfinite(total)
            self.diverged_step.index_copy_(0, index, torch.where(first, self.global_step + 1, step))
            self.diverged_epoch.index_copy_(0, index, torch.where(first, self.current_epoch, epoch))
            self.diverged_loss.index_copy_(0, index, torch.where(first, total.float(), loss_then))
        # Lightning writes a step's metrics when (step + 1) % log_every_n_steps == 0: logged only then (R runs'
        # metrics every step would cost 3 R logging calls a step), the router's too, as a run alone logs them
        metrics = {}
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            acc = hits.flatten(1).sum(1) / mask.flatten(1).sum(1)
            for r in self._running:
                p = self._position[r]
                metrics.update({run_key(r, "train/loss"): loss[p], run_key(r, "train/acc"): acc[p],
                                run_key(r, "train/aux_loss"): aux[p],
                                **{run_key(r, f"router/{k}"): v for k, v in self.router_of(r).items()}})
        self.log_dict(metrics)
        return total.sum()

    # ---- evaluation ----
    def _eval_step(self, batch):
        inputs, labels, bins = self._of_stack(batch)
        loss, _, hits, mask = self._forward(inputs, labels)
        add_eval_counts(self._sums, loss, hits, mask, bins, len(self._slice_labels()), self.train_seq_len)
        add_router_sums(self._sums, self._router[0], inputs)

    def _slice_labels(self) -> list[str]:
        split = "test" if self.trainer.testing else "val"
        return self.trainer.datamodule.datasets[split].slice_table.labels()

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch)

    def test_step(self, batch, batch_idx):
        self._eval_step(batch)

    def on_validation_epoch_end(self):
        sums, self._sums = self._sums, {}
        if not sums or self.trainer.sanity_checking:
            return
        metrics = eval_metrics(sums, "val", self._slice_labels())
        params = self.model.stacked()
        diag = {"embed_common": torch.func.vmap(common_part)(params["embed.weight"])}
        if not self.model.config["tie_embeddings"]:
            diag["head_common"] = torch.func.vmap(common_part)(params["head.weight"])
        # each run's selection and stopping decided on the host, from one read of its state
        accs = torch.stack([m["val/acc"] for m in metrics]).tolist()
        diverged, best, stale = (t.tolist() for t in (self.diverged_step, self.best_val_acc, self.stale_validations))
        improved, logged = [False] * self.runs, {}
        for r in self._running:
            if diverged[r] >= 0:
                self._end(r, DIVERGED)
                continue
            p = self._position[r]
            logged.update({run_key(r, k): v for k, v in metrics[p].items()})
            logged.update({run_key(r, f"diag/{k}"): v[p] for k, v in diag.items()})
            improved[r] = accs[p] > best[r]
            if improved[r]:
                best[r] = accs[p]
            if accs[p] > self.threshold:
                self._end(r, THRESHOLD)
                continue
            # as EarlyStopping: patience counts validations without improvement, so a run that improved goes on,
            # whatever the patience (0 included)
            stale[r] = 0 if improved[r] else stale[r] + 1
            if not improved[r] and stale[r] >= self.patience:
                self._end(r, PATIENCE)
        self.best_val_acc.copy_(torch.tensor(best))
        self.stale_validations.copy_(torch.tensor(stale))
        self._keep_best([improved[r] for r in self._stack])
        self.log_dict(logged)
        self._update_running()
        if not self._running:
            self.trainer.should_stop = True
        elif len(self._running) < len(self._stack):
            self._let_ended_runs_go()

    @torch.no_grad()
    def _keep_best(self, chosen: list[bool]) -> None:
        """The weights of the runs `chosen` (one flag per run in the stack) into their best weights."""
        if not any(chosen):
            return
        chosen = torch.tensor(chosen, device=self.best_val_acc.device)
        for name, value in self.model.named_parameters():
            best = self.get_buffer(f"best/{name}")
            rows = torch.where(chosen.view((-1,) + (1,) * (value.ndim - 1)), value, best[self._stack_index])
            best.index_copy_(0, self._stack_index, rows)

    def _let_ended_runs_go(self) -> None:
        """The model, optimizer and batches keep only the runs still training."""
        self._router_of_ended.update({r: self.router_of(r) for r in self._stack if r not in self._running})
        keep = torch.tensor([self._position[r] for r in self._running], device=self._stack_index.device)
        renamed = self.model.replace({name: value[keep] for name, value in self.model.named_parameters()})
        self.trainer.optimizers[0].keep_runs(keep, renamed)
        self.in_stack.fill_(False)
        self.in_stack[self._running] = True
        self._refresh_stack()

    def on_train_end(self):
        # as StopOnDivergence alone: a run whose weights the last step's update made non-finite diverged there
        params = self.model.stacked().values()
        finite = torch.stack([torch.isfinite(p.flatten(1)).all(1) for p in params]).all(0).tolist()
        for r in self._running:
            if not finite[self._position[r]] and int(self.diverged_step[r]) < 0:
                self.diverged_step[r], self.diverged_epoch[r] = self.global_step, self.current_epoch
                self.diverged_after_last_step[r] = True
                self._end(r, DIVERGED)

    def _end(self, run: int, how: int) -> None:
        self.ended_how[run] = how
        self.ended_step[run] = self.global_step
        self.ended_epoch[run] = self.current_epoch + 1  # as alone: stopping ends the epoch, which then counts

    def use_best(self, tested: list[int]) -> None:
        """Every run back in the stack on its best weights, which the test measures (as a run alone tests its best
        checkpoint); only the `tested` runs log test metrics."""
        self.tested = tested
        self.model.replace({name: self.get_buffer(f"best/{name}") for name, _ in self.model.named_parameters()})
        self.in_stack.fill_(True)
        self._refresh_stack()

    def on_test_epoch_end(self):
        sums, self._sums = self._sums, {}
        metrics = eval_metrics(sums, "test", self._slice_labels())
        self.log_dict({run_key(r, k): v for r in self.tested for k, v in metrics[r].items()})

    def configure_optimizers(self):
        optimizer = stacked_adamw(self.model, [self.optims[r] for r in self._stack])
        total = int(self.trainer.estimated_stepping_batches)
        optim = self.optims[0]
        schedule = WarmupCosine(int(optim["warmup_ratio"] * total), total, optim["min_lr_ratio"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if not gradient_clip_val:
            return
        params = list(self.model.parameters())
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)  # elementwise: the same per run
        else:
            clip_per_run(params, gradient_clip_val)


def _every_run_in_state(module: StackedRecallModule, state: dict, prefix: str, local_metadata) -> None:
    """A stack's state dict holds every run's weights (a run that left the stack on its best weights), whichever
    runs are in the stack: so a checkpoint has one shape for the stack's whole life."""
    if len(module._stack) == module.runs:
        return
    index = module._stack_index
    for name, _ in module.model.named_parameters():
        key = f"{prefix}model.{name}"
        every = state[f"{prefix}best/{name}"].clone()
        every[index.to(every.device)] = state[key]
        state[key] = every


def _stack_of_state(module: StackedRecallModule, state: dict, prefix: str, *args) -> None:
    """Loading a state dict: the model takes the runs that were in the stack then (`in_stack`)."""
    in_stack = state.get(f"{prefix}in_stack")
    if in_stack is None:
        return
    index = in_stack.nonzero().flatten()
    weights = {}
    for name, _ in module.model.named_parameters():
        key = f"{prefix}model.{name}"
        weights[name] = state[key] = state[key][index.to(state[key].device)]
    module.model.replace(weights)
    module.in_stack.copy_(in_stack)
    module._refresh_stack()


def stack_problem(cfg: DictConfig) -> str | None:
    """Why this run cannot join a stack, or None: a stack trains in one process on one device, and float16's
    loss scaling would skip every run's step when one run's gradients overflow (runs alone skip only their own)."""
    trainer = cfg.trainer
    if not one_device(trainer):
        return f"trainer.devices={trainer.devices} cannot be stacked: stacked runs train on one device (devices=1)"
    if cfg.cuda_graphs is True:
        return "cuda_graphs=true cannot be stacked: the graphs capture one run's model (runs with it train alone)"
    if trainer.precision in FLOAT16:
        return (f"trainer.precision={trainer.precision} cannot be stacked: its loss scale is shared by the runs "
                "of a stack (use bf16-mixed or 32-true)")
    return None


# The mixers whose stacked step measured faster on the GPU than the same runs packed as processes
# (docs/results/throughput/README.md); for the others the kernels under vmap cost more than the launches saved.
STACK_PAYS = ("attention",)


def trains_on_cuda(cfg: DictConfig) -> bool:
    """Whether this run trains on a CUDA device of this machine."""
    return torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")


def stacks(cfg: DictConfig, stack="auto") -> bool:
    """Whether this run joins a stack under the setting `stack` (auto: where runs train on CUDA and their mixer is
    one of STACK_PAYS; true; false): its settings are valid and a stack can train it (`stack_problem`)."""
    if stack is False:
        return False
    if stack == "auto" and not (trains_on_cuda(cfg) and cfg.model.mixer in STACK_PAYS):
        return False
    try:
        check_settings(cfg)
    except ConfigError:
        return False
    return stack_problem(cfg) is None


def _check_stack(cfgs: list[DictConfig]) -> None:
    keys = {stack_key(cfg) for cfg in cfgs}
    if len(keys) > 1:
        raise ConfigError(f"stacked runs may differ only in {', '.join(STACKED_KEYS)}")
    problem = stack_problem(cfgs[0])
    if problem is not None:
        raise ConfigError(problem)


def train_stack(cfgs: list[DictConfig], run_dirs: list[Path], extra_callbacks=()) -> list[dict]:
    """Train these runs as one stack, write each one's `result.json` in its folder and return their results
    (`extra_callbacks`: more Lightning callbacks of the stack's trainer).

    A run given twice (one folder) trains once. Runs that have ended already are returned as they are; fewer than
    two left, they run alone (`sandbox.train.train`). A bad setting is a ConfigError before any training, and so is
    a stack resumed at another precision or on other kernels than its earlier segment (`check_same_computation`); a
    stack checkpoint that one of its runs went on from elsewhere is set aside. A signal ends the stack with
    RunInterrupted once every run's result.json says so; the same command resumes the stack from its checkpoint.
    An error is recorded as every running run's failure and raised."""
    from sandbox.train import train

    start = time.perf_counter()
    run_dirs = [Path(d) for d in run_dirs]
    digests = [config_hash(OmegaConf.to_container(cfg, resolve=True)) for cfg in cfgs]
    if len(set(run_dirs)) < len(run_dirs):
        # one run given twice (a value repeated in a multirun, `seed=0,0`): trained once, as one after the other
        # finds it ended the second time, not as two runs of the stack writing one folder
        first = {d: run_dirs.index(d) for d in run_dirs}
        for d, digest in zip(run_dirs, digests):
            if digest != digests[first[d]]:
                raise ConfigError(f"{d} is the folder of two runs of other configurations: give each its own folder")
        once = dict(zip(first, train_stack([cfgs[i] for i in first.values()], list(first), extra_callbacks)))
        return [once[d] for d in run_dirs]
    results: dict[int, dict] = {}
    for i, (run_dir, digest) in enumerate(zip(run_dirs, digests)):
        ended = runs.ended_result(run_dir, digest)
        if ended is not None:
            results[i] = ended
    todo = [i for i in range(len(cfgs)) if i not in results]
    if len(todo) < 2:
        results.update({i: train(cfgs[i], run_dirs[i], extra_callbacks) for i in todo})
        return [results[i] for i in range(len(cfgs))]
    cfgs, run_dirs, digests = ([xs[i] for i in todo] for xs in (cfgs, run_dirs, digests))
    for cfg in cfgs:
        check_settings(cfg)
    _check_stack(cfgs)
    stack_digest = hashlib.sha256(" ".join(sorted(digests)).encode()).hexdigest()
    # beside its runs: `sandbox-train -m` puts them in <output_root>/<name>/, `sandbox-sweep` a trial's in its folder
    stack_dir = Path(os.path.commonpath(run_dirs)) / STACKS / stack_digest[:runs.HASH_DIGITS]
    for run_dir in [*run_dirs, stack_dir]:
        problem = runs.unwritable_problem(run_dir, cfgs[0].output_root)
        if problem is not None:
            raise ConfigError(problem)
    seeds = sorted({cfg.seed for cfg in cfgs})
    data = {seed: build_data(next(cfg for cfg in cfgs if cfg.seed == seed)) for seed in seeds}
    models = []
    for cfg in cfgs:  # each run's weights as alone: seeded, then built
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        models.append(build_module(cfg, data[cfg.seed]).model)
    optims = [OmegaConf.to_container(cfg.optim, resolve=True) for cfg in cfgs]
    module = StackedRecallModule(models, optims, data[seeds[0]].max_seq_len,
                                 OmegaConf.to_container(cfgs[0].callbacks.early_stopping, resolve=True))
    datamodule = StackedDataModule([data[seed] for seed in seeds], [seeds.index(cfg.seed) for cfg in cfgs])
    loggers = RunLoggers([run_logger(cfg, run_dir) for cfg, run_dir in zip(cfgs, run_dirs)])
    for logger, cfg, model in zip(loggers.loggers, cfgs, models):
        logger.log_hyperparams({"model": OmegaConf.to_container(cfg.model, resolve=True),
                                "vocab_size": model.config["vocab_size"], "max_seq_len": model.config["max_seq_len"],
                                "optim": OmegaConf.to_container(cfg.optim, resolve=True), "stack": str(stack_dir)})
    say(f"{len(cfgs)} runs stacked, their checkpoint in {stack_dir}")
    with Interruption(stack_dir / runs.CHECKPOINTS / "last.ckpt") as interruption:
        trainer = make_trainer(cfgs[0], stack_dir, [RunIdentity(stack_digest, cfgs[0].model.backend), interruption,
                                                    *extra_callbacks], logger=loggers, per_run_selection=True)
        resume_from = runs.resume_checkpoint(stack_dir, stack_digest, module.state_dict())
        # each run's result of the segment the stack resumes after (none if killed outright)
        earlier = [runs.stored_result(run_dir) if resume_from is not None else None for run_dir in run_dirs]
        # a run whose last segment was not this stack's (alone, or in a stack of other runs) went on from elsewhere:
        # resumed from here, its metrics and result would mix two histories
        elsewhere = [d for d, e in zip(run_dirs, earlier)
                     if e and Path((e.get("stack") or {}).get("folder", "")).name != stack_dir.name]
        if elsewhere:
            runs.set_aside(resume_from, f"{elsewhere[0]} was trained elsewhere after it (alone or in another stack)")
            resume_from, earlier = None, [None] * len(run_dirs)
        now = computation(trainer, cfgs[0].model.backend)
        if resume_from is not None:  # named by the stack's folder, whose checkpoint holds the weights
            check_same_computation(stack_dir, resume_from, earlier, now)

        def record(r: int, status: str, reason: str, tested: dict | None = None) -> dict:
            # a diverged run ended at its first non-finite loss, as alone; the others at the validation that ended them
            ended_step = int(module.diverged_step[r] if status == "diverged" else module.ended_step[r])
            ended_epoch = int(module.diverged_epoch[r] if status == "diverged" else module.ended_epoch[r])
            return result_record(
                cfgs[r], digests[r], status, reason, trainer, best_val_acc=float(module.best_val_acc[r]),
                tested=tested, steps=ended_step if ended_step >= 0 else trainer.global_step,
                epochs=ended_epoch if ended_epoch >= 0 else trainer.current_epoch,
                model=module.model.template,
                router=result_router(tested, {k: float(v) for k, v in module.router_of(r).items()}),
                max_seq_len=datamodule.max_seq_len,
                backend=now["backend"],
                cuda_graphs=False, resumed=resume_from is not None, earlier=earlier[r], start=start,
                stack={"folder": str(stack_dir), "runs": len(cfgs)})

        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
            statuses = [_status(cfgs[r], trainer, module, r) for r in range(len(cfgs))]
            tested = {}
            finished = [r for r, (status, _) in enumerate(statuses) if status == "finished"]
            if finished:
                module.use_best(finished)
                for key, value in trainer.test(module, datamodule=datamodule, verbose=False)[0].items():
                    r, name = split_run_key(key)
                    tested.setdefault(r, {})[name] = value
            ended = [record(r, status, reason, tested.get(r) if status == "finished" else None)
                     for r, (status, reason) in enumerate(statuses)]
        except (SIGTERMException, RunInterrupted):
            stop_if_not_resumed(stack_dir, interruption, trainer, resume_from)
            reason = interrupted_reason(interruption, trainer)
            for r in range(len(cfgs)):
                run_reason = _interrupted_run_reason(reason, cfgs[r], trainer, module, r)
                write_json_atomic(run_dirs[r] / RESULT_FILE, record(r, "interrupted", run_reason))
            say(f"{stack_dir}: interrupted by {reason}; run the same command to resume", error=True)
            raise RunInterrupted(interruption.signum) from None
        except RunPruned as err:  # the search's pruner judged the stack by its first run: each run records it
            for r in range(len(cfgs)):
                write_json_atomic(run_dirs[r] / RESULT_FILE, record(r, "pruned", str(err)))
            raise
        except Exception as err:
            for r in range(len(cfgs)):
                write_json_atomic(run_dirs[r] / RESULT_FILE, record(r, "failed", runs.describe_error(err)))
            raise
    for r, result in enumerate(ended):
        write_json_atomic(run_dirs[r] / RESULT_FILE, result)
        if result["status"] != "finished":
            say(f"{run_dirs[r]}: {result['status'].replace('_', ' ')}: {result['status_reason']} "
                f"(recorded in {RESULT_FILE})", error=True)
        results[todo[r]] = result
    stop_if_signalled(stack_dir, interruption)
    return [results[i] for i in sorted(results)]


def _interrupted_run_reason(reason: str, cfg: DictConfig, trainer: L.Trainer, module: StackedRecallModule,
                            run: int) -> str:
    """The interrupted stack's `reason` for run `run`; a run that had already ended adds where and how, since the
    signal's step is the stack's, not the step the run stopped at."""
    if int(module.ended_how[run]) == RUNNING and int(module.diverged_step[run]) < 0:
        return reason
    status, why = _status(cfg, trainer, module, run)
    ended = int(module.diverged_step[run] if status == "diverged" else module.ended_step[run])
    return f"{reason} (this run had ended at step {ended}: {why}; the stack records it when it ends)"


def _status(cfg: DictConfig, trainer: L.Trainer, module: StackedRecallModule, run: int) -> tuple[str, str]:
    """Run `run`'s status and reason, worded as `sandbox.train` words a run alone."""
    if int(module.diverged_step[run]) >= 0:
        loss, step = float(module.diverged_loss[run]), int(module.diverged_step[run])
        if bool(module.diverged_after_last_step[run]):
            return "diverged", f"weights not finite after step {step}"
        return "diverged", f"training loss {loss:.4g} at step {step}"
    stopped = {THRESHOLD: "threshold", PATIENCE: "patience"}.get(int(module.ended_how[run]))
    return fit_status(cfg, trainer, validated=math.isfinite(float(module.best_val_acc[run])), stopped=stopped)
