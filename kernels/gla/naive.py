"""Gated linear attention (GLA), plain PyTorch: S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, o_t = scale * S_t^T q_t.

g [B, T, H, K] are per-channel log decays (<= 0). `naive_chunk` is the chunked parallel form (the `torch`
backend); the token-by-token reference is `kernels.reference`. States are [N, H, K, V].
"""

import torch

from kernels._common import check_inputs, compute_dtype, pad_sequences

SUB = 16  # sub-chunk length of the intra-chunk product (see naive_chunk)


def _intra(q, k, v, b):
    """sum_{j <= i} (q_i * k_j * exp(b_i - b_j)).sum() v_j within each chunk, never exponentiating a positive number.

    b is the within-chunk cumulative log decay. Pairs inside one sub-chunk of SUB tokens are computed
    elementwise; pairs (i in sub-chunk I, j before I) factor through the decay at the start s_I of I:
    exp(b_i - b_j) = exp(b_i - b_{s_I}) * exp(b_{s_I} - b_j), both factors <= 1.
    """
    C, K = q.shape[-2:]
    c = min(SUB, C)
    S = C // c
    shape = q.shape[:-2]
    qs, ks, bs = (x.reshape(*shape, S, c, K) for x in (q, k, b))
    tril = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    diff = (bs[..., :, None, :] - bs[..., None, :, :]).masked_fill(~tril[:, :, None], float("-inf"))
    a_diag = torch.einsum("...ik,...jk,...ijk->...ij", qs, ks, diff.exp())  # [..., S, c, c]

    ref = bs[..., 0, :]  # decay at each sub-chunk's start [..., S, K]
    before = torch.arange(C, device=q.device)[None, :] < torch.arange(S, device=q.device)[:, None] * c  # [S, C]
    k_to_ref = (ref[..., :, None, :] - b[..., None, :, :]).masked_fill(~before[:, :, None], float("-inf"))
    k_to_ref = k[..., None, :, :] * k_to_ref.exp()  # [..., S, C, K]
    a = (qs * (bs - ref[..., None, :]).exp()) @ k_to_ref.transpose(-1, -2)  # [..., S, c, C]
    eye = torch.eye(S, dtype=q.dtype, device=q.device)
    a_diag = (a_diag[..., :, :, None, :] * eye[:, None, :, None]).reshape(*shape, C, C)  # block diagonal
    return (a.reshape(*shape, C, C) + a_diag) @ v


def naive_chunk(
    q,
    k,
    v,
    *,
    g=None,
    beta=None,
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    chunk_size=64,
):
    """With b the cumulative log decay inside a chunk (b_last at its end) and S_n the state entering it:

    o_i = scale * ((q_i * exp(b_i)) S_n + sum_{j <= i} (q_i * k_j * exp(b_i - b_j)).sum() v_j)
    S_{n+1} = diag(exp(b_last)) S_n + (k * exp(b_last - b))^T v
    """
    d = check_inputs("gla", q, k, v, g, beta, scale, initial_state, cu_seqlens)
    dt = compute_dtype(q)
    C = chunk_size
    if C % min(SUB, C):
        raise ValueError(f"chunk_size must be at most {SUB} or a multiple of {SUB}, got {C}")
    (q, k, v, g), unpad = pad_sequences([q, k, v, g], cu_seqlens, d.B, d.T, C)
    N, T = q.shape[:2]
    out_dtype = v.dtype  # o like v (the computation runs in dt)
    q, k, v, g = (x.to(dt).transpose(1, 2).reshape(N, d.H, T // C, C, -1) for x in (q, k, v, g))
    b = g.cumsum(-2)
    b_last = b[..., -1, :]  # [N, H, chunks, K]

    writes = (k * (b_last[..., None, :] - b).exp()).transpose(-1, -2) @ v  # [N, H, chunks, K, V]
    S = q.new_zeros(N, d.H, d.K, d.V) if initial_state is None else initial_state.to(dt)
    states = []
    for n in range(T // C):
        states.append(S)
        S = b_last[:, :, n, :, None].exp() * S + writes[:, :, n]
    o = d.scale * ((q * b.exp()) @ torch.stack(states, 2) + _intra(q, k, v, b))
    o = unpad(o.reshape(N, d.H, T, d.V).transpose(1, 2)).to(out_dtype)
    return o, (S if output_final_state else None)
