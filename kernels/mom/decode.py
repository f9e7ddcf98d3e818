"""One decoding step of a MoM layer: only the selected memories' states are read and written, in place.

For sequence b and selection j (memory m = sel[b, j]), per head: S = state[b, m] is updated with the token's
k, v (and g, beta) by the rule's recurrence and read with its q, o = scale S^T q; the other memories' states
are not touched. Cost: J (= k + shared) states per sequence, whatever the number of memories and the length.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import empty
from kernels.fused_recurrent import blocks
from kernels.rules import get_rule


@triton.jit
def _decode_kernel(
    S, sel, q, k, v, g, beta, o, scale, n, J,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    GATE: tl.constexpr, DELTA: tl.constexpr,
):  # fmt: skip
    i_v, i_jh = tl.program_id(0), tl.program_id(1)
    i_bj, i_h = i_jh // H, i_jh % H
    m = tl.load(sel + i_bj)
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mk, mv = offs_k < K, offs_v < V
    m_state = mk[:, None] & mv[None, :]
    p_state = (((i_bj // J) * n + m) * H + i_h).to(tl.int64) * K * V + offs_k[:, None] * V + offs_v[None, :]
    row = i_bj * H + i_h
    h = tl.load(S + p_state, mask=m_state, other=0.0)
    q_t = tl.load(q + row * K + offs_k, mask=mk, other=0.0).to(tl.float32)
    k_t = tl.load(k + row * K + offs_k, mask=mk, other=0.0).to(tl.float32)
    v_t = tl.load(v + row * V + offs_v, mask=mv, other=0.0).to(tl.float32)
    if GATE == 1:
        h *= tl.exp(tl.load(g + row * K + offs_k, mask=mk, other=0.0).to(tl.float32))[:, None]
    if GATE == 2:
        h *= tl.exp(tl.load(g + row).to(tl.float32))
    if DELTA:
        v_t = (v_t - tl.sum(h * k_t[:, None], 0)) * tl.load(beta + row).to(tl.float32)
    h += k_t[:, None] * v_t[None, :]
    tl.store(S + p_state, h, mask=m_state)
    tl.store(o + row * V + offs_v, tl.sum(h * q_t[:, None], 0) * scale, mask=mv)


def decode_step(rule, state, sel, q, k, v, g=None, beta=None, scale=None):
    """state [B, n, H, K, V] float32 (updated in place), sel [B, J] the memories to update (distinct per row),
    q, k [B, J, H, K], v [B, J, H, V], g [B, J, H] or [B, J, H, K], beta [B, J, H] -> o [B, J, H, V] float32."""
    gate, delta = get_rule(rule).gate_code, get_rule(rule).delta
    B, n, H, K, V = state.shape
    J = sel.shape[1]
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"the decode kernel updates a contiguous float32 state in place, got {state.dtype}")
    q, k, v, sel = q.contiguous(), k.contiguous(), v.contiguous(), sel.contiguous()
    g = None if g is None else g.contiguous()
    beta = None if beta is None else beta.contiguous()
    BK, BV = blocks(K, V)
    o = empty(B, J, H, V, device=q.device, dtype=torch.float32)
    _decode_kernel[(triton.cdiv(V, BV), B * J * H)](
        state, sel, q, k, v, g, beta, o, K**-0.5 if scale is None else scale, n, J,
        H=H, K=K, V=V, BK=BK, BV=BV, GATE=gate, DELTA=delta,
    )  # fmt: skip
    return o
