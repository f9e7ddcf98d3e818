"""The routed MoM path: a routing table built on the device, the per-memory projections as one grouped matmul,
the short conv within each memory's segment, the update-rule kernels over the packed segments (the shared
memory as B more segments of the same call), outputs mixed in token order (`kernels.norms`); and a decoding
step that updates only the selected memories. See README.md; the executors that drive it are
`models.routing.packed` and `packed_step`."""

from kernels.mom.conv import batch_conv, segment_conv
from kernels.mom.decode import decode_step
from kernels.mom.routing import SegmentTable, pack_tokens, routed_linear, routing_table, take_rows

__all__ = [
    "SegmentTable",
    "batch_conv",
    "decode_step",
    "pack_tokens",
    "routed_linear",
    "routing_table",
    "segment_conv",
    "take_rows",
]
