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
    def forward(ctx, x, weight):
        T, S = x.shape[1], weight.shape[1]
        a = x * weight[:, S - 1]
        for s in range(1, min(S, T)):  # tap S-1-s reads s steps back
            a[:, s:].addcmul_(x[:, : T - s], weight[:, S - 1 - s])
        ctx.save_for_backward(x, weight, a)
        return F.silu(a)

    @staticmethod
    def backward(ctx, dy):
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
    y = _CausalConvSiLU.apply(x.reshape(-1, T, C).to(dt).contiguous(), weight.to(dt))
    return y.view(*lead, T, C).to(x.dtype)
