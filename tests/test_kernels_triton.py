"""The Triton ops of every rule against the float64 PyTorch reference: outputs, final states and gradients.

On the CPU they run under the Triton interpreter (tests/conftest.py switches it on) at tiny shapes; on a GPU
the `gpu` tests run larger shapes too. Every buffer the ops allocate starts as NaN (kernels._common.POISON).
Tolerances (relative error ||x - ref|| / ||ref|| against float64): 1e-3 for float32 inputs, 1e-2 for bf16;
backend triton_bf16 (every product on operands rounded to bf16, as fla computes) 1e-1 for either
(kernels.testing.BF16_TOLERANCE).
"""

import pytest
import torch

import kernels
from kernels.testing import BF16_TOLERANCE, make_inputs, rel_err

pytest.importorskip("triton")

MODES = ["recurrent", "chunk"]
TOL = {torch.float32: 1e-3, torch.bfloat16: BF16_TOLERANCE["triton"]}

# (B, T, H, K, V, cu_seqlens or None, dtype): lengths off the chunk grid, packed sequences, empty ones
CPU_CASES = [
    (2, 19, 1, 16, 32, None, torch.float32),
    (1, 90, 1, 32, 16, [0, 13, 13, 90], torch.float32),  # a sequence of more than one chunk (64)
    (1, 70, 1, 16, 16, [0, 0, 70], torch.bfloat16),
    (1, 80, 1, 100, 16, [0, 0, 80], torch.float32),  # K > 64: the delta rules' state in two pieces
    (1, 70, 1, 144, 40, None, torch.bfloat16),  # K > 128: four pieces, state columns in blocks of 32 (ragged)
]
GPU_CASES = [
    (2, 300, 4, 64, 128, None, torch.float32),
    (1, 1000, 2, 64, 128, [0, 0, 130, 577, 577, 1000], torch.float32),
    (2, 200, 2, 256, 256, None, torch.float32),
    (3, 150, 2, 48, 80, None, torch.float32),
    (2, 300, 4, 64, 128, None, torch.bfloat16),
    (1, 1000, 2, 256, 256, [0, 333, 333, 1000], torch.bfloat16),
    (1, 1000, 2, 128, 128, [0, 333, 333, 1000], torch.bfloat16),
]
# every power-of-two head dim with a single head (block sizes and shared memory depend on K and V alone)
GPU_HEAD_DIM_CASES = [(2, 200, 1, d, d, None, dtype) for d in (16, 32, 64, 128, 256) for dtype in TOL]


pytestmark = pytest.mark.usefixtures("poison")  # tests/conftest.py


def check(rule, mode, B, T, H, K, V, cu, dtype, device, ref_mode, beta_max=1.0, backend="triton"):
    N = B if cu is None else len(cu) - 1
    cu_seqlens = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=device)
    x64 = make_inputs(rule, B, T, H, K, V, dtype=torch.float64, device=device, initial_state=True, N=N,
                      beta_max=beta_max)  # fmt: skip
    # the op and the reference see the same (rounded) inputs
    x = {n: t.detach().to(dtype if n != "initial_state" else torch.float32).requires_grad_() for n, t in x64.items()}
    ref_in = {n: t.detach().double().requires_grad_() for n, t in x.items()}
    ref = kernels.get_op(rule, "torch", ref_mode)(**ref_in, output_final_state=True, cu_seqlens=cu_seqlens)
    do, dht = torch.randn_like(ref[0]), torch.randn_like(ref[1])
    ref_grads = torch.autograd.grad((ref[0] * do).sum() + (ref[1] * dht).sum(), list(ref_in.values()))

    o, ht = kernels.get_op(rule, backend, mode)(**x, output_final_state=True, cu_seqlens=cu_seqlens)
    assert o.shape == (B, T, H, V) and o.dtype == dtype
    assert ht.shape == (N, H, K, V) and ht.dtype == torch.float32
    grads = torch.autograd.grad((o * do.to(dtype)).sum() + (ht * dht.float()).sum(), list(x.values()))
    errors = {"o": rel_err(o, ref[0]), "ht": rel_err(ht, ref[1])}
    errors.update({f"d{n}": rel_err(got, want) for n, got, want in zip(x, grads, ref_grads)})
    tol = BF16_TOLERANCE[backend] if backend == "triton_bf16" else TOL[dtype]
    bad = {n: e for n, e in errors.items() if not e < tol}  # NaN fails too
    assert not bad, f"relative errors above {tol}: {bad}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rule", kernels.RULES)
@pytest.mark.parametrize("B,T,H,K,V,cu,dtype", CPU_CASES)
def test_triton_op_matches_reference(rule, mode, B, T, H, K, V, cu, dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check(rule, mode, B, T, H, K, V, cu, dtype, device, ref_mode="recurrent")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rule", kernels.RULES)
@pytest.mark.parametrize("B,T,H,K,V,cu,dtype", GPU_CASES + GPU_HEAD_DIM_CASES)
def test_triton_op_matches_reference_large(rule, mode, B, T, H, K, V, cu, dtype):
    # float64 chunked form as the reference: equal to the recurrence (test_kernels_naive) and far faster
    check(rule, mode, B, T, H, K, V, cu, dtype, "cuda", ref_mode="chunk")


@pytest.mark.parametrize("rule", kernels.RULES)
@pytest.mark.parametrize("B,T,H,K,V,cu,dtype", CPU_CASES)
def test_triton_bf16_chunk_op_matches_reference(rule, B, T, H, K, V, cu, dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check(rule, "chunk", B, T, H, K, V, cu, dtype, device, ref_mode="recurrent", backend="triton_bf16")


@pytest.mark.gpu
@pytest.mark.parametrize("rule", kernels.RULES)
@pytest.mark.parametrize("B,T,H,K,V,cu,dtype", GPU_CASES + GPU_HEAD_DIM_CASES)
def test_triton_bf16_chunk_op_matches_reference_large(rule, B, T, H, K, V, cu, dtype):
    check(rule, "chunk", B, T, H, K, V, cu, dtype, "cuda", ref_mode="chunk", backend="triton_bf16")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rule", [name for name, r in kernels.RULES.items() if r.delta])
@pytest.mark.parametrize("B,T,H,K,V,cu,dtype", [CPU_CASES[1], CPU_CASES[2]])
def test_triton_op_matches_reference_with_negative_eigenvalues(rule, mode, B, T, H, K, V, cu, dtype):
    """beta in (0, 2) (`allow_neg_eigval`): I - beta k k^T has the eigenvalue 1 - beta < 0 along k."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check(rule, mode, B, T, H, K, V, cu, dtype, device, ref_mode="recurrent", beta_max=2.0)


@pytest.mark.parametrize("mode", MODES)
def test_triton_op_without_initial_or_final_state(mode):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = make_inputs("gated_deltanet", 1, 20, 2, 16, 16, device=device)
    op = kernels.get_op("gated_deltanet", "triton", mode)
    o, ht = op(**x)
    ref, _ = kernels.get_op("gated_deltanet", "torch", "recurrent")(**x)
    assert ht is None and rel_err(o, ref) < 1e-3
    o.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in x.values())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rule", ["gla", "gated_deltanet"])
def test_triton_op_final_state_gradient_of_any_layout(rule, mode):
    """A loss such as ht.sum() hands the backward an expanded (stride 0) dht, which the kernels once read as
    contiguous: every gradient came out wrong (or NaN)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cu = torch.tensor([0, 3, 3, 11], dtype=torch.int32, device=device)
    x64 = make_inputs(rule, 1, 11, 2, 16, 16, dtype=torch.float64, device=device, initial_state=True, N=3)
    x = {n: t.detach().float().requires_grad_() for n, t in x64.items()}
    ref = kernels.get_op(rule, "torch", "recurrent")(**x64, output_final_state=True, cu_seqlens=cu)
    o, ht = kernels.get_op(rule, "triton", mode)(**x, output_final_state=True, cu_seqlens=cu)
    do = torch.randn_like(ref[0])
    ref_grads = torch.autograd.grad((ref[0] * do).sum() + ref[1].sum(), list(x64.values()))
    grads = torch.autograd.grad((o * do.float()).sum() + ht.sum(), list(x.values()))
    errors = {f"d{n}": rel_err(got, want) for n, got, want in zip(x, grads, ref_grads)}
    assert not {n: e for n, e in errors.items() if not e < 1e-4}, errors


def test_triton_op_refuses_float64():
    x = make_inputs("deltanet", 1, 4, 1, 16, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        kernels.get_op("deltanet", "triton", "recurrent")(**x)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cu", [[0, 5, 15], [0, 12, 5, 20], [1, 20]], ids=["short-of-T", "falling", "not-from-0"])
def test_triton_op_refuses_offsets_that_do_not_rise_from_0_to_T(mode, cu):
    """As the torch ops do: the kernels would read the offsets unchecked and return wrong outputs (or crash)."""
    x = make_inputs("gated_deltanet", 1, 20, 1, 16, 16)
    with pytest.raises(ValueError, match=r"cu_seqlens must rise from 0 to T = 20"):
        kernels.get_op("gated_deltanet", "triton", mode)(**x, cu_seqlens=torch.tensor(cu, dtype=torch.int32))
