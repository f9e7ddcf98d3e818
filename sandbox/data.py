"""The DataModule: train, validation and test sets of a synthetic task, from disjoint seed ranges.

Each split is a mixture of segments (seq_len, num_kv_pairs, ...), generated once by `tasks.make_mixture`
on the CPU as numpy arrays, which become torch tensors here. Every example carries the index of its value in
each slice (e.g. `num_kv_pairs=8`) so the evaluation can count accuracy per slice on the device without
looking values up per batch.
"""

import functools
import itertools
from dataclasses import dataclass

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

import tasks
from tasks import SPLITS


@dataclass
class SliceTable:
    """The slice values of a split: `names[i]` takes values `values[i]`; examples hold indices into them."""

    names: list[str]
    values: list[list[int]]

    def labels(self) -> list[str]:
        return [f"{name}={value}" for name, vals in zip(self.names, self.values) for value in vals]


class RecallDataset(Dataset):
    def __init__(self, data: tasks.TaskData):
        self.inputs = torch.from_numpy(data.inputs)
        self.labels = torch.from_numpy(data.labels)
        names = sorted(data.slices)
        values = [sorted(set(data.slices[n].tolist())) for n in names]
        self.slice_table = SliceTable(names, values)
        # Flat bin per (slice, value) so that one scatter_add counts every slice at once.
        offsets, bins = 0, []
        for name, vals in zip(names, values):
            lookup = {v: i for i, v in enumerate(vals)}
            bins.append(torch.tensor([offsets + lookup[v] for v in data.slices[name].tolist()]))
            offsets += len(vals)
        self.slice_bins = torch.stack(bins, dim=1) if bins else torch.zeros(len(self.inputs), 0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i):
        return self.inputs[i], self.labels[i], self.slice_bins[i]


class EpochShuffle(Sampler):
    """A permutation that depends only on (seed, epoch), so a resumed run sees the same batches.

    With several processes, process `rank` of `world_size` takes every world_size-th index of the one
    permutation (the tail that does not split evenly is left out), so the processes see disjoint shards
    of equal length. Lightning calls `set_epoch` before every training epoch.
    """

    def __init__(self, num_examples: int, seed: int, rank: int = 0, world_size: int = 1):
        self.num_examples, self.seed, self.epoch = num_examples, seed, 0
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.num_examples, generator=generator)[:len(self) * self.world_size]
        return iter(order[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        return self.num_examples // self.world_size


class ResumableLoader(DataLoader):
    """The training DataLoader, resumable in the middle of an epoch (a run that validates, and so checkpoints,
    every `trainer.val_check_interval` steps). Its `position` is the epoch (read from its EpochShuffle) and
    the batches served in it; given the position of a checkpoint as `resume`, its next iteration, if of that
    epoch, skips those batches, so a resumed run trains on the batches an uninterrupted run trains on."""

    def __init__(self, *args, resume: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.served, self.resume = 0, resume

    def position(self) -> dict:
        return {"epoch": self.sampler.epoch, "served": self.served}

    def __iter__(self):
        # A generator: this runs at the first batch, after Lightning has set the sampler's epoch.
        resume, self.resume = self.resume, None
        skip = resume["served"] if resume and resume["epoch"] == self.sampler.epoch else 0
        self.served = skip
        for batch in self._batches(skip):
            self.served += 1
            yield batch

    def _batches(self, skip: int):
        return itertools.islice(super().__iter__(), skip, None)


class DeviceLoader(ResumableLoader):
    """A ResumableLoader whose dataset is held on `device`: each batch is gathered there by slicing the epoch's
    permutation, copied to the device once per epoch, so a step neither collates on the host nor copies its batch
    over (a copy that waits for the device). The batches, their order and resuming are the ResumableLoader's."""

    def __init__(self, dataset: RecallDataset, *args, device: torch.device, **kwargs):
        super().__init__(dataset, *args, **kwargs)
        self.tensors = [t.to(device) for t in (dataset.inputs, dataset.labels, dataset.slice_bins)]

    def _batches(self, skip: int):
        order = torch.tensor(list(self.sampler), device=self.tensors[0].device)
        for start in range(skip * self.batch_size, len(self) * self.batch_size, self.batch_size):
            index = order[start:start + self.batch_size]
            yield tuple(t[index] for t in self.tensors)


class RecallDataModule(L.LightningDataModule):
    def __init__(self, name: str, params: dict, segments: dict, seed: int, batch_size: int,
                 eval_batch_size: int | None = None, limit_examples: int | None = None, device_data: bool = False):
        """The settings are those of `task` in the config, checked by `sandbox.settings.check_settings`;
        eval_batch_size None: the training batch size."""
        super().__init__()
        self.name, self.params, self.segments, self.seed = name, dict(params), segments, seed
        self.batch_size = batch_size
        self.eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        # A cap on each segment's size, for fast debug runs.
        self.limit_examples = limit_examples
        # Keep the training set on the trainer's device and gather batches there (DeviceLoader).
        self.device_data = device_data
        self.datasets: dict[str, RecallDataset] = {}
        self._train_loader: ResumableLoader | None = None
        self._resume: dict | None = None

    # The model is built for the largest vocabulary and length of any segment: a segment may set its own, and
    # where neither it nor `params` does, the task's default holds.
    @functools.cached_property
    def shape(self) -> dict[str, int]:
        return tasks.model_shape(self.name, [s for split in SPLITS for s in self.segments[split]], **self.params)

    @property
    def vocab_size(self) -> int:
        return self.shape["vocab_size"]

    @property
    def max_seq_len(self) -> int:
        return self.shape["seq_len"]

    @functools.cached_property
    def train_seq_len(self) -> int:
        """The longest training sequence: test positions at or past it are past the training length."""
        return tasks.model_shape(self.name, self.segments["train"], **self.params)["seq_len"]

    def generate(self) -> None:
        """Build all three splits (idempotent). Raises ValueError on impossible task settings."""
        if self.datasets:
            return
        for split in SPLITS:
            segments = tasks.capped(self.segments[split], self.limit_examples)
            data = tasks.make_mixture(self.name, segments, seed=tasks.split_seed(self.seed, split), **self.params)
            self.datasets[split] = RecallDataset(data)

    def setup(self, stage: str | None = None) -> None:
        self.generate()

    # Lightning keeps the datamodule's state in checkpoints and restores it before it asks for the loaders.
    def state_dict(self) -> dict:
        return {"train_position": self._train_loader.position()} if self._train_loader is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self._resume = state.get("train_position")

    def _processes(self) -> tuple[int, int]:
        """(rank, world size) of this process; (0, 1) outside a multi-process run."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self):
        # batch_size is the global batch: with N processes each takes batch_size / N examples per step, so a
        # run takes the same optimiser steps on the same batches whatever the number of processes.
        # (`sandbox.train` checks that it divides.)
        rank, world_size = self._processes()
        batch_size = self.batch_size // world_size
        sampler = EpochShuffle(len(self.datasets["train"]), self.seed, rank, world_size)
        options = {"batch_size": batch_size, "sampler": sampler, "drop_last": len(sampler) >= batch_size,
                   "resume": self._resume}
        if self.device_data:
            device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
            self._train_loader = DeviceLoader(self.datasets["train"], device=device, **options)
        else:
            self._train_loader = ResumableLoader(self.datasets["train"], **options)
        self._resume = None
        return self._train_loader

    def _eval_dataloader(self, split: str):
        # Each process evaluates every world_size-th example; the module sums the counts over processes.
        rank, world_size = self._processes()
        shard = range(rank, len(self.datasets[split]), world_size)
        return DataLoader(self.datasets[split], batch_size=self.eval_batch_size, sampler=shard)

    def val_dataloader(self):
        return self._eval_dataloader("val")

    def test_dataloader(self):
        return self._eval_dataloader("test")
