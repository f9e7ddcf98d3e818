"""DeltaNet (Schlag et al. 2021; Yang et al. 2024): the delta rule, which overwrites what a key stored.

    S_t = (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T  =  S_{t-1} + b_t k_t (v_t - S_{t-1}^T k_t)^T
    o_t = K^{-1/2} S_t^T q_t,        b_t = sigmoid(W_b x_t)  (one write strength per head)

q and k are L2-normalised per head (after the short conv and SiLU), which keeps I - b k k^T a contraction.
With `allow_neg_eigval`, b_t = 2 sigmoid(W_b x_t) in (0, 2): I - b k k^T may flip the sign along k.

Shapes: x [B, T, d_model] -> [B, T, d_model]; H = num_heads, K = head_dim (default d_model / H),
V = K * expand_v; beta [B, T, H]. `state_size` = H * K * V values per sequence.
Parallel form: `kernels.deltanet`.
"""

from torch import nn

from models.memory import MemoryMixer


class DeltaNet(MemoryMixer):
    rule = "deltanet"
    slot_gates = ("b_proj",)

    def build_gates(self):
        self.b_proj = nn.Linear(self.d_model, self.num_slots * self.num_heads, bias=False)

    def activate_gates(self, b):
        return None, self.write_strength(b)
