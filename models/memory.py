"""What the linear-memory mixers share (one per rule of `kernels.rules`: linear attention, GLA, ..., gated DeltaNet).

A memory is a matrix state S in R^{K x V} per head, written once per token and read with the query:

    S_t = update(S_{t-1}; k_t, v_t, g_t, b_t)          (the rule, declared in `kernels.rules`)
    o_t = K^{-1/2} S_t^T q_t                              (read after the write)
    y_t = W_o [ rmsnorm(o_t) * silu(W_gate x_t) ]        (per-head RMSNorm gated by the input, then projected)

with q_t, k_t, v_t = silu(short causal conv(W_q x, W_k x, W_v x)) and the rule's feature map on q, k.

The class holds `num_slots` memories side by side so that MoM can drive it (`models/mom.py`): every slot has
its own key, value and gate (beta, decay-input) projections; the query projection, the short-conv weights,
the decay constants, the output gate, norm and projection are shared. It exposes its pieces (the projections,
the feature map and gates, the rule's parallel op `core`, the read-out) and knows
nothing of routing: the executors of `models/routing.py` combine them, over every token (`forward`, `step`:
every slot sees every token, with weight 1) or under a MoM routing.

`allow_neg_eigval` (the delta rules only) lets the write strength beta reach (0, 2) (`write_strength`).

Shapes: x [B, T, d_model]; H heads, K = head_dim, V = head_dim * expand_v. State per sequence:
num_slots * H * K * V values (what `state_size` counts; the conv buffers, (conv_size - 1) * (2K + V) * H per
slot, are not counted, as in the paper).

A subclass sets `rule` (a name declared in `kernels.rules`, whose one-token update `step` uses), builds its
gate parameters in `build_gates` (the per-slot projections named in `slot_gates`), computes them from those
projections in `activate_gates` and may change the feature map in `features` (default: L2 normalisation of q
and k per head). The parallel form calls the rule's op in `kernels` on the backend resolved once per forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels import norms_torch
from models import routing
from models.common import (
    GatedRMSNorm,
    ShortConv,
    check_backend,
    check_flag,
    check_input,
    check_int,
    compute_dtype,
    head_layout,
    value_dim,
)


class MemoryMixer(nn.Module):
    rule: str = ""

    def __init__(
        self,
        d_model: int,
        *,
        num_heads: int = 1,
        head_dim: int | None = None,
        expand_v: float = 1.0,
        conv_size: int = 4,
        allow_neg_eigval: bool = False,
        backend: str = "auto",
        num_slots: int = 1,
    ):
        super().__init__()
        K = head_layout(d_model, num_heads, head_dim)
        V = value_dim(K, expand_v)
        check_int("conv_size", conv_size, low=0)  # 0: no short conv
        check_flag("allow_neg_eigval", allow_neg_eigval)
        if allow_neg_eigval and not kernels.get_rule(self.rule).delta:
            delta_rules = tuple(name for name, r in kernels.RULES.items() if r.delta)
            raise ValueError(f"allow_neg_eigval=True is not valid for rule {self.rule!r}: it doubles the write "
                             f"strength beta of the delta rules {delta_rules}")  # fmt: skip
        check_backend(backend)
        check_int("num_slots", num_slots)
        self.d_model, self.num_heads, self.key_dim, self.value_dim = d_model, num_heads, K, V
        self.conv_size, self.backend, self.num_slots = conv_size, backend, num_slots
        self.allow_neg_eigval = allow_neg_eigval
        self.scale = K**-0.5
        H, n = num_heads, num_slots

        self.q_proj = nn.Linear(d_model, H * K, bias=False)  # shared by all slots
        self.k_proj = nn.Linear(d_model, n * H * K, bias=False)  # one block of H * K per slot
        self.v_proj = nn.Linear(d_model, n * H * V, bias=False)
        self.q_conv = ShortConv(H * K, conv_size)  # conv weights shared by all slots
        self.k_conv = ShortConv(H * K, conv_size)
        self.v_conv = ShortConv(H * V, conv_size)
        self.build_gates()
        self.gate_proj = nn.Linear(d_model, H * V, bias=False)
        self.o_norm = GatedRMSNorm(V)
        self.o_proj = nn.Linear(H * V, d_model, bias=False)

    # --- the rule-specific parts (subclasses) --------------------------------------------------------------

    slot_gates: tuple[str, ...] = ()  # the per-slot gate projections (nn.Linear attributes), in `activate_gates` order

    def build_gates(self) -> None:
        """Create the rule's per-slot gate projections and shared constants (none by default)."""

    def activate_gates(self, *pre: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The gate projections' outputs for one slot each ([..., width] per name in `slot_gates`) -> (g, beta):
        log decays [..., H] or [..., H, K], strengths [..., H] (None where the rule has none)."""
        return None, None

    def write_strength(self, b: torch.Tensor) -> torch.Tensor:
        """The delta rules' beta from its projection: sigmoid(b) in (0, 1), or with `allow_neg_eigval` 2 sigmoid(b)
        in (0, 2), where the erase factor I - beta k k^T has the eigenvalue 1 - beta < 0 along k (state tracking
        needs it: Grazzi et al. 2024)."""
        beta = torch.sigmoid(b.to(compute_dtype(b)))
        return 2 * beta if self.allow_neg_eigval else beta

    def build_head_decay(self) -> None:
        """The decay constants of a per-head decay (Mamba-2's), shared by all slots: exp(A_log) ~ U(1, 16),
        softplus(dt_bias) log-uniform in [1e-3, 1e-1]."""
        H = self.num_heads
        self.A_log = nn.Parameter(torch.empty(H).uniform_(1, 16).log())
        dt = torch.empty(H).uniform_(math.log(1e-3), math.log(1e-1)).exp()
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt

    def head_decay(self, a: torch.Tensor) -> torch.Tensor:
        """The per-head log decay g = -exp(A_log) * softplus(a + dt_bias) from its projection a [..., H]."""
        dt = compute_dtype(a)
        return -self.A_log.to(dt).exp() * F.softplus(a.to(dt) + self.dt_bias.to(dt))

    def features(self, q: torch.Tensor, k: torch.Tensor, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The feature map on q, k [..., H, K] (default: L2 normalisation per head; `fused`: as a Triton kernel)."""
        if fused:
            from kernels import norms  # imports Triton

            return norms.l2norm(q), norms.l2norm(k)
        return norms_torch.l2norm(q), norms_torch.l2norm(k)

    # --- the pieces the executors combine (`models/routing.py`) ---------------------------------------------

    def slot_projections(self) -> list[nn.Linear]:
        """The per-slot projections (key, value, then the gates'), each with one block of rows per slot."""
        return [self.k_proj, self.v_proj, *(getattr(self, name) for name in self.slot_gates)]

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """x [..., d_model] -> (g, beta): log decays [..., n, H] or [..., n, H, K], strengths [..., n, H]."""
        lead = (*x.shape[:-1], self.num_slots, -1)
        return self.activate_gates(*(getattr(self, name)(x).view(lead) for name in self.slot_gates))

    def project(self, x: torch.Tensor):
        """Every slot's projections of x [..., d_model]: q [..., H * K] (shared), k [..., n, H * K],
        v [..., n, H * V], (g, beta) as from `gates`."""
        lead = (*x.shape[:-1], self.num_slots, -1)
        return self.q_proj(x), self.k_proj(x).view(lead), self.v_proj(x).view(lead), self.gates(x)

    def core(self, q, k, v, g, beta, backend: str, cu_seqlens=None) -> torch.Tensor:
        """The rule's parallel form on the resolved backend: q, k [N, T, H, K], v [N, T, H, V] (with `cu_seqlens`,
        N = 1 and packed sequences), g and beta as from `activate_gates` -> o [N, T, H, V]."""
        extra = {name: z for name, z in (("g", g), ("beta", beta), ("cu_seqlens", cu_seqlens)) if z is not None}
        return kernels.get_op(self.rule, backend)(q, k, v, scale=self.scale, **extra)[0]

    def read_out(self, x, o, weight, fused: bool, slots=None):
        """The slots' outputs -> mix (weights, or 1 each) -> gated per-head norm -> projection.

        o [..., n, H, V] in token order; or, from the packed path (`fused` only), packed rows [P, H, V] with
        `slots` [B * T, J] the rows of each token's J outputs. weight [..., n] (or [..., J]) or None."""
        H, V = self.num_heads, self.value_dim
        gate = self.gate_proj(x).view(*x.shape[:-1], H, V)
        if fused:
            from kernels import norms  # imports Triton

            mix = None if weight is None else weight.reshape(-1, weight.shape[-1])
            o = norms.mix_gated_rmsnorm(o.reshape(-1, H, V), gate.reshape(-1, H, V), self.o_norm.weight, mix, slots,
                                        eps=self.o_norm.eps, out_dtype=x.dtype).view(gate.shape)  # fmt: skip
        else:
            o = o.sum(-3) if weight is None else (o * weight[..., None, None].to(o.dtype)).sum(-3)
            o = self.o_norm(o.to(x.dtype), gate)
        return self.o_proj(o.flatten(-2))

    # --- every slot over every token ------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, d_model] -> y [B, T, d_model]."""
        check_input(x, self.d_model)
        return routing.dense(self, x, None, kernels.resolve_backend(self.backend, x.device))

    def init_state(self, batch_size: int) -> dict[str, torch.Tensor]:
        check_int("batch_size", batch_size)
        p = self.q_proj.weight
        n, H, K, V = self.num_slots, self.num_heads, self.key_dim, self.value_dim
        return {
            "q_conv": self.q_conv.init_state(batch_size, n, device=p.device, dtype=p.dtype),
            "k_conv": self.k_conv.init_state(batch_size, n, device=p.device, dtype=p.dtype),
            "v_conv": self.v_conv.init_state(batch_size, n, device=p.device, dtype=p.dtype),
            "S": torch.zeros(batch_size, n, H, K, V, device=p.device, dtype=compute_dtype(p)),
        }

    def step(self, x: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """x [B, d_model] -> (y [B, d_model], new state)."""
        check_input(x, self.d_model, step=True, batch=state["S"].shape[0])
        return routing.dense_step(self, x, state, None, kernels.resolve_backend(self.backend, x.device))

    def state_size(self, seq_len: int) -> int:
        return self.num_slots * self.num_heads * self.key_dim * self.value_dim
