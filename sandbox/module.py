"""The LightningModule: any model of the zoo on a recall task.

Loss: next-token cross-entropy at labelled positions (labels != -100), plus the mixers' auxiliary
losses (MoM's load balancing, already scaled by its coefficient). Accuracy is counted at labelled
positions; in evaluation also per slice (e.g. per num_kv_pairs), with device-side sums that are
reduced over processes once per epoch.

A training step reads nothing back to the host, so the CPU can queue the next steps while the GPU works: the
logits are taken at a fixed number of positions per example (the most labelled positions of any example of the
data, `max_labels`; the others are ignored by the loss) rather than at a boolean mask, whose selection reads
its count from the device; metrics stay tensors until Lightning writes them at its logging interval (none go to
the progress bar, which Lightning reads to the host after every step); on CUDA AdamW is fused (one kernel
for every parameter, its step counts on the device).
"""

import math

import lightning as L
import torch
import torch.nn.functional as F

from models import build_model
from sandbox.graphs import graphed
from tasks import FILLER, IGNORE


class WarmupCosine:
    """Learning-rate factor: linear warm-up, then cosine decay to `min_ratio`. Plain attributes only, so
    the scheduler's state loads with `weights_only=True`."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float):
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, max(total_steps, 1), min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def label_positions(labels: torch.Tensor, rows: int) -> torch.Tensor:
    """Flat positions (b T + t) of the labelled tokens in row-major order, then unlabelled ones, `rows` in all."""
    unlabelled = (labels == IGNORE).flatten().to(torch.int32)
    return torch.argsort(unlabelled, stable=True)[:rows]


def labelled_loss(model, inputs: torch.Tensor, labels: torch.Tensor, max_labels: int):
    """A model's loss on a batch: `model(inputs, label_index=...)` -> (loss, aux loss, hits [B, T] bool: labelled
    positions predicted right, mask [B, T] of the labelled). `max_labels`: labelled positions per example at most."""
    mask = labels != IGNORE
    index = label_positions(labels, min(labels.numel(), labels.shape[0] * max_labels))
    out = model(inputs, label_index=index, stats_positions=inputs != FILLER)
    targets = labels.flatten()[index]  # IGNORE past the labelled positions
    logits = out.logits.to(torch.promote_types(out.logits.dtype, torch.float32))  # 16-bit up, float64 kept
    loss = F.cross_entropy(logits, targets, ignore_index=IGNORE)
    hits = torch.zeros_like(mask).view(-1).scatter(0, index, logits.argmax(-1) == targets)  # index: distinct
    return loss, out.aux_loss, hits.view_as(mask), mask


def training_loss(model, inputs: torch.Tensor, labels: torch.Tensor, max_labels: int):
    """`labelled_loss` of a training batch and the router statistics of that forward (0-dim tensors by name)."""
    return (*labelled_loss(model, inputs, labels, max_labels), model.router_stats(as_tensors=True))


class TrainingLoss(torch.nn.Module):
    """`training_loss` as a module: the unit that `cuda_graphs` captures (sandbox.graphs). Its outputs are then the
    graph's own tensors, rewritten by each replay, while the model's attributes (its router statistics) keep
    whatever the last eager forward, an evaluation, left there: so the statistics are outputs too."""

    def __init__(self, model: torch.nn.Module, max_labels: int):
        super().__init__()
        self.model, self.max_labels = model, max_labels

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor):
        return training_loss(self.model, inputs, labels, self.max_labels)


def most_labelled(datasets) -> int:
    """The most labelled positions of any example of these datasets (their labels are CPU tensors: no device read)."""
    return max(int((d.labels != IGNORE).sum(1).max()) for d in datasets)


def decay_groups(params, decay: float, run_dims: int = 0) -> list[dict]:
    """Optimizer groups with weight decay `decay` on matrices only (of each run: `run_dims` leading dimensions
    are runs, sandbox.stacked), none on vectors."""
    params = list(params)
    matrix = [p.ndim - run_dims >= 2 for p in params]
    return [{"params": [p for p, m in zip(params, matrix) if m], "weight_decay": decay},
            {"params": [p for p, m in zip(params, matrix) if not m], "weight_decay": 0.0}]


def adamw(model: torch.nn.Module, optim: dict, fused: bool) -> torch.optim.AdamW:
    """AdamW of the `optim` settings, weight decay on matrices only; `fused`: one kernel for every parameter."""
    return torch.optim.AdamW(decay_groups(model.parameters(), optim["weight_decay"]), lr=optim["lr"],
                             betas=tuple(optim["betas"]), fused=fused)


def add_eval_counts(sums: dict, loss, hits, mask, bins, num_bins: int, past: int) -> None:
    """Add an evaluation batch of R runs to their sums (float64 on the device, made on first use): loss [R],
    hits and mask [R, B, T], bins [R, B, S] (each example's bin in each of S slicings, of num_bins in all); per
    slice also the hits and labelled positions at `past` and after (the longest training length: what a test
    longer than training measures of extrapolation, without the positions it was trained on)."""
    runs = loss.shape[0]
    if not sums:
        for name, size in (("loss", ()), ("hits", ()), ("count", ()),
                           *((key, (num_bins,)) for key in ("slice_hits", "slice_count",
                                                            "slice_past_hits", "slice_past_count"))):
            sums[name] = torch.zeros(runs, *size, device=loss.device, dtype=torch.float64)
    per_example_hits, per_example_count = hits.sum(-1).double(), mask.sum(-1).double()  # [R, B]
    past_hits, past_count = hits[..., past:].sum(-1).double(), mask[..., past:].sum(-1).double()
    sums["loss"] += loss.detach().double() * per_example_count.sum(1)
    sums["hits"] += per_example_hits.sum(1)
    sums["count"] += per_example_count.sum(1)
    first_bin = torch.arange(0, runs * num_bins, num_bins, device=bins.device)[:, None]  # run r's bins start here
    for column in range(bins.shape[-1]):
        index = (bins[..., column] + first_bin).flatten()
        for key, counts in (("slice_hits", per_example_hits), ("slice_count", per_example_count),
                            ("slice_past_hits", past_hits), ("slice_past_count", past_count)):
            sums[key].view(-1).index_add_(0, index, counts.flatten())


def add_router_sums(sums: dict, router: dict[str, torch.Tensor], inputs: torch.Tensor) -> None:
    """Add an evaluation batch's router statistics of R runs ({name: [R]}; inputs [R, B, T]) to their sums, each
    weighted by the positions it is over (content loads: the tokens that are not filler; the others: every
    position), so that a split's statistics are those of all its batches, not of its last one (aux_loss: the
    batches' balance losses, weighted alike)."""
    if not router:
        return
    content = (inputs != FILLER).flatten(1).sum(1).double()
    weights = {"router_positions": torch.full_like(content, inputs[0].numel()), "router_content": content}
    for key, weight in weights.items():
        sums[key] = sums.get(key, 0) + weight
    for name, value in router.items():
        sums[f"router/{name}"] = sums.get(f"router/{name}", 0) + value.double() * weights[_router_weight(name)]


def _router_weight(name: str) -> str:
    """The sum of positions a router statistic of `add_router_sums` is weighted by."""
    return "router_content" if name.rsplit("/", 1)[-1].startswith("content_load") else "router_positions"


def eval_metrics(sums: dict, prefix: str, slice_labels: list[str]) -> list[dict[str, torch.Tensor]]:
    """Each run's metrics from its evaluation sums: {prefix}/loss, {prefix}/acc, {prefix}/acc/<slice> of each slice
    with a labelled position evaluated (a split cut by limit_*_batches may have none of a slice: no accuracy, not
    0), {prefix}/acc_past_train/<slice> of each slice with a labelled position evaluated past the training length
    (a longer test segment's), and the router statistics over the split (router/<name>, as training logs them)."""
    count = sums["count"].clamp(min=1)
    loss, acc = (sums["loss"] / count).float(), (sums["hits"] / count).float()

    def per_slice(name: str, hits: torch.Tensor, counts: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        evaluated = (counts > 0).tolist()
        slice_acc = (hits / counts.clamp(min=1)).float()
        return [{f"{prefix}/{name}/{label}": slice_acc[r, i] for i, label in enumerate(slice_labels) if evaluated[r][i]}
                for r in range(len(count))]

    slices = per_slice("acc", sums["slice_hits"], sums["slice_count"])
    past_train = per_slice("acc_past_train", sums["slice_past_hits"], sums["slice_past_count"])
    router = {key: (sums[key] / sums[_router_weight(key)].clamp(min=1)).float()
              for key in sums if key.startswith("router/")}
    return [{f"{prefix}/loss": loss[r], f"{prefix}/acc": acc[r], **slices[r], **past_train[r],
             **{key: value[r] for key, value in router.items()}}
            for r in range(len(count))]


class RecallModule(L.LightningModule):
    fused_adamw = True  # on CUDA; `sandbox-bench train` turns it off to measure what it gives
    runs = 1  # runs trained at once (sandbox.stacked_run.StackedRecallModule: R, their batches stacked)

    def __init__(self, model: dict, vocab_size: int, max_seq_len: int, optim: dict, cuda_graphs: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.model = build_model(vocab_size=vocab_size, max_seq_len=max_seq_len, **model)
        self.optim = optim
        self.max_labels = max_seq_len  # per example; made exact from the data in `setup`
        self.train_seq_len = max_seq_len  # evaluation counts apart the positions past it; set in `setup`
        self.cuda_graphs = cuda_graphs  # the training loss's forward and backward as CUDA graphs (sandbox.graphs)
        self._graphed = {}  # batch shape -> the graphed loss (not a submodule: it holds self.model)
        self._sums: dict[str, torch.Tensor] = {}

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if datamodule is not None and datamodule.datasets:
            self.max_labels = most_labelled(datamodule.datasets.values())
            self.train_seq_len = datamodule.train_seq_len

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor):
        """(loss, aux loss, hits [B, T] bool: labelled positions predicted right, mask [B, T] of the labelled)."""
        return labelled_loss(self.model, inputs, labels, self.max_labels)

    def training_outputs(self, inputs: torch.Tensor, labels: torch.Tensor):
        """`training_loss` of a training batch; with `cuda_graphs`, replayed from the CUDA graphs captured at the
        first batch of its shape."""
        if not self.cuda_graphs:
            return training_loss(self.model, inputs, labels, self.max_labels)
        shape = (*inputs.shape, *labels.shape)
        if shape not in self._graphed:
            loss = TrainingLoss(self.model, self.max_labels)
            self._graphed[shape] = graphed(loss, (inputs, labels), self.trainer.precision)
        return self._graphed[shape](inputs, labels)

    def training_step(self, batch, batch_idx):
        inputs, labels, _ = batch
        loss, aux_loss, hits, mask, router = self.training_outputs(inputs, labels)
        self.log("train/loss", loss)
        self.log("train/acc", hits.sum() / mask.sum())
        self.log("train/aux_loss", aux_loss)
        # Lightning writes a step's metrics when (step + 1) % log_every_n_steps == 0, with the last value logged
        # until then: logged at that step, so that its row holds its own step's statistics (not a stale step's)
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self.log_dict({f"router/{k}": v for k, v in router.items()})
        return loss + aux_loss

    # ---- evaluation: sums over the epoch, per slice too ----
    def _eval_step(self, batch):
        inputs, labels, bins = batch
        loss, _, hits, mask = self(inputs, labels)
        add_eval_counts(self._sums, loss[None], hits[None], mask[None], bins[None], len(self._slice_labels()),
                        self.train_seq_len)
        add_router_sums(self._sums, {k: v[None] for k, v in self.model.router_stats(as_tensors=True).items()},
                        inputs[None])

    def _slice_labels(self) -> list[str]:
        split = "test" if self.trainer.testing else "val"
        return self.trainer.datamodule.datasets[split].slice_table.labels()

    def _eval_epoch_end(self, prefix: str):
        sums = {k: self.trainer.strategy.reduce(v, reduce_op="sum") for k, v in self._sums.items()}
        self._sums = {}
        if not sums:
            return
        self.log_dict(eval_metrics(sums, prefix, self._slice_labels())[0], sync_dist=False)
        if prefix == "val":
            self.log_dict({f"diag/{k}": v for k, v in self.model.embedding_stats().items()})

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch)

    def on_validation_epoch_end(self):
        self._eval_epoch_end("val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch)

    def on_test_epoch_end(self):
        self._eval_epoch_end("test")

    def configure_optimizers(self):
        # float16's GradScaler must unscale before clipping, which a fused step does only inside itself
        fused = self.fused_adamw and self.device.type == "cuda" and self.trainer.precision != "16-mixed"
        optimizer = adamw(self.model, self.optim, fused=fused)
        total = int(self.trainer.estimated_stepping_batches)
        warmup = int(self.optim["warmup_ratio"] * total)
        schedule = WarmupCosine(warmup, total, self.optim["min_lr_ratio"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # Lightning's mixed-precision plugin refuses to clip for any fused optimizer, for float16's sake; the
        # fused step is used only without a GradScaler, where the gradients are already unscaled.
        if not optimizer.defaults.get("fused"):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if not gradient_clip_val:
            return
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(self.parameters(), gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)
