"""A training step of `sandbox-train` reads nothing back to the host between its logging intervals, so that on a GPU
the CPU queues the next steps while the device works; the labelled-position selection that makes this possible
gives the loss and accuracy of a boolean mask's."""

import collections
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch.utils._python_dispatch import TorchDispatchMode

from sandbox.module import add_eval_counts, eval_metrics, label_positions
from sandbox.train import CONF_DIR, build, make_trainer
from tasks import IGNORE

# aten ops that wait for the device on CUDA: a scalar read (.item(), float(), bool(), .tolist()), and the
# selections whose output size depends on the data
HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal"}


class HostReadSpy(TorchDispatchMode):
    """Counts the ops of HOST_READS (and indexing by a bool tensor) except reads of `skip` tensors."""

    def __init__(self, skip=()):
        super().__init__()
        self.seen, self.skip = collections.Counter(), skip

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[1]
        by_mask = name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
        if (name in HOST_READS and not any(args[0] is t for t in self.skip)) or by_mask:
            self.seen[name] += 1
        return func(*args, **(kwargs or {}))


class SpyOnSteps(L.Callback):
    """Spies from the start of batch `first` to the start of batch `last` (Lightning's after-step logging
    included), not at a logging step."""

    def __init__(self, first: int, last: int):
        self.first, self.last, self.spy = first, last, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.first:
            # The unfused AdamW keeps its step counts on the host by design (no device read); fused, on the device.
            steps = [s["step"] for s in trainer.optimizers[0].state.values()]
            self.spy = HostReadSpy(skip=steps)
            self.spy.__enter__()
        elif batch_idx == self.last:
            self.spy.__exit__(None, None, None)


def tiny_config(model: str, *extra: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[f"model={model}", "debug=fast", "task.limit_examples=64",
                                           "model.n_layers=1", "trainer.limit_train_batches=4",
                                           "trainer.log_every_n_steps=50", "callbacks.progress=none", *extra])


@pytest.mark.parametrize("model", ["attention", "mom"])
def test_training_steps_read_nothing_back_from_the_device(tmp_path, model):
    cfg = tiny_config(model)
    datamodule, module = build(cfg)
    spy = SpyOnSteps(first=1, last=3)
    make_trainer(cfg, Path(tmp_path), [spy]).fit(module, datamodule=datamodule)
    assert spy.spy is not None and dict(spy.spy.seen) == {}


def test_the_spy_sees_the_reads_of_a_step_that_makes_them(tmp_path):
    """The step of before (sandbox-bench train's `nosync` lever off) reads the device: the spy must see it."""
    from sandbox.bench.train import host_reads_module

    cfg = tiny_config("attention")
    datamodule, module = build(cfg)
    state = module.state_dict()
    module = host_reads_module()(model=dict(module.hparams.model), vocab_size=datamodule.vocab_size,
                                 max_seq_len=datamodule.max_seq_len, optim=dict(module.hparams.optim))
    module.load_state_dict(state)
    spy = SpyOnSteps(first=1, last=3)
    make_trainer(cfg, Path(tmp_path), [spy]).fit(module, datamodule=datamodule)
    assert spy.spy.seen["index"] == 2 * 2  # the mask selects the hidden states and the labels, each step
    assert spy.spy.seen["_local_scalar_dense"] == 2 * 2  # loss and accuracy on the progress bar


def test_label_positions_give_the_masks_loss_and_accuracy():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 50, (5, 12), generator=gen)
    labels[torch.rand(5, 12, generator=gen) < 0.7] = IGNORE
    logits = torch.randn(5 * 12, 50, generator=gen)
    mask = labels != IGNORE
    rows = 5 * int(mask.sum(1).max())
    index = label_positions(labels, rows)
    assert index.shape == (rows,) and index.unique().numel() == rows
    torch.testing.assert_close(index[: int(mask.sum())], mask.flatten().nonzero().squeeze(1))  # in row-major order
    targets = labels.flatten()[index]
    loss = F.cross_entropy(logits[index], targets, ignore_index=IGNORE)
    torch.testing.assert_close(loss, F.cross_entropy(logits[mask.flatten()], labels[mask]))
    hits = torch.zeros(60, dtype=torch.bool).index_copy_(0, index, logits[index].argmax(-1) == targets)
    torch.testing.assert_close(hits.view(5, 12), mask & (logits.argmax(-1).view(5, 12) == labels))


class SyncsOnSteps(L.Callback):
    """Makes any host sync of the steps from batch `first` to batch `last` an error (CUDA's sync debug mode)."""

    def __init__(self, first: int, last: int):
        self.first, self.last, self.checked = first, last, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.first:
            torch.cuda.set_sync_debug_mode("error")
        elif batch_idx == self.last:
            torch.cuda.set_sync_debug_mode("default")
            self.checked = self.last - self.first


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", ["false", "auto"])
@pytest.mark.parametrize("model", ["attention", "gated_deltanet", "mom"])
def test_training_steps_do_not_sync_on_cuda(tmp_path, model, graphs):
    """With the training set on the device, the steps between logging intervals make no host sync at all, op by
    op and replayed from CUDA graphs (auto, the default on one GPU: captured at the first step)."""
    cfg = tiny_config(model, f"cuda_graphs={graphs}")
    datamodule, module = build(cfg)
    datamodule.device_data = True
    check = SyncsOnSteps(first=1, last=3)  # inside the epoch of 4 batches: its end validates, which reads the device
    try:
        make_trainer(cfg, Path(tmp_path), [check]).fit(module, datamodule=datamodule)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert check.checked == 2 and module.cuda_graphs == (graphs == "auto")
    assert type(module.trainer.optimizers[0]).__name__ == "AdamW" and module.trainer.optimizers[0].defaults["fused"]


def test_fused_adamw_clips_gradients_under_mixed_precision(tmp_path, monkeypatch):
    """Lightning's mixed-precision plugin refuses to clip for a fused optimizer (float16 unscales inside the
    step); the module clips itself there. A clip far below Adam's eps leaves the weights where they started, as
    the plain AdamW's clipping does, and unlike training without a clip."""
    import sandbox.module as module_file

    plain_adamw = module_file.adamw
    start = None
    after = {}
    for fused, clip in ((False, "1e-12"), (True, "1e-12"), (True, "null")):
        monkeypatch.setattr(module_file, "adamw", lambda model, optim, fused, f=fused: plain_adamw(model, optim, f))
        cfg = tiny_config("attention", "trainer.precision=bf16-mixed", f"trainer.gradient_clip_val={clip}",
                          "optim.weight_decay=0.0")
        datamodule, module = build(cfg)
        start = start or {k: v.clone() for k, v in module.state_dict().items()}
        module.load_state_dict(start)
        L.seed_everything(0)
        make_trainer(cfg, tmp_path / f"{fused}-{clip}").fit(module, datamodule=datamodule)
        assert module.trainer.optimizers[0].defaults["fused"] == fused
        after[fused, clip] = module.state_dict()
    moved = {run: max((w[k] - start[k]).abs().max().item() for k in start) for run, w in after.items()}
    assert moved[False, "1e-12"] < 1e-5 and moved[True, "1e-12"] < 1e-5, moved
    assert moved[True, "null"] > 1e-3, moved


def test_eval_counts_give_the_accuracy_past_the_training_length_apart():
    """Trained at L 4, tested at 4 and 8: a slice's accuracy counts every position, its accuracy past the training
    length the positions 4-7 alone, per run, summed over batches on the device (no read); a slice without such
    positions (seq_len=4) gets none, not 0; tested at the training length, no slice has one."""
    # two slicings: seq_len (bins 0, 1) and num_kv_pairs (bins 2, 3); examples of L 4, 8, 8; kv 1, 1, 2
    labels = ["seq_len=4", "seq_len=8", "num_kv_pairs=1", "num_kv_pairs=2"]
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0], [1] * 8, [1] * 8], dtype=torch.bool)
    hits = torch.tensor([[[1, 1, 0, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0]],
                         [[1, 1, 1, 1, 0, 0, 0, 0], [1] * 8, [1] * 8]], dtype=torch.bool)  # [runs, B, T]
    bins = torch.tensor([[0, 2], [1, 2], [1, 3]]).expand(2, 3, 2)
    sums, spy = {}, HostReadSpy()
    with spy:
        for batch in (slice(0, 2), slice(2, 3)):
            add_eval_counts(sums, torch.ones(2), hits[:, batch], mask.expand(2, 3, 8)[:, batch], bins[:, batch],
                            len(labels), past=4)
    assert dict(spy.seen) == {}
    assert all(value.dtype == torch.float64 for value in sums.values())
    first, second = ({k: round(float(v), 6) for k, v in run.items()} for run in eval_metrics(sums, "test", labels))
    assert first == {"test/loss": 1.0, "test/acc": 0.75, "test/acc/seq_len=4": 0.75,
                     "test/acc/seq_len=8": 0.75, "test/acc/num_kv_pairs=1": round(8 / 12, 6),
                     "test/acc/num_kv_pairs=2": 0.875, "test/acc_past_train/seq_len=8": 0.5,
                     "test/acc_past_train/num_kv_pairs=1": 0.25, "test/acc_past_train/num_kv_pairs=2": 0.75}
    assert second["test/acc_past_train/seq_len=8"] == 1.0 and "test/acc_past_train/seq_len=4" not in second
    sums = {}
    add_eval_counts(sums, torch.ones(2), hits, mask.expand(2, 3, 8), bins, len(labels), past=8)
    assert not any("past_train" in key for run in eval_metrics(sums, "val", labels) for key in run)
