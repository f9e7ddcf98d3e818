"""The memory update rules of the sandbox (declared in `kernels.rules`), each as a PyTorch reference and as
Triton kernels.

Every op has the signature
    op(q, k, v, *, g=None, beta=None, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None)
        -> (o, final_state or None)
with q, k [B, T, H, K], v [B, T, H, V], o like v, states [N, H, K, V] (float32, float64 for float64 inputs).
The rules (o_t = scale * S_t^T q_t reads the state after token t is written):
    linear_attention  S_t = S_{t-1} + k_t v_t^T
    gla               S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T                     g [B, T, H, K]
    simple_gla        S_t = exp(g_t) S_{t-1} + k_t v_t^T                           g [B, T, H]
    deltanet          S_t = (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T            beta [B, T, H]
    gated_deltanet    S_t = exp(g_t) (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T   g, beta [B, T, H]
Ops per backend and mode: torch/recurrent the token-by-token reference (`kernels.reference`), torch/chunk the
rule's parallel PyTorch form (the reference where it has none), triton/chunk the chunked kernels
(`kernels.chunk`), triton/recurrent the fused recurrent kernels (`kernels.fused_recurrent`). Backend
triton_bf16 is triton with the chunked kernels' products on operands rounded to bf16 and their chunk states kept
in bf16, as fla computes: faster, at bf16's accuracy (the fused recurrent kernels take no products to round).
Triton is imported only when a Triton op is asked for, so this package works where Triton is missing.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import Callable

import torch

from kernels import reference
from kernels.rules import RULES, get_rule

__all__ = ["BACKENDS", "MODES", "RULES", "get_op", "get_rule", "on_triton", "resolve_backend"]

BACKENDS = ("torch", "triton", "triton_bf16", "auto")
TRITON_BACKENDS = ("triton", "triton_bf16")
MODES = ("chunk", "recurrent")


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def on_triton(backend: str) -> bool:
    """Whether a resolved backend runs the Triton kernels (triton or triton_bf16)."""
    return backend in TRITON_BACKENDS


def resolve_backend(backend: str, device: torch.device) -> str:
    """Resolve to "torch", "triton" or "triton_bf16"; "auto" picks triton on a CUDA device when Triton is
    installed."""
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    if on_triton(backend):
        if not _triton_available():
            raise ValueError(f"backend {backend!r} needs the triton package, which is not installed")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend {backend!r} needs a CUDA device, got {device.type!r}; on the CPU Triton runs only "
                "under TRITON_INTERPRET=1 (set before triton is imported)"
            )
    return backend


def get_op(rule: str, backend: str, mode: str = "chunk") -> Callable:
    """The op of `rule` for a resolved backend ("torch", "triton" or "triton_bf16") and mode ("chunk" or
    "recurrent")."""
    spec = get_rule(rule)
    if mode not in MODES:
        raise ValueError(f"unknown kernel mode {mode!r}; choose one of {MODES}")
    if backend == "torch":
        if mode == "chunk" and spec.parallel is not None:
            return importlib.import_module(spec.parallel).naive_chunk
        return functools.partial(reference.recurrent, rule)
    if on_triton(backend):
        if mode == "chunk":
            from kernels.chunk import chunk_op  # imports Triton

            return functools.partial(chunk_op, rule, bf16_products=backend == "triton_bf16")
        from kernels.fused_recurrent import fused_recurrent_op

        return functools.partial(fused_recurrent_op, rule)
    raise ValueError(f"unknown resolved kernel backend {backend!r}; choose one of {('torch', *TRITON_BACKENDS)}")
