"""Simple GLA: linear attention with a data-dependent forgetting of the whole state, one decay per head (the
Mamba-2 / RetNet form; fla's simple_gla).

    S_t = a_t S_{t-1} + k_t v_t^T,        o_t = K^{-1/2} S_t^T q_t
    a_t = exp(g_t),   g_t = -exp(A_log) * softplus(W_a x_t + dt_bias)

one a_t per head; q and k L2-normalised per head (after the short conv and SiLU). A_log and dt_bias (per head)
are the decay constants, shared by all memory slots; W_a is per slot. Initialisation as in Mamba-2:
exp(A_log) ~ U(1, 16), softplus(dt_bias) log-uniform in [1e-3, 1e-1].

Shapes: x [B, T, d_model] -> [B, T, d_model]; H = num_heads, K = head_dim (default d_model / H),
V = K * expand_v; g [B, T, H]. `state_size` = H * K * V values per sequence. Parallel form: `kernels.simple_gla`.
"""

from torch import nn

from models.memory import MemoryMixer


class SimpleGLA(MemoryMixer):
    rule = "simple_gla"
    slot_gates = ("a_proj",)

    def build_gates(self):
        self.a_proj = nn.Linear(self.d_model, self.num_slots * self.num_heads, bias=False)
        self.build_head_decay()

    def activate_gates(self, a):
        return self.head_decay(a), None
