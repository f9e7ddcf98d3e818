"""Chunked Triton kernels for every rule: one kernel family parameterised by the rule.

GATE: 0 none, 1 per channel (GLA), 2 per head (simple GLA, gated DeltaNet); DELTA: the delta rule (both from
`kernels.rules`, which refuses the one form not implemented here: a per-channel decay with the delta rule).
The math is in the rules' READMEs. In a chunk of C tokens entered with state h, with b the cumulative log
decay, G_ij = exp(b_i - b_j) (j <= i; per channel for GLA) and U the values written (V, or for the delta rules
the new values U = U' - W h from the UT transform Tm = (I + L)^-1):

    O = scale (exp(b) * Q h + Aqk U),   Aqk = causal(Q K^T * G)
    h' = exp(b_C) h + (K * exp(b_C - b))^T U

The stages, one module each:
- `forward`: `local_kernel` (per chunk: b, Aqk, and for the delta rules Tm, W, U'), `gla_intra_blocks_kernel`
  and `gla_intra_diag_kernel` (GLA's Aqk, computed in sub-chunks so that no positive number is exponentiated),
  `state_kernel` (chunk after chunk: the state entering each chunk, and U), `output_kernel`.
- `backward`: `dstate_kernel` (chunk after chunk backwards: the state gradient after each chunk dH, and for the
  delta rules dU), `dprep_kernel` (per chunk: D = scale causal(dO U^T * G), for the delta rules dv, dbeta's value
  part and P' = strict(-dX_v U^T) * G with dX_v = Tm^T dU, for the other rules dv = dU), `gla_dintra_kernel`
  (GLA's intra-chunk dq, dk), `dqk_kernel` (per chunk and block of K: dq, dk and dbeta's key part). The decays'
  gradient dg is a reverse cumulative sum of per-token terms (`kernels._decay_grad`).
- `common`: what the stages share (the chunk sizes, the products `dot`, the state in pieces).
- `launch`: the chunk table, tile sizes, dot modes and each kernel's warps and stages, with their reasons.
- `function`: the autograd function that runs the stages, and `chunk_op`.

Every sequence is handled as packed (a batch of B rows of T tokens is B sequences); a device-side chunk
table maps a program to its chunk, so there is no host-device sync. Transposed tiles are loaded through
strides instead of `tl.trans` (Triton 3.4-3.6 miscompiles some dots on transposed operands on Hopper). The
two sequential kernels split the state into blocks of V, and of K too for the rules without the delta rule
(whose state rows evolve independently), and hold it as separate tiles of 64 rows (`launch.Tiles`); the delta
rules' UT inverse is blockwise (`forward._ut_inverse`). With bf16 inputs the products run as bf16 tensor-core
dots (`launch.DOT_MODES`), at warp counts that avoid Triton 3.6's miscompiles on Hopper
(`launch.KERNEL_SETTINGS`).
"""

from kernels.chunk.function import chunk_op

__all__ = ["chunk_op"]
