"""Chunked Triton kernels (forward and backward) of the gla rule; the kernels are shared by all rules and
live in kernels/_chunk.py (see this folder's README for the chunked decomposition)."""

from kernels._chunk import chunk_op


def chunk(q, k, v, *, g=None, beta=None, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    return chunk_op("gla", q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)
