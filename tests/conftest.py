"""Shared test set-up.

Triton has no CPU driver: on a machine without an NVIDIA GPU the kernel tests run under the Triton
interpreter, which must be switched on before triton is first imported.
"""

import os
import shutil

import pytest


def _has_nvidia_gpu() -> bool:
    return os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") is not None


if not _has_nvidia_gpu():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    import torch

    needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(needs_gpu)


@pytest.fixture
def poison(monkeypatch):
    """Every buffer the Triton ops allocate starts as NaN (`kernels._common.POISON`): an element a kernel forgets
    to write shows up in the comparison with the reference instead of passing by luck."""
    import kernels._common

    monkeypatch.setattr(kernels._common, "POISON", True)
