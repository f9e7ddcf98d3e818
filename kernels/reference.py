"""The token-by-token reference of every rule, built from its declared one-token update (`kernels.rules`).

Obviously right and slow: one sequence and one token at a time, in float64 for float64 inputs and float32
otherwise. Every faster form (the parallel PyTorch forms, the Triton kernels) is tested against it.
"""

from __future__ import annotations

import torch

from kernels._common import assemble, check_inputs, compute_dtype, sequence_bounds
from kernels.rules import get_rule


def recurrent(
    rule, q, k, v, *, g=None, beta=None, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None
):
    """The op signature of `kernels` (after the rule's name): -> (o [B, T, H, V] like v, final states or None)."""
    update = get_rule(rule).update
    d = check_inputs(rule, q, k, v, g, beta, scale, initial_state, cu_seqlens)
    dt = compute_dtype(q)
    outs, finals = [], []
    for n, (b, start, end) in enumerate(sequence_bounds(cu_seqlens, d.B, d.T)):
        S = q.new_zeros(d.H, d.K, d.V, dtype=dt) if initial_state is None else initial_state[n].to(dt)
        seq = []
        for t in range(start, end):
            gt, bt = (None if x is None else x[b, t].to(dt) for x in (g, beta))  # [H] or [H, K]; [H]
            S, o = update(S, q[b, t].to(dt), k[b, t].to(dt), v[b, t].to(dt), gt, bt)
            seq.append(d.scale * o)
        outs.append(torch.stack(seq) if seq else q.new_zeros(0, d.H, d.V, dtype=dt))
        finals.append(S)
    return assemble(outs, finals, cu_seqlens, v.dtype, output_final_state)
