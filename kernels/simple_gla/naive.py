"""Simple GLA, plain PyTorch: S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = scale * S_t^T q_t.

g [B, T, H] are per-head log decays (<= 0). `naive_chunk` is the chunked parallel form (the `torch` backend,
shared with linear attention, which is the case g = 0); the token-by-token reference is `kernels.reference`.
States are [N, H, K, V].
"""

import torch

from kernels._common import check_inputs, compute_dtype, pad_sequences


def decay_chunk(rule, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_size):
    """A per-head decay in chunks; g may be None (linear attention). With b the cumulative log decay inside a
    chunk (b_last at its end), G_ij = exp(b_i - b_j) for j <= i and S_n the state entering the chunk:

    O = scale * (diag(exp(b)) Q S_n + (Q K^T * G) V),    S_{n+1} = exp(b_last) S_n + (K * exp(b_last - b))^T V
    """
    d = check_inputs(rule, q, k, v, g, beta, scale, initial_state, cu_seqlens)
    dt = compute_dtype(q)
    C = chunk_size
    if g is None:
        g = q.new_zeros(q.shape[:3], dtype=dt)
    (q, k, v, g), unpad = pad_sequences([q, k, v, g], cu_seqlens, d.B, d.T, C)
    N, T = q.shape[:2]
    out_dtype = v.dtype  # o like v (the computation runs in dt)
    q, k, v = (x.to(dt).transpose(1, 2).reshape(N, d.H, T // C, C, -1) for x in (q, k, v))
    b = g.to(dt).transpose(1, 2).reshape(N, d.H, T // C, C).cumsum(-1)
    b_last = b[..., -1]  # [N, H, chunks]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    G = (b[..., :, None] - b[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # [N, H, chunks, C, C]

    writes = (k * (b_last[..., None] - b).exp()[..., None]).transpose(-1, -2) @ v  # [N, H, chunks, K, V]
    S = q.new_zeros(N, d.H, d.K, d.V) if initial_state is None else initial_state.to(dt)
    states = []
    for n in range(T // C):
        states.append(S)
        S = b_last[:, :, n, None, None].exp() * S + writes[:, :, n]
    o = d.scale * ((q * b.exp()[..., None]) @ torch.stack(states, 2) + ((q @ k.transpose(-1, -2)) * G) @ v)
    o = unpad(o.reshape(N, d.H, T, d.V).transpose(1, 2)).to(out_dtype)
    return o, (S if output_final_state else None)


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
    return decay_chunk("simple_gla", q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                       chunk_size)  # fmt: skip
