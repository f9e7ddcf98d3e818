"""The memory mixers' row-wise steps around the update rules, as Triton kernels (backend `triton`):

    l2norm:             y = x * rsqrt(sum_i x_i^2 + eps) per row of K       (q and k's feature map)
    mix_gated_rmsnorm:  a_t = sum_j w_tj o[row_tj]                            (a token's memory outputs, mixed)
                        y_t = a_t * rsqrt(mean_i a_ti^2 + eps) * weight * silu(gate_t)   per head of V

In PyTorch (`kernels/norms_torch.py`: `l2norm`, and `gated_rmsnorm` after the mix in `MemoryMixer.read_out`)
each is a chain of elementwise kernels that keeps several float32 copies for the backward. Here each is one
kernel each way, computing in float32: `l2norm` keeps its output (which the update rule keeps anyway) and the
per-row rsqrt; `mix_gated_rmsnorm` reads a token's rows where they are (the packed rows of the routed MoM,
through `slots`: no token-order copy) and keeps only its inputs and the per-head rsqrt, recomputing the mix in
the backward. The backward passes are deterministic: each input row gets its gradient from one program (a
packed row belongs to one token), and the norm weight's gradient is summed from per-program partial sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import check_triton_inputs, empty
from kernels.runs import batched, fold_runs

TILE = 4096  # elements of a program's [rows, columns] tile


def _tile(width: int) -> tuple[int, int]:
    """(rows, columns) of a tile covering whole rows of `width`."""
    cols = triton.next_power_of_2(width)
    return max(1, TILE // cols), cols


# --- l2norm ------------------------------------------------------------------------------------------------


@triton.jit
def _row_tile(R, K: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
    """This program's [BR, BK] tile of the rows of K: row indices, their mask, the tile's mask and offsets."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BK)
    m_r = rows < R
    return rows, m_r, m_r[:, None] & (cols < K)[None, :], rows.to(tl.int64)[:, None] * K + cols[None, :]


@triton.jit
def _l2_fwd_kernel(x, y, rstd, R, eps, K: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
    rows, m_r, m, p = _row_tile(R, K, BR, BK)
    xt = tl.load(x + p, mask=m, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(xt * xt, 1) + eps)
    tl.store(y + p, (xt * r[:, None]).to(y.dtype.element_ty), mask=m)
    tl.store(rstd + rows, r, mask=m_r)


@triton.jit
def _l2_bwd_kernel(y, rstd, dy, dx, R, K: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
    """dx = r (dy - y <dy, y>): the gradient of x r(x) from the output y = x r and r."""
    rows, m_r, m, p = _row_tile(R, K, BR, BK)
    yt = tl.load(y + p, mask=m, other=0.0).to(tl.float32)
    d = tl.load(dy + p, mask=m, other=0.0).to(tl.float32)
    r = tl.load(rstd + rows, mask=m_r, other=0.0)
    out = r[:, None] * (d - yt * tl.sum(d * yt, 1)[:, None])
    tl.store(dx + p, out.to(dx.dtype.element_ty), mask=m)


class _L2Norm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, eps):
        K = x.shape[-1]
        x2 = x.contiguous().view(-1, K)
        R = x2.shape[0]
        BR, BK = _tile(K)
        y = empty(R, K, device=x.device, dtype=x.dtype)
        rstd = empty(R, device=x.device, dtype=torch.float32)
        if R:
            _l2_fwd_kernel[(triton.cdiv(R, BR),)](x2, y, rstd, R, eps, K=K, BR=BR, BK=BK)
        ctx.save_for_backward(y, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        y, rstd = ctx.saved_tensors
        R, K = y.shape
        BR, BK = _tile(K)
        dx = empty(R, K, device=dy.device, dtype=dy.dtype)
        if R:
            _l2_bwd_kernel[(triton.cdiv(R, BR),)](y, rstd, dy.contiguous().view(R, K), dx, R, K=K, BR=BR, BK=BK)
        return dx.view(dy.shape), None


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / ||x|| over the last dimension, as `kernels.norms_torch.l2norm` (output contiguous, in x's dtype); under
    vmap over runs, one launch for all of them."""
    check_triton_inputs(x)
    return fold_runs(lambda x: (_L2Norm.apply(x, eps),), x)[0]


# --- mix_gated_rmsnorm ---------------------------------------------------------------------------------------


@triton.jit
def _mixed(o, slots, w, toks, m_n, cols, m, HV: tl.constexpr, J: tl.constexpr, SLOTS: tl.constexpr,
           WEIGHTED: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr):  # fmt: skip
    """a = sum_j w_tj o[row_tj] on a [BN tokens, BV] tile of one head (o offset to the head), float32."""
    a = tl.zeros([BN, BV], dtype=tl.float32)
    for j in tl.static_range(J):
        row = tl.load(slots + toks * J + j, mask=m_n, other=0) if SLOTS else toks.to(tl.int64) * J + j
        oj = tl.load(o + row[:, None] * HV + cols[None, :], mask=m, other=0.0).to(tl.float32)
        if WEIGHTED:
            oj *= tl.load(w + toks * J + j, mask=m_n, other=0.0).to(tl.float32)[:, None]
        a += oj
    return a


@triton.jit
def _mix_norm_fwd_kernel(
    o, slots, w, gate, nw, y, rstd, N, eps,
    H: tl.constexpr, V: tl.constexpr, J: tl.constexpr, SLOTS: tl.constexpr, WEIGHTED: tl.constexpr,
    BN: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    i_h = tl.program_id(1)
    toks = tl.program_id(0) * BN + tl.arange(0, BN)
    cols = tl.arange(0, BV)
    m_n, m_v = toks < N, cols < V
    m = m_n[:, None] & m_v[None, :]
    a = _mixed(o + i_h * V, slots, w, toks, m_n, cols, m, H * V, J, SLOTS, WEIGHTED, BN, BV)
    r = tl.rsqrt(tl.sum(a * a, 1) / V + eps)
    p = toks.to(tl.int64)[:, None] * (H * V) + i_h * V + cols[None, :]
    g = tl.load(gate + p, mask=m, other=0.0).to(tl.float32)
    scale = tl.load(nw + cols, mask=m_v, other=0.0).to(tl.float32)
    out = a * r[:, None] * scale[None, :] * g * tl.sigmoid(g)
    tl.store(y + p, out.to(y.dtype.element_ty), mask=m)
    tl.store(rstd + toks * H + i_h, r, mask=m_n)


@triton.jit
def _mix_norm_bwd_kernel(
    o, slots, w, gate, nw, rstd, dy, do, dw_part, dgate, dnw_part, N,
    H: tl.constexpr, V: tl.constexpr, J: tl.constexpr, SLOTS: tl.constexpr, WEIGHTED: tl.constexpr,
    BN: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    """With n = a r and s = sigmoid(gate): dn = dy weight silu(gate), da = r (dn - n mean(dn n));
    d o[row_tj] = w_tj da (each packed row is one token's), dw_tj = <da, o[row_tj]> (this head's part),
    dgate = dy n weight s (1 + gate (1 - s)), dweight = sum over tokens of dy n silu(gate) (this block's part)."""
    i_n, i_h = tl.program_id(0), tl.program_id(1)
    toks = i_n * BN + tl.arange(0, BN)
    cols = tl.arange(0, BV)
    m_n, m_v = toks < N, cols < V
    m = m_n[:, None] & m_v[None, :]
    a = _mixed(o + i_h * V, slots, w, toks, m_n, cols, m, H * V, J, SLOTS, WEIGHTED, BN, BV)
    r = tl.load(rstd + toks * H + i_h, mask=m_n, other=0.0)
    n = a * r[:, None]
    p = toks.to(tl.int64)[:, None] * (H * V) + i_h * V + cols[None, :]
    g = tl.load(gate + p, mask=m, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    scale = tl.load(nw + cols, mask=m_v, other=0.0).to(tl.float32)[None, :]
    d = tl.load(dy + p, mask=m, other=0.0).to(tl.float32)
    tl.store(dgate + p, (d * n * scale * s * (1 + g * (1 - s))).to(dgate.dtype.element_ty), mask=m)
    tl.store(dnw_part + (i_n * H + i_h) * V + cols, tl.sum(d * n * g * s, 0), mask=m_v)
    dn = d * scale * g * s
    da = r[:, None] * (dn - n * (tl.sum(dn * n, 1) / V)[:, None])
    for j in tl.static_range(J):
        row = tl.load(slots + toks * J + j, mask=m_n, other=0) if SLOTS else toks.to(tl.int64) * J + j
        q = row[:, None] * (H * V) + i_h * V + cols[None, :]
        if WEIGHTED:
            oj = tl.load(o + q, mask=m, other=0.0).to(tl.float32)
            tl.store(dw_part + (toks * J + j) * H + i_h, tl.sum(da * oj, 1), mask=m_n)
            dj = da * tl.load(w + toks * J + j, mask=m_n, other=0.0).to(tl.float32)[:, None]
        else:
            dj = da
        tl.store(do + q, dj.to(do.dtype.element_ty), mask=m)


class _MixGatedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o, gate, norm_weight, weight, slots, J, eps, out_dtype):
        N, H, V = gate.shape
        o, gate = o.contiguous(), gate.contiguous()
        weight = None if weight is None else weight.contiguous()
        BN, BV = _tile(V)
        y = empty(N, H, V, device=o.device, dtype=out_dtype)
        rstd = empty(N, H, device=o.device, dtype=torch.float32)
        if N:
            _mix_norm_fwd_kernel[(triton.cdiv(N, BN), H)](
                o, slots, weight, gate, norm_weight, y, rstd, N, eps,
                H=H, V=V, J=J, SLOTS=slots is not None, WEIGHTED=weight is not None, BN=BN, BV=BV,
            )  # fmt: skip
        ctx.save_for_backward(o, gate, norm_weight, weight, slots, rstd)
        ctx.J = J
        return y

    @staticmethod
    def backward(ctx, dy):
        o, gate, norm_weight, weight, slots, rstd = ctx.saved_tensors
        N, H, V = gate.shape
        J = ctx.J
        BN, BV = _tile(V)
        grid = (triton.cdiv(N, BN), H)
        do = empty(*o.shape, device=o.device, dtype=o.dtype)
        dgate = empty(N, H, V, device=o.device, dtype=gate.dtype)
        dw_part = None if weight is None else empty(N, J, H, device=o.device, dtype=torch.float32)
        dnw_part = empty(grid[0], H, V, device=o.device, dtype=torch.float32)
        if N:
            _mix_norm_bwd_kernel[grid](
                o, slots, weight, gate, norm_weight, rstd, dy.contiguous(), do, dw_part, dgate, dnw_part, N,
                H=H, V=V, J=J, SLOTS=slots is not None, WEIGHTED=weight is not None, BN=BN, BV=BV,
                num_warps=8,  # it holds several float32 tiles: with 4 warps it spills on sm_90
            )  # fmt: skip
        dweight = None if weight is None else dw_part.sum(-1).to(weight.dtype)
        return do, dgate, dnw_part.sum((0, 1)).to(norm_weight.dtype), dweight, None, None, None, None


def mix_gated_rmsnorm(
    o: torch.Tensor,
    gate: torch.Tensor,
    norm_weight: torch.Tensor,
    weight: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
    eps: float = 1e-5,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """A token's J memory outputs mixed with their weights, then the gated per-head RMSNorm.

    o: the outputs as rows [R, H, V], either token-major (row t * J + j: token t's j-th output, R = N * J) or,
    with `slots` [N, J] (int64), token t's j-th output is row slots[t, j], every row exactly one token's output
    (a permutation: the routed MoM's packed rows);
    gate [N, H, V]; norm_weight [V]; weight [N, J] (None: each output counts 1). -> [N, H, V] in out_dtype
    (default gate's). Under vmap over runs (token-major rows only), one launch for all of them with the runs folded
    into the tokens and a unit norm weight, each run's norm weight applied after (the output is linear in it)."""
    check_triton_inputs(o)
    if batched(o, gate, norm_weight, weight):
        if slots is not None:
            raise ValueError("slots (packed rows) cannot be used under vmap over runs")
        unit = torch.ones(gate.shape[-1], device=gate.device, dtype=norm_weight.dtype)
        (y,) = fold_runs(lambda o, gate, weight: (mix_gated_rmsnorm(o, gate, unit, weight, None, eps, out_dtype),),
                         o, gate, weight)
        return y * norm_weight.to(y.dtype)
    N, H, V = gate.shape
    if o.dim() != 3 or o.shape[1:] != (H, V):
        raise ValueError(f"o must have shape [R, H, V] with [H, V] = {[H, V]}, got {list(o.shape)}")
    if slots is None and o.shape[0] % max(N, 1):
        raise ValueError(f"without slots, o's rows ({o.shape[0]}) must be a multiple of the tokens N = {N}")
    if slots is not None and (slots.dim() != 2 or slots.shape[0] != N or slots.dtype != torch.int64):
        raise ValueError(f"slots must be an int64 tensor [N, J] with N = {N}, got {slots.dtype} {list(slots.shape)}")
    J = slots.shape[1] if slots is not None else (o.shape[0] // N if N else 1)
    if slots is not None and o.shape[0] != N * J:  # every row gets its gradient from the token it belongs to
        raise ValueError(f"with slots [N, J] = {[N, J]}, o must have N * J = {N * J} rows, got {o.shape[0]}")
    if weight is not None and list(weight.shape) != [N, J]:
        raise ValueError(f"weight must have shape [N, J] = {[N, J]}, got {list(weight.shape)}")
    return _MixGatedRMSNorm.apply(o, gate, norm_weight, weight, slots, J, eps, out_dtype or gate.dtype)
