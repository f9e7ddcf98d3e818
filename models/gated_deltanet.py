"""Gated DeltaNet (Yang et al. 2024): the delta rule with a data-dependent forgetting of the whole state.

    S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T,        o_t = K^{-1/2} S_t^T q_t
    a_t = exp(g_t),   g_t = -exp(A_log) * softplus(W_a x_t + dt_bias),   b_t = sigmoid(W_b x_t)

one a_t and b_t per head (b_t = 2 sigmoid(W_b x_t) in (0, 2) with `allow_neg_eigval`); q and k L2-normalised
per head (after the short conv and SiLU). A_log and dt_bias (per head) are the decay constants, shared by all
memory slots; W_a and W_b are per slot. Initialisation as in Mamba-2: exp(A_log) ~ U(1, 16), softplus(dt_bias)
log-uniform in [1e-3, 1e-1].

Shapes: x [B, T, d_model] -> [B, T, d_model]; H = num_heads, K = head_dim (default d_model / H),
V = K * expand_v; g, beta [B, T, H]. `state_size` = H * K * V values per sequence.
Parallel form: `kernels.gated_deltanet`. This is MoM's default memory rule.
"""

from torch import nn

from models.memory import MemoryMixer


class GatedDeltaNet(MemoryMixer):
    rule = "gated_deltanet"
    slot_gates = ("a_proj", "b_proj")

    def build_gates(self):
        n, H = self.num_slots, self.num_heads
        self.a_proj = nn.Linear(self.d_model, n * H, bias=False)
        self.b_proj = nn.Linear(self.d_model, n * H, bias=False)
        self.build_head_decay()

    def activate_gates(self, a, b):
        return self.head_decay(a), self.write_strength(b)
