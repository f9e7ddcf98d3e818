"""The backward stage: chunk after chunk backwards, the state gradient after each chunk dH and for the delta rules
dU (`dstate_kernel`); then per chunk in parallel, dv, D and for the delta rules P' and dbeta's value part
(`dprep_kernel`), GLA's intra-chunk dq and dk (`gla_dintra_kernel`), and dq, dk and dbeta's key part
(`dqk_kernel`). The decays' gradient is summed from the per-token terms these leave (`kernels._decay_grad`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.chunk.common import (
    decay_rows,
    dot,
    piece_rows,
    pieces_load,
    pieces_store,
    rows_times_pieces,
    rows_times_state,
    sub_chunk,
)


@triton.jit
def dstate_kernel(
    q, k, bcum, Aqk, W, do, dU, dH, dht, dh0, cu, chunk_offsets, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, KP: tl.constexpr, NP: tl.constexpr,
    BV: tl.constexpr, GATE: tl.constexpr, DELTA: tl.constexpr, HAS_DHT: tl.constexpr,
    STORE_DH0: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """Backwards over the chunks: dH <- exp(b_C) dH + scale (exp(b) Q)^T dO, held as in `state_kernel` (NP pieces of
    KP rows and BV columns per program); for the delta rules (all K rows) also dU = scale Aqk^T dO + K_dec dH
    and dH -= W^T dU. The other rules' dU, which the recursion does not need, is left to `dprep_kernel`."""
    i_v, i_nh, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    nc = (tl.load(chunk_offsets + i_n + 1) - c0).to(tl.int32)
    offs_c = tl.arange(0, C)
    offs_v = i_v * BV + tl.arange(0, BV)
    mv = offs_v < V
    k0 = i_k * NP * KP

    dS = pieces_load(dht, i_nh, k0, i_v, K, V, KP, BV, NP, HAS_DHT)
    for i in range(nc):
        ic = nc - 1 - i
        start = bos + ic * C
        n = tl.minimum(eos - start, C).to(tl.int32)
        m_c = offs_c < n
        rows = start + offs_c
        pieces_store(dH + ((c0 + ic) * H + i_h) * K * V, k0, i_v, dS, K, V, KP, BV, NP)
        p_v = (rows[:, None] * H + i_h) * V + offs_v[None, :]
        m_cv = m_c[:, None] & mv[None, :]
        do_c = tl.load(do + p_v, mask=m_cv, other=0.0)
        if GATE == 2:
            b, b_last = decay_rows(bcum, start, n, i_h, offs_c, H)
        if DELTA:
            AT = tl.load(Aqk + (rows[None, :] * H + i_h) * C + offs_c[:, None], mask=m_c[None, :], other=0.0)
            kdS = rows_times_pieces(k, rows, m_c, i_h, k0, dS, H, K, KP, NP, DOT)
            if GATE == 2:
                kdS = kdS * tl.exp(b_last - b)[:, None]
            du = scale * dot(AT, do_c, DOT) + kdS
            tl.store(dU + p_v, du, mask=m_cv)
        if GATE == 2:  # exp(b) on Q's columns goes on dO's rows
            do_c = do_c * tl.exp(b)[:, None]
        new = ()
        for j in tl.static_range(NP):
            offs_k, mk, pT, m_kc = piece_rows(rows, m_c, i_h, k0, j, H, K, KP)
            qT = tl.load(q + pT, mask=m_kc, other=0.0)
            if GATE == 2:
                piece = dS[j] * tl.exp(b_last)
            elif GATE == 1:
                b_last = tl.load(bcum + ((start + n - 1) * H + i_h) * K + offs_k, mask=mk, other=0.0)
                qT = qT * tl.exp(tl.load(bcum + pT, mask=m_kc, other=0.0))
                piece = dS[j] * tl.exp(b_last)[:, None]
            else:
                piece = dS[j]
            piece += scale * dot(qT, do_c, DOT)
            if DELTA:
                piece -= dot(tl.load(W + pT, mask=m_kc, other=0.0), du, DOT)
            new = new + (piece,)
        dS = new
    if STORE_DH0:
        pieces_store(dh0 + i_nh.to(tl.int64) * K * V, k0, i_v, dS, K, V, KP, BV, NP)


@triton.jit
def dprep_kernel(
    q, k, v, beta, bcum, Aqk, Tm, U, h, dH, do, dU, dv, D, Pp, dbeta_v, dgl, table, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, GATE: tl.constexpr, DELTA: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """Per chunk, over all value columns: D = scale causal(dO U^T * G); for the delta rules dX_v = Tm^T dU,
    dv = beta dX_v, dbeta's value part, P' = strict(-dX_v U^T) * G; for the other rules dv = dU = scale Aqk^T dO
    + K_dec dH (K_dec: K decayed to the chunk's end); for per-head gates the do.o - dv.v terms."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    start = tl.load(table + 2 * i_c).to(tl.int64)
    n = (tl.load(table + 2 * i_c + 1) - start).to(tl.int32)
    offs_c = tl.arange(0, C)
    m_c = offs_c < n
    rows = start + offs_c
    causal = offs_c[:, None] >= offs_c[None, :]
    p_cc = (rows[:, None] * H + i_h) * C + offs_c[None, :]
    p_h = (i_c.to(tl.int64) * H + i_h) * K * V

    accD = tl.zeros([C, C], dtype=tl.float32)
    if DELTA:
        accM = tl.zeros([C, C], dtype=tl.float32)
        beta_c = tl.load(beta + rows * H + i_h, mask=m_c, other=0.0).to(tl.float32)
        TmT = tl.load(Tm + (rows[None, :] * H + i_h) * C + offs_c[:, None], mask=m_c[None, :], other=0.0)
        dbeta = tl.zeros([C], dtype=tl.float32)
    else:
        AT = tl.load(Aqk + (rows[None, :] * H + i_h) * C + offs_c[:, None], mask=m_c[None, :], other=0.0)
    if GATE == 2:
        b, b_last = decay_rows(bcum, start, n, i_h, offs_c, H)
        A = tl.load(Aqk + p_cc, mask=m_c[:, None], other=0.0)
        local = tl.zeros([C], dtype=tl.float32)
    for vb in range(0, V, BV):
        offs_v = vb + tl.arange(0, BV)
        mv = offs_v < V
        p_v = (rows[:, None] * H + i_h) * V + offs_v[None, :]
        m_cv = m_c[:, None] & mv[None, :]
        pT_v = (rows[None, :] * H + i_h) * V + offs_v[:, None]
        m_vc = mv[:, None] & m_c[None, :]
        do_c = tl.load(do + p_v, mask=m_cv, other=0.0)
        if DELTA:
            uT = tl.load(U + pT_v, mask=m_vc, other=0.0)
        else:
            uT = tl.load(v + pT_v, mask=m_vc, other=0.0)
        accD += dot(do_c, uT, DOT)
        if DELTA:
            dxv = dot(TmT, tl.load(dU + p_v, mask=m_cv, other=0.0), DOT)
            v_c = tl.load(v + p_v, mask=m_cv, other=0.0).to(tl.float32)
            tl.store(dv + p_v, beta_c[:, None] * dxv, mask=m_cv)
            dbeta += tl.sum(dxv * v_c, 1)
            accM += dot(dxv, uT, DOT)
        elif GATE == 2:  # K's decays to the chunk's end, per head, go on the rows of K dH
            kdh = rows_times_state(tl.zeros([C, BV], dtype=tl.float32), k, bcum, rows, m_c, start + n - 1, i_h,
                                    dH + p_h, offs_v, mv, H, K, V, BK, 0, DOT)  # fmt: skip
            du = scale * dot(AT, do_c, DOT) + kdh * tl.exp(b_last - b)[:, None]
            tl.store(dU + p_v, du, mask=m_cv)
        else:
            du = rows_times_state(scale * dot(AT, do_c, DOT), k, bcum, rows, m_c, start + n - 1, i_h, dH + p_h,
                                   offs_v, mv, H, K, V, BK, 2 if GATE == 1 else 0, DOT)  # fmt: skip
            tl.store(dU + p_v, du, mask=m_cv)
        if GATE == 2:
            # o recomputed in float32 for do.o, and dv.v from the dv just computed
            if DELTA:
                o_c = dot(A, tl.load(U + p_v, mask=m_cv, other=0.0), DOT)
                dvv = tl.sum(beta_c[:, None] * dxv * v_c, 1)
            else:
                v_c = tl.load(v + p_v, mask=m_cv, other=0.0)
                o_c = dot(A, v_c, DOT)
                dvv = tl.sum(du * v_c.to(tl.float32), 1)
            for kb in range(0, K, BK):
                offs_k = kb + tl.arange(0, BK)
                mk = offs_k < K
                q_c = tl.load(q + (rows[:, None] * H + i_h) * K + offs_k[None, :], mask=m_c[:, None] & mk[None, :],
                              other=0.0)  # fmt: skip
                h_c = tl.load(h + p_h + offs_k[:, None] * V + offs_v[None, :], mask=mk[:, None] & mv[None, :],
                              other=0.0)  # fmt: skip
                o_c += dot(q_c, h_c, DOT) * tl.exp(b)[:, None]
            local += tl.sum(do_c * o_c, 1) * scale - dvv
    Dm = tl.where(causal, accD * scale, 0.0)
    if GATE == 2:
        G = tl.exp(tl.where(causal, b[:, None] - b[None, :], float("-inf")))
        Dm = Dm * G
    tl.store(D + p_cc, Dm, mask=m_c[:, None])
    if DELTA:
        P = tl.where(offs_c[:, None] > offs_c[None, :], -accM, 0.0)
        if GATE == 2:
            P = P * G
        tl.store(Pp + p_cc, P, mask=m_c[:, None])
        tl.store(dbeta_v + rows * H + i_h, dbeta, mask=m_c)
    if GATE == 2:
        tl.store(dgl + rows * H + i_h, local, mask=m_c)


@triton.jit
def gla_dintra_kernel(
    q, k, bcum, D, dq_intra, dk_intra, table,
    H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, S: tl.constexpr, BK: tl.constexpr,
    DOT: tl.constexpr,
):  # fmt: skip
    """For sub-chunk i_s and a block of K: dq_i = sum_{j <= i} D_ij k_j exp(b_i - b_j) over rows i in i_s, and
    dk_j = sum_{i >= j} D_ij q_i exp(b_i - b_j) over rows j in i_s (exponents split at sub-chunk starts)."""
    i_k, i_cs, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_s, start, n, offs_s, m_i, rows_i = sub_chunk(table, i_cs, C, S)
    offs_k = i_k * BK + tl.arange(0, BK)
    mk = offs_k < K
    p_i = (rows_i[:, None] * H + i_h) * K + offs_k[None, :]
    m_ik = m_i[:, None] & mk[None, :]
    b_i = tl.load(bcum + p_i, mask=m_ik, other=0.0)
    b_ref = tl.load(bcum + ((start + tl.minimum(i_s * S, n - 1)) * H + i_h) * K + offs_k, mask=mk, other=0.0)

    dq = tl.zeros([S, BK], dtype=tl.float32)
    for J in range(i_s):  # earlier sub-chunks: exp(b_i - b_j) = exp(b_i - b_ref) exp(b_ref - b_j)
        rows_j = start + J * S + offs_s
        p_j = (rows_j[:, None] * H + i_h) * K + offs_k[None, :]
        m_jk = (J * S + offs_s < n)[:, None] & mk[None, :]
        k_j = tl.load(k + p_j, mask=m_jk, other=0.0).to(tl.float32)
        b_j = tl.load(bcum + p_j, mask=m_jk, other=0.0)
        D_ij = tl.load(D + (rows_i[:, None] * H + i_h) * C + J * S + offs_s[None, :], mask=m_i[:, None], other=0.0)
        dq += dot(D_ij, k_j * tl.exp(b_ref[None, :] - b_j), DOT)
    dq = dq * tl.exp(b_i - b_ref[None, :])
    dk = tl.zeros([S, BK], dtype=tl.float32)
    for J in range(i_s + 1, C // S):  # later sub-chunks, each with its own reference row
        rows_j = start + J * S + offs_s
        m_j = J * S + offs_s < n
        p_j = (rows_j[:, None] * H + i_h) * K + offs_k[None, :]
        m_jk = m_j[:, None] & mk[None, :]
        q_j = tl.load(q + p_j, mask=m_jk, other=0.0).to(tl.float32)
        b_j = tl.load(bcum + p_j, mask=m_jk, other=0.0)
        b_r = tl.load(bcum + ((start + tl.minimum(J * S, n - 1)) * H + i_h) * K + offs_k, mask=mk, other=0.0)
        # D^T block: rows j of this sub-chunk, columns i of sub-chunk J
        DT = tl.load(D + (rows_j[None, :] * H + i_h) * C + i_s * S + offs_s[:, None], mask=m_j[None, :], other=0.0)
        q_j = tl.where(m_jk, q_j * tl.exp(b_j - b_r[None, :]), 0.0)  # rows past the end: exp(-b_r) may overflow
        dk += dot(DT, q_j, DOT) * tl.exp(b_r[None, :] - b_i)
    for j in range(S):  # the diagonal block, elementwise
        row_j = start + i_s * S + j
        m_jk = mk & (offs_k * 0 + i_s * S + j < n)
        p_j = (row_j * H + i_h) * K + offs_k
        k_j = tl.load(k + p_j, mask=m_jk, other=0.0).to(tl.float32)
        q_j = tl.load(q + p_j, mask=m_jk, other=0.0).to(tl.float32)
        b_j = tl.load(bcum + p_j, mask=m_jk, other=0.0)
        # column j of D's diagonal block (D[i, j], i in i_s) and row j (D[j, i'], i' in i_s)
        D_col = tl.load(D + (rows_i * H + i_h) * C + i_s * S + j, mask=m_i, other=0.0)
        D_row = tl.load(
            D + (row_j * H + i_h) * C + i_s * S + offs_s, mask=m_i & (offs_s * 0 + i_s * S + j < n), other=0.0
        )
        e_q = tl.exp(tl.where(offs_s[:, None] >= j, b_i - b_j[None, :], float("-inf")))  # rows i >= j
        dq += D_col[:, None] * k_j[None, :] * e_q
        valid_j = (offs_s[:, None] <= j) & (offs_s[:, None] * 0 + i_s * S + j < n)
        e_k = tl.exp(tl.where(valid_j, b_j[None, :] - b_i, float("-inf")))  # rows i' <= j
        dk += D_row[:, None] * q_j[None, :] * e_k
    tl.store(dq_intra + p_i, dq, mask=m_ik)
    tl.store(dk_intra + p_i, dk, mask=m_ik)


@triton.jit
def dqk_kernel(
    q, k, v, beta, bcum, Tm, U, h, dH, do, dU, D, Pp, dq_intra, dk_intra, dq, dk, dbeta_k, dgl, table, scale, ROWS,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, GATE: tl.constexpr, DELTA: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """Per chunk and block of K: dq = scale exp(b) dO h^T + intra, dk = exp(b_C - b) U dH^T + intra, and for
    the delta rules the terms through W (dX_k = -dX_v h^T) and through L (P' K). dq and dk are stored in their
    buffers' dtype (the inputs'); for per-channel gates also the decays' per-token terms q dq - k dk, in float32."""
    i_k, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(table + 2 * i_c).to(tl.int64)
    n = (tl.load(table + 2 * i_c + 1) - start).to(tl.int32)
    offs_c = tl.arange(0, C)
    offs_k = i_k * BK + tl.arange(0, BK)
    m_c, mk = offs_c < n, offs_k < K
    rows = start + offs_c
    p_k = (rows[:, None] * H + i_h) * K + offs_k[None, :]
    m_ck = m_c[:, None] & mk[None, :]
    p_state = (i_c.to(tl.int64) * H + i_h) * K * V + offs_k[None, :] * V

    acc_q = tl.zeros([C, BK], dtype=tl.float32)  # dO h^T
    acc_kh = tl.zeros([C, BK], dtype=tl.float32)  # U dH^T
    if DELTA:
        acc_xk = tl.zeros([C, BK], dtype=tl.float32)  # dX_v h^T
        TmT = tl.load(Tm + (rows[None, :] * H + i_h) * C + offs_c[:, None], mask=m_c[None, :], other=0.0)
    for vb in range(0, V, BV):
        offs_v = vb + tl.arange(0, BV)
        mv = offs_v < V
        p_v = (rows[:, None] * H + i_h) * V + offs_v[None, :]
        m_cv = m_c[:, None] & mv[None, :]
        m_vk = mv[:, None] & mk[None, :]
        hT = tl.load(h + p_state + offs_v[:, None], mask=m_vk, other=0.0)
        dHT = tl.load(dH + p_state + offs_v[:, None], mask=m_vk, other=0.0)
        acc_q += dot(tl.load(do + p_v, mask=m_cv, other=0.0), hT, DOT)
        if DELTA:
            u = tl.load(U + p_v, mask=m_cv, other=0.0)
            acc_xk += dot(dot(TmT, tl.load(dU + p_v, mask=m_cv, other=0.0), DOT), hT, DOT)
        else:
            u = tl.load(v + p_v, mask=m_cv, other=0.0)
        acc_kh += dot(u, dHT, DOT)

    q_c = tl.load(q + p_k, mask=m_ck, other=0.0)
    k_c = tl.load(k + p_k, mask=m_ck, other=0.0)
    last = (start + n - 1) * H + i_h
    if GATE == 0:
        b_q = tl.zeros([C, BK], dtype=tl.float32)
        b_k = tl.zeros([C, BK], dtype=tl.float32)
    if GATE == 2:
        b = tl.load(bcum + rows * H + i_h, mask=m_c, other=0.0)
        b_q = tl.zeros([C, BK], dtype=tl.float32) + b[:, None]
        b_k = tl.load(bcum + last) - b_q
    if GATE == 1:
        b_q = tl.load(bcum + p_k, mask=m_ck, other=0.0)
        b_k = tl.load(bcum + last * K + offs_k, mask=mk, other=0.0)[None, :] - b_q
    dq_c = scale * tl.exp(b_q) * acc_q
    dk_c = tl.exp(b_k) * acc_kh
    if GATE == 1:
        dq_c += tl.load(dq_intra + p_k, mask=m_ck, other=0.0)
        dk_c += tl.load(dk_intra + p_k, mask=m_ck, other=0.0)
    else:
        p_cc = (rows[:, None] * H + i_h) * C + offs_c[None, :]
        pT_cc = (rows[None, :] * H + i_h) * C + offs_c[:, None]
        dq_c += dot(tl.load(D + p_cc, mask=m_c[:, None], other=0.0), k_c, DOT)
        dk_c += dot(tl.load(D + pT_cc, mask=m_c[None, :], other=0.0), q_c, DOT)
    if DELTA:
        beta_c = tl.load(beta + rows * H + i_h, mask=m_c, other=0.0).to(tl.float32)
        bg = beta_c[:, None] * tl.exp(b_q)  # beta * gamma, the row scale of X_k = diag(beta gamma) K
        Pk = dot(tl.load(Pp + p_cc, mask=m_c[:, None], other=0.0), k_c, DOT)
        PTk = dot(tl.load(Pp + pT_cc, mask=m_c[None, :], other=0.0) * beta_c[None, :], k_c, DOT)
        dk_c += -bg * acc_xk + beta_c[:, None] * Pk + PTk
        part = tl.sum(-tl.exp(b_q) * acc_xk * k_c + Pk * k_c, 1)
        tl.store(dbeta_k + i_k.to(tl.int64) * ROWS + rows * H + i_h, part, mask=m_c)
    if GATE == 1:
        tl.store(dgl + p_k, q_c.to(tl.float32) * dq_c - k_c.to(tl.float32) * dk_c, mask=m_ck)
    tl.store(dq + p_k, dq_c, mask=m_ck)
    tl.store(dk + p_k, dk_c, mask=m_ck)
