"""Argument checks and sequence packing shared by every rule's ops (PyTorch and Triton alike)."""

from __future__ import annotations

import itertools
import math
import numbers
import os
from dataclasses import dataclass

import torch

from kernels.rules import get_rule

# Set by the tests: every buffer the Triton ops allocate starts as NaN, so an element a kernel forgets to
# write shows up in the comparison with the reference instead of passing by luck.
POISON = False


def empty(*shape, device, dtype) -> torch.Tensor:
    """torch.empty for the Triton ops' outputs and scratch buffers (NaN-filled when POISON is set)."""
    x = torch.empty(*shape, device=device, dtype=dtype)
    return x.fill_(float("nan")) if POISON else x


@dataclass(frozen=True)
class Dims:
    B: int
    T: int
    H: int
    K: int
    V: int
    N: int  # number of sequences: B, or len(cu_seqlens) - 1 when sequences are packed
    scale: float


def _shape(x: torch.Tensor) -> list[int]:
    return list(x.shape)


def _expect(name: str, x: torch.Tensor, shape: list[int], letters: str) -> None:
    if _shape(x) != shape:
        raise ValueError(f"{name} must have shape [{letters}] = {shape}, got {_shape(x)}")


def check_inputs(rule, q, k, v, g, beta, scale, initial_state, cu_seqlens) -> Dims:
    """Validate the uniform op signature for `rule` (its name); returns the problem's sizes and the resolved scale."""
    spec = get_rule(rule)
    g_layout, takes_beta = spec.gate, spec.delta
    _check_tensors(q=q, k=k, v=v, g=g, beta=beta, initial_state=initial_state, cu_seqlens=cu_seqlens)
    if q.dim() != 4:
        raise ValueError(f"q must have shape [B, T, H, K], got {_shape(q)}")
    B, T, H, K = q.shape
    _expect("k", k, [B, T, H, K], "B, T, H, K")
    if v.dim() != 4 or _shape(v)[:3] != [B, T, H]:
        raise ValueError(f"v must have shape [B, T, H, V] with [B, T, H] = {[B, T, H]}, got {_shape(v)}")
    V = v.shape[3]
    if min(B, H, K, V) < 1:  # K = 0 divided by zero in the scale, B = 0 or H = 0 failed in the torch forms' reshapes
        raise ValueError(f"q, k, v need B, H, K, V >= 1 (T may be 0), got [B, T, H, K] = {[B, T, H, K]}, V = {V}")
    finite = isinstance(scale, numbers.Real) and not isinstance(scale, bool) and math.isfinite(scale)
    if scale is not None and not finite:  # a NaN scale made every output NaN
        raise ValueError(f"scale={scale!r} is not valid; it must be a finite number, or None for K ** -0.5")
    if g_layout is None and g is not None:
        raise ValueError(f"{rule} takes no g (log decays); got g of shape {_shape(g)}")
    if g_layout is not None:
        g_shape, letters = ([B, T, H, K], "B, T, H, K") if g_layout == "channel" else ([B, T, H], "B, T, H")
        if g is None:
            raise ValueError(f"{rule} needs g (log decays) of shape [{letters}] = {g_shape}")
        _expect("g", g, g_shape, letters)
    if not takes_beta and beta is not None:
        raise ValueError(f"{rule} takes no beta (write strength); got beta of shape {_shape(beta)}")
    if takes_beta:
        if beta is None:
            raise ValueError(f"{rule} needs beta (write strength) of shape [B, T, H] = {[B, T, H]}")
        _expect("beta", beta, [B, T, H], "B, T, H")
    N = B
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"cu_seqlens must be an int32/int64 tensor of shape [N + 1] with N >= 1, got "
                f"{cu_seqlens.dtype} of shape {_shape(cu_seqlens)}"
            )
        if B != 1:
            raise ValueError(f"cu_seqlens packs sequences along T and needs batch size B = 1, got B = {B}")
        N = cu_seqlens.numel() - 1
        # The Triton kernels read the offsets unchecked (out of range: wrong outputs or a crash). Offsets in host
        # memory are checked here at no cost; device ones are not read, as that would sync with the host.
        if cu_seqlens.device.type == "cpu":
            check_offsets(cu_seqlens.tolist(), T)
    if initial_state is not None:
        _expect("initial_state", initial_state, [N, H, K, V], "N, H, K, V")
    return Dims(B, T, H, K, V, N, K**-0.5 if scale is None else float(scale))


def _check_tensors(**named) -> None:
    """Every argument given is a tensor on q's device (the Triton kernels would read another device's memory as
    their own), the data a floating-point one: an integer q, k or v was computed on as if it were float."""
    for name, x in named.items():
        if x is None and name not in ("q", "k", "v"):
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.device != named["q"].device:
            raise ValueError(f"{name} is on {x.device}, q on {named['q'].device}: every tensor must be on q's device")
        if name != "cu_seqlens" and not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def check_triton_inputs(q: torch.Tensor) -> None:
    """The Triton ops compute in float32 on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)."""
    if q.dtype == torch.float64:
        raise ValueError("the Triton kernels compute in float32; use the 'torch' backend for float64 inputs")
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"the Triton kernels need CUDA tensors, got {q.device.type!r} ones; on the CPU use the 'torch' "
            "backend (or TRITON_INTERPRET=1, set before triton is imported)"
        )


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 inputs are computed (and their states kept) in float64, everything else in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def sequence_bounds(cu_seqlens: torch.Tensor | None, B: int, T: int) -> list[tuple[int, int, int]]:
    """(batch row, start, end) of every sequence, in state order (syncs with the host: references only)."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    cu = cu_seqlens.tolist()
    check_offsets(cu, T)
    return [(0, cu[n], cu[n + 1]) for n in range(len(cu) - 1)]


def check_offsets(cu: list[int], T: int) -> None:
    """Packed sequences' offsets must rise (not strictly: empty sequences are allowed) from 0 to T."""
    if cu[0] != 0 or cu[-1] != T or any(a > b for a, b in itertools.pairwise(cu)):
        raise ValueError(f"cu_seqlens must rise from 0 to T = {T}, got {cu}")


def pad_sequences(xs: list[torch.Tensor | None], cu_seqlens, B: int, T: int, multiple: int):
    """Lay the sequences out as a zero-padded batch [N, T_pad, ...] with T_pad a multiple of `multiple`.

    Zero padding at the end is harmless for every rule: k = 0, beta = 0 and g = 0 leave the state alone.
    Returns the padded tensors and `unpad(o_padded) -> o` restoring the input layout.
    """
    bounds = sequence_bounds(cu_seqlens, B, T)
    longest = max((end - start for _, start, end in bounds), default=0)
    T_pad = max(multiple, -(-longest // multiple) * multiple)

    if cu_seqlens is None:

        def pad(x):
            return torch.nn.functional.pad(x, [0, 0] * (x.dim() - 2) + [0, T_pad - T])

        return [None if x is None else pad(x) for x in xs], lambda o: o[:, :T]

    def pad(x):
        out = x.new_zeros(len(bounds), T_pad, *x.shape[2:])
        for n, (_, start, end) in enumerate(bounds):
            out[n, : end - start] = x[0, start:end]
        return out

    def unpad(o):
        return torch.cat([o[n, : end - start] for n, (_, start, end) in enumerate(bounds)], dim=0)[None]

    return [None if x is None else pad(x) for x in xs], unpad


def assemble(seq_outputs: list[torch.Tensor], finals: list[torch.Tensor], cu_seqlens, dtype, output_final_state):
    """Per-sequence outputs [L, H, V] back to [B, T, H, V] (or [1, T, H, V] packed), plus the stacked states."""
    o = torch.cat(seq_outputs, 0)[None] if cu_seqlens is not None else torch.stack(seq_outputs, 0)
    return o.to(dtype), (torch.stack(finals, 0) if output_final_state else None)
