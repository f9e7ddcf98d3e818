"""The memory update rules of the sandbox, each as a PyTorch reference and as Triton kernels.

Every op has the signature
    op(q, k, v, *, g=None, beta=None, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None)
        -> (o, final_state or None)
with q, k [B, T, H, K], v [B, T, H, V], o like v, states [N, H, K, V] (float32, float64 for float64 inputs).
The rules (o_t = scale * S_t^T q_t reads the state after token t is written):
    linear_attention  S_t = S_{t-1} + k_t v_t^T
    gla               S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T                     g [B, T, H, K]
    deltanet          S_t = (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T            beta [B, T, H]
    gated_deltanet    S_t = exp(g_t) (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T   g, beta [B, T, H]
Triton is imported only when a Triton op is asked for, so this package works where Triton is missing.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable

import torch

RULES = ("linear_attention", "gla", "deltanet", "gated_deltanet")
BACKENDS = ("torch", "triton", "auto")
MODES = ("chunk", "recurrent")


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """Resolve to "torch" or "triton"; "auto" picks Triton on a CUDA device when Triton is installed."""
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    if backend == "triton":
        if not _triton_available():
            raise ValueError("backend 'triton' needs the triton package, which is not installed")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend 'triton' needs a CUDA device, got {device.type!r}; on the CPU Triton runs only "
                "under TRITON_INTERPRET=1 (set before triton is imported)"
            )
    return backend


def get_op(rule: str, backend: str, mode: str = "chunk") -> Callable:
    """The op of `rule` for a resolved backend ("torch" or "triton") and mode ("chunk" or "recurrent")."""
    if rule not in RULES:
        raise ValueError(f"unknown memory rule {rule!r}; choose one of {RULES}")
    if mode not in MODES:
        raise ValueError(f"unknown kernel mode {mode!r}; choose one of {MODES}")
    if backend == "torch":
        naive = importlib.import_module(f"{__name__}.{rule}.naive")
        return naive.naive_chunk if mode == "chunk" else naive.naive_recurrent
    if backend == "triton":
        if mode == "chunk":
            return importlib.import_module(f"{__name__}.{rule}.chunk").chunk
        return importlib.import_module(f"{__name__}.{rule}.fused_recurrent").fused_recurrent
    raise ValueError(f"unknown resolved kernel backend {backend!r}; choose one of ('torch', 'triton')")
