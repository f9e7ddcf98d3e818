"""Small pieces the mixers share: argument and input checks, the check of the backend setting, and the short causal
convolution and the gated per-head RMSNorm as modules (their PyTorch forms are in `kernels/conv_torch.py` and
`kernels/norms_torch.py`, beside their Triton forms).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import kernels
# the kernels' dtype rule for gates and states, which the mixers follow (re-exported for them)
from kernels._common import compute_dtype  # noqa: F401
from kernels.conv_torch import causal_conv_silu
from kernels.norms_torch import gated_rmsnorm

# --- argument checks (raised at construction, naming the setting and what it may be) ----------------------


def check_choice(key: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"{key}={value!r} is not valid; choose one of {tuple(valid)}")


def check_int(key: str, value, low: int = 1, high: int | None = None, high_name: str = "") -> None:
    """An integer in low..high (high: None for no upper bound; high_name: the setting it comes from)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        bound = f">= {low}" if high is None else f"in {low}..{high_name}{'=' if high_name else ''}{high}"
        raise ValueError(f"{key}={value!r} is not valid; it must be an integer {bound}")


def check_number(key: str, value, *, positive: bool) -> None:
    """A finite number, > 0 (positive) or >= 0: inf and nan would make the loss or a width non-finite."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
        or (positive and value == 0)
    ):
        raise ValueError(f"{key}={value!r} is not valid; it must be a finite number {'> 0' if positive else '>= 0'}")


def check_flag(key: str, value) -> None:
    if not isinstance(value, bool):  # a config error: ValueError, like every other one
        raise ValueError(f"{key}={value!r} is not valid; it must be true or false")  # noqa: TRY004


def head_layout(d_model: int, num_heads: int, head_dim: int | None) -> int:
    """Validate the head settings and return the key/query head dimension.

    `head_dim=None` splits the width evenly: d_model must then be divisible by num_heads.
    """
    check_int("d_model", d_model)
    check_int("num_heads", num_heads)
    if head_dim is None:
        if d_model % num_heads:
            divisors = [h for h in range(1, d_model + 1) if d_model % h == 0]
            raise ValueError(
                f"num_heads={num_heads} does not divide d_model={d_model}; choose num_heads among {divisors} "
                f"or set head_dim explicitly"
            )
        return d_model // num_heads
    check_int("head_dim", head_dim)
    return head_dim


def value_dim(head_dim: int, expand_v: float) -> int:
    check_number("expand_v", expand_v, positive=True)
    dv = head_dim * expand_v
    whole = round(dv)  # a whole product can miss by an ulp in binary floating point: 50 * 1.1 = 55.00000000000001
    if abs(dv - whole) > 1e-9 * dv or whole < 1:
        raise ValueError(
            f"expand_v={expand_v!r} is not valid: head_dim * expand_v = {dv} must be a positive integer"
        )
    return whole


# --- a mixer's input (checked at the entry of each forward and step) ----------------------------------


def check_input(x, d_model: int, *, step: bool = False, batch: int | None = None) -> None:
    """A mixer's input: a floating-point tensor [B, T, d_model] (`step`: [B, d_model], B the state's `batch`), every
    size >= 1. Shapes only (no host sync); they failed deep in a reshape, a matmul or a kernel instead."""
    letters = "[B, d_model]" if step else "[B, T, d_model]"
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x must be a floating-point tensor {letters}, got {got}")
    if x.dim() != (2 if step else 3) or x.shape[-1] != d_model or 0 in x.shape:
        raise ValueError(f"x must have shape {letters} with d_model={d_model} and every size >= 1, got {list(x.shape)}")
    if batch is not None and x.shape[0] != batch:
        raise ValueError(f"the input has batch size {x.shape[0]}, the state {batch}: use init_state({x.shape[0]})")


# --- the backend setting and the compute dtype -------------------------------------------------------


def check_backend(backend: str) -> None:
    check_choice("backend", backend, kernels.BACKENDS)


# --- modules -----------------------------------------------------------------------------------------


class ShortConv(nn.Module):
    """Causal depthwise convolution over time followed by SiLU: y_t = silu(sum_i w_i * x_{t-size+1+i}).

    `size = 0` switches it off (identity, no activation). In `step` the state holds the last size-1 inputs.
    """

    def __init__(self, channels: int, size: int):
        super().__init__()
        self.channels, self.size = channels, size
        self.weight = nn.Parameter(torch.empty(channels, size)) if size else None
        if size:
            bound = size**-0.5  # nn.Conv1d's default for a depthwise kernel
            nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., T, C] -> [..., T, C]."""
        return x if not self.size else causal_conv_silu(x, self.weight)

    def init_state(self, *lead: int, device=None, dtype=None) -> torch.Tensor:
        return torch.zeros(*lead, self.channels, max(self.size - 1, 0), device=device, dtype=dtype)

    def step(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., C], state [..., C, size-1] -> (y [..., C], new state)."""
        if not self.size:
            return x, state
        window = torch.cat([state, x[..., None]], -1)  # [..., C, size]
        return F.silu((window * self.weight).sum(-1)), window[..., 1:]


class GatedRMSNorm(nn.Module):
    """Per-head output norm: y = rmsnorm(o) * weight * silu(gate) over the last dimension (fp32 inside)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return gated_rmsnorm(o, gate, self.weight, self.eps)
