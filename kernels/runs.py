"""Ops under `torch.func.vmap` over runs (stacked runs, `sandbox/stacked.py`), once for all R runs instead of once
per run: an op whose dim 0 holds independent sequences, with no weights of its own (the chunked Triton ops, softmax
attention's fused kernel, the L2 norm), with the run dimension folded into dim 0 (`fold_runs`); a depthwise op
with a weight per channel (the short conv) with the runs side by side in its channels (`fold_channels`). Torch
only."""

from __future__ import annotations

import torch


def batched(*tensors) -> bool:
    """Whether any of these (tensors or None) is a tensor of a vmap, i.e. the op runs for several runs at once."""
    return any(t is not None and torch._C._functorch.is_batchedtensor(t) for t in tensors)


class _FoldRuns(torch.autograd.Function):
    """`op(*tensors)` under vmap as one call on the R runs' tensors folded: [R, B, ...] -> [R B, ...]. Entered only
    under vmap (`fold_runs`), where autograd records what the op does on the folded tensors."""

    @staticmethod
    def forward(op, *tensors):
        raise RuntimeError("_FoldRuns runs only under torch.func.vmap")

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def vmap(info, in_dims, op, *tensors):
        runs = info.batch_size

        def fold(x, dim):
            if x is None:
                return None
            x = x.movedim(dim, 0) if dim is not None else x.expand(runs, *x.shape)
            return x.flatten(0, 1)

        out = op(*(fold(x, dim) for x, dim in zip(tensors, in_dims[1:])))
        unfolded = tuple(None if o is None else o.unflatten(0, (runs, -1)) for o in out)
        return unfolded, tuple(None if o is None else 0 for o in out)


def fold_runs(op, *tensors):
    """op(*tensors) -> a tuple of tensors (or None), each [B, ...] like the inputs; under vmap, one call of op for
    every run. Outside vmap, just the call."""
    if not batched(*tensors):
        return op(*tensors)
    return _FoldRuns.apply(op, *tensors)


class _FoldChannels(torch.autograd.Function):
    """`op(x, weight)` of a depthwise op (x [..., C], weight [C, ...]: channel c of x meets row c of weight only)
    under vmap as one call with the runs side by side in the channels: x [R, ..., C] -> [..., R C], weight
    [R, C, ...] -> [R C, ...]. Entered only under vmap (`fold_channels`)."""

    @staticmethod
    def forward(op, x, weight):
        raise RuntimeError("_FoldChannels runs only under torch.func.vmap")

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def vmap(info, in_dims, op, x, weight):
        runs = info.batch_size
        x, weight = (t.movedim(d, 0) if d is not None else t.expand(runs, *t.shape)
                     for t, d in zip((x, weight), in_dims[1:]))
        out = op(x.movedim(0, -2).flatten(-2).contiguous(), weight.flatten(0, 1))
        return out.unflatten(-1, (runs, -1)).movedim(-2, 0), 0


def fold_channels(op, x, weight):
    """op(x, weight) -> a tensor like x, for a depthwise op (`_FoldChannels`); under vmap, one call of op for every
    run. Outside vmap, just the call."""
    if not batched(x, weight):
        return op(x, weight)
    return _FoldChannels.apply(op, x, weight)
