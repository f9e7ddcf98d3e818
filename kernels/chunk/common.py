"""What every stage of the chunked kernels shares: the chunk sizes, the matrix product `dot` at the precision of
the inputs' dot mode, the reads of a chunk's rows, and the state held as separate tiles of rows ("pieces") by
the two chunk-sequential kernels (forward `state_kernel`, backward `dstate_kernel`).
"""

from __future__ import annotations

import triton
import triton.language as tl

CHUNK = 64  # tokens per chunk
SUB = 16  # GLA's sub-chunk: its intra-chunk products are taken in blocks of SUB tokens

# --- products ------------------------------------------------------------------------------------------------


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
def dot(a, b, DOT: tl.constexpr):
    """a @ b in float32; pass bf16 inputs as loaded, unconverted, for the one-dot case. DOT (per input dtype in
    `launch.DOT_MODES`, on backend triton_bf16 `launch.BF16_DOT_MODES`): 0 float32 dots; 1 tf32x3 (float32
    accuracy on tensor cores); 2 bf16 tensor-core dots accumulating in float32, a float32 operand split as hi + lo
    in bf16 (16 bits of mantissa, error about 2^-17 of it): one dot for two bf16 operands, 2 for one float32
    operand, 3 for two; 3 as 2 with each bf16 dot on the operands converted to float32 (exact, as on the GPU; the
    interpreter's dot multiplies bf16's raw bits); 4 both operands rounded to bf16, one dot (backend
    triton_bf16); 5 as 4 under the interpreter."""
    if DOT >= 4:
        out = _mma(a.to(tl.bfloat16), b.to(tl.bfloat16), None, DOT - 2)
    elif DOT >= 2:
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


# --- a chunk's rows ------------------------------------------------------------------------------------------


@triton.jit
def decay_rows(bcum, start, n, i_h, offs_c, H: tl.constexpr):
    """Per-head gates: b over the chunk's rows (0 past the end) and b at its last row."""
    m_c = offs_c < n
    b = tl.load(bcum + (start + offs_c) * H + i_h, mask=m_c, other=0.0)
    b_last = tl.load(bcum + (start + n - 1) * H + i_h)
    return b, b_last


@triton.jit
def rows_times_state(
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
        acc += dot(x_c, s_c, DOT)
    return acc


@triton.jit
def sub_chunk(table, i_cs, C: tl.constexpr, S: tl.constexpr):
    """Sub-chunk i_cs of the chunk table (C // S per chunk): its index i_s in its chunk, the chunk's first token
    and length n, and its S rows (offsets, mask of the real ones, token indices)."""
    i_c, i_s = i_cs // (C // S), i_cs % (C // S)
    start = tl.load(table + 2 * i_c).to(tl.int64)
    n = (tl.load(table + 2 * i_c + 1) - start).to(tl.int32)
    offs_s = tl.arange(0, S)
    return i_s, start, n, offs_s, i_s * S + offs_s < n, start + i_s * S + offs_s


# --- the state as pieces of KP rows (the chunk-sequential kernels) -------------------------------------------


@triton.jit
def pieces_load(states, i_nh, k0, i_v, K: tl.constexpr, V: tl.constexpr, KP: tl.constexpr, BV: tl.constexpr,
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
def pieces_store(base, k0, i_v, pieces, K: tl.constexpr, V: tl.constexpr, KP: tl.constexpr,
                  BV: tl.constexpr, NP: tl.constexpr):  # fmt: skip
    offs_v = i_v * BV + tl.arange(0, BV)
    for j in tl.static_range(NP):
        offs_k = k0 + j * KP + tl.arange(0, KP)
        mask = (offs_k[:, None] < K) & (offs_v[None, :] < V)
        tl.store(base + offs_k[:, None] * V + offs_v[None, :], pieces[j], mask=mask)


@triton.jit
def piece_rows(rows, m_c, i_h, k0, j, H: tl.constexpr, K: tl.constexpr, KP: tl.constexpr):
    """Piece j's rows of the state (offsets, mask) and, for a [T, H, K] tensor read transposed ([KP, C]), the
    offsets and mask of the chunk's tokens in those rows."""
    offs_k = k0 + j * KP + tl.arange(0, KP)
    mk = offs_k < K
    return offs_k, mk, (rows[None, :] * H + i_h) * K + offs_k[:, None], mk[:, None] & m_c[None, :]


@triton.jit
def rows_times_pieces(x, rows, m_c, i_h, k0, pieces, H: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                       NP: tl.constexpr, DOT: tl.constexpr):  # fmt: skip
    """X S for the chunk's rows of x ([T, H, K]) and the state S given as NP pieces of KP rows."""
    for j in tl.static_range(NP):
        offs_k = k0 + j * KP + tl.arange(0, KP)
        x_c = tl.load(x + (rows[:, None] * H + i_h) * K + offs_k[None, :], mask=m_c[:, None] & (offs_k[None, :] < K),
                      other=0.0)  # fmt: skip
        if j == 0:
            acc = dot(x_c, pieces[j], DOT)
        else:
            acc += dot(x_c, pieces[j], DOT)
    return acc
