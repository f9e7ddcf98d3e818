"""Chunked Triton kernels for every rule: one kernel family parameterised by the rule.

GATE: 0 none, 1 per channel (GLA), 2 per head (simple GLA, gated DeltaNet); DELTA: the delta rule (both from
`kernels.rules`, which refuses the one form not implemented here: a per-channel decay with the delta rule).
The math is in the rules' READMEs. In a chunk of C tokens entered with state h, with b the cumulative log
decay, G_ij = exp(b_i - b_j) (j <= i; per channel for GLA) and U the values written (V, or for the delta rules
the new values U = U' - W h from the UT transform Tm = (I + L)^-1):

    O = scale (exp(b) * Q h + Aqk U),   Aqk = causal(Q K^T * G)
    h' = exp(b_C) h + (K * exp(b_C - b))^T U

Forward kernels: `_local` (per chunk: b, Aqk, and for the delta rules Tm, W, U'), `_gla_intra_blocks` and
`_gla_intra_diag` (GLA's Aqk, computed in sub-chunks so that no positive number is exponentiated), `_state`
(chunk after chunk: the state entering each chunk, and U), `_output`. Backward kernels: `_dstate` (chunk after
chunk backwards: the state gradient after each chunk dH, and for the delta rules dU), `_dprep` (per chunk:
D = scale causal(dO U^T * G), for the delta rules dv, dbeta's value part and P' = strict(-dX_v U^T) * G with
dX_v = Tm^T dU, for the other rules dv = dU), `_gla_dintra` (GLA's intra-chunk dq, dk), `_dqk` (per chunk and
block of K: dq, dk and dbeta's key part).
The decays' gradient dg is a reverse cumulative sum of per-token terms (see `_decay_grad`).

Every sequence is handled as packed (a batch of B rows of T tokens is B sequences); a device-side chunk
table maps a program to its chunk, so there is no host-device sync. Transposed tiles are loaded through
strides instead of `tl.trans` (Triton 3.4-3.6 miscompiles some dots on transposed operands on Hopper). The
two sequential kernels split the state into blocks of V, and of K too for the rules without the delta rule
(whose state rows evolve independently), and hold it as separate tiles of 64 rows (`_state_pieces`); the delta
rules' UT inverse is blockwise (`_ut_inverse`). With bf16 inputs the products run as bf16 tensor-core dots
(`_dot_mode`), at warp counts that avoid Triton 3.6's miscompiles on Hopper (`_launch`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels._common import check_inputs, check_triton_inputs, empty
from kernels._decay_grad import decay_grad
from kernels.rules import get_rule

CHUNK = 64
SUB = 16  # GLA's sub-chunk


def _dot_mode(dtype: torch.dtype) -> int:
    """How `_dot` multiplies. The decays' gradient sums per-token terms that nearly cancel, so the dots need
    more than tf32's 11 bits: with plain tf32, in a bf16 MoM layer (length 1000, heads of 256) its error was
    7e-2, against 4e-3 for the zoo's PyTorch MoM in bf16.
    2, bf16 inputs: bf16 tensor-core dots accumulating in float32. Two bf16 operands (the inputs) multiply
       exactly in one dot; a float32 operand is split as hi + lo in bf16 (16 bits of mantissa, error about
       2^-17 of it): 2 dots, or 3 when both operands are float32 (half the tensor-core time of tf32x3).
    1, other inputs: tf32x3 (float32 accuracy on tensor cores; plain float32 dots run on FMA units and compile
       slowly), for the 1e-3 of float32 inputs.
    Under the interpreter (no tf32; its dot multiplies the raw bits of bf16 operands): 0, float32, for float32
    inputs, and 3 for bf16 ones, mode 2 with each bf16 dot done on the operands converted to float32 (exact, as
    on the GPU), so that the CPU tests run the bf16 path's splits and conversions."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if dtype == torch.bfloat16:
        return 3 if interpreted else 2
    return 0 if interpreted else 1


@triton.jit
def _split(x):
    """A float32 tile as hi + lo, both bf16."""
    hi = x.to(tl.bfloat16)
    return hi, (x - hi.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def _mma(a, b, acc, DOT: tl.constexpr):
    """acc + a @ b for bf16 a, b, accumulating in float32 (converted first under the interpreter)."""
    if DOT == 3:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _dot(a, b, DOT: tl.constexpr):
    """a @ b in float32 (see `_dot_mode`); pass bf16 inputs as loaded, unconverted, for the one-dot case."""
    if DOT >= 2:
        if a.dtype == tl.bfloat16 and b.dtype == tl.bfloat16:
            out = _mma(a, b, None, DOT)
        elif a.dtype == tl.bfloat16:
            b_hi, b_lo = _split(b.to(tl.float32))
            out = _mma(a, b_hi, _mma(a, b_lo, None, DOT), DOT)
        elif b.dtype == tl.bfloat16:
            a_hi, a_lo = _split(a.to(tl.float32))
            out = _mma(a_hi, b, _mma(a_lo, b, None, DOT), DOT)
        else:
            a_hi, a_lo = _split(a.to(tl.float32))
            b_hi, b_lo = _split(b.to(tl.float32))
            out = _mma(a_hi, b_hi, _mma(a_hi, b_lo, _mma(a_lo, b_hi, None, DOT), DOT), DOT)
    elif DOT == 1:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32x3")
    else:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return out


@triton.jit
def _decay_rows(bcum, start, n, i_h, offs_c, H: tl.constexpr):
    """Per-head gates: b over the chunk's rows (0 past the end) and b at its last row."""
    m_c = offs_c < n
    b = tl.load(bcum + (start + offs_c) * H + i_h, mask=m_c, other=0.0)
    b_last = tl.load(bcum + (start + n - 1) * H + i_h)
    return b, b_last


@triton.jit
def _rows_times_state(
    acc, x, bcum, rows, m_c, last, i_h, state, offs_v, mv,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, DECAY: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """acc + X S over K in blocks of BK: X the chunk's rows of x [T, H, K], S the [K, V] state at `state` (its
    columns offs_v). DECAY (per-channel gates, GLA): 1 scales X by exp(b) (Q's decays), 2 by exp(b_C - b) (K's
    decays to the chunk's end, `last` its last row)."""
    for kb in range(0, K, BK):
        offs_k = kb + tl.arange(0, BK)
        mk = offs_k < K
        p = (rows[:, None] * H + i_h) * K + offs_k[None, :]
        m = m_c[:, None] & mk[None, :]
        x_c = tl.load(x + p, mask=m, other=0.0)
        if DECAY == 1:
            x_c = x_c * tl.exp(tl.load(bcum + p, mask=m, other=0.0))
        if DECAY == 2:
            b_last = tl.load(bcum + (last * H + i_h) * K + offs_k, mask=mk, other=0.0)
            x_c = x_c * tl.exp(b_last[None, :] - tl.load(bcum + p, mask=m, other=0.0))
        s_c = tl.load(state + offs_k[:, None] * V + offs_v[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        acc += _dot(x_c, s_c, DOT)
    return acc


@triton.jit
def _ut_inverse(L, buf, n, stride, C: tl.constexpr, S: tl.constexpr, DOT: tl.constexpr):
    """Tm = (I + strict(L))^-1 for a [C, C] tile of which the first n rows are real, blockwise with blocks of S.
    The C // S diagonal blocks are inverted by forward substitution, S steps each on an [S, S] tile, passing
    through `buf` (rows of `stride` elements: Tm's rows of this chunk, overwritten afterwards by the caller).
    With D^-1 their inverse (block diagonal) and E the part of L below them, I + L = (I + D)(I + M) with
    M = D^-1 E, and as M^(C // S) = 0, for 4 blocks (I + M)^-1 = (I - M)(I + M^2): Tm = (I - M)(I + M^2) D^-1."""
    tl.static_assert(C // S == 4, "the product form below is for 4 blocks")
    offs_c = tl.arange(0, C)
    offs_s = tl.arange(0, S)
    m_c = offs_c < n
    tl.store(buf + offs_c[:, None] * stride + offs_c[None, :], L, mask=m_c[:, None])
    tl.debug_barrier()
    for blk in tl.static_range(C // S):
        p = buf + (blk * S + offs_s[:, None]) * stride + blk * S + offs_s[None, :]
        m = (blk * S + offs_s < n)[:, None]
        X = tl.where(offs_s[:, None] > offs_s[None, :], -tl.load(p, mask=m, other=0.0), 0.0)
        for i in range(1, S):  # X_i = -L_i - sum_{j < i} L_ij X_j
            row = tl.sum(tl.where(offs_s[:, None] == i, X, 0.0), 0)
            row = row + tl.sum(row[:, None] * X, 0)
            X = tl.where(offs_s[:, None] == i, row[None, :], X)
        tl.store(p, X, mask=m)
    tl.debug_barrier()
    blk_c = offs_c // S
    same = blk_c[:, None] == blk_c[None, :]
    eye = tl.where(offs_c[:, None] == offs_c[None, :], 1.0, 0.0)
    Dinv = eye + tl.load(buf + offs_c[:, None] * stride + offs_c[None, :], mask=m_c[:, None] & same, other=0.0)
    E = tl.where(blk_c[:, None] > blk_c[None, :], L, 0.0)
    M = _dot(Dinv, E, DOT)
    P = _dot(eye - M, eye + _dot(M, M, DOT), DOT)
    return _dot(P, Dinv, DOT)


@triton.jit
def _local_kernel(
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
            qk += _dot(q_c, kT, DOT)
            if DELTA:
                kk += _dot(k_c, kT, DOT)
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
                tl.store(W + p, _dot(T_c * bg[None, :], tl.load(k + p, mask=m, other=0.0), DOT), mask=m)
            for vb in range(0, V, BV):
                offs_v = vb + tl.arange(0, BV)
                p = (rows[:, None] * H + i_h) * V + offs_v[None, :]
                m = m_c[:, None] & (offs_v[None, :] < V)
                tl.store(Up + p, _dot(T_c * beta_c[None, :], tl.load(v + p, mask=m, other=0.0), DOT), mask=m)


@triton.jit
def _sub_chunk(table, i_cs, C: tl.constexpr, S: tl.constexpr):
    """Sub-chunk i_cs of the chunk table (C // S per chunk): its index i_s in its chunk, the chunk's first token
    and length n, and its S rows (offsets, mask of the real ones, token indices)."""
    i_c, i_s = i_cs // (C // S), i_cs % (C // S)
    start = tl.load(table + 2 * i_c).to(tl.int64)
    n = (tl.load(table + 2 * i_c + 1) - start).to(tl.int32)
    offs_s = tl.arange(0, S)
    return i_s, start, n, offs_s, i_s * S + offs_s < n, start + i_s * S + offs_s


@triton.jit
def _gla_intra_blocks_kernel(
    q, k, bcum, Aqk, table,
    H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, S: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """Rows of sub-chunk i_s of GLA's Aqk[i, j] = sum_k q_ik k_jk exp(b_ik - b_jk) outside the diagonal block:
    the columns of earlier sub-chunks as one product per block of BK channels, the exponents split at the
    sub-chunk's first row r (both parts <= 0); the later columns 0."""
    i_cs, i_h = tl.program_id(0), tl.program_id(1)
    i_s, start, n, offs_s, m_i, rows_i = _sub_chunk(table, i_cs, C, S)
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
            acc += _dot(q_i, kT, DOT)
    diagonal = (offs_c >= i_s * S) & (offs_c < i_s * S + S)
    p = (rows_i[:, None] * H + i_h) * C + offs_c[None, :]
    tl.store(Aqk + p, acc, mask=m_i[:, None] & ~diagonal[None, :])


@triton.jit
def _gla_intra_diag_kernel(
    q, k, bcum, Aqk, table, H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, S: tl.constexpr, BK: tl.constexpr
):  # fmt: skip
    """The diagonal block of sub-chunk i_s of GLA's Aqk, column by column on the whole [S, K] tile (b_i - b_j
    <= 0 in every term: no positive number is exponentiated). Apart from `_gla_intra_blocks`, whose product
    tiles would otherwise hold this loop to a few programs per multiprocessor (registers, shared memory)."""
    i_cs, i_h = tl.program_id(0), tl.program_id(1)
    i_s, start, n, offs_s, m_i, rows_i = _sub_chunk(table, i_cs, C, S)
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
def _pieces_load(states, i_nh, k0, i_v, K: tl.constexpr, V: tl.constexpr, KP: tl.constexpr, BV: tl.constexpr,
                 NP: tl.constexpr, LOAD: tl.constexpr):  # fmt: skip
    """NP pieces of KP rows (from row k0) and the BV columns of block i_v of state i_nh of `states` ([N, H, K,
    V]; zeros beyond K and V), or NP pieces of zeros when not LOAD (`states` may be None then)."""
    offs_v = i_v * BV + tl.arange(0, BV)
    pieces = ()
    for j in tl.static_range(NP):
        offs_k = k0 + j * KP + tl.arange(0, KP)
        if LOAD:
            mask = (offs_k[:, None] < K) & (offs_v[None, :] < V)
            p = states + i_nh.to(tl.int64) * K * V + offs_k[:, None] * V + offs_v[None, :]
            piece = tl.load(p, mask=mask, other=0.0)
        else:
            piece = tl.zeros([KP, BV], dtype=tl.float32)
        pieces = pieces + (piece,)
    return pieces


@triton.jit
def _pieces_store(base, k0, i_v, pieces, K: tl.constexpr, V: tl.constexpr, KP: tl.constexpr,
                  BV: tl.constexpr, NP: tl.constexpr):  # fmt: skip
    offs_v = i_v * BV + tl.arange(0, BV)
    for j in tl.static_range(NP):
        offs_k = k0 + j * KP + tl.arange(0, KP)
        mask = (offs_k[:, None] < K) & (offs_v[None, :] < V)
        tl.store(base + offs_k[:, None] * V + offs_v[None, :], pieces[j], mask=mask)


@triton.jit
def _piece_rows(rows, m_c, i_h, k0, j, H: tl.constexpr, K: tl.constexpr, KP: tl.constexpr):
    """Piece j's rows of the state (offsets, mask) and, for a [T, H, K] tensor read transposed ([KP, C]), the
    offsets and mask of the chunk's tokens in those rows."""
    offs_k = k0 + j * KP + tl.arange(0, KP)
    mk = offs_k < K
    return offs_k, mk, (rows[None, :] * H + i_h) * K + offs_k[:, None], mk[:, None] & m_c[None, :]


@triton.jit
def _rows_times_pieces(x, rows, m_c, i_h, k0, pieces, H: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                       NP: tl.constexpr, DOT: tl.constexpr):  # fmt: skip
    """X S for the chunk's rows of x ([T, H, K]) and the state S given as NP pieces of KP rows."""
    for j in tl.static_range(NP):
        offs_k = k0 + j * KP + tl.arange(0, KP)
        x_c = tl.load(x + (rows[:, None] * H + i_h) * K + offs_k[None, :], mask=m_c[:, None] & (offs_k[None, :] < K),
                      other=0.0)  # fmt: skip
        if j == 0:
            acc = _dot(x_c, pieces[j], DOT)
        else:
            acc += _dot(x_c, pieces[j], DOT)
    return acc


@triton.jit
def _state_kernel(
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

    S = _pieces_load(h0, i_nh, k0, i_v, K, V, KP, BV, NP, HAS_H0)
    for ic in range(nc):
        start = bos + ic * C
        n = tl.minimum(eos - start, C).to(tl.int32)
        m_c = offs_c < n
        rows = start + offs_c
        _pieces_store(h + ((c0 + ic) * H + i_h) * K * V, k0, i_v, S, K, V, KP, BV, NP)
        p_v = (rows[:, None] * H + i_h) * V + offs_v[None, :]
        m_cv = m_c[:, None] & mv[None, :]
        if DELTA:
            wS = _rows_times_pieces(W, rows, m_c, i_h, k0, S, H, K, KP, NP, DOT)
            u = tl.load(Up + p_v, mask=m_cv, other=0.0) - wS
            tl.store(U + p_v, u, mask=m_cv)
        else:
            u = tl.load(v + p_v, mask=m_cv, other=0.0)
        if GATE == 2:  # the decays of K's columns go on U's rows
            b, b_last = _decay_rows(bcum, start, n, i_h, offs_c, H)
            u = u * tl.exp(b_last - b)[:, None]
        new = ()
        for j in tl.static_range(NP):
            offs_k, mk, pT, m_kc = _piece_rows(rows, m_c, i_h, k0, j, H, K, KP)
            kT = tl.load(k + pT, mask=m_kc, other=0.0)
            if GATE == 2:
                piece = S[j] * tl.exp(b_last) + _dot(kT, u, DOT)
            elif GATE == 1:
                bT = tl.load(bcum + pT, mask=m_kc, other=0.0)
                b_last = tl.load(bcum + ((start + n - 1) * H + i_h) * K + offs_k, mask=mk, other=0.0)
                piece = S[j] * tl.exp(b_last)[:, None] + _dot(kT * tl.exp(b_last[:, None] - bT), u, DOT)
            else:
                piece = S[j] + _dot(kT, u, DOT)
            new = new + (piece,)
        S = new
    if STORE_HT:
        _pieces_store(ht + i_nh.to(tl.int64) * K * V, k0, i_v, S, K, V, KP, BV, NP)


@triton.jit
def _output_kernel(
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
    acc = _rows_times_state(acc, q, bcum, rows, m_c, start + n - 1, i_h, h_chunk, offs_v, mv, H, K, V, BK,
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
    acc = (acc + _dot(A, u, DOT)) * scale
    tl.store(o + p_v, acc.to(o.dtype.element_ty), mask=m_cv)


@triton.jit
def _dstate_kernel(
    q, k, bcum, Aqk, W, do, dU, dH, dht, dh0, cu, chunk_offsets, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, KP: tl.constexpr, NP: tl.constexpr,
    BV: tl.constexpr, GATE: tl.constexpr, DELTA: tl.constexpr, HAS_DHT: tl.constexpr,
    STORE_DH0: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """Backwards over the chunks: dH <- exp(b_C) dH + scale (exp(b) Q)^T dO, held as in `_state` (NP pieces of
    KP rows and BV columns per program); for the delta rules (all K rows) also dU = scale Aqk^T dO + K_dec dH
    and dH -= W^T dU. The other rules' dU, which the recursion does not need, is left to `_dprep`."""
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

    dS = _pieces_load(dht, i_nh, k0, i_v, K, V, KP, BV, NP, HAS_DHT)
    for i in range(nc):
        ic = nc - 1 - i
        start = bos + ic * C
        n = tl.minimum(eos - start, C).to(tl.int32)
        m_c = offs_c < n
        rows = start + offs_c
        _pieces_store(dH + ((c0 + ic) * H + i_h) * K * V, k0, i_v, dS, K, V, KP, BV, NP)
        p_v = (rows[:, None] * H + i_h) * V + offs_v[None, :]
        m_cv = m_c[:, None] & mv[None, :]
        do_c = tl.load(do + p_v, mask=m_cv, other=0.0)
        if GATE == 2:
            b, b_last = _decay_rows(bcum, start, n, i_h, offs_c, H)
        if DELTA:
            AT = tl.load(Aqk + (rows[None, :] * H + i_h) * C + offs_c[:, None], mask=m_c[None, :], other=0.0)
            kdS = _rows_times_pieces(k, rows, m_c, i_h, k0, dS, H, K, KP, NP, DOT)
            if GATE == 2:
                kdS = kdS * tl.exp(b_last - b)[:, None]
            du = scale * _dot(AT, do_c, DOT) + kdS
            tl.store(dU + p_v, du, mask=m_cv)
        if GATE == 2:  # exp(b) on Q's columns goes on dO's rows
            do_c = do_c * tl.exp(b)[:, None]
        new = ()
        for j in tl.static_range(NP):
            offs_k, mk, pT, m_kc = _piece_rows(rows, m_c, i_h, k0, j, H, K, KP)
            qT = tl.load(q + pT, mask=m_kc, other=0.0)
            if GATE == 2:
                piece = dS[j] * tl.exp(b_last)
            elif GATE == 1:
                b_last = tl.load(bcum + ((start + n - 1) * H + i_h) * K + offs_k, mask=mk, other=0.0)
                qT = qT * tl.exp(tl.load(bcum + pT, mask=m_kc, other=0.0))
                piece = dS[j] * tl.exp(b_last)[:, None]
            else:
                piece = dS[j]
            piece += scale * _dot(qT, do_c, DOT)
            if DELTA:
                piece -= _dot(tl.load(W + pT, mask=m_kc, other=0.0), du, DOT)
            new = new + (piece,)
        dS = new
    if STORE_DH0:
        _pieces_store(dh0 + i_nh.to(tl.int64) * K * V, k0, i_v, dS, K, V, KP, BV, NP)


@triton.jit
def _dprep_kernel(
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
        b, b_last = _decay_rows(bcum, start, n, i_h, offs_c, H)
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
        accD += _dot(do_c, uT, DOT)
        if DELTA:
            dxv = _dot(TmT, tl.load(dU + p_v, mask=m_cv, other=0.0), DOT)
            v_c = tl.load(v + p_v, mask=m_cv, other=0.0).to(tl.float32)
            tl.store(dv + p_v, beta_c[:, None] * dxv, mask=m_cv)
            dbeta += tl.sum(dxv * v_c, 1)
            accM += _dot(dxv, uT, DOT)
        elif GATE == 2:  # K's decays to the chunk's end, per head, go on the rows of K dH
            kdh = _rows_times_state(tl.zeros([C, BV], dtype=tl.float32), k, bcum, rows, m_c, start + n - 1, i_h,
                                    dH + p_h, offs_v, mv, H, K, V, BK, 0, DOT)  # fmt: skip
            du = scale * _dot(AT, do_c, DOT) + kdh * tl.exp(b_last - b)[:, None]
            tl.store(dU + p_v, du, mask=m_cv)
        else:
            du = _rows_times_state(scale * _dot(AT, do_c, DOT), k, bcum, rows, m_c, start + n - 1, i_h, dH + p_h,
                                   offs_v, mv, H, K, V, BK, 2 if GATE == 1 else 0, DOT)  # fmt: skip
            tl.store(dU + p_v, du, mask=m_cv)
        if GATE == 2:
            # o recomputed in float32 for do.o, and dv.v from the dv just computed
            if DELTA:
                o_c = _dot(A, tl.load(U + p_v, mask=m_cv, other=0.0), DOT)
                dvv = tl.sum(beta_c[:, None] * dxv * v_c, 1)
            else:
                v_c = tl.load(v + p_v, mask=m_cv, other=0.0)
                o_c = _dot(A, v_c, DOT)
                dvv = tl.sum(du * v_c.to(tl.float32), 1)
            for kb in range(0, K, BK):
                offs_k = kb + tl.arange(0, BK)
                mk = offs_k < K
                q_c = tl.load(q + (rows[:, None] * H + i_h) * K + offs_k[None, :], mask=m_c[:, None] & mk[None, :],
                              other=0.0)  # fmt: skip
                h_c = tl.load(h + p_h + offs_k[:, None] * V + offs_v[None, :], mask=mk[:, None] & mv[None, :],
                              other=0.0)  # fmt: skip
                o_c += _dot(q_c, h_c, DOT) * tl.exp(b)[:, None]
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
def _gla_dintra_kernel(
    q, k, bcum, D, dq_intra, dk_intra, table,
    H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, S: tl.constexpr, BK: tl.constexpr,
    DOT: tl.constexpr,
):  # fmt: skip
    """For sub-chunk i_s and a block of K: dq_i = sum_{j <= i} D_ij k_j exp(b_i - b_j) over rows i in i_s, and
    dk_j = sum_{i >= j} D_ij q_i exp(b_i - b_j) over rows j in i_s (exponents split at sub-chunk starts)."""
    i_k, i_cs, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_s, start, n, offs_s, m_i, rows_i = _sub_chunk(table, i_cs, C, S)
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
        dq += _dot(D_ij, k_j * tl.exp(b_ref[None, :] - b_j), DOT)
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
        dk += _dot(DT, q_j, DOT) * tl.exp(b_r[None, :] - b_i)
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
def _dqk_kernel(
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
        acc_q += _dot(tl.load(do + p_v, mask=m_cv, other=0.0), hT, DOT)
        if DELTA:
            u = tl.load(U + p_v, mask=m_cv, other=0.0)
            acc_xk += _dot(_dot(TmT, tl.load(dU + p_v, mask=m_cv, other=0.0), DOT), hT, DOT)
        else:
            u = tl.load(v + p_v, mask=m_cv, other=0.0)
        acc_kh += _dot(u, dHT, DOT)

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
        dq_c += _dot(tl.load(D + p_cc, mask=m_c[:, None], other=0.0), k_c, DOT)
        dk_c += _dot(tl.load(D + pT_cc, mask=m_c[None, :], other=0.0), q_c, DOT)
    if DELTA:
        beta_c = tl.load(beta + rows * H + i_h, mask=m_c, other=0.0).to(tl.float32)
        bg = beta_c[:, None] * tl.exp(b_q)  # beta * gamma, the row scale of X_k = diag(beta gamma) K
        Pk = _dot(tl.load(Pp + p_cc, mask=m_c[:, None], other=0.0), k_c, DOT)
        PTk = _dot(tl.load(Pp + pT_cc, mask=m_c[None, :], other=0.0) * beta_c[None, :], k_c, DOT)
        dk_c += -bg * acc_xk + beta_c[:, None] * Pk + PTk
        part = tl.sum(-tl.exp(b_q) * acc_xk * k_c + Pk * k_c, 1)
        tl.store(dbeta_k + i_k.to(tl.int64) * ROWS + rows * H + i_h, part, mask=m_c)
    if GATE == 1:
        tl.store(dgl + p_k, q_c.to(tl.float32) * dq_c - k_c.to(tl.float32) * dk_c, mask=m_ck)
    tl.store(dq + p_k, dq_c, mask=m_ck)
    tl.store(dk + p_k, dk_c, mask=m_ck)


def _chunk_table(cu_seqlens: torch.Tensor, T_total: int, C: int):
    """Device-side chunk table: (first token, end token) of every chunk, and each sequence's first chunk.

    The table has an upper bound of cdiv(T_total, C) + N rows (known without a sync); the spare rows are empty
    chunks (first token = end token = T_total) whose programs write nothing.
    """
    N = cu_seqlens.numel() - 1
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    chunk_offsets = torch.cat([cu.new_zeros(1), torch.cumsum((lengths + C - 1) // C, 0)])
    n_rows = triton.cdiv(T_total, C) + N
    gid = torch.arange(n_rows, device=cu.device)
    seq = torch.searchsorted(chunk_offsets[1:], gid, right=True).clamp(max=N - 1)
    starts = cu[seq] + (gid - chunk_offsets[seq]) * C
    valid = gid < chunk_offsets[-1]
    starts = torch.where(valid, starts, T_total)
    ends = torch.where(valid, torch.minimum(starts + C, cu[seq + 1]), T_total)
    return torch.stack([starts, ends], 1).to(torch.int32).contiguous(), chunk_offsets.to(torch.int32), n_rows


def _blocks(K: int, V: int) -> tuple[int, int, int]:
    """(BK for the full-K state tiles, BV, BKS for loops over K). BV is 32 at K > 128: the delta rules' sequential
    kernels hold all K rows of a BV-column block; with 16 their fewer spills in `dstate` do not make up for twice
    the programs, each reading the chunk's [64, K] tiles (docs/performance.md)."""
    BK = max(16, triton.next_power_of_2(K))
    BV = min(max(16, triton.next_power_of_2(V)), 64 if BK <= 128 else 32)
    return BK, BV, min(BK, 64)


def _state_pieces(delta: bool, BK: int, BKS: int) -> tuple[int, int]:
    """(KP rows per piece, NP pieces per program) of the state in the chunk-sequential kernels, which hold BV of
    its columns: all K rows, in pieces of BKS, for the delta rules (U = U' - W h needs every row); one piece of
    BKS rows for the others, whose rows evolve independently (more programs)."""
    return BKS, (BK // BKS if delta else 1)


def _launch(kernel: str, BK: int, dot: int) -> dict:
    """Launch options of one kernel.

    The chunk-sequential kernels (`state`, `dstate`; BK rows of the state): their [K, BV] state and [C, K] tiles
    are large at K >= 128, where a second pipeline stage does not fit in shared memory. `dprep` and `dqk` pipeline
    their loops over V in two stages. `gla_intra_blocks` runs in one stage (more stages leave room for only two
    programs per multiprocessor at K >= 128); `gla_intra_diag` with 2 warps at K > 128 (faster than 8).
    Triton 3.6 on Hopper miscompiles the bf16 dots (mode 2) of two kernels (docs/performance.md):
    `local` with 4 or 8 warps gives wrong outputs at K = 16 and 256 (every rule; right with 2 warps, as fla found for
    its chunk-64 kernels on Hopper, its PR #988), and the delta rules' `state` at K > 128 (the state in four
    pieces) gives wrong outputs with 8 or 16 warps, right with 4 (as `dstate`, which at BV = 32 hit an illegal
    memory access before the state was split in pieces)."""
    options = {}
    if kernel in ("state", "dstate"):  # 4 warps, not more: see the miscompile above
        options = {"num_warps": 4, "num_stages": 1} if BK >= 128 else {"num_stages": 2}
    elif kernel in ("dprep", "dqk"):
        options = {"num_stages": 2}
    elif kernel == "gla_intra_blocks":
        options = {"num_stages": 1}
    elif kernel == "gla_intra_diag" and BK > 128:
        options = {"num_warps": 2}
    if dot == 2 and kernel == "local":
        options["num_warps"] = 2
    return options


class ChunkFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rule, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
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
        table, chunk_offsets, NC = _chunk_table(cu, B * T, C)
        BK, BV, BKS = _blocks(K, V)
        dot = _dot_mode(q.dtype)
        f32 = {"device": dev, "dtype": torch.float32}
        rows = B * T * H

        bcum = None if gate == 0 else empty(*(g.shape), **f32)
        Aqk = empty(B, T, H, C, **f32)
        Tm = empty(B, T, H, C, **f32) if delta else None
        W = empty(B, T, H, K, **f32) if delta else None
        Up = empty(B, T, H, V, **f32) if delta else None
        U = empty(B, T, H, V, **f32) if delta else None
        h = empty(NC, H, K, V, **f32)
        ht = empty(N, H, K, V, **f32) if output_final_state else None
        o = empty(B, T, H, V, device=dev, dtype=v.dtype)
        common = {"H": H, "K": K, "C": C, "DOT": dot}
        if rows > 0:
            _local_kernel[(NC, H)](
                q, k, v, g, beta, bcum, Aqk, Tm, W, Up, table, scale,
                V=V, BK=BKS, BV=BV, GATE=gate, DELTA=delta, **(common | _launch("local", BKS, dot)),
            )  # fmt: skip
            if gate == 1:
                grid = (NC * (C // SUB), H)
                _gla_intra_blocks_kernel[grid](
                    q, k, bcum, Aqk, table, S=SUB, BK=BKS, **(common | _launch("gla_intra_blocks", BKS, dot))
                )
                _gla_intra_diag_kernel[grid](
                    q, k, bcum, Aqk, table, H=H, K=K, C=C, S=SUB, BK=BK, **_launch("gla_intra_diag", BK, dot)
                )
        KP, NP = _state_pieces(delta, BK, BKS)
        _state_kernel[(triton.cdiv(V, BV), N * H, triton.cdiv(K, KP * NP))](
            k, v, bcum, W, Up, U, h, initial_state, ht, cu, chunk_offsets,
            V=V, KP=KP, NP=NP, BV=BV, GATE=gate, DELTA=delta, HAS_H0=initial_state is not None,
            STORE_HT=output_final_state, **(common | _launch("state", KP * NP, dot)),
        )  # fmt: skip
        if rows > 0:
            _output_kernel[(triton.cdiv(V, BV), NC, H)](
                q, v, bcum, Aqk, U, h, o, table, scale, V=V, BK=BKS, BV=BV, GATE=gate, DELTA=delta,
                **(common | _launch("output", BKS, dot)),
            )  # fmt: skip
        ctx.save_for_backward(q, k, v, beta, initial_state, cu, table, chunk_offsets, bcum, Aqk, Tm, W, U, h, ht)
        ctx.meta = (gate, delta, scale, NC, cu_seqlens is not None, None if g is None else g.dtype)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, beta, h0, cu, table, chunk_offsets, bcum, Aqk, Tm, W, U, h, ht = ctx.saved_tensors
        gate, delta, scale, NC, varlen, g_dtype = ctx.meta
        B, T, H, K = q.shape
        V = v.shape[-1]
        N = cu.numel() - 1
        C = CHUNK
        BK, BV, BKS = _blocks(K, V)
        dot = _dot_mode(q.dtype)
        f32 = {"device": q.device, "dtype": torch.float32}
        rows = B * T * H
        do = do.contiguous()
        common = {"H": H, "K": K, "C": C, "DOT": dot}

        dH = empty(NC, H, K, V, **f32)
        # dU is dv itself for the rules without the delta rule: stored in v's dtype, as dv for the delta rules
        dU = empty(B, T, H, V, **f32) if delta else empty(B, T, H, V, device=q.device, dtype=v.dtype)
        dh0 = empty(N, H, K, V, **f32) if h0 is not None else None
        KP, NP = _state_pieces(delta, BK, BKS)
        _dstate_kernel[(triton.cdiv(V, BV), N * H, triton.cdiv(K, KP * NP))](
            q, k, bcum, Aqk, W, do, dU, dH, dht, dh0, cu, chunk_offsets, scale,
            V=V, KP=KP, NP=NP, BV=BV, GATE=gate, DELTA=delta, HAS_DHT=dht is not None, STORE_DH0=h0 is not None,
            **(common | _launch("dstate", KP * NP, dot)),
        )  # fmt: skip
        dv = empty(B, T, H, V, device=q.device, dtype=v.dtype) if delta else dU
        D = empty(B, T, H, C, **f32)
        Pp = empty(B, T, H, C, **f32) if delta else None
        dbeta_v = empty(B, T, H, **f32) if delta else None
        dgl = None  # the decays' per-token terms: per channel (written by `_dqk`) or per head (by `_dprep`)
        if gate:
            dgl = empty(B, T, H, K, **f32) if gate == 1 else empty(B, T, H, **f32)
        NK = triton.cdiv(K, BKS)
        dq = empty(B, T, H, K, device=q.device, dtype=q.dtype)
        dk = empty(B, T, H, K, device=q.device, dtype=k.dtype)
        dbeta_k = empty(NK, B, T, H, **f32) if delta else None
        dq_intra = dk_intra = None
        if rows > 0:
            _dprep_kernel[(NC, H)](
                q, k, v, beta, bcum, Aqk, Tm, U, h, dH, do, dU, dv, D, Pp, dbeta_v, dgl, table, scale,
                V=V, BK=BKS, BV=BV, GATE=gate, DELTA=delta, **(common | _launch("dprep", BKS, dot)),
            )  # fmt: skip
            if gate == 1:
                dq_intra, dk_intra = empty(B, T, H, K, **f32), empty(B, T, H, K, **f32)
                _gla_dintra_kernel[(NK, NC * (C // SUB), H)](
                    q, k, bcum, D, dq_intra, dk_intra, table, S=SUB, BK=BKS,
                    **(common | _launch("gla_dintra", BKS, dot)),
                )  # fmt: skip
            _dqk_kernel[(NK, NC, H)](
                q, k, v, beta, bcum, Tm, U, h, dH, do, dU, D, Pp, dq_intra, dk_intra, dq, dk, dbeta_k, dgl,
                table, scale, rows, V=V, BK=BKS, BV=BV, GATE=gate, DELTA=delta,
                **(common | _launch("dqk", BKS, dot)),
            )  # fmt: skip
        # the float32 work buffers go before the decays' gradient and dbeta allocate: the layer's peak memory
        del dH, dU, D, Pp, dq_intra, dk_intra
        dg = None if gate == 0 else decay_grad(dgl, dht, ht, cu if varlen else None, g_dtype)
        dbeta = (dbeta_v + dbeta_k.sum(0)).to(beta.dtype) if delta else None
        return (
            None, dq, dk, dv, dg, dbeta,
            None, None if h0 is None else dh0.to(h0.dtype), None, None,
        )  # fmt: skip


def chunk_op(
    rule, q, k, v, *, g=None, beta=None, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None
):
    """The op of `rule` (its name; the rest is `kernels`' op signature) through the chunked kernels."""
    d = check_inputs(rule, q, k, v, g, beta, scale, initial_state, cu_seqlens)
    check_triton_inputs(q)
    return ChunkFunction.apply(rule, q, k, v, g, beta, d.scale, initial_state, output_final_state, cu_seqlens)
