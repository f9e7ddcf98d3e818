"""Routing in one place: which memory slots each token writes to, and the two executors that run a memory mixer
(`models/memory.py`) under it.

A `Routing` holds, per token, the slots it writes to (`index [..., J]`, distinct) and the weights of their
outputs in the mix (`weight [..., J]`), over n slots. MoM builds one per call with `Routing.top_k`: the top-k
memories with their renormalised weights and, with a shared memory, the last slot with weight 1 (that rule is
written there only). `routing=None` means every slot sees every token with weight 1: the single-memory mixers.

The executors combine the mixer's pieces (`project`, `slot_projections`, the short convs, `features`,
`activate_gates`, `core`, `read_out`; the rule's one-token update from `kernels.rules`); the mixer knows nothing
of routing.

- `dense` (the reference, and the single-memory mixers' forward on either backend): all n slots over all the
  tokens, as a batch of B * n sequences of one kernel call (no per-memory loop, no padding, no host sync). Under
  a routing each slot's routed tokens are moved to the front of its row with a stable sort; its conv and its
  recurrence run over that order, so the tokens not routed to it, which come after all of its own, reach none of
  its routed outputs (and their outputs get weight 0 in the mix).
- `packed` (Triton, `kernels/mom`): each memory runs on its own packed segment of the tokens routed to it (the
  routing's segment `table`), so it costs J = k (+ shared) memories' work instead of n.

Decoding has the same two forms: `dense_step` advances a slot's conv buffer and state only on the tokens routed
to it (a new state; autograd allowed), `packed_step` updates only the selected slots' states, in place, through
the decode kernel (inference only).

`backend` is the resolved kernel backend ("torch", "triton" or "triton_bf16"), decided once per forward by the
caller. On the Triton backends the steps around the rule (the short conv, the L2 feature map, the mix and gated
norm) run as Triton kernels too (`kernels/mom/conv.py`, `kernels/norms.py`), except in float64 (the PyTorch
reference's).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

import kernels
from kernels import conv_torch


@dataclass
class Routing:
    """One call's routing; its dense forms and packed table are built on first use."""

    index: torch.Tensor  # [..., J] int64: the slots each token writes to (distinct), the shared one last
    weight: torch.Tensor  # [..., J]: their outputs' weights in the mix
    num_slots: int  # n

    @classmethod
    def top_k(cls, index: torch.Tensor, weight: torch.Tensor, num_memories: int, shared: bool) -> Routing:
        """The top-k memories (index, weight [..., k]) and, with `shared`, the shared memory: slot M, weight 1."""
        if shared:
            index = torch.cat([index, index.new_full((*index.shape[:-1], 1), num_memories)], -1)
            weight = torch.cat([weight, weight.new_ones(*weight.shape[:-1], 1)], -1)
        return cls(index, weight, num_memories + int(shared))

    @cached_property
    def dense_mask(self) -> torch.Tensor:
        """[..., n] bool: whether the token writes to slot m."""
        shape = (*self.index.shape[:-1], self.num_slots)
        return torch.zeros(shape, dtype=torch.bool, device=self.index.device).scatter(-1, self.index, True)

    @cached_property
    def dense_weight(self) -> torch.Tensor:
        """[..., n]: slot m's weight in the token's mix (0 where it does not write)."""
        return self.weight.new_zeros(self.dense_mask.shape).scatter(-1, self.index, self.weight)

    @cached_property
    def table(self):
        """The packed segment layout for the Triton path (`kernels.mom.routing_table`, index [B, T, J])."""
        from kernels import mom  # imports Triton

        return mom.routing_table(self.index, self.num_slots)


def _fused(backend: str, x: torch.Tensor) -> bool:
    """Whether the steps around the rule run as Triton kernels: on a Triton backend, except in float64 (the
    reference's). Under vmap over runs (stacked runs) they fold the runs into one launch (`kernels.runs`)."""
    return kernels.on_triton(backend) and x.dtype != torch.float64


def _gather_time(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, n, T, C], index [B, n, T] -> x[b, m, index[b, m, t], :] (as whole rows: faster than `gather`)."""
    B, n, T, C = x.shape
    rows = index + torch.arange(0, B * n * T, T, device=index.device).view(B, n, 1)
    return x.reshape(B * n * T, C).index_select(0, rows.flatten()).view(B, n, T, C)


class _PermuteTime(torch.autograd.Function):
    """x [B, n, T, C] -> x[b, m, order[b, m, t], :] for a permutation `order` of the time steps with inverse
    `back`: the backward is the gather through `back` (autograd's scatter-add is several times slower)."""

    generate_vmap_rule = True  # plain torch ops: `torch.func.vmap` batches them

    @staticmethod
    def forward(x, order, back):
        return _gather_time(x, order)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[2])

    @staticmethod
    def backward(ctx, dy):
        (back,) = ctx.saved_tensors
        return _gather_time(dy, back), None, None


# --- parallel form -------------------------------------------------------------------------------------------


def dense(memory, x: torch.Tensor, routing: Routing | None, backend: str) -> torch.Tensor:
    """x [B, T, d_model] -> y [B, T, d_model]: every slot over every token, in its routed order."""
    B, T, _ = x.shape
    H, K, V, n = memory.num_heads, memory.key_dim, memory.value_dim, memory.num_slots
    fused = _fused(backend, x)
    q, k, v, gates = memory.project(x)
    qkv = torch.cat([q[:, None].expand(B, n, T, H * K), k.transpose(1, 2), v.transpose(1, 2)], -1)  # [B, n, T, C]
    gates = [None if z is None else z.transpose(1, 2) for z in gates]  # [B, n, T, H(, K)]
    if routing is not None:
        # each slot's routed tokens first, in token order (stable sort), then the others
        not_routed = (~routing.dense_mask).transpose(1, 2).to(torch.uint8)  # [B, n, T]
        order = torch.sort(not_routed, dim=-1, stable=True).indices
        back = order.argsort(-1)
        qkv = _PermuteTime.apply(qkv, order, back)
        gates = [None if z is None else _PermuteTime.apply(z.flatten(3), order, back).view(z.shape)
                 for z in gates]  # fmt: skip
    if memory.conv_size:  # q, k and v through one conv (each slot its own sequence), their weights side by side
        conv_weight = torch.cat([memory.q_conv.weight, memory.k_conv.weight, memory.v_conv.weight])
        if fused:
            from kernels import mom  # imports Triton

            qkv = mom.batch_conv(qkv.flatten(0, 1), conv_weight).view(qkv.shape)
        else:
            qkv = conv_torch.causal_conv_silu(qkv, conv_weight)
    q, k, v = qkv.split([H * K, H * K, H * V], -1)
    q, k = memory.features(q.reshape(B * n, T, H, K), k.reshape(B * n, T, H, K), fused)
    g, beta = (None if z is None else z.reshape(B * n, T, *z.shape[3:]) for z in gates)
    o = memory.core(q, k, v.reshape(B * n, T, H, V), g, beta, backend).reshape(B, n, T, H * V)
    if routing is not None:
        o = _PermuteTime.apply(o, back, order)  # back to token order
    weight = None if routing is None else routing.dense_weight
    return memory.read_out(x, o.transpose(1, 2).view(B, T, n, H, V), weight, fused)


def packed(memory, x: torch.Tensor, routing: Routing, backend: str) -> torch.Tensor:
    """x [B, T, d_model] -> y [B, T, d_model] on a Triton backend: each memory over its own tokens only."""
    from kernels import mom  # imports Triton

    B, T, _ = x.shape
    H, K, V, n = memory.num_heads, memory.key_dim, memory.value_dim, memory.num_slots
    fused = _fused(backend, x)
    table = routing.table
    P = table.perm.numel()  # B * T * J packed rows, one per (token, selected slot)
    xf = x.reshape(B * T, -1)
    # every per-slot projection (key, value, gates) in one weight [n, width, d_model]: one grouped matmul
    projs = memory.slot_projections()
    slot_weight = torch.cat([p.weight.view(n, -1, memory.d_model) for p in projs], 1)
    k, v, *pre = mom.routed_linear(xf, slot_weight, table).split([p.out_features // n for p in projs], -1)
    q = mom.segment_conv(memory.q_proj(xf), memory.q_conv.weight, table, gather=True)
    k = mom.segment_conv(k, memory.k_conv.weight, table)
    v = mom.segment_conv(v, memory.v_conv.weight, table)
    q, k = memory.features(q.view(1, P, H, K), k.view(1, P, H, K), fused)
    g, beta = memory.activate_gates(*(z[None] for z in pre))
    o = memory.core(q, k, v.view(1, P, H, V), g, beta, backend, cu_seqlens=table.cu_seqlens)
    return memory.read_out(x, o[0], routing.weight, fused, table.slots)  # the packed rows, read where they are


# --- recurrent form ------------------------------------------------------------------------------------------


def dense_step(memory, x: torch.Tensor, state: dict, routing: Routing | None, backend: str):
    """x [B, d_model] -> (y [B, d_model], new state): every slot computed, a slot's conv buffer and state kept
    where the token is not routed to it."""
    B = x.shape[0]
    H, K, V, n = memory.num_heads, memory.key_dim, memory.value_dim, memory.num_slots
    fused = _fused(backend, x)
    mask = None if routing is None else routing.dense_mask
    q, k, v, (g, beta) = memory.project(x)
    new, out = {}, []
    for name, conv, z in (
        ("q_conv", memory.q_conv, q[:, None].expand(B, n, H * K)),
        ("k_conv", memory.k_conv, k),
        ("v_conv", memory.v_conv, v),
    ):
        y, buf = conv.step(z, state[name])
        new[name] = buf if mask is None else torch.where(mask[..., None, None], buf, state[name])
        out.append(y)
    q, k, v = out
    q, k = memory.features(q.view(B, n, H, K), k.view(B, n, H, K), fused)
    S = state["S"]
    dt = S.dtype
    S_new, o = kernels.get_rule(memory.rule).update(S, q.to(dt), k.to(dt), v.view(B, n, H, V).to(dt), g, beta)
    new["S"] = S_new if mask is None else torch.where(mask[..., None, None, None], S_new, S)
    o = memory.scale * o  # a slot not routed to gets weight 0 in the mix
    weight = None if routing is None else routing.dense_weight
    return memory.read_out(x, o.to(x.dtype), weight, fused), new


@torch.no_grad()
def packed_step(memory, x: torch.Tensor, state: dict, routing: Routing):
    """One token for the selected slots only, through the decode kernel: their states and conv buffers are
    updated in place, the others not read. Inference only: returns (y, state), `state` the same tensors."""
    from kernels import mom  # imports Triton

    H, K, V = memory.num_heads, memory.key_dim, memory.value_dim
    fused = _fused("triton", x)
    index = routing.index
    B, J = index.shape

    def pick(z):  # [B, n, ...] -> the selected slots [B, J, ...]
        return z.gather(1, index.view(B, J, *[1] * (z.dim() - 2)).expand(B, J, *z.shape[2:]))

    q, k, v, gates = memory.project(x)
    out = []
    for name, conv, z in (
        ("q_conv", memory.q_conv, q[:, None].expand(B, J, H * K)),
        ("k_conv", memory.k_conv, pick(k)),
        ("v_conv", memory.v_conv, pick(v)),
    ):
        y, buf = conv.step(z, pick(state[name]))
        if conv.size > 1:  # the selected slots' conv buffers advance
            state[name].scatter_(1, index.view(B, J, 1, 1).expand(buf.shape), buf)
        out.append(y)
    q, k = memory.features(out[0].view(B, J, H, K), out[1].view(B, J, H, K), fused)
    g, beta = (None if z is None else pick(z) for z in gates)
    o = mom.decode_step(memory.rule, state["S"], index, q, k, out[2].view(B, J, H, V), g, beta, memory.scale)
    return memory.read_out(x, o.to(x.dtype), routing.weight, fused), state
