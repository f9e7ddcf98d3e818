"""Fused recurrent Triton kernel (forward and backward) of the gla rule; the kernels are shared by all
rules and live in kernels/_fused_recurrent.py."""

from kernels._fused_recurrent import fused_recurrent_op


def fused_recurrent(
    q, k, v, *, g=None, beta=None, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None
):
    return fused_recurrent_op("gla", q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)
