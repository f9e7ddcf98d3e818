"""Gated linear attention (GLA, Yang et al. 2023): a per-channel, data-dependent forgetting of the keys.

    S_t = diag(a_t) S_{t-1} + k_t v_t^T,      a_t = exp(g_t),      g_t = logsigmoid(W_a x_t) / 16  in R^K
    o_t = K^{-1/2} S_t^T q_t

As in GLA, q and k have no feature map (identity, after the short conv and SiLU) and the log decays are
divided by a normaliser (16) so that the decays start close to 1. W_a (d_model -> H * K) is a full-rank
decay-input projection, one per memory slot.

Shapes: x [B, T, d_model] -> [B, T, d_model]; H = num_heads, K = head_dim (default d_model / H),
V = K * expand_v; g [B, T, H, K]. `state_size` = H * K * V values per sequence. Parallel form: `kernels.gla`.
"""

import torch.nn.functional as F
from torch import nn

from models.common import compute_dtype
from models.memory import MemoryMixer


class GLA(MemoryMixer):
    rule = "gla"
    slot_gates = ("a_proj",)
    gate_normaliser = 16.0

    def build_gates(self):
        self.a_proj = nn.Linear(self.d_model, self.num_slots * self.num_heads * self.key_dim, bias=False)

    def activate_gates(self, a):
        g = F.logsigmoid(a.to(compute_dtype(a))) / self.gate_normaliser
        return g.view(*a.shape[:-1], self.num_heads, self.key_dim), None

    def features(self, q, k, fused):
        return q, k
