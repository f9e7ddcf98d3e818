"""The forward stage: per chunk in parallel, the chunk's own products (`local_kernel`: the cumulative log decays
b, Aqk, and for the delta rules the UT transform's Tm, W and U'; GLA's Aqk in `gla_intra_blocks_kernel` and
`gla_intra_diag_kernel`); then chunk after chunk, the state entering each chunk and the new values U
(`state_kernel`); then per chunk in parallel, the outputs (`output_kernel`).
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
def _ut_inverse(L, buf, n, stride, C: tl.constexpr, S: tl.constexpr, DOT: tl.constexpr):
    """Tm = (I + strict(L))^-1 for a [C, C] tile of which the first n rows are real, blockwise with blocks of S.
    The C // S diagonal blocks are inverted by forward substitution, all at once as a [C // S, S, S] tile (S steps
    in all, not S per block), passing through `buf` (rows of `stride` elements: Tm's rows of this chunk,
    overwritten afterwards by the caller). With D^-1 their inverse (block diagonal) and E the part of L below
    them, I + L = (I + D)(I + M) with M = D^-1 E, and as M^(C // S) = 0, for 4 blocks
    (I + M)^-1 = (I - M)(I + M^2): Tm = (I - M)(I + M^2) D^-1."""
    tl.static_assert(C // S == 4, "the product form below is for 4 blocks")
    offs_c = tl.arange(0, C)
    m_c = offs_c < n
    tl.store(buf + offs_c[:, None] * stride + offs_c[None, :], L, mask=m_c[:, None])
    tl.debug_barrier()
    blk = tl.arange(0, C // S)[:, None, None]  # [blocks, S rows, S columns]
    r = tl.arange(0, S)[None, :, None]
    c = tl.arange(0, S)[None, None, :]
    p = buf + (blk * S + r) * stride + blk * S + c
    m = blk * S + r < n
    X = tl.where(r > c, -tl.load(p, mask=m, other=0.0), 0.0)
    for i in range(1, S):  # in every block, X_i = -L_i - sum_{j < i} L_ij X_j
        row = tl.sum(tl.where(r == i, X, 0.0), 1)  # [blocks, S]: row i of each block
        row = row + tl.sum(row[:, :, None] * X, 1)
        X = tl.where(r == i, row[:, None, :], X)
    tl.store(p, X, mask=m)
    tl.debug_barrier()
    blk_c = offs_c // S
    same = blk_c[:, None] == blk_c[None, :]
    eye = tl.where(offs_c[:, None] == offs_c[None, :], 1.0, 0.0)
    Dinv = eye + tl.load(buf + offs_c[:, None] * stride + offs_c[None, :], mask=m_c[:, None] & same, other=0.0)
    E = tl.where(blk_c[:, None] > blk_c[None, :], L, 0.0)
    M = dot(Dinv, E, DOT)
    P = dot(eye - M, eye + dot(M, M, DOT), DOT)
    return dot(P, Dinv, DOT)


@triton.jit
def local_kernel(
    q, k, v, g, beta, bcum, Aqk, Tm, W, Up, table, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, GATE: tl.constexpr, DELTA: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    start = tl.load(table + 2 * i_c).to(tl.int64)
    n = (tl.load(table + 2 * i_c + 1) - start).to(tl.int32)
    offs_c = tl.arange(0, C)
    m_c = offs_c < n
    rows = start + offs_c
    causal = offs_c[:, None] >= offs_c[None, :]

    if GATE == 2:
        b = tl.cumsum(tl.load(g + rows * H + i_h, mask=m_c, other=0.0).to(tl.float32), 0)
        tl.store(bcum + rows * H + i_h, b, mask=m_c)
        G = tl.exp(tl.where(causal, b[:, None] - b[None, :], float("-inf")))
    if GATE == 1:
        for kb in range(0, K, BK):
            offs_k = kb + tl.arange(0, BK)
            p = (rows[:, None] * H + i_h) * K + offs_k[None, :]
            m = m_c[:, None] & (offs_k[None, :] < K)
            tl.store(bcum + p, tl.cumsum(tl.load(g + p, mask=m, other=0.0).to(tl.float32), 0), mask=m)
    if GATE != 1:
        qk = tl.zeros([C, C], dtype=tl.float32)
        kk = tl.zeros([C, C], dtype=tl.float32)
        for kb in range(0, K, BK):
            offs_k = kb + tl.arange(0, BK)
            m = m_c[:, None] & (offs_k[None, :] < K)
            k_c = tl.load(k + (rows[:, None] * H + i_h) * K + offs_k[None, :], mask=m, other=0.0)
            kT = tl.load(
                k + (rows[None, :] * H + i_h) * K + offs_k[:, None],
                mask=m_c[None, :] & (offs_k[:, None] < K), other=0.0,
            )  # fmt: skip
            q_c = tl.load(q + (rows[:, None] * H + i_h) * K + offs_k[None, :], mask=m, other=0.0)
            qk += dot(q_c, kT, DOT)
            if DELTA:
                kk += dot(k_c, kT, DOT)
        A = tl.where(causal, qk, 0.0)
        if GATE == 2:
            A = A * G
        tl.store(Aqk + (rows[:, None] * H + i_h) * C + offs_c[None, :], A, mask=m_c[:, None])
        if DELTA:
            beta_c = tl.load(beta + rows * H + i_h, mask=m_c, other=0.0).to(tl.float32)
            L = beta_c[:, None] * kk
            if GATE == 2:
                L = L * G
            T_c = _ut_inverse(L, Tm + (start * H + i_h) * C, n, H * C, C, 16, DOT)
            tl.debug_barrier()  # every thread has read the diagonal blocks back before Tm is overwritten
            tl.store(Tm + (rows[:, None] * H + i_h) * C + offs_c[None, :], T_c, mask=m_c[:, None])
            bg = beta_c
            if GATE == 2:
                bg = beta_c * tl.exp(b)
            # W = Tm diag(beta gamma) K and U' = Tm diag(beta) V: the row scales go on Tm's columns
            for kb in range(0, K, BK):
                offs_k = kb + tl.arange(0, BK)
                p = (rows[:, None] * H + i_h) * K + offs_k[None, :]
                m = m_c[:, None] & (offs_k[None, :] < K)
                tl.store(W + p, dot(T_c * bg[None, :], tl.load(k + p, mask=m, other=0.0), DOT), mask=m)
            for vb in range(0, V, BV):
                offs_v = vb + tl.arange(0, BV)
                p = (rows[:, None] * H + i_h) * V + offs_v[None, :]
                m = m_c[:, None] & (offs_v[None, :] < V)
                tl.store(Up + p, dot(T_c * beta_c[None, :], tl.load(v + p, mask=m, other=0.0), DOT), mask=m)


@triton.jit
def gla_intra_blocks_kernel(
    q, k, bcum, Aqk, table,
    H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, S: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """Rows of sub-chunk i_s of GLA's Aqk[i, j] = sum_k q_ik k_jk exp(b_ik - b_jk) outside the diagonal block:
    the columns of earlier sub-chunks as one product per block of BK channels, the exponents split at the
    sub-chunk's first row r (both parts <= 0); the later columns 0."""
    i_cs, i_h = tl.program_id(0), tl.program_id(1)
    i_s, start, n, offs_s, m_i, rows_i = sub_chunk(table, i_cs, C, S)
    offs_c = tl.arange(0, C)
    r = tl.minimum(i_s * S, n - 1)
    earlier = offs_c < tl.minimum(i_s * S, n)  # columns of earlier sub-chunks' rows
    acc = tl.zeros([S, C], dtype=tl.float32)
    if i_s > 0:
        for kb in range(0, K, BK):
            offs_k = kb + tl.arange(0, BK)
            mk = offs_k < K
            b_r = tl.load(bcum + ((start + r) * H + i_h) * K + offs_k, mask=mk, other=0.0)
            p_i = (rows_i[:, None] * H + i_h) * K + offs_k[None, :]
            m_ik = m_i[:, None] & mk[None, :]
            q_i = tl.load(q + p_i, mask=m_ik, other=0.0).to(tl.float32)
            q_i = q_i * tl.exp(tl.load(bcum + p_i, mask=m_ik, other=0.0) - b_r[None, :])
            pT = ((start + offs_c[None, :]) * H + i_h) * K + offs_k[:, None]
            mT = earlier[None, :] & mk[:, None]
            kT = tl.load(k + pT, mask=mT, other=0.0).to(tl.float32)
            kT = kT * tl.exp(tl.where(mT, b_r[:, None] - tl.load(bcum + pT, mask=mT, other=0.0), float("-inf")))
            acc += dot(q_i, kT, DOT)
    diagonal = (offs_c >= i_s * S) & (offs_c < i_s * S + S)
    p = (rows_i[:, None] * H + i_h) * C + offs_c[None, :]
    tl.store(Aqk + p, acc, mask=m_i[:, None] & ~diagonal[None, :])


@triton.jit
def gla_intra_diag_kernel(
    q, k, bcum, Aqk, table, H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, S: tl.constexpr, BK: tl.constexpr
):  # fmt: skip
    """The diagonal block of sub-chunk i_s of GLA's Aqk, column by column on the whole [S, K] tile (b_i - b_j
    <= 0 in every term: no positive number is exponentiated). Apart from `gla_intra_blocks_kernel`, whose product
    tiles would otherwise hold this loop to a few programs per multiprocessor (registers, shared memory)."""
    i_cs, i_h = tl.program_id(0), tl.program_id(1)
    i_s, start, n, offs_s, m_i, rows_i = sub_chunk(table, i_cs, C, S)
    offs_k = tl.arange(0, BK)
    mk = offs_k < K
    p_i = (rows_i[:, None] * H + i_h) * K + offs_k[None, :]
    m_ik = m_i[:, None] & mk[None, :]
    q_i = tl.load(q + p_i, mask=m_ik, other=0.0).to(tl.float32)
    b_i = tl.load(bcum + p_i, mask=m_ik, other=0.0)
    for j in range(S):
        p_j = ((start + i_s * S + j) * H + i_h) * K + offs_k
        m_jk = mk & (offs_k * 0 + i_s * S + j < n)
        k_j = tl.load(k + p_j, mask=m_jk, other=0.0).to(tl.float32)
        b_j = tl.load(bcum + p_j, mask=m_jk, other=0.0)
        e = tl.exp(tl.where(offs_s[:, None] >= j, b_i - b_j[None, :], float("-inf")))
        tl.store(Aqk + (rows_i * H + i_h) * C + i_s * S + j, tl.sum(q_i * k_j[None, :] * e, 1), mask=m_i)


@triton.jit
def state_kernel(
    k, v, bcum, W, Up, U, h, h0, ht, cu, chunk_offsets,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, KP: tl.constexpr, NP: tl.constexpr,
    BV: tl.constexpr, GATE: tl.constexpr, DELTA: tl.constexpr, HAS_H0: tl.constexpr,
    STORE_HT: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """Chunk after chunk: the state entering each chunk, and for the delta rules U. A program holds NP pieces of
    KP rows of the state and BV of its columns: the delta rules need every row for U = U' - W h (NP KP >= K),
    the other rules take one piece each (their rows evolve independently). The pieces are separate tiles so
    that each product is [C, KP] x [KP, BV] and the large [C, K] operands never live in registers whole."""
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

    S = pieces_load(h0, i_nh, k0, i_v, K, V, KP, BV, NP, HAS_H0)
    for ic in range(nc):
        start = bos + ic * C
        n = tl.minimum(eos - start, C).to(tl.int32)
        m_c = offs_c < n
        rows = start + offs_c
        pieces_store(h + ((c0 + ic) * H + i_h) * K * V, k0, i_v, S, K, V, KP, BV, NP)
        p_v = (rows[:, None] * H + i_h) * V + offs_v[None, :]
        m_cv = m_c[:, None] & mv[None, :]
        if DELTA:
            wS = rows_times_pieces(W, rows, m_c, i_h, k0, S, H, K, KP, NP, DOT)
            u = tl.load(Up + p_v, mask=m_cv, other=0.0) - wS
            tl.store(U + p_v, u, mask=m_cv)
        else:
            u = tl.load(v + p_v, mask=m_cv, other=0.0)
        if GATE == 2:  # the decays of K's columns go on U's rows
            b, b_last = decay_rows(bcum, start, n, i_h, offs_c, H)
            u = u * tl.exp(b_last - b)[:, None]
        new = ()
        for j in tl.static_range(NP):
            offs_k, mk, pT, m_kc = piece_rows(rows, m_c, i_h, k0, j, H, K, KP)
            kT = tl.load(k + pT, mask=m_kc, other=0.0)
            if GATE == 2:
                piece = S[j] * tl.exp(b_last) + dot(kT, u, DOT)
            elif GATE == 1:
                bT = tl.load(bcum + pT, mask=m_kc, other=0.0)
                b_last = tl.load(bcum + ((start + n - 1) * H + i_h) * K + offs_k, mask=mk, other=0.0)
                piece = S[j] * tl.exp(b_last)[:, None] + dot(kT * tl.exp(b_last[:, None] - bT), u, DOT)
            else:
                piece = S[j] + dot(kT, u, DOT)
            new = new + (piece,)
        S = new
    if STORE_HT:
        pieces_store(ht + i_nh.to(tl.int64) * K * V, k0, i_v, S, K, V, KP, BV, NP)


@triton.jit
def output_kernel(
    q, v, bcum, Aqk, U, h, o, table, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, GATE: tl.constexpr, DELTA: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(table + 2 * i_c).to(tl.int64)
    n = (tl.load(table + 2 * i_c + 1) - start).to(tl.int32)
    offs_c = tl.arange(0, C)
    offs_v = i_v * BV + tl.arange(0, BV)
    m_c, mv = offs_c < n, offs_v < V
    rows = start + offs_c
    acc = tl.zeros([C, BV], dtype=tl.float32)
    h_chunk = h + (i_c.to(tl.int64) * H + i_h) * K * V
    acc = rows_times_state(acc, q, bcum, rows, m_c, start + n - 1, i_h, h_chunk, offs_v, mv, H, K, V, BK,
                            1 if GATE == 1 else 0, DOT)  # fmt: skip
    if GATE == 2:
        acc = acc * tl.exp(tl.load(bcum + rows * H + i_h, mask=m_c, other=0.0))[:, None]
    A = tl.load(Aqk + (rows[:, None] * H + i_h) * C + offs_c[None, :], mask=m_c[:, None], other=0.0)
    p_v = (rows[:, None] * H + i_h) * V + offs_v[None, :]
    m_cv = m_c[:, None] & mv[None, :]
    if DELTA:
        u = tl.load(U + p_v, mask=m_cv, other=0.0)
    else:
        u = tl.load(v + p_v, mask=m_cv, other=0.0)
    acc = (acc + dot(A, u, DOT)) * scale
    tl.store(o + p_v, acc.to(o.dtype.element_ty), mask=m_cv)
