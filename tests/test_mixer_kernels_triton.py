"""The Triton kernels around the update rules on the `triton` backend, against float64 PyTorch: the L2 feature
map, the mix of a token's memory outputs followed by the gated per-head RMSNorm (`kernels/norms.py`), the short
conv over whole sequences (`kernels.mom.batch_conv`), and the single-memory mixers that run them, end to end.
Outputs and every gradient, relative error below 1e-3 for float32 inputs and 1e-2 for bf16, fresh random inputs,
buffers poisoned with NaN, widths that are not powers of two, an empty input, and packed rows read through a
random permutation (`slots`). On the CPU under the Triton interpreter; the `gpu` tests add larger sizes.
"""

import pytest
import torch

import kernels
import models
from kernels.conv_torch import causal_conv_silu
from kernels.norms_torch import gated_rmsnorm, l2norm
from kernels.testing import rel_err

pytest.importorskip("triton")
from kernels import mom, norms  # noqa: E402  (after the skip: imports Triton)

TOL = {torch.float32: 1e-3, torch.bfloat16: 1e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


pytestmark = pytest.mark.usefixtures("poison")  # tests/conftest.py


def leaves(*tensors, dtype):
    """The same values as leaves of `dtype` (for the op) and of float64 (for the reference)."""
    rounded = [t.to(dtype) for t in tensors]
    return ([t.clone().requires_grad_() for t in rounded],
            [t.double().requires_grad_() for t in rounded])  # fmt: skip


def assert_close(got: dict, want: dict, dtype):
    errors = {name: rel_err(got[name], want[name]) for name in got}
    bad = {n: e for n, e in errors.items() if not e < TOL[dtype]}  # NaN fails too
    assert not bad, f"relative errors above {TOL[dtype]}: {bad}"


def check_l2norm(shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEVICE)
    dy = torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEVICE)
    (x,), (x_ref,) = leaves(x, dtype=dtype)
    y = norms.l2norm(x)
    y_ref = l2norm(x_ref)
    assert y.shape == x.shape and y.dtype == dtype
    (dx,) = torch.autograd.grad((y * dy.to(dtype)).sum(), [x])
    (dx_ref,) = torch.autograd.grad((y_ref * dy).sum(), [x_ref])
    assert_close({"y": y, "dx": dx}, {"y": y_ref, "dx": dx_ref}, dtype)


@pytest.mark.parametrize("shape,dtype", [
    ((2, 19, 3, 16), torch.float32),
    ((1, 70, 2, 144), torch.float32),  # K not a power of two, over one tile
    ((5, 40), torch.bfloat16),
    ((3, 1, 256), torch.float32),
    ((0, 4, 16), torch.float32),  # no rows
])  # fmt: skip
def test_l2norm_matches_torch(shape, dtype):
    check_l2norm(shape, dtype)


def mix_reference(o, gate, norm_weight, weight, slots, eps):
    """The PyTorch form (float64): a token's rows gathered, weighted and summed, then `gated_rmsnorm`."""
    N, H, V = gate.shape
    rows = o.view(N, -1, H, V) if slots is None else o[slots]
    mixed = rows.sum(1) if weight is None else (rows * weight[:, :, None, None]).sum(1)
    return gated_rmsnorm(mixed, gate, norm_weight, eps)


def check_mix(N, J, H, V, dtype, *, weighted, packed):
    gen = torch.Generator().manual_seed(N * 100 + J * 10 + V)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEVICE)

    o, gate, norm_weight = rand(N * J, H, V), rand(N, H, V), 1 + 0.1 * rand(V)
    weight = torch.softmax(rand(N, J), -1) if weighted else None
    # packed: token t's j-th output is a random row (each row one token's), as the routed MoM's packed rows
    slots = torch.randperm(N * J, generator=gen).view(N, J).to(DEVICE) if packed else None
    dy = rand(N, H, V)
    inputs = [o, gate, norm_weight] + ([weight] if weighted else [])
    ours, ref = leaves(*inputs, dtype=dtype)
    ours[2] = ours[2].detach().float().requires_grad_()  # the norm weight is a float32 parameter
    if weighted:  # routing weights are float32 (the router runs in float32)
        ours[3] = ours[3].detach().float().requires_grad_()
    y = norms.mix_gated_rmsnorm(ours[0], ours[1], ours[2], ours[3] if weighted else None, slots)
    y_ref = mix_reference(ref[0], ref[1], ref[2], ref[3] if weighted else None, slots, 1e-5)
    assert y.shape == (N, H, V) and y.dtype == dtype
    grads = torch.autograd.grad((y * dy.to(dtype)).sum(), ours)
    grads_ref = torch.autograd.grad((y_ref * dy).sum(), ref)
    names = ["y", "do", "dgate", "dnorm_weight", "dweight"]
    assert_close(dict(zip(names, [y, *grads])), dict(zip(names, [y_ref, *grads_ref])), dtype)


@pytest.mark.parametrize("N,J,H,V,dtype,weighted,packed", [
    (37, 1, 2, 16, torch.float32, False, False),  # a single memory: no mix
    (23, 3, 2, 40, torch.float32, True, False),  # V not a power of two
    (29, 3, 1, 32, torch.float32, True, True),  # routed MoM rows: top-2 + shared, packed
    (17, 2, 3, 64, torch.bfloat16, True, True),
    (11, 4, 1, 320, torch.float32, False, True),  # a wide value head (expand_v 5), over several tiles' width
    (0, 3, 2, 16, torch.float32, True, True),  # no tokens
])  # fmt: skip
def test_mix_gated_rmsnorm_matches_torch(N, J, H, V, dtype, weighted, packed):
    check_mix(N, J, H, V, dtype, weighted=weighted, packed=packed)


def test_mix_gated_rmsnorm_names_a_bad_shape():
    o, gate = torch.zeros(10, 2, 16, device=DEVICE), torch.zeros(4, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of the tokens N = 4"):
        norms.mix_gated_rmsnorm(o, gate, torch.ones(16, device=DEVICE))
    with pytest.raises(ValueError, match=r"weight must have shape \[N, J\] = \[4, 2\]"):
        norms.mix_gated_rmsnorm(o[:8], gate, torch.ones(16, device=DEVICE), weight=torch.ones(4, 3, device=DEVICE))
    slots = torch.arange(8, device=DEVICE).view(4, 2)
    with pytest.raises(ValueError, match="o must have N \\* J = 8 rows, got 10"):
        norms.mix_gated_rmsnorm(o, gate, torch.ones(16, device=DEVICE), slots=slots)


def check_conv(N, T, C, size, dtype):
    gen = torch.Generator().manual_seed(N * T + C + size)
    x, weight, dy = (torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEVICE)
                     for shape in ((N, T, C), (C, size), (N, T, C)))  # fmt: skip
    (x, weight), (x_ref, weight_ref) = leaves(x, weight, dtype=dtype)
    weight = weight.detach().float().requires_grad_()  # the conv weights are float32 parameters
    y = mom.batch_conv(x, weight)
    y_ref = causal_conv_silu(x_ref, weight_ref)
    assert y.shape == x.shape and y.dtype == dtype
    grads = torch.autograd.grad((y * dy.to(dtype)).sum(), [x, weight])
    grads_ref = torch.autograd.grad((y_ref * dy).sum(), [x_ref, weight_ref])
    assert_close(dict(zip(["y", "dx", "dweight"], [y, *grads])), dict(zip(["y", "dx", "dweight"], [y_ref, *grads_ref])),
                 dtype)  # fmt: skip


@pytest.mark.parametrize("N,T,C,size,dtype", [
    (2, 37, 24, 4, torch.float32),  # sequences over one program's 32 rows: a boundary inside a program
    (3, 2, 16, 4, torch.float32),  # shorter than the conv
    (1, 50, 200, 2, torch.bfloat16),  # channels over one program's 128
])  # fmt: skip
def test_batch_conv_matches_torch(N, T, C, size, dtype):
    check_conv(N, T, C, size, dtype)


@pytest.mark.parametrize("rule", list(kernels.RULES))
def test_single_memory_mixers_on_triton_match_torch(rule):
    """A whole single-memory layer (conv, feature map, rule, output norm) on the triton backend in float32 against
    the same layer on the torch backend in float64: output and the gradients of the input and every parameter."""
    torch.manual_seed(0)
    ref = models.MIXERS[rule](32, num_heads=2, backend="torch").double().to(DEVICE)
    layer = models.MIXERS[rule](32, num_heads=2, backend="triton").to(DEVICE)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(2, 70, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE)
    dy = torch.randn(2, 70, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(DEVICE)
    results = []
    for module, dtype in ((layer, torch.float32), (ref, torch.float64)):
        inp = x.to(dtype).requires_grad_()
        y = module(inp)
        results.append([y, *torch.autograd.grad((y * dy.to(dtype)).sum(), [inp, *module.parameters()])])
    names = ["y", "dx"] + [f"d{name}" for name, _ in layer.named_parameters()]
    assert_close(dict(zip(names, results[0])), dict(zip(names, results[1])), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_on_gpu_at_paper_size(dtype):
    """The shapes of the paper-size MoM layer (4 heads of 256, top-2 + shared), fewer tokens."""
    check_l2norm((3 * 2048, 4, 256), dtype)
    check_mix(2048, 3, 4, 256, dtype, weighted=True, packed=True)
    check_mix(1000, 1, 4, 64, dtype, weighted=False, packed=False)
    check_conv(4, 2048, 3 * 1024, 4, dtype)


@pytest.mark.parametrize("op", ["l2norm", "mix_gated_rmsnorm", "batch_conv"])
def test_ops_under_vmap_over_runs_equal_each_run_alone(op):
    """Stacked runs call these under torch.func.vmap with each run's own inputs and weights: one launch for all
    runs (kernels/runs.py), equal to each run alone, outputs and gradients; the ragged width 40 on purpose."""
    R, N, T, H, V, J = 3, 2, 19, 2, 40, 3
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE)

    if op == "l2norm":
        inputs = [rand(R, N, T, H, V)]
        fn = norms.l2norm
    elif op == "mix_gated_rmsnorm":
        inputs = [rand(R, N * T * J, H, V), rand(R, N * T, H, V), 1 + 0.1 * rand(R, V), rand(R, N * T, J)]
        fn = norms.mix_gated_rmsnorm
    else:
        inputs = [rand(R, N, T, H * V), 0.3 * rand(R, H * V, 4)]
        fn = mom.batch_conv
    stacked = [x.clone().requires_grad_() for x in inputs]
    alone = [x.clone().requires_grad_() for x in inputs]
    out = torch.func.vmap(fn)(*stacked)
    want = torch.stack([fn(*(x[r] for x in alone)) for r in range(R)])
    dy = rand(*out.shape)
    (out * dy).sum().backward()
    (want * dy).sum().backward()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    for i, (s, a) in enumerate(zip(stacked, alone)):
        torch.testing.assert_close(s.grad, a.grad, rtol=1e-4, atol=1e-5, msg=lambda m, i=i: f"input {i}: {m}")
