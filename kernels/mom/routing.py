"""A MoM layer's routing as a packed layout of memory segments, built on the device (no host sync).

Every (token, selected memory) pair is one packed row: P = B * T * J rows, J = k (+ 1 with the shared memory,
the last of the n memories, which every token selects). Rows are ordered by segment, segment s = m * B + b
holding the tokens of sequence b routed to memory m, in token order. Memory-major order makes each memory's rows
one contiguous group (for the grouped matmul) and each segment one packed sequence (for the kernels).

A token's row is the first row of its segment plus its rank among that segment's tokens, a cumulative sum over
time of the routing mask: no sort, token order within a segment by construction, and every size is known from
the shapes alone (P rows, S = n * B segments), so the layout can be captured in a CUDA graph.

The gathers here have deterministic backward passes without atomics: the packed rows are a permutation of the
(token, selection) slots, so moving rows back is a gather too, and a token's gradient is the sum of its J rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SegmentTable:
    slots: torch.Tensor  # [B * T, J] int64: packed row of each token's selections
    perm: torch.Tensor  # [P] int64: the token (b * T + t) of each packed row
    row_start: torch.Tensor  # [P] int32: the first packed row of each row's segment
    row_memory: torch.Tensor  # [P] int64: the memory of each packed row
    cu_seqlens: torch.Tensor  # [S + 1] int32: the segments as packed sequences (empty ones allowed)
    group_ends: torch.Tensor  # [n] int32: end row of each memory's group


def routing_table(index: torch.Tensor, num_memories: int) -> SegmentTable:
    """index [B, T, J] (distinct memories per token, in 0..num_memories-1) -> the packed layout."""
    B, T, J = index.shape
    dev = index.device
    onehot = torch.zeros(B, num_memories, T, dtype=torch.int32, device=dev).scatter_(1, index.transpose(1, 2), 1)
    rank = (onehot.cumsum(-1) - 1).transpose(1, 2)  # [B, T, n]: rank of token t among the tokens of (b, m)
    seg_len = onehot.sum(-1).T.reshape(-1)  # [n * B], segment s = m * B + b
    seg = index * B + torch.arange(B, device=dev)[:, None, None]  # [B, T, J]
    cu = torch.nn.functional.pad(seg_len.cumsum(0), (1, 0))
    slots = (cu[seg] + rank.gather(2, index)).view(B * T, J)
    rows = slots.flatten()
    token = torch.arange(B * T, device=dev)[:, None].expand(B * T, J).flatten()
    perm = torch.empty_like(rows).scatter_(0, rows, token)
    row_seg = torch.empty_like(rows).scatter_(0, rows, seg.flatten())
    return SegmentTable(
        slots=slots,
        perm=perm,
        row_start=cu[row_seg].to(torch.int32),
        row_memory=row_seg // B,
        cu_seqlens=cu.to(torch.int32),
        group_ends=cu[B::B].to(torch.int32),
    )


class _TakeRows(torch.autograd.Function):
    """y = x[rows] for distinct rows; the gradient goes back by an index copy (each row written once)."""

    @staticmethod
    def forward(ctx, x, rows):
        ctx.save_for_backward(rows)
        ctx.rows_in = x.shape[0]
        return x.index_select(0, rows)

    @staticmethod
    def backward(ctx, dy):
        (rows,) = ctx.saved_tensors
        return dy.new_zeros(ctx.rows_in, *dy.shape[1:]).index_copy_(0, rows, dy), None


def take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [R, ...] -> x[rows] (rows distinct), with a deterministic backward pass."""
    return _TakeRows.apply(x, rows)


def gather_sum(dx_packed: torch.Tensor, table: SegmentTable) -> torch.Tensor:
    """Per-row gradients [P, C] -> per-token ones [B * T, C]: the sum of a token's J rows (fixed order)."""
    return dx_packed.index_select(0, table.slots.flatten()).view(*table.slots.shape, -1).sum(1)


class _PackTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, table):
        ctx.table = table
        return x.index_select(0, table.perm)

    @staticmethod
    def backward(ctx, dy):
        return gather_sum(dy, ctx.table), None


def pack_tokens(x: torch.Tensor, table: SegmentTable) -> torch.Tensor:
    """Token rows [B * T, C] -> packed rows [P, C] (a token repeated once per selection)."""
    return _PackTokens.apply(x, table)


def _grouped_mm_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """torch._grouped_mm without a host sync: bf16 on sm90+ (its other CUDA cases loop over the groups on the
    host); on the CPU (the interpreter tests) any float dtype. Rows must be 16-byte aligned."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != weight.dtype or (x.shape[1] * x.element_size()) % 16:
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9


class _GroupedLinear(torch.autograd.Function):
    """Packed row r (token perm[r], memory m) -> x[perm[r]] @ weight[m]^T, as one grouped matmul."""

    @staticmethod
    def forward(ctx, x, weight, table):
        ctx.table = table
        ctx.save_for_backward(x, weight)
        return torch._grouped_mm(x.index_select(0, table.perm), weight.transpose(1, 2), offs=table.group_ends)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        table = ctx.table
        dy = dy.contiguous()
        dx = gather_sum(torch._grouped_mm(dy, weight, offs=table.group_ends), table)
        packed = x.index_select(0, table.perm)  # gathered again rather than kept: P x d_model of memory
        dw = torch._grouped_mm(packed.T, dy, offs=table.group_ends).transpose(1, 2)
        # a memory that gets no row has no gradient (the grouped kernel need not write its block)
        rows = torch.diff(table.group_ends, prepend=table.group_ends.new_zeros(1))
        return dx, torch.where(rows[:, None, None] > 0, dw, 0), None


def routed_linear(x: torch.Tensor, weight: torch.Tensor, table: SegmentTable) -> torch.Tensor:
    """The per-memory projections of the routed tokens: x [B * T, d], weight [n, N, d] (memory m's nn.Linear
    weight is weight[m]) -> [P, N], row r projected with its own memory's weight.

    One grouped matmul (torch._grouped_mm) over the packed rows where it runs without a host sync (see
    `_grouped_mm_ok`); elsewhere (float32 on CUDA, GPUs before sm90) every memory's projection of every token is
    computed as one dense matmul and the packed rows are taken from it: (M + shared) / J times the FLOPs, no sync.
    """
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dt), weight.to(dt)
    n, N, d = weight.shape
    if _grouped_mm_ok(x, weight):
        pad = -N % (16 // x.element_size())  # output rows 16-byte aligned for the grouped kernels
        out = _GroupedLinear.apply(x, torch.nn.functional.pad(weight, (0, 0, 0, pad)), table)
        return out[:, :N]
    dense = (x @ weight.reshape(n * N, d).T).view(-1, N)  # [B * T * n, N]: token-major, memory-minor
    return take_rows(dense, table.perm * n + table.row_memory)
