"""Linear attention, plain PyTorch: S_t = S_{t-1} + k_t v_t^T, o_t = scale * S_t^T q_t.

`naive_chunk` is the chunked parallel form (the `torch` backend); the token-by-token reference is
`kernels.reference`. Shapes: q, k [B, T, H, K]; v [B, T, H, V]; states [N, H, K, V].
"""

import torch

from kernels._common import check_inputs, compute_dtype, pad_sequences


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
    """Within a chunk: o = scale * (q S_0 + tril(q k^T) v); across chunks: S_{n+1} = S_n + k_n^T v_n."""
    d = check_inputs("linear_attention", q, k, v, g, beta, scale, initial_state, cu_seqlens)
    dt = compute_dtype(q)
    C = chunk_size
    (q, k, v), unpad = pad_sequences([q, k, v], cu_seqlens, d.B, d.T, C)
    N, T = q.shape[:2]
    # [N, T, H, D] -> [N, H, chunks, C, D]
    out_dtype = v.dtype  # o like v (the computation runs in dt)
    q, k, v = (x.to(dt).transpose(1, 2).reshape(N, d.H, T // C, C, -1) for x in (q, k, v))
    S0 = q.new_zeros(N, d.H, d.K, d.V) if initial_state is None else initial_state.to(dt)

    kv = k.transpose(-1, -2) @ v  # each chunk's write [N, H, chunks, K, V]
    states = S0[:, :, None] + kv.cumsum(2) - kv  # the state entering each chunk
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    o = d.scale * (q @ states + ((q @ k.transpose(-1, -2)) * causal) @ v)
    o = unpad(o.reshape(N, d.H, T, d.V).transpose(1, 2)).to(out_dtype)
    return o, (S0 + kv.sum(2) if output_final_state else None)
