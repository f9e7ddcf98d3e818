"""Linear attention: a memory that only adds.

    S_t = S_{t-1} + k_t v_t^T,        o_t = K^{-1/2} S_t^T q_t,        S in R^{K x V} per head

Feature map: q and k are L2-normalised per head (after the short conv and SiLU), so every write has norm
||v_t|| and the state grows at most linearly; there is no denominator: the gated per-head RMSNorm of the
output (shared with the other memories, `models/memory.py`) plays the normaliser's role.

Shapes: x [B, T, d_model] -> [B, T, d_model]; H = num_heads, K = head_dim (default d_model / H),
V = K * expand_v. `state_size` = H * K * V values per sequence. Parallel form: `kernels.linear_attention`.
"""

from models.memory import MemoryMixer


class LinearAttention(MemoryMixer):
    rule = "linear_attention"
