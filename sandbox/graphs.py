"""CUDA graphs over a training step's forward and backward (`cuda_graphs`: auto, the default, or true).

At the sandbox's sizes a step is launch-bound: the CPU issuing a few hundred small kernels takes several times
the GPU's work (docs/results/throughput/). `torch.cuda.make_graphed_callables` records the loss's forward and
its backward once, each as one CUDA graph, and replays them on every later batch of the same shape: one launch
each instead of one per kernel. The optimizer step and clipping stay outside (fused AdamW is one launch already).

What capture needs, and why the settings check refuses the rest (sandbox/settings.py): fixed shapes (a training
batch's shape is fixed, the labelled positions are a fixed count, `RecallModule.max_labels`); no host reads in
the forward or backward; one device; autocast without its weight cache; and gradients used once per step, since
the backward returns its graph's own gradient buffers, which the next replay overwrites
(`trainer.accumulate_grad_batches` must be 1). Evaluation runs eagerly (the graphed forward only replaces the
training-mode one).
"""

from __future__ import annotations

import torch
from torch import nn


def graphed(module: nn.Module, sample: tuple[torch.Tensor, ...], precision: str):
    """`module` (in training mode) captured as CUDA graphs for inputs shaped as `sample`, after
    make_graphed_callables' three warm-up passes (which leave the parameters' gradients alone); its training-mode
    forward then replays them. `precision`: the trainer's, which decides the autocast the graphs record."""
    # each call copies its inputs into the graph's own buffers: never capture the loader's tensors themselves
    sample = tuple(t.clone() for t in sample)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16-mixed", cache_enabled=False):
        return torch.cuda.make_graphed_callables(module, sample)
