"""DeltaNet, plain PyTorch: S_t = (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T, o_t = scale * S_t^T q_t.

beta [B, T, H] are the write strengths. `naive_recurrent` is the recurrence token by token (the reference);
`naive_chunk` is the chunked WY/UT form shared with gated DeltaNet (the case g = 0). States are [N, H, K, V].
"""

import torch

from kernels._common import assemble, check_inputs, compute_dtype, sequence_bounds
from kernels.gated_deltanet.naive import delta_chunk


def naive_recurrent(
    q, k, v, *, g=None, beta=None, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None
):
    d = check_inputs("deltanet", q, k, v, g, beta, scale, initial_state, cu_seqlens)
    dt = compute_dtype(q)
    outs, finals = [], []
    for n, (b, start, end) in enumerate(sequence_bounds(cu_seqlens, d.B, d.T)):
        S = q.new_zeros(d.H, d.K, d.V, dtype=dt) if initial_state is None else initial_state[n].to(dt)
        seq = []
        for t in range(start, end):
            qt, kt, vt, bt = (x[b, t].to(dt) for x in (q, k, v, beta))  # [H, K], [H, K], [H, V], [H]
            v_old = torch.einsum("hk,hkv->hv", kt, S)  # what the memory currently returns for k_t
            S = S + bt[:, None, None] * kt[:, :, None] * (vt - v_old)[:, None, :]
            seq.append(d.scale * torch.einsum("hk,hkv->hv", qt, S))
        outs.append(torch.stack(seq) if seq else q.new_zeros(0, d.H, d.V, dtype=dt))
        finals.append(S)
    return assemble(outs, finals, cu_seqlens, v.dtype, output_final_state)


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
    return delta_chunk("deltanet", q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_size)
