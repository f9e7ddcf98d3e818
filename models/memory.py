"""What the linear-memory mixers share (one per rule of `kernels.rules`: linear attention, GLA, ..., gated DeltaNet).

A memory is a matrix state S in R^{K x V} per head, written once per token and read with the query:

    S_t = update(S_{t-1}; k_t, v_t, g_t, b_t)          (the rule, declared in `kernels.rules`)
    o_t = K^{-1/2} S_t^T q_t                              (read after the write)
    y_t = W_o [ rmsnorm(o_t) * silu(W_gate x_t) ]        (per-head RMSNorm gated by the input, then projected)

with q_t, k_t, v_t = silu(short causal conv(W_q x, W_k x, W_v x)) and the rule's feature map on q, k.

The class holds `num_slots` memories side by side so that MoM can drive it with a routing (`models/mom.py`):
every slot has its own key, value and gate (beta, decay-input) projections; the query projection, the
short-conv weights, the decay constants, the output gate, norm and projection are shared. Given a routing
(mask [B, T, n] of the slots each token writes to, weights [B, T, n] of their outputs in the mix), slot m
sees only its own subsequence, in token order:

- in the parallel form (`mix`), each slot's routed tokens are moved to the front of its row with a stable
  sort; its conv and its recurrence run over that order, so the tokens not routed to it, which come after all
  of its own, reach none of its routed outputs (and their outputs get weight 0 in the mix). The slots run
  as a batch of B * n sequences of one kernel call (no per-memory loop, no padding, no host sync);
- in `step`, a slot's conv buffer and state advance only on the tokens routed to it (the others keep them),
  so its state at time t is its state after exactly its own tokens up to t.

Without a routing (`mask=None`, the single-memory mixers) every slot sees every token with weight 1.
That form (`mix`, `mix_step`) is the reference. `mix_routed` and `step_routed` compute the same through the
routed Triton path (`kernels/mom`): each memory runs on its own packed segment of the tokens routed to it, so
it costs J = k (+ shared) memories' work instead of all of them; decoding touches only the selected states.

`allow_neg_eigval` (the delta rules only) lets the write strength beta reach (0, 2) (`write_strength`).

Shapes: x [B, T, d_model]; H heads, K = head_dim, V = head_dim * expand_v. State per sequence:
num_slots * H * K * V values (what `state_size` counts; the conv buffers, (conv_size - 1) * (2K + V) * H per
slot, are not counted, as in the paper).

A subclass sets `rule` (a name declared in `kernels.rules`, whose one-token update `step` uses), builds its
gate parameters in `build_gates` (the per-slot projections named in `slot_gates`), computes them from those
projections in `activate_gates` and may change the feature map in `features` (default: L2 normalisation of q
and k per head). The parallel form calls the rule's op in `kernels` through the backend setting.
"""

from __future__ import annotations

import torch
from torch import nn

import kernels
from models.common import (
    GatedRMSNorm,
    ShortConv,
    causal_conv_silu,
    check_backend,
    check_flag,
    check_int,
    compute_dtype,
    head_layout,
    kernel_op,
    l2norm,
    value_dim,
)


def _gather_time(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, n, T, C], index [B, n, T] -> x[b, m, index[b, m, t], :] (as whole rows: faster than `gather`)."""
    B, n, T, C = x.shape
    rows = index + torch.arange(0, B * n * T, T, device=index.device).view(B, n, 1)
    return x.reshape(B * n * T, C).index_select(0, rows.flatten()).view(B, n, T, C)


class _PermuteTime(torch.autograd.Function):
    """x [B, n, T, C] -> x[b, m, order[b, m, t], :] for a permutation `order` of the time steps with inverse
    `back`: the backward is the gather through `back` (autograd's scatter-add is several times slower)."""

    @staticmethod
    def forward(ctx, x, order, back):
        ctx.save_for_backward(back)
        return _gather_time(x, order)

    @staticmethod
    def backward(ctx, dy):
        (back,) = ctx.saved_tensors
        return _gather_time(dy, back), None, None


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

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """x [..., d_model] -> (g, beta): log decays [..., n, H] or [..., n, H, K], strengths [..., n, H]."""
        lead = (*x.shape[:-1], self.num_slots, -1)
        return self.activate_gates(*(getattr(self, name)(x).view(lead) for name in self.slot_gates))

    def features(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The feature map on q, k [..., H, K] (default: L2 normalisation per head)."""
        if self._fused(q):
            from kernels import norms  # imports Triton

            return norms.l2norm(q), norms.l2norm(k)
        return l2norm(q), l2norm(k)

    # --- parallel form -------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, d_model] -> y [B, T, d_model]."""
        return self.mix(x)

    def mix(self, x: torch.Tensor, mask: torch.Tensor | None = None, weight: torch.Tensor | None = None):
        """The parallel form of all slots; mask [B, T, n] bool, weight [B, T, n]: the routing (None: every slot
        sees every token, with weight 1). The slots run as a batch of B * n sequences of one kernel call."""
        B, T, _ = x.shape
        H, K, V, n = self.num_heads, self.key_dim, self.value_dim, self.num_slots
        q = self.q_proj(x)[:, None].expand(B, n, T, H * K)  # [B, n, T, C]: each slot convolves its own
        k = self.k_proj(x).view(B, T, n, H * K).transpose(1, 2)
        v = self.v_proj(x).view(B, T, n, H * V).transpose(1, 2)
        qkv = torch.cat([q, k, v], -1)
        gates = [None if z is None else z.transpose(1, 2) for z in self.gates(x)]  # [B, n, T, H(, K)]
        if mask is not None:
            # Each slot runs on its own subsequence: its routed tokens first, in token order (stable sort), then
            # the others. Those come after every routed token, so neither the causal conv nor the recurrence
            # carries them into a routed token's output, and their own outputs get weight 0 in the mix.
            not_routed = (~mask).transpose(1, 2).to(torch.uint8)  # [B, n, T]
            order = torch.sort(not_routed, dim=-1, stable=True).indices
            back = order.argsort(-1)
            qkv = _PermuteTime.apply(qkv, order, back)
            gates = [None if z is None else _PermuteTime.apply(z.flatten(3), order, back).view(z.shape)
                     for z in gates]  # fmt: skip
        if self.conv_size:  # q, k and v through one conv, their weights side by side
            conv_weight = torch.cat([self.q_conv.weight, self.k_conv.weight, self.v_conv.weight])
            if self._fused(x):
                from kernels import mom  # imports Triton

                qkv = mom.batch_conv(qkv.flatten(0, 1), conv_weight).view(qkv.shape)
            else:
                qkv = causal_conv_silu(qkv, conv_weight)
        q, k, v = qkv.split([H * K, H * K, H * V], -1)
        q, k = self.features(q.reshape(B * n, T, H, K), k.reshape(B * n, T, H, K))
        g, beta = (None if z is None else z.reshape(B * n, T, *z.shape[3:]) for z in gates)
        extra = {name: z for name, z in (("g", g), ("beta", beta)) if z is not None}
        op = kernel_op(self.rule, self.backend, x.device)
        o, _ = op(q, k, v.reshape(B * n, T, H, V), scale=self.scale, **extra)
        o = o.reshape(B, n, T, H * V)
        if mask is not None:
            o = _PermuteTime.apply(o, back, order)  # back to token order
        return self._output(x, o.transpose(1, 2).view(B, T, n, H, V), weight)

    def mix_routed(self, x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, shared: bool):
        """The parallel form through the routed Triton path: index [B, T, k] the memories (slots) each token is
        routed to, weight [B, T, k] their weights; with `shared`, the last slot is the shared memory."""
        from kernels import mom  # imports Triton

        B, T, _ = x.shape
        H, K, V, n = self.num_heads, self.key_dim, self.value_dim, self.num_slots
        route = mom.routing_table(index, n - shared, shared)
        P = route.perm.numel()  # B * T * J packed rows, one per (token, selected memory)
        xf = x.reshape(B * T, -1)
        # every per-slot projection (key, value, gates) in one weight [n, width, d_model]: one grouped matmul
        projs = [self.k_proj, self.v_proj, *(getattr(self, name) for name in self.slot_gates)]
        slot_weight = torch.cat([p.weight.view(n, -1, self.d_model) for p in projs], 1)
        widths = [p.out_features // n for p in projs]
        k, v, *pre = mom.routed_linear(xf, slot_weight, route).split(widths, -1)
        q = mom.segment_conv(self.q_proj(xf), self.q_conv.weight, route, gather=True)
        k = mom.segment_conv(k, self.k_conv.weight, route)
        v = mom.segment_conv(v, self.v_conv.weight, route)
        q, k = self.features(q.view(1, P, H, K), k.view(1, P, H, K))
        g, beta = self.activate_gates(*(z[None] for z in pre))
        extra = {name: z for name, z in (("g", g), ("beta", beta)) if z is not None}
        op = kernel_op(self.rule, "triton", x.device)
        o, _ = op(q, k, v.view(1, P, H, V), scale=self.scale, cu_seqlens=route.cu_seqlens, **extra)
        if shared:
            weight = torch.cat([weight, weight.new_ones(B, T, 1)], -1)
        return self._output(x, o[0], weight, route.slots)  # the packed rows, read where they are

    def _fused(self, x: torch.Tensor) -> bool:
        """Whether the steps around the rule (the short conv, the L2 feature map, the output's mix and gated norm)
        run as Triton kernels (`kernels/mom/conv.py`, `kernels/norms.py`): on the triton backend, except in float64
        (the PyTorch reference's)."""
        return x.dtype != torch.float64 and kernels.resolve_backend(self.backend, x.device) == "triton"

    def _output(self, x, o, weight, slots=None):
        """The slots' outputs -> mix (weights, or 1 each) -> gated per-head norm -> projection.

        o [..., n, H, V] in token order; or, from the routed path (Triton only), packed rows [P, H, V] with
        `slots` [B * T, J] the rows of each token's J outputs. weight [..., n] (or [..., J]) or None."""
        H, V = self.num_heads, self.value_dim
        gate = self.gate_proj(x).view(*x.shape[:-1], H, V)
        if self._fused(x):
            from kernels import norms  # imports Triton

            mix = None if weight is None else weight.reshape(-1, weight.shape[-1])
            o = norms.mix_gated_rmsnorm(o.reshape(-1, H, V), gate.reshape(-1, H, V), self.o_norm.weight, mix, slots,
                                        eps=self.o_norm.eps, out_dtype=x.dtype).view(gate.shape)  # fmt: skip
        else:
            o = o.sum(-3) if weight is None else (o * weight[..., None, None].to(o.dtype)).sum(-3)
            o = self.o_norm(o.to(x.dtype), gate)
        return self.o_proj(o.flatten(-2))

    # --- recurrent form ------------------------------------------------------------------------------------

    def init_state(self, batch_size: int) -> dict[str, torch.Tensor]:
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
        return self.mix_step(x, state)

    def mix_step(self, x, state, mask=None, weight=None):
        """One token for all slots; mask [B, n] bool and weight [B, n]: the routing (None: all slots)."""
        B = x.shape[0]
        H, K, V, n = self.num_heads, self.key_dim, self.value_dim, self.num_slots
        q = self.q_proj(x)[:, None].expand(B, n, H * K)
        k = self.k_proj(x).view(B, n, H * K)
        v = self.v_proj(x).view(B, n, H * V)
        new, out = {}, []
        for name, conv, z in (
            ("q_conv", self.q_conv, q),
            ("k_conv", self.k_conv, k),
            ("v_conv", self.v_conv, v),
        ):
            y, buf = conv.step(z, state[name])  # a slot's conv buffer advances only on its own tokens
            new[name] = buf if mask is None else torch.where(mask[..., None, None], buf, state[name])
            out.append(y)
        q, k, v = out
        q, k = self.features(q.view(B, n, H, K), k.view(B, n, H, K))
        g, beta = self.gates(x)
        S = state["S"]
        dt = S.dtype
        S_new, o = kernels.get_rule(self.rule).update(S, q.to(dt), k.to(dt), v.view(B, n, H, V).to(dt), g, beta)
        new["S"] = S_new if mask is None else torch.where(mask[..., None, None, None], S_new, S)
        o = self.scale * o  # the slots not routed to get weight 0 in the mix
        return self._output(x, o.to(x.dtype), weight), new

    @torch.no_grad()
    def step_routed(self, x, state, index, weight, shared: bool):
        """One token for the selected slots only (index [B, k], weight [B, k]; with `shared`, the last slot too),
        through the decode kernel: their states and conv buffers are updated in place, the others not read.
        Inference only (no autograd): returns (y, state) with `state` the same, updated, tensors."""
        from kernels import mom  # imports Triton

        B = x.shape[0]
        H, K, V, n = self.num_heads, self.key_dim, self.value_dim, self.num_slots
        if shared:
            index = torch.cat([index, index.new_full((B, 1), n - 1)], -1)
            weight = torch.cat([weight, weight.new_ones(B, 1)], -1)
        J = index.shape[1]

        def pick(z):  # [B, n, ...] -> the selected slots [B, J, ...]
            return z.gather(1, index.view(B, J, *[1] * (z.dim() - 2)).expand(B, J, *z.shape[2:]))

        projected = (
            ("q_conv", self.q_conv, self.q_proj(x)[:, None].expand(B, J, H * K)),
            ("k_conv", self.k_conv, pick(self.k_proj(x).view(B, n, H * K))),
            ("v_conv", self.v_conv, pick(self.v_proj(x).view(B, n, H * V))),
        )
        out = []
        for name, conv, z in projected:
            y, buf = conv.step(z, pick(state[name]))
            if conv.size > 1:  # the selected slots' conv buffers advance
                state[name].scatter_(1, index.view(B, J, 1, 1).expand(buf.shape), buf)
            out.append(y)
        q, k = self.features(out[0].view(B, J, H, K), out[1].view(B, J, H, K))
        g, beta = (None if z is None else pick(z) for z in self.gates(x))
        o = mom.decode_step(self.rule, state["S"], index, q, k, out[2].view(B, J, H, V), g, beta, self.scale)
        return self._output(x, o.to(x.dtype), weight), state

    def state_size(self, seq_len: int) -> int:
        return self.num_slots * self.num_heads * self.key_dim * self.value_dim
