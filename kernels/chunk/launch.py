"""How the chunked kernels are launched: the chunk table (which chunk a program works on), the tile sizes, the
dot mode of each input dtype and each kernel's warps and pipeline stages, each setting with its reason. What the
settings cost and the compiler bugs they avoid are measured in docs/performance.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton


def chunk_table(cu_seqlens: torch.Tensor, T_total: int, C: int):
    """Device-side chunk table: (first token, end token) of every chunk, and each sequence's first chunk.

    The table has an upper bound of cdiv(T_total, C) + N rows (known without a sync); the spare rows are empty
    chunks (first token = end token = T_total) whose programs write nothing.
    """
    N = cu_seqlens.numel() - 1
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    chunk_offsets = torch.cat([cu.new_zeros(1), torch.cumsum((lengths + C - 1) // C, 0)])
    n_rows = triton.cdiv(T_total, C) + N
    gid = torch.arange(n_rows, device=cu.device)
    seq = torch.searchsorted(chunk_offsets[1:], gid, right=True).clamp(max=N - 1)
    starts = cu[seq] + (gid - chunk_offsets[seq]) * C
    valid = gid < chunk_offsets[-1]
    starts = torch.where(valid, starts, T_total)
    ends = torch.where(valid, torch.minimum(starts + C, cu[seq + 1]), T_total)
    return torch.stack([starts, ends], 1).to(torch.int32).contiguous(), chunk_offsets.to(torch.int32), n_rows


# (bf16 inputs, under TRITON_INTERPRET) -> the mode of `common.dot`. The decays' gradient sums per-token terms that
# nearly cancel, so the products need more than tf32's 11 bits (with plain tf32 a bf16 MoM layer's was off by 7e-2).
DOT_MODES = {
    (False, False): 1,  # tf32x3: float32 accuracy on tensor cores (float32 dots run on FMA units, compile slowly)
    (True, False): 2,  # bf16 tensor-core dots, float32 operands split in two: half the tensor-core time of tf32x3
    (False, True): 0,  # float32: the interpreter has no tf32
    (True, True): 3,  # mode 2 on operands converted to float32, so that the CPU tests run the bf16 path's splits
}
# Backend triton_bf16 (under TRITON_INTERPRET -> the mode): every product as fla computes it, both operands rounded
# to bf16 and one tensor-core dot accumulating in float32, whatever the inputs' dtype: a third of mode 2's dots
# for two float32 operands, at bf16's accuracy (docs/results/bf16_products/ measures both).
BF16_DOT_MODES = {False: 4, True: 5}


@dataclass(frozen=True)
class Tiles:
    """One call's tile sizes and dot mode (`tiles`)."""

    BK: int  # all K rows, padded to a power of two: GLA's diagonal blocks, the delta rules' state
    BV: int  # value columns per program of the chunk-sequential kernels, and per step of the loops over V
    BKS: int  # K in blocks of at most 64: the loops over K and the rows of a state piece
    NP: int  # pieces of BKS rows of the state per program in the chunk-sequential kernels
    dot: int  # the mode of `common.dot` (DOT_MODES, BF16_DOT_MODES)

    @property
    def state_rows(self) -> int:
        """Rows of the state a program of the chunk-sequential kernels holds."""
        return self.BKS * self.NP


def tiles(K: int, V: int, delta: bool, dtype: torch.dtype, bf16_products: bool = False) -> Tiles:
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    BK = max(16, triton.next_power_of_2(K))
    BKS = min(BK, 64)  # no [64, K] operand lives in registers whole at K = 256
    return Tiles(
        BK=BK,
        # 32 at K > 128: the delta rules' sequential kernels hold all K rows of their BV columns; 16 would double
        # the programs, each reading the chunk's [64, K] tiles
        BV=min(max(16, triton.next_power_of_2(V)), 64 if BK <= 128 else 32),
        BKS=BKS,
        # the delta rules hold all K rows (U = U' - W h needs every row); the other rules' rows evolve
        # independently, so one piece each (more programs)
        NP=BK // BKS if delta else 1,
        dot=BF16_DOT_MODES[interpreted] if bf16_products else DOT_MODES[dtype == torch.bfloat16, interpreted],
    )


@dataclass(frozen=True)
class Setting:
    when: Callable[[Tiles], bool]
    options: dict
    why: str


def _always(t: Tiles) -> bool:
    return True


_SEQUENTIAL = (  # the chunk-sequential kernels, `state` and `dstate`
    Setting(lambda t: t.state_rows >= 128, {"num_warps": 4, "num_stages": 1},
            "a second stage of the [K, BV] state and [C, K] tiles overflows shared memory; 4 warps, not 8 or 16: "
            "Triton 3.6 on Hopper miscompiles the delta rules' bf16 `state` at K > 128 with more"),
    Setting(lambda t: t.state_rows < 128, {"num_stages": 2}, "two pipeline stages where they fit in shared memory"),
)  # fmt: skip

# Every kernel's launch options beyond Triton's defaults: a kernel gets the options of each of its settings whose
# condition holds for the call's tiles, later ones overriding earlier ones.
KERNEL_SETTINGS: dict[str, tuple[Setting, ...]] = {
    "local": (
        Setting(lambda t: t.dot in (2, 4), {"num_warps": 2},
                "Triton 3.6 on Hopper miscompiles its bf16 dots with 4 or 8 warps (wrong at K = 16 and 256)"),
    ),
    "gla_intra_blocks": (
        Setting(_always, {"num_stages": 1}, "more stages leave room for only two programs per SM at K >= 128"),
    ),
    "gla_intra_diag": (Setting(lambda t: t.BK > 128, {"num_warps": 2}, "faster than 8 warps at K > 128"),),
    "state": _SEQUENTIAL,
    "output": (),
    "dstate": _SEQUENTIAL,
    "dprep": (Setting(_always, {"num_stages": 2}, "its loop over V pipelines in two stages"),),
    "gla_dintra": (),
    "dqk": (Setting(_always, {"num_stages": 2}, "its loop over V pipelines in two stages"),),
}  # fmt: skip


def kernel_options(kernel: str, t: Tiles) -> dict:
    """The launch options of `kernel` (a key of KERNEL_SETTINGS) for a call's tiles."""
    options = {}
    for setting in KERNEL_SETTINGS[kernel]:
        if setting.when(t):
            options |= setting.options
    return options
