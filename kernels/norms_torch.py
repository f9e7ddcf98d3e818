"""The memory mixers' row-wise steps around the update rules in PyTorch (backend `torch`; the references of their
Triton forms in `kernels/norms.py`): the L2 feature map of q and k, and the gated per-head RMSNorm of the output.
Torch only: this module works where Triton is missing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._common import compute_dtype


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / ||x|| over the last dimension: the feature map of the delta rules (and of our linear attention)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def gated_rmsnorm(o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """y = rmsnorm(o) * weight * silu(gate) over the last dimension (fp32 inside), in o's dtype."""
    dt = compute_dtype(o)
    x = o.to(dt)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.to(dt)
    return (x * F.silu(gate.to(dt))).to(o.dtype)
