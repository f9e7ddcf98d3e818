"""DeltaNet, plain PyTorch: S_t = (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T, o_t = scale * S_t^T q_t.

beta [B, T, H] are the write strengths. `naive_chunk` is the chunked WY/UT form shared with gated DeltaNet (the
case g = 0); the token-by-token reference is `kernels.reference`. States are [N, H, K, V].
"""

from kernels.gated_deltanet.naive import delta_chunk


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
