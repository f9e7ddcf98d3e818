"""Fused recurrent Triton kernels for every rule: the state lives in registers, one token per step.

One kernel family, parameterised by the rule (GATE: 0 none, 1 per channel, 2 per head; DELTA: the delta
rule; both from `kernels.rules`). A program owns one (sequence, head) and a block of BV value columns with
all K rows of the state.

Forward, per token:  S' = a_t S;  delta: u_t = beta_t (v_t - S'^T k_t), else u_t = v_t;  S = S' + k_t u_t^T;
                     o_t = scale S^T q_t.
Backward, in two sweeps (the state's gradient dS runs backwards in time, the state itself forwards):
  1. reverse:  dS += scale q do^T;  dv, the S-free part of dk (dS u), dbeta;  dr = -beta dS^T k (stored);
               dS = a_t (dS + k dr^T).  Ends with the initial state's gradient.
  2. forward:  recompute S; dk += S' dr;  dq = scale S do;  for a per-head gate the partial sums of do . o.
The decays' gradients need no state at all: with P_t = <dS_t, S_t>, dg_t = dg_{t+1} + (local term), so dg
is a reverse cumulative sum (see `_decay_grad`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import check_inputs, check_triton_inputs, empty
from kernels._decay_grad import decay_grad
from kernels.rules import get_rule


@triton.jit
def _bounds(cu, i_n, T, VARLEN: tl.constexpr):
    if VARLEN:
        bos = tl.load(cu + i_n).to(tl.int64)
        eos = tl.load(cu + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    return bos, eos


@triton.jit
def _fwd_kernel(
    q, k, v, g, beta, o, h0, ht, vnew, cu, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    GATE: tl.constexpr, DELTA: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
    STORE_VNEW: tl.constexpr, VARLEN: tl.constexpr,
):  # fmt: skip
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = _bounds(cu, i_n, T, VARLEN)
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mk, mv = offs_k < K, offs_v < V
    m_state = mk[:, None] & mv[None, :]
    p_state = i_nh.to(tl.int64) * K * V + offs_k[:, None] * V + offs_v[None, :]

    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        S += tl.load(h0 + p_state, mask=m_state, other=0.0).to(tl.float32)
    for t in range(bos, eos):
        row = t * H + i_h
        q_t = tl.load(q + row * K + offs_k, mask=mk, other=0.0).to(tl.float32)
        k_t = tl.load(k + row * K + offs_k, mask=mk, other=0.0).to(tl.float32)
        v_t = tl.load(v + row * V + offs_v, mask=mv, other=0.0).to(tl.float32)
        if GATE == 1:
            S *= tl.exp(tl.load(g + row * K + offs_k, mask=mk, other=0.0).to(tl.float32))[:, None]
        if GATE == 2:
            S *= tl.exp(tl.load(g + row).to(tl.float32))
        if DELTA:
            v_t = v_t - tl.sum(S * k_t[:, None], 0)
            if STORE_VNEW:
                tl.store(vnew + row * V + offs_v, v_t, mask=mv)
            v_t *= tl.load(beta + row).to(tl.float32)
        S += k_t[:, None] * v_t[None, :]
        o_t = tl.sum(S * q_t[:, None], 0) * scale
        tl.store(o + row * V + offs_v, o_t.to(o.dtype.element_ty), mask=mv)
    if STORE_HT:
        tl.store(ht + p_state, S, mask=m_state)


@triton.jit
def _bwd_reverse_kernel(
    q, k, v, g, beta, do, dht, vnew, dk_part, dv, dbeta_part, dr, dh0, cu, scale, T, ROWS,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    GATE: tl.constexpr, DELTA: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
    VARLEN: tl.constexpr,
):  # fmt: skip
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = _bounds(cu, i_n, T, VARLEN)
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mk, mv = offs_k < K, offs_v < V
    m_state = mk[:, None] & mv[None, :]
    p_state = i_nh.to(tl.int64) * K * V + offs_k[:, None] * V + offs_v[None, :]
    part = i_v.to(tl.int64) * ROWS  # this V block's slice of the partial sums over V

    dS = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        dS += tl.load(dht + p_state, mask=m_state, other=0.0).to(tl.float32)
    for i in range(eos - bos):
        t = eos - 1 - i
        row = t * H + i_h
        q_t = tl.load(q + row * K + offs_k, mask=mk, other=0.0).to(tl.float32)
        k_t = tl.load(k + row * K + offs_k, mask=mk, other=0.0).to(tl.float32)
        do_t = tl.load(do + row * V + offs_v, mask=mv, other=0.0).to(tl.float32)
        dS += (scale * q_t)[:, None] * do_t[None, :]
        du = tl.sum(dS * k_t[:, None], 0)
        if DELTA:
            b_t = tl.load(beta + row).to(tl.float32)
            vn = tl.load(vnew + row * V + offs_v, mask=mv, other=0.0)
            dk_t = tl.sum(dS * (b_t * vn)[None, :], 1)
            tl.store(dbeta_part + part + row, tl.sum(du * vn, 0))
            dr_t = -b_t * du
            tl.store(dr + row * V + offs_v, dr_t, mask=mv)
            tl.store(dv + row * V + offs_v, b_t * du, mask=mv)
            dS += k_t[:, None] * dr_t[None, :]
        else:
            v_t = tl.load(v + row * V + offs_v, mask=mv, other=0.0).to(tl.float32)
            dk_t = tl.sum(dS * v_t[None, :], 1)
            tl.store(dv + row * V + offs_v, du, mask=mv)
        tl.store(dk_part + part * K + row * K + offs_k, dk_t, mask=mk)
        if GATE == 1:
            dS *= tl.exp(tl.load(g + row * K + offs_k, mask=mk, other=0.0).to(tl.float32))[:, None]
        if GATE == 2:
            dS *= tl.exp(tl.load(g + row).to(tl.float32))
    if STORE_DH0:
        tl.store(dh0 + p_state, dS, mask=m_state)


@triton.jit
def _bwd_forward_kernel(
    q, k, v, g, beta, do, h0, vnew, dr, dq_part, dk_part, do_o_part, cu, scale, T, ROWS,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    GATE: tl.constexpr, DELTA: tl.constexpr, HAS_H0: tl.constexpr, VARLEN: tl.constexpr,
):  # fmt: skip
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = _bounds(cu, i_n, T, VARLEN)
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mk, mv = offs_k < K, offs_v < V
    m_state = mk[:, None] & mv[None, :]
    p_state = i_nh.to(tl.int64) * K * V + offs_k[:, None] * V + offs_v[None, :]
    part = i_v.to(tl.int64) * ROWS

    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        S += tl.load(h0 + p_state, mask=m_state, other=0.0).to(tl.float32)
    for t in range(bos, eos):
        row = t * H + i_h
        q_t = tl.load(q + row * K + offs_k, mask=mk, other=0.0).to(tl.float32)
        k_t = tl.load(k + row * K + offs_k, mask=mk, other=0.0).to(tl.float32)
        do_t = tl.load(do + row * V + offs_v, mask=mv, other=0.0).to(tl.float32)
        if GATE == 1:
            S *= tl.exp(tl.load(g + row * K + offs_k, mask=mk, other=0.0).to(tl.float32))[:, None]
        if GATE == 2:
            S *= tl.exp(tl.load(g + row).to(tl.float32))
        if DELTA:
            # the part of dk that needs the decayed state S' before this token's write
            dr_t = tl.load(dr + row * V + offs_v, mask=mv, other=0.0)
            p_dk = dk_part + part * K + row * K + offs_k
            tl.store(p_dk, tl.load(p_dk, mask=mk, other=0.0) + tl.sum(S * dr_t[None, :], 1), mask=mk)
            u_t = tl.load(vnew + row * V + offs_v, mask=mv, other=0.0) * tl.load(beta + row).to(tl.float32)
        else:
            u_t = tl.load(v + row * V + offs_v, mask=mv, other=0.0).to(tl.float32)
        S += k_t[:, None] * u_t[None, :]
        tl.store(dq_part + part * K + row * K + offs_k, scale * tl.sum(S * do_t[None, :], 1), mask=mk)
        if GATE == 2:
            tl.store(do_o_part + part + row, scale * tl.sum(tl.sum(S * q_t[:, None], 0) * do_t, 0))


def blocks(K: int, V: int) -> tuple[int, int]:
    """(BK, BV) of a program holding all K rows of the state and BV of its columns (also `kernels.mom.decode`)."""
    BK = max(16, triton.next_power_of_2(K))
    BV = min(max(16, triton.next_power_of_2(V)), max(16, 4096 // BK))
    return BK, BV


def _flat(x):
    return None if x is None else x.contiguous()


class FusedRecurrentFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rule, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
        gate, delta = get_rule(rule).gate_code, get_rule(rule).delta
        q, k, v, g, beta, initial_state = map(_flat, (q, k, v, g, beta, initial_state))
        B, T, H, K = q.shape
        V = v.shape[-1]
        N = B if cu_seqlens is None else cu_seqlens.numel() - 1
        BK, BV = blocks(K, V)
        o = empty(*v.shape, device=v.device, dtype=v.dtype)
        ht = empty(N, H, K, V, device=q.device, dtype=torch.float32) if output_final_state else None
        # the residuals v - S'^T k are kept for the backward pass of the delta rules
        store_vnew = delta and any(ctx.needs_input_grad)
        vnew = empty(B, T, H, V, device=v.device, dtype=torch.float32) if store_vnew else None
        grid = (triton.cdiv(V, BV), N * H)
        _fwd_kernel[grid](
            q, k, v, g, beta, o, initial_state, ht, vnew, cu_seqlens, scale, T,
            H=H, K=K, V=V, BK=BK, BV=BV, GATE=gate, DELTA=delta, HAS_H0=initial_state is not None,
            STORE_HT=output_final_state, STORE_VNEW=store_vnew, VARLEN=cu_seqlens is not None,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, g, beta, initial_state, cu_seqlens, vnew, ht)
        ctx.meta = (gate, delta, scale, BK, BV, N)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, h0, cu_seqlens, vnew, ht = ctx.saved_tensors
        gate, delta, scale, BK, BV, N = ctx.meta
        B, T, H, K = q.shape
        V = v.shape[-1]
        NV = triton.cdiv(V, BV)
        rows = B * T * H
        # the kernels read do and dht as contiguous; a loss such as ht.sum() hands in an expanded (stride 0) dht
        do, dht = do.contiguous(), _flat(dht)
        varlen = cu_seqlens is not None
        f32 = {"device": q.device, "dtype": torch.float32}
        dk_part = empty(NV, B, T, H, K, **f32)
        dq_part = empty(NV, B, T, H, K, **f32)
        dv = empty(B, T, H, V, **f32)
        dbeta_part = empty(NV, B, T, H, **f32) if delta else None
        dr = empty(B, T, H, V, **f32) if delta else None
        do_o_part = empty(NV, B, T, H, **f32) if gate == 2 else None
        dh0 = empty(N, H, K, V, **f32) if h0 is not None else None
        grid = (NV, N * H)
        common = {"H": H, "K": K, "V": V, "BK": BK, "BV": BV, "GATE": gate, "DELTA": delta, "VARLEN": varlen}
        _bwd_reverse_kernel[grid](
            q, k, v, g, beta, do, dht, vnew, dk_part, dv, dbeta_part, dr, dh0, cu_seqlens, scale, T, rows,
            HAS_DHT=dht is not None, STORE_DH0=h0 is not None, **common,
        )  # fmt: skip
        _bwd_forward_kernel[grid](
            q, k, v, g, beta, do, h0, vnew, dr, dq_part, dk_part, do_o_part, cu_seqlens, scale, T, rows,
            HAS_H0=h0 is not None, **common,
        )  # fmt: skip
        dq, dk = dq_part.sum(0), dk_part.sum(0)
        dg = None
        if gate == 1:
            dg = decay_grad(q * dq - k * dk, dht, ht, cu_seqlens)
        elif gate == 2:
            dg = decay_grad(do_o_part.sum(0) - (dv * v).sum(-1), dht, ht, cu_seqlens)
        dbeta = dbeta_part.sum(0).to(beta.dtype) if delta else None
        return (
            None, dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None if g is None else dg.to(g.dtype), dbeta,
            None, None if h0 is None else dh0.to(h0.dtype), None, None,
        )  # fmt: skip


def fused_recurrent_op(
    rule, q, k, v, *, g=None, beta=None, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None
):
    """The op of `rule` (its name; the rest is `kernels`' op signature) through the fused recurrent kernels."""
    d = check_inputs(rule, q, k, v, g, beta, scale, initial_state, cu_seqlens)
    check_triton_inputs(q)
    return FusedRecurrentFunction.apply(rule, q, k, v, g, beta, d.scale, initial_state, output_final_state, cu_seqlens)
