"""The decays' gradient of the Triton ops: a reverse cumulative sum over each sequence, in one Triton kernel.

dg_t = sum over s >= t in t's sequence of local_s, plus <dht, S_T> of the sequence (per channel for g of
[B, T, H, K], summed over K for per-head gates [B, T, H]). This holds because dg_t = <dS'_t, S'_t> (S'_t the
decayed state before token t's write) and <dS'_t, S'_t> - <dS'_{t+1}, S'_{t+1}> depends on token t alone (the
`local` terms the callers pass).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import empty


@triton.jit
def _suffix_sum_kernel(
    local, end, dg, cu,
    H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, HAS_END: tl.constexpr,
):  # fmt: skip
    """For head i_h of sequence i_n and channels block i_d: the sequence's tokens from its end backwards, BT at a
    time, each block's suffix sums plus the float32 sum of everything after the block (and `end`)."""
    i_nh, i_d = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    offs_d = i_d * BD + tl.arange(0, BD)
    m_d = offs_d < D
    offs_t = tl.arange(0, BT)
    if HAS_END:
        after = tl.load(end + i_nh * D + offs_d, mask=m_d, other=0.0)
    else:
        after = tl.zeros([BD], dtype=tl.float32)
    for i in range(tl.cdiv(eos - bos, BT)):
        rows = eos - (i + 1) * BT + offs_t
        m = (rows >= bos)[:, None] & m_d[None, :]
        p = (rows[:, None] * H + i_h) * D + offs_d[None, :]
        x = tl.load(local + p, mask=m, other=0.0)
        total = tl.sum(x, 0)
        tl.store(dg + p, (after + total)[None, :] - tl.cumsum(x, 0) + x, mask=m)
        after += total


def decay_grad(local: torch.Tensor, dht, ht, cu_seqlens, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """dg (of `dtype`, summed in float32; shaped like `local`: [B, T, H, K] or [B, T, H]) from the per-token terms
    `local`, the final states' gradient dht and the final states ht ([N, H, K, V], or None)."""
    B, T, H = local.shape[:3]
    D = local.shape[3] if local.dim() == 4 else 1
    cu = cu_seqlens if cu_seqlens is not None else torch.arange(B + 1, device=local.device, dtype=torch.int32) * T
    end = None
    if dht is not None:
        end = (dht.float() * ht.float()).sum(-1)  # [N, H, K]
        end = (end if local.dim() == 4 else end.sum(-1)).contiguous()  # [N, H] for per-head gates
    local = local.float().contiguous()
    dg = empty(*local.shape, device=local.device, dtype=dtype)
    # 32 channels and 128 tokens a step: the fastest of the tiles timed on an H200
    BD = min(32, max(16, triton.next_power_of_2(D)))
    _suffix_sum_kernel[((cu.numel() - 1) * H, triton.cdiv(D, BD))](
        local, end, dg, cu, H=H, D=D, BT=128, BD=BD, HAS_END=end is not None
    )
    return dg
