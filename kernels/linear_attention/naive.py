"""Linear attention, plain PyTorch: S_t = S_{t-1} + k_t v_t^T, o_t = scale * S_t^T q_t.

`naive_chunk` is the chunked form shared with simple GLA (the case g = 0; the `torch` backend); the
token-by-token reference is `kernels.reference`. Shapes: q, k [B, T, H, K]; v [B, T, H, V]; states [N, H, K, V].
"""

from kernels.simple_gla.naive import decay_chunk


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
    return decay_chunk("linear_attention", q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                       chunk_size)  # fmt: skip
