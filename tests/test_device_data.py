"""RecallDataModule's `device_data`: the training set held on the device gives the batches the CPU loader gives,
in the same order, and resumes in the middle of an epoch as it does."""

import pytest
import torch

from sandbox.data import DeviceLoader, EpochShuffle, RecallDataModule, ResumableLoader

SEGMENTS = {split: [{"seq_len": 32, "num_kv_pairs": 2, "num_examples": 30},
                    {"seq_len": 64, "num_kv_pairs": 8, "num_examples": 27}] for split in ("train", "val", "test")}


def datamodule(device_data: bool, batch_size: int = 8) -> RecallDataModule:
    dm = RecallDataModule("mqar", {"vocab_size": 64}, SEGMENTS, seed=3, batch_size=batch_size, device_data=device_data)
    dm.generate()
    return dm


def epochs(loader, count: int) -> list[list[tuple]]:
    """The batches of `count` epochs, as Lightning runs them (set_epoch before each)."""
    out = []
    for epoch in range(count):
        loader.sampler.set_epoch(epoch)
        out.append([tuple(t.cpu() for t in batch) for batch in loader])
    return out


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b):
        assert len(x) == len(y) == 3
        for s, t in zip(x, y):
            assert s.dtype == t.dtype
            torch.testing.assert_close(s, t, rtol=0, atol=0)


def loaders(device, batch_size: int, resume=None):
    train = datamodule(False).datasets["train"]
    options = {"batch_size": batch_size, "drop_last": len(train) >= batch_size}
    cpu = ResumableLoader(train, sampler=EpochShuffle(len(train), seed=3), resume=resume, **options)
    held = DeviceLoader(train, device=device, sampler=EpochShuffle(len(train), seed=3), resume=resume, **options)
    return cpu, held


@pytest.mark.parametrize("batch_size", [8, 100])  # 57 examples: whole batches, or one short batch (no drop_last)
def test_device_loader_gives_the_cpu_loaders_batches(batch_size):
    cpu, held = loaders(torch.device("cpu"), batch_size)
    expected, got = epochs(cpu, 2), epochs(held, 2)
    assert len(expected[0]) == len(held) == (57 // 8 if batch_size == 8 else 1)
    for a, b in zip(expected, got):
        assert_same(a, b)
    assert not torch.equal(expected[0][0][0], expected[1][0][0])  # the epochs are shuffled differently


def test_device_loader_resumes_mid_epoch_like_the_cpu_loader():
    full, _ = loaders(torch.device("cpu"), 8)
    uninterrupted = epochs(full, 2)
    cpu, held = loaders(torch.device("cpu"), 8, resume={"epoch": 1, "served": 3})
    for loader in (cpu, held):
        loader.sampler.set_epoch(1)
        assert_same([tuple(t.cpu() for t in batch) for batch in loader], uninterrupted[1][3:])
        assert loader.position() == {"epoch": 1, "served": len(uninterrupted[1])}


def test_datamodule_device_data_resumes_from_its_state():
    plain, held = datamodule(False), datamodule(True)
    loader = held.train_dataloader()
    assert isinstance(loader, DeviceLoader) and not isinstance(plain.train_dataloader(), DeviceLoader)
    batches = iter(loader)
    for _ in range(2):
        next(batches)
    state = held.state_dict()
    assert state == {"train_position": {"epoch": 0, "served": 2}}
    resumed = datamodule(True)
    resumed.load_state_dict(state)
    expected = [tuple(batch) for batch in plain.train_dataloader()][2:]
    assert_same([tuple(batch) for batch in resumed.train_dataloader()], expected)


@pytest.mark.gpu
def test_device_loader_on_cuda_gives_the_cpu_loaders_batches():
    cpu, held = loaders(torch.device("cuda"), 8)
    assert held.tensors[0].is_cuda
    for a, b in zip(epochs(cpu, 2), epochs(held, 2)):
        assert_same(a, b)
