"""Gated DeltaNet, plain PyTorch: S_t = exp(g_t) (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T, o_t = scale * S_t^T q_t.

g [B, T, H] are per-head log decays (<= 0), beta [B, T, H] the write strengths. `naive_chunk` is the chunked
parallel form in the WY/UT representation (the `torch` backend, shared with DeltaNet, which is the case g = 0);
the token-by-token reference is `kernels.reference`. States are [N, H, K, V].
"""

import torch

from kernels._common import check_inputs, compute_dtype, pad_sequences


def delta_chunk(rule, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_size):
    """The delta rule in chunks; g (per head) may be None (DeltaNet).

    Write S_t = a_t S_{t-1} + k_t u_t^T with the "new values" u_t = b_t (v_t - a_t S_{t-1}^T k_t). Inside a
    chunk entered with state S_n, with b the cumulative log decay and G_ij = exp(b_i - b_j) (j <= i):
      (I + L) U = diag(beta) V - diag(beta * exp(b)) K S_n,  L_ij = beta_i G_ij k_i.k_j for j < i,
    so U = U' - W S_n with U' = T diag(beta) V, W = T diag(beta exp(b)) K, T = (I + L)^-1 (the UT transform);
      O = scale * (diag(exp(b)) Q S_n + (Q K^T * G * causal) U)
      S_{n+1} = exp(b_last) S_n + (K * exp(b_last - b))^T U
    """
    d = check_inputs(rule, q, k, v, g, beta, scale, initial_state, cu_seqlens)
    dt = compute_dtype(q)
    C = chunk_size
    if g is None:
        g = beta.new_zeros(beta.shape)
    (q, k, v, g, beta), unpad = pad_sequences([q, k, v, g, beta], cu_seqlens, d.B, d.T, C)
    N, T = q.shape[:2]
    out_dtype = v.dtype  # o like v (the computation runs in dt)
    q, k, v = (x.to(dt).transpose(1, 2).reshape(N, d.H, T // C, C, -1) for x in (q, k, v))
    g, beta = (x.to(dt).transpose(1, 2).reshape(N, d.H, T // C, C) for x in (g, beta))
    b = g.cumsum(-1)
    b_last = b[..., -1]  # [N, H, chunks]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    G = (b[..., :, None] - b[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # [N, H, chunks, C, C]

    L = (beta[..., None] * G * (k @ k.transpose(-1, -2))).tril(-1)
    eye = torch.eye(C, dtype=dt, device=q.device)
    rhs = torch.cat([beta[..., None] * v, (beta * b.exp())[..., None] * k], -1)
    u_w = torch.linalg.solve_triangular(eye + L, rhs, upper=False, unitriangular=True)
    u_part, w = u_w[..., : d.V], u_w[..., d.V :]
    qk = (q @ k.transpose(-1, -2)) * G  # G is already zero above the diagonal
    q_dec = q * b.exp()[..., None]
    k_dec = (k * (b_last[..., None] - b).exp()[..., None]).transpose(-1, -2)

    S = q.new_zeros(N, d.H, d.K, d.V) if initial_state is None else initial_state.to(dt)
    o = []
    for n in range(T // C):
        u = u_part[:, :, n] - w[:, :, n] @ S
        o.append(q_dec[:, :, n] @ S + qk[:, :, n] @ u)
        S = b_last[:, :, n, None, None].exp() * S + k_dec[:, :, n] @ u
    o = d.scale * torch.stack(o, 2)
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
    return delta_chunk(
        "gated_deltanet", q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_size
    )
