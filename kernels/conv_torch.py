"""The short causal depthwise conv + SiLU of the memory mixers in PyTorch (backend `torch`; the reference of its
Triton form `kernels.mom.batch_conv`, `kernels/mom/conv.py`). Torch only: this module works where Triton is
missing (`kernels.mom` imports Triton).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._common import compute_dtype


class _CausalConvSiLU(torch.autograd.Function):
    """y = silu(a), a_t = sum_s w_{S-1-s} x_{t-s} over x [N, T, C] (zeros before t = 0), w [C, S].

    Written as S shifted multiply-adds on the contiguous [N, T, C] layout, with the backward by hand and no
    padded copies: on the CPU, conv1d over the channel-strided layout and autograd's SiLU backward cost
    several times more, and this op's tensors (MoM: every slot's q, k and v) are large."""

    @staticmethod
    def forward(x, weight):
        T, S = x.shape[1], weight.shape[1]
        a = x * weight[:, S - 1]
        for s in range(1, min(S, T)):  # tap S-1-s reads s steps back
            a[:, s:].addcmul_(x[:, : T - s], weight[:, S - 1 - s])
        return F.silu(a), a

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs, output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def vmap(info, in_dims, x, weight):
        """Under `torch.func.vmap` (stacked models, `sandbox.stacked`): R models' x [R, N, T, C] as one call,
        their channels side by side when each has its own weights [R, C, S], else as R * N sequences."""
        R = info.batch_size
        x = x.movedim(in_dims[0], 0) if in_dims[0] is not None else x.expand(R, *x.shape)
        if in_dims[1] is None:
            y, a = _CausalConvSiLU.apply(x.flatten(0, 1), weight)
            return (y.view(x.shape), a.view(x.shape)), (0, 0)
        N, T, C = x.shape[1:]
        wide = x.permute(1, 2, 0, 3).reshape(N, T, R * C).contiguous()
        y, a = _CausalConvSiLU.apply(wide, weight.movedim(in_dims[1], 0).flatten(0, 1))
        y, a = (z.view(N, T, R, C).permute(2, 0, 1, 3) for z in (y, a))
        return (y, a), (0, 0)

    @staticmethod
    def backward(ctx, dy, _):
        x, weight, a = ctx.saved_tensors
        T, S = x.shape[1], weight.shape[1]
        da = torch.ops.aten.silu_backward(dy, a)  # one fused pass
        dx = da * weight[:, S - 1]
        dw = weight.new_zeros(weight.shape)
        dw[:, S - 1] = (da * x).sum((0, 1))
        for s in range(1, min(S, T)):
            dx[:, : T - s].addcmul_(da[:, s:], weight[:, S - 1 - s])
            dw[:, S - 1 - s] = (da[:, s:] * x[:, : T - s]).sum((0, 1))
        return dx, dw


def causal_conv_silu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The short conv (`models.common.ShortConv`): x [..., T, C], weight [C, S] -> silu(causal conv) [..., T, C]."""
    lead, (T, C) = x.shape[:-2], x.shape[-2:]
    dt = compute_dtype(x)  # 16-bit inputs (mixed precision) are summed in float32, as conv1d accumulates
    y = _CausalConvSiLU.apply(x.reshape(-1, T, C).to(dt).contiguous(), weight.to(dt))[0]
    return y.view(*lead, T, C).to(x.dtype)
