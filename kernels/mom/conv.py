"""The short causal depthwise conv + SiLU over packed segments: y_r = silu(sum_i w_i x_{r - size + 1 + i}), where
rows before the first row of r's segment count as zero. So a memory's conv sees only its own tokens, in
training as in decoding (the reference code ran it across the segment boundaries).

With `gather`, input row r is read from token perm[r] of a token-ordered input (the shared query projection),
so no packed copy of it is made. Backward: one kernel recomputes the pre-activation, writes dz = dy * silu' and
per-block partial sums of the weights' gradient; a second one gives dx_r = sum_i w_i dz_{r + size - 1 - i} over
the rows of r's segment. With `gather` the packed dx goes back to tokens as the sum of a token's rows.
Everything is a fixed-size launch (no host sync) and deterministic (no atomics). `batch_conv` runs the same
kernels over a batch of whole sequences, each one segment: the single-memory mixers' conv on the triton backend.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import empty
from kernels.mom.routing import SegmentTable, gather_sum, pack_tokens
from kernels.runs import fold_channels

ROWS = 32  # packed rows per program


@triton.jit
def _conv_pre(
    x, src, row_start, w, rows, cols, m_r, m_c, stride_x,
    SIZE: tl.constexpr, GATHER: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    """The conv's pre-activation on a [BR, BC] tile (float32)."""
    start = tl.load(row_start + rows, mask=m_r, other=0)
    acc = tl.zeros([BR, BC], dtype=tl.float32)
    for i in tl.static_range(SIZE):
        r = rows - (SIZE - 1) + i
        ok = m_r & (r >= start)
        if GATHER:
            r = tl.load(src + r, mask=ok, other=0)
        x_i = tl.load(
            x + r.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=ok[:, None] & m_c[None, :], other=0.0
        )
        acc += x_i.to(tl.float32) * tl.load(w + cols * SIZE + i, mask=m_c, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _fwd_kernel(
    x, src, row_start, w, y, P, stride_x,
    C: tl.constexpr, SIZE: tl.constexpr, GATHER: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    m_r, m_c = rows < P, cols < C
    acc = _conv_pre(x, src, row_start, w, rows, cols, m_r, m_c, stride_x, SIZE, GATHER, BR, BC)
    out = acc * tl.sigmoid(acc)
    tl.store(y + rows.to(tl.int64)[:, None] * C + cols[None, :], out.to(y.dtype.element_ty),
             mask=m_r[:, None] & m_c[None, :])  # fmt: skip


@triton.jit
def _dz_kernel(
    x, src, row_start, w, dy, dz, dw_part, P, stride_x,
    C: tl.constexpr, SIZE: tl.constexpr, GATHER: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    i_r = tl.program_id(0)
    rows = i_r * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    m_r, m_c = rows < P, cols < C
    m = m_r[:, None] & m_c[None, :]
    acc = _conv_pre(x, src, row_start, w, rows, cols, m_r, m_c, stride_x, SIZE, GATHER, BR, BC)
    s = tl.sigmoid(acc)
    p = rows.to(tl.int64)[:, None] * C + cols[None, :]
    d = tl.load(dy + p, mask=m, other=0.0).to(tl.float32) * s * (1 + acc * (1 - s))
    tl.store(dz + p, d.to(dz.dtype.element_ty), mask=m)
    start = tl.load(row_start + rows, mask=m_r, other=0)
    for i in tl.static_range(SIZE):
        r = rows - (SIZE - 1) + i
        ok = m_r & (r >= start)
        if GATHER:
            r = tl.load(src + r, mask=ok, other=0)
        x_i = tl.load(
            x + r.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=ok[:, None] & m_c[None, :], other=0.0
        )
        tl.store(dw_part + (i_r * C + cols) * SIZE + i, tl.sum(d * x_i.to(tl.float32), 0), mask=m_c)


@triton.jit
def _dx_kernel(dz, row_start, w, dx, P, C: tl.constexpr, SIZE: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    m_r, m_c = rows < P, cols < C
    start = tl.load(row_start + rows, mask=m_r, other=0)
    acc = tl.zeros([BR, BC], dtype=tl.float32)
    for i in tl.static_range(SIZE):
        r = rows + (SIZE - 1) - i  # the output row that read this row through tap i
        ok = m_r & (r < P)
        ok = ok & (tl.load(row_start + r, mask=ok, other=-1) == start)  # in the same segment
        d = tl.load(dz + r.to(tl.int64)[:, None] * C + cols[None, :], mask=ok[:, None] & m_c[None, :], other=0.0)
        acc += d.to(tl.float32) * tl.load(w + cols * SIZE + i, mask=m_c, other=0.0).to(tl.float32)[None, :]
    tl.store(dx + rows.to(tl.int64)[:, None] * C + cols[None, :], acc.to(dx.dtype.element_ty),
             mask=m_r[:, None] & m_c[None, :])  # fmt: skip


def _launch(P: int, C: int):
    """Grid and tile sizes: ROWS packed rows by BC channels per program."""
    BC = min(128, max(16, triton.next_power_of_2(C)))
    return (triton.cdiv(P, ROWS), triton.cdiv(C, BC)), {"BR": ROWS, "BC": BC}


class _SegmentConv(torch.autograd.Function):
    """Rows [P, C] (or, with `gather`, token rows read through gather.perm) -> [P, C]; row_start [P] int32."""

    @staticmethod
    def forward(ctx, x, weight, row_start, gather: SegmentTable | None):
        if x.stride(1) != 1:
            x = x.contiguous()
        P, C = row_start.numel(), x.shape[1]
        grid, tiles = _launch(P, C)
        src = None if gather is None else gather.perm
        y = empty(P, C, device=x.device, dtype=x.dtype)
        if P:
            _fwd_kernel[grid](
                x, src, row_start, weight, y, P, x.stride(0),
                C=C, SIZE=weight.shape[1], GATHER=gather is not None, **tiles,
            )  # fmt: skip
        ctx.save_for_backward(x, weight, row_start)
        ctx.gather = gather
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, row_start = ctx.saved_tensors
        gather = ctx.gather
        dy = dy.contiguous()
        P, C, size = dy.shape[0], dy.shape[1], weight.shape[1]
        grid, tiles = _launch(P, C)
        src = None if gather is None else gather.perm
        dz = empty(P, C, device=dy.device, dtype=dy.dtype)
        dw_part = empty(grid[0], C, size, device=dy.device, dtype=torch.float32)
        dx = empty(P, C, device=dy.device, dtype=dy.dtype)
        if P:
            _dz_kernel[grid](
                x, src, row_start, weight, dy, dz, dw_part, P, x.stride(0),
                C=C, SIZE=size, GATHER=gather is not None, **tiles,
            )  # fmt: skip
            _dx_kernel[grid](dz, row_start, weight, dx, P, C=C, SIZE=size, **tiles)
        if gather is not None:
            dx = gather_sum(dx, gather)
        return dx.to(x.dtype), dw_part.sum(0).to(weight.dtype), None, None


def segment_conv(
    x: torch.Tensor, weight: torch.Tensor | None, table: SegmentTable, gather: bool = False
) -> torch.Tensor:
    """Causal depthwise conv + SiLU within each packed segment.

    x: packed rows [P, C] (unit column stride), or with `gather` token rows [B * T, C] read through the routing;
    weight [C, size] (None: no conv, the identity, as `models.common.ShortConv` with size 0) -> [P, C].
    """
    if weight is None:
        return pack_tokens(x, table) if gather else x
    return _SegmentConv.apply(x, weight, table.row_start, table if gather else None)


def batch_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The same conv over whole sequences: x [N, T, C] (unit column stride), weight [C, size] -> [N, T, C], as
    `kernels.conv_torch.causal_conv_silu` (computed in float32, returned in x's dtype); under vmap over runs, one
    launch with the runs side by side in the channels."""
    return fold_channels(_batch_conv, x, weight)


def _batch_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    N, T, C = x.shape
    rows = torch.arange(N * T, device=x.device, dtype=torch.int32)
    row_start = rows - rows % max(T, 1)  # each sequence one segment
    return _SegmentConv.apply(x.reshape(N * T, C), weight, row_start, None).view(N, T, C)
