"""Softmax attention, causal and multi-head: the exact-recall baseline.

    o_t = sum_{s <= t} softmax_s(q_t . k_s / sqrt(K)) v_s,      y_t = W_o [o_t^1; ...; o_t^H]

per head, with q, k, v = W_q x, W_k x, W_v x (no bias). With `rope` (the default) q and k are rotated by
their position (rotary embedding, base 10000), so q_t . k_s depends on t - s: "attend to the token after
the matching key", the induction pattern recall needs, is then easy to learn; without it, order comes only
from the backbone's learned positions, if any. With `conv_size` > 0 (default 4), q, k and v first pass
through the same short causal convolution (with SiLU) as the linear mixers' inputs, so that attention and
the memories compare on the same token mixing; `conv_size=0` is plain attention. With `qk_norm` (the default)
q and k pass through a per-head RMSNorm first, so that the scores depend on their directions (as the linear
mixers' L2-normalised q and k do): with tied embeddings, attention without it stayed at chance on MQAR at
L = 256 and 512 (docs/results/fidelity/).
The recurrent form keeps the KV cache (and the conv's last inputs): `init_state` is an empty cache,
`step` appends the token's key and value and attends over the cache (O(t) per token).

Shapes: x [B, T, d_model] -> [B, T, d_model]; H = num_heads, K = head_dim (default d_model / H).
`state_size(L)` = 2 * H * K * L values (keys and values of L tokens; 2 * d_model * L by default).
`backend` is validated and recorded for a uniform interface; the op is torch's scaled_dot_product_attention
(which picks its own fused kernel on CUDA), not a `kernels` op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.runs import fold_runs
from models.common import ShortConv, check_backend, check_flag, check_input, check_int, head_layout


class Attention(nn.Module):
    def __init__(
        self,
        d_model: int,
        *,
        num_heads: int = 1,
        head_dim: int | None = None,
        rope: bool = True,
        conv_size: int = 4,
        qk_norm: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        K = head_layout(d_model, num_heads, head_dim)
        check_backend(backend)
        check_flag("rope", rope)
        if rope and K % 2:
            raise ValueError(f"rope=True needs an even head_dim, got head_dim={K}; set rope=false or change it")
        check_int("conv_size", conv_size, low=0)
        check_flag("qk_norm", qk_norm)
        self.rope, self.conv_size = rope, conv_size
        self.d_model, self.num_heads, self.head_dim, self.backend = d_model, num_heads, K, backend
        self.qkv_proj = nn.Linear(d_model, 3 * num_heads * K, bias=False)
        self.o_proj = nn.Linear(num_heads * K, d_model, bias=False)
        self.qkv_conv = ShortConv(3 * num_heads * K, conv_size)
        # Per-head RMSNorm of q and k: the score depends on their directions, as in the linear mixers (which
        # L2-normalise q and k), not on the scale of the token embeddings that the output loss moves.
        self.q_norm = nn.RMSNorm(K, eps=1e-5) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(K, eps=1e-5) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.d_model)
        B, T, _ = x.shape
        qkv = self.qkv_conv(self.qkv_proj(x))
        q, k, v = qkv.view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            positions = torch.arange(T, device=x.device)
            q, k = rotate(q, positions), rotate(k, positions)
        # stacked runs (vmap): one fused kernel for all of them, which torch's vmap would run once per run
        (o,) = fold_runs(lambda q, k, v: (F.scaled_dot_product_attention(q, k, v, is_causal=True),), q, k, v)
        return self.o_proj(o.transpose(1, 2).flatten(2))

    def init_state(self, batch_size: int) -> dict[str, torch.Tensor]:
        check_int("batch_size", batch_size)
        p = self.qkv_proj.weight
        empty = torch.zeros(batch_size, self.num_heads, 0, self.head_dim, device=p.device, dtype=p.dtype)
        conv = self.qkv_conv.init_state(batch_size, device=p.device, dtype=p.dtype)
        return {"k": empty, "v": empty, "conv": conv}

    def step(self, x: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """x [B, d_model] -> (y [B, d_model], cache with this token appended)."""
        check_input(x, self.d_model, step=True, batch=state["k"].shape[0])
        B = x.shape[0]
        qkv, conv = self.qkv_conv.step(self.qkv_proj(x), state["conv"])
        q, k, v = qkv.view(B, 3, self.num_heads, 1, self.head_dim).unbind(1)  # [B, H, 1, K]
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            position = torch.tensor([state["k"].shape[2]], device=x.device)
            q, k = rotate(q, position), rotate(k, position)
        k, v = torch.cat([state["k"], k], 2), torch.cat([state["v"], v], 2)
        o = F.scaled_dot_product_attention(q, k, v)  # the newest token sees the whole cache
        return self.o_proj(o.flatten(1)), {"k": k, "v": v, "conv": conv}

    def state_size(self, seq_len: int) -> int:
        return 2 * self.num_heads * self.head_dim * seq_len


def rotate(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding of x [..., T, K] at integer positions [T]: channel pairs (i, i + K/2)
    are rotated by the angle position * base^(-2i/K)."""
    half = x.shape[-1] // 2
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.to(torch.float32)[:, None] * inv_freq  # [T, K/2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
