"""The chunked ops as an autograd function: the forward stage's kernels in order, the buffers they pass on, and the
backward stage's kernels in order, then the decays' gradient from their per-token terms.
"""

from __future__ import annotations

import torch
import triton

from kernels._common import check_inputs, check_triton_inputs, empty
from kernels._decay_grad import decay_grad
from kernels.chunk.backward import dprep_kernel, dqk_kernel, dstate_kernel, gla_dintra_kernel
from kernels.chunk.common import CHUNK, SUB
from kernels.chunk.forward import (
    gla_intra_blocks_kernel,
    gla_intra_diag_kernel,
    local_kernel,
    output_kernel,
    state_kernel,
)
from kernels.chunk.launch import chunk_table, kernel_options, tiles
from kernels.rules import get_rule
from kernels.runs import batched, fold_runs


class ChunkFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rule, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, bf16_products):
        gate, delta = get_rule(rule).gate_code, get_rule(rule).delta
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        g = None if g is None else g.contiguous()
        beta = None if beta is None else beta.contiguous()
        initial_state = None if initial_state is None else initial_state.contiguous()
        B, T, H, K = q.shape
        V = v.shape[-1]
        dev = q.device
        cu = cu_seqlens if cu_seqlens is not None else torch.arange(B + 1, device=dev, dtype=torch.int32) * T
        N = cu.numel() - 1
        C = CHUNK
        table, chunk_offsets, NC = chunk_table(cu, B * T, C)
        t = tiles(K, V, delta, q.dtype, bf16_products)
        f32 = {"device": dev, "dtype": torch.float32}
        rows = B * T * H

        bcum = None if gate == 0 else empty(*(g.shape), **f32)
        Aqk = empty(B, T, H, C, **f32)
        Tm = empty(B, T, H, C, **f32) if delta else None
        W = empty(B, T, H, K, **f32) if delta else None
        Up = empty(B, T, H, V, **f32) if delta else None
        U = empty(B, T, H, V, **f32) if delta else None
        # the chunk states, kept for the output and the backward: in bf16 for bf16 inputs of the ungated rules, so
        # that their consumers take one bf16 product (the recurrence itself runs in float32 registers). With decays
        # they stay in float32: the decays' gradient sums products with h over whole sequences, and bf16 h put it
        # at 6e-2 of the float64 reference in the routed MoM test (dH, W and U likewise stay in float32). With
        # bf16 products (backend triton_bf16) every consumer rounds h and dH to bf16 anyway: both are kept in bf16
        h_bf16 = bf16_products or (q.dtype == torch.bfloat16 and gate == 0)
        h = empty(NC, H, K, V, device=dev, dtype=torch.bfloat16 if h_bf16 else torch.float32)
        ht = empty(N, H, K, V, **f32) if output_final_state else None
        o = empty(B, T, H, V, device=dev, dtype=v.dtype)
        common = {"H": H, "K": K, "C": C, "DOT": t.dot}
        if rows > 0:
            local_kernel[(NC, H)](
                q, k, v, g, beta, bcum, Aqk, Tm, W, Up, table, scale,
                V=V, BK=t.BKS, BV=t.BV, GATE=gate, DELTA=delta, **(common | kernel_options("local", t)),
            )  # fmt: skip
            if gate == 1:
                grid = (NC * (C // SUB), H)
                gla_intra_blocks_kernel[grid](
                    q, k, bcum, Aqk, table, S=SUB, BK=t.BKS, **(common | kernel_options("gla_intra_blocks", t))
                )
                gla_intra_diag_kernel[grid](
                    q, k, bcum, Aqk, table, H=H, K=K, C=C, S=SUB, BK=t.BK, **kernel_options("gla_intra_diag", t)
                )
        state_kernel[(triton.cdiv(V, t.BV), N * H, triton.cdiv(K, t.state_rows))](
            k, v, bcum, W, Up, U, h, initial_state, ht, cu, chunk_offsets,
            V=V, KP=t.BKS, NP=t.NP, BV=t.BV, GATE=gate, DELTA=delta, HAS_H0=initial_state is not None,
            STORE_HT=output_final_state, **(common | kernel_options("state", t)),
        )  # fmt: skip
        if rows > 0:
            output_kernel[(triton.cdiv(V, t.BV), NC, H)](
                q, v, bcum, Aqk, U, h, o, table, scale, V=V, BK=t.BKS, BV=t.BV, GATE=gate, DELTA=delta,
                **(common | kernel_options("output", t)),
            )  # fmt: skip
        ctx.save_for_backward(q, k, v, beta, initial_state, cu, table, chunk_offsets, bcum, Aqk, Tm, W, U, h, ht)
        ctx.meta = (gate, delta, scale, NC, cu_seqlens is not None, None if g is None else g.dtype, bf16_products)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, beta, h0, cu, table, chunk_offsets, bcum, Aqk, Tm, W, U, h, ht = ctx.saved_tensors
        gate, delta, scale, NC, varlen, g_dtype, bf16_products = ctx.meta
        B, T, H, K = q.shape
        V = v.shape[-1]
        N = cu.numel() - 1
        C = CHUNK
        t = tiles(K, V, delta, q.dtype, bf16_products)
        f32 = {"device": q.device, "dtype": torch.float32}
        rows = B * T * H
        # the kernels read do and dht as contiguous; a loss such as ht.sum() hands in an expanded (stride 0) dht
        do = do.contiguous()
        dht = None if dht is None else dht.contiguous()
        common = {"H": H, "K": K, "C": C, "DOT": t.dot}

        dH = empty(NC, H, K, V, device=q.device, dtype=torch.bfloat16 if bf16_products else torch.float32)
        # dU is dv itself for the rules without the delta rule: stored in v's dtype, as dv for the delta rules
        dU = empty(B, T, H, V, **f32) if delta else empty(B, T, H, V, device=q.device, dtype=v.dtype)
        dh0 = empty(N, H, K, V, **f32) if h0 is not None else None
        dstate_kernel[(triton.cdiv(V, t.BV), N * H, triton.cdiv(K, t.state_rows))](
            q, k, bcum, Aqk, W, do, dU, dH, dht, dh0, cu, chunk_offsets, scale,
            V=V, KP=t.BKS, NP=t.NP, BV=t.BV, GATE=gate, DELTA=delta, HAS_DHT=dht is not None, STORE_DH0=h0 is not None,
            **(common | kernel_options("dstate", t)),
        )  # fmt: skip
        dv = empty(B, T, H, V, device=q.device, dtype=v.dtype) if delta else dU
        D = empty(B, T, H, C, **f32)
        Pp = empty(B, T, H, C, **f32) if delta else None
        dbeta_v = empty(B, T, H, **f32) if delta else None
        dgl = None  # the decays' per-token terms: per channel (written by `dqk_kernel`) or per head (by `dprep_kernel`)
        if gate:
            dgl = empty(B, T, H, K, **f32) if gate == 1 else empty(B, T, H, **f32)
        NK = triton.cdiv(K, t.BKS)
        dq = empty(B, T, H, K, device=q.device, dtype=q.dtype)
        dk = empty(B, T, H, K, device=q.device, dtype=k.dtype)
        dbeta_k = empty(NK, B, T, H, **f32) if delta else None
        dq_intra = dk_intra = None
        if rows > 0:
            dprep_kernel[(NC, H)](
                q, k, v, beta, bcum, Aqk, Tm, U, h, dH, do, dU, dv, D, Pp, dbeta_v, dgl, table, scale,
                V=V, BK=t.BKS, BV=t.BV, GATE=gate, DELTA=delta, **(common | kernel_options("dprep", t)),
            )  # fmt: skip
            if gate == 1:
                dq_intra, dk_intra = empty(B, T, H, K, **f32), empty(B, T, H, K, **f32)
                gla_dintra_kernel[(NK, NC * (C // SUB), H)](
                    q, k, bcum, D, dq_intra, dk_intra, table, S=SUB, BK=t.BKS,
                    **(common | kernel_options("gla_dintra", t)),
                )  # fmt: skip
            dqk_kernel[(NK, NC, H)](
                q, k, v, beta, bcum, Tm, U, h, dH, do, dU, D, Pp, dq_intra, dk_intra, dq, dk, dbeta_k, dgl,
                table, scale, rows, V=V, BK=t.BKS, BV=t.BV, GATE=gate, DELTA=delta,
                **(common | kernel_options("dqk", t)),
            )  # fmt: skip
        # the float32 work buffers go before the decays' gradient and dbeta allocate: the layer's peak memory
        del dH, dU, D, Pp, dq_intra, dk_intra
        dg = None if gate == 0 else decay_grad(dgl, dht, ht, cu if varlen else None, g_dtype)
        dbeta = (dbeta_v + dbeta_k.sum(0)).to(beta.dtype) if delta else None
        return (
            None, dq, dk, dv, dg, dbeta,
            None, None if h0 is None else dh0.to(h0.dtype), None, None, None,
        )  # fmt: skip


def chunk_op(
    rule, q, k, v, *, g=None, beta=None, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
    bf16_products=False,
):
    """The op of `rule` (its name; the rest is `kernels`' op signature) through the chunked kernels; under vmap over
    runs (stacked runs), one launch for all of them (`kernels.runs`). `bf16_products` (backend triton_bf16): every
    product on operands rounded to bf16, the chunk states and their gradient kept in bf16, as fla computes."""
    d = check_inputs(rule, q, k, v, g, beta, scale, initial_state, cu_seqlens)
    check_triton_inputs(q)

    def op(q, k, v, g, beta, initial_state):
        return ChunkFunction.apply(
            rule, q, k, v, g, beta, d.scale, initial_state, output_final_state, cu_seqlens, bf16_products
        )

    if cu_seqlens is not None and batched(q):
        raise ValueError("cu_seqlens (packed sequences) cannot be used under vmap over runs")
    return fold_runs(op, q, k, v, g, beta, initial_state)
