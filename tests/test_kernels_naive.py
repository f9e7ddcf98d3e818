"""The chunked PyTorch form of every rule against its token-by-token recurrence; the dispatch contract."""

import pytest
import torch

import kernels
from kernels import rules
from kernels.testing import make_inputs, rel_err

# (B, T, H, K, V, cu_seqlens or None, chunk_size): lengths off the chunk grid, packed sequences, an empty one
SHAPES = [
    (2, 37, 2, 16, 24, None, 16),
    (1, 80, 1, 32, 16, None, 64),
    (1, 70, 2, 16, 16, [0, 21, 21, 70], 16),
    (1, 45, 1, 24, 32, [0, 0, 45], 32),
]


def _grads(out, inputs, seed):
    gen = torch.Generator().manual_seed(seed)
    o, ht = out
    loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
    if ht is not None:
        loss = loss + (ht * torch.randn(ht.shape, generator=gen, dtype=ht.dtype)).sum()
    return torch.autograd.grad(loss, list(inputs.values()))


@pytest.mark.parametrize("rule", kernels.RULES)
@pytest.mark.parametrize("B,T,H,K,V,cu,chunk", SHAPES)
def test_chunk_matches_recurrence_float64(rule, B, T, H, K, V, cu, chunk):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    N = B if cu is None else len(cu) - 1
    inputs = make_inputs(rule, B, T, H, K, V, dtype=torch.float64, generator=gen, initial_state=True, N=N)
    cu_seqlens = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    ref = kernels.get_op(rule, "torch", "recurrent")(**inputs, output_final_state=True, cu_seqlens=cu_seqlens)
    out = kernels.get_op(rule, "torch", "chunk")(
        **inputs, output_final_state=True, cu_seqlens=cu_seqlens, chunk_size=chunk
    )
    assert out[0].shape == (B, T, H, V) and out[0].dtype == torch.float64
    assert out[1].shape == (N, H, K, V) and out[1].dtype == torch.float64
    assert rel_err(out[0], ref[0]) < 1e-10
    assert rel_err(out[1], ref[1]) < 1e-10
    seed = int(torch.randint(2**31, (), generator=gen))
    for name, got, want in zip(inputs, _grads(out, inputs, seed), _grads(ref, inputs, seed)):
        assert rel_err(got, want) < 1e-10, name


@pytest.mark.parametrize("rule", [name for name, r in kernels.RULES.items() if r.delta])
@pytest.mark.parametrize("B,T,H,K,V,cu,chunk", SHAPES[1:3])
def test_chunk_matches_recurrence_with_negative_eigenvalues(rule, B, T, H, K, V, cu, chunk):
    """beta in (0, 2) (`allow_neg_eigval`): the UT transform's L is no longer small, the forms still agree."""
    N = B if cu is None else len(cu) - 1
    inputs = make_inputs(rule, B, T, H, K, V, dtype=torch.float64, initial_state=True, N=N, beta_max=2.0)
    assert inputs["beta"].max() > 1.5
    cu_seqlens = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    ref = kernels.get_op(rule, "torch", "recurrent")(**inputs, output_final_state=True, cu_seqlens=cu_seqlens)
    out = kernels.get_op(rule, "torch", "chunk")(**inputs, output_final_state=True, cu_seqlens=cu_seqlens,
                                                 chunk_size=chunk)  # fmt: skip
    assert rel_err(out[0], ref[0]) < 1e-10 and rel_err(out[1], ref[1]) < 1e-10
    for name, got, want in zip(inputs, _grads(out, inputs, 0), _grads(ref, inputs, 0)):
        assert rel_err(got, want) < 1e-10, name


@pytest.mark.parametrize("rule", kernels.RULES)
def test_chunk_float32_close_to_float64_recurrence(rule):
    inputs = make_inputs(rule, 2, 100, 2, 32, 32, dtype=torch.float64, initial_state=True)
    ref = kernels.get_op(rule, "torch", "recurrent")(**inputs, output_final_state=True)
    inputs32 = {name: x.detach().float() for name, x in inputs.items()}
    o, ht = kernels.get_op(rule, "torch", "chunk")(**inputs32, output_final_state=True)
    assert o.dtype == torch.float32 and ht.dtype == torch.float32
    assert rel_err(o, ref[0]) < 1e-5 and rel_err(ht, ref[1]) < 1e-5


@pytest.mark.parametrize("mode", kernels.MODES)
@pytest.mark.parametrize("rule", kernels.RULES)
def test_bf16_inputs_give_bf16_outputs(rule, mode):
    """o like v, computed in float32: the contract of every op (the Triton ops and the routed MoM mix on it)."""
    inputs = make_inputs(rule, 1, 70, 2, 16, 16, dtype=torch.bfloat16)
    o, ht = kernels.get_op(rule, "torch", mode)(**inputs, output_final_state=True)
    assert o.dtype == torch.bfloat16 and ht.dtype == torch.float32
    ref, _ = kernels.get_op(rule, "torch", mode)(**{n: x.detach().double() for n, x in inputs.items()})
    assert rel_err(o, ref) < 1e-2


def test_gla_chunk_survives_strong_decays():
    """Cumulative decays far below exp's float32 range inside one chunk must not overflow."""
    inputs = make_inputs("gla", 1, 128, 1, 16, 16, dtype=torch.float64)
    inputs["g"] = (inputs["g"].detach() * 40).requires_grad_()
    ref = kernels.get_op("gla", "torch", "recurrent")(**inputs)
    o, _ = kernels.get_op("gla", "torch", "chunk")(**{n: x.detach().float() for n, x in inputs.items()})
    assert torch.isfinite(o).all() and rel_err(o, ref[0]) < 1e-5


@pytest.mark.parametrize("mode", kernels.MODES)
@pytest.mark.parametrize("rule", kernels.RULES)
def test_masked_tokens_leave_the_state_alone(rule, mode):
    """k = 0 / beta = 0 (and g = 0) on a token: the state is unchanged, as if the token were absent."""
    inputs = {n: x.detach() for n, x in make_inputs(rule, 1, 20, 2, 16, 16, dtype=torch.float64).items()}
    keep = torch.rand(20) < 0.5
    masked = dict(inputs)
    masked["k"] = inputs["k"] * keep[None, :, None, None]
    if "beta" in inputs:
        masked["beta"] = inputs["beta"] * keep[None, :, None]
    if "g" in inputs:
        masked["g"] = inputs["g"] * keep.view(1, 20, *[1] * (inputs["g"].dim() - 2))
    op = kernels.get_op(rule, "torch", mode)
    _, ht = op(**masked, output_final_state=True)
    _, ref = op(**{n: x[:, keep] for n, x in inputs.items()}, output_final_state=True)
    assert rel_err(ht, ref) < 1e-12


def test_bad_arguments_name_the_setting():
    x = make_inputs("gated_deltanet", 1, 8, 2, 16, 16)
    q, k, v, g, beta = (x[n].detach() for n in ("q", "k", "v", "g", "beta"))
    op = kernels.get_op("gated_deltanet", "torch")
    with pytest.raises(ValueError, match="needs g"):
        op(q, k, v, beta=beta)
    with pytest.raises(ValueError, match=r"beta must have shape \[B, T, H\]"):
        op(q, k, v, g=g, beta=beta[..., :1])
    with pytest.raises(ValueError, match="takes no beta"):
        kernels.get_op("gla", "torch")(q, k, v, g=k, beta=beta)
    with pytest.raises(ValueError, match="takes no g"):
        kernels.get_op("linear_attention", "torch")(q, k, v, g=k)
    with pytest.raises(ValueError, match=r"initial_state must have shape \[N, H, K, V\]"):
        op(q, k, v, g=g, beta=beta, initial_state=torch.zeros(2, 2, 16, 16))
    with pytest.raises(ValueError, match="batch size B = 1"):
        op(
            q.expand(2, -1, -1, -1),
            k.expand(2, -1, -1, -1),
            v.expand(2, -1, -1, -1),
            g=g.expand(2, -1, -1),
            beta=beta.expand(2, -1, -1),
            cu_seqlens=torch.tensor([0, 8]),
        )


def test_dispatch_contract():
    cpu = torch.device("cpu")
    assert kernels.resolve_backend("torch", cpu) == "torch"
    assert kernels.resolve_backend("auto", cpu) == "torch"
    with pytest.raises(ValueError, match="'cuda_graphs'.*torch"):
        kernels.resolve_backend("cuda_graphs", cpu)
    with pytest.raises(ValueError, match="rule 'lstm'.*gated_deltanet"):
        kernels.get_op("lstm", "torch")
    with pytest.raises(ValueError, match="mode 'parallel'.*recurrent"):
        kernels.get_op("gla", "torch", "parallel")
    from kernels import reference
    from kernels.gla.naive import naive_chunk

    assert kernels.get_op("gla", "torch") is naive_chunk
    assert kernels.get_op("gla", "torch", "recurrent").func is reference.recurrent


def test_triton_backend_refused_on_cpu_without_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kernels.resolve_backend("triton", torch.device("cpu"))


def test_declaring_a_rule_refuses_what_the_kernels_cannot_run(monkeypatch):
    monkeypatch.setattr(rules, "RULES", dict(rules.RULES))  # undone after the test
    update = rules.get_rule("gla").update
    with pytest.raises(ValueError, match="chunk kernels cannot run gate='channel' with delta=True"):
        rules.declare("kda", gate="channel", delta=True, update=update)
    with pytest.raises(ValueError, match="gate='vector' is not valid"):
        rules.declare("vector", gate="vector", delta=False, update=update)
    with pytest.raises(ValueError, match="'gla' is already declared"):
        rules.declare("gla", gate="channel", delta=False, update=update)
    with pytest.raises(ValueError, match="update is not the form that the kernels compute for gate='head'"):
        rules.declare("undecayed", gate="head", delta=False, update=rules.get_rule("linear_attention").update)
    assert set(rules.RULES) == set(kernels.RULES)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", kernels.MODES)
def test_bad_tensors_name_the_argument(backend, mode):
    """Checked before any work, as the shapes are: on the torch forms these failed in a reshape or a division, or
    computed a NaN or an integer input silently; the Triton kernels would read a tensor of another device."""
    if backend == "triton":
        pytest.importorskip("triton")
        kernels.resolve_backend("triton", torch.device("cpu"))  # under TRITON_INTERPRET=1 (conftest)
    x = {n: t.detach() for n, t in make_inputs("gated_deltanet", 1, 8, 2, 16, 16).items()}
    op = kernels.get_op("gated_deltanet", backend, mode)
    with pytest.raises(TypeError, match="cu_seqlens must be a torch.Tensor, got list"):
        op(**x, cu_seqlens=[0, 8])
    with pytest.raises(TypeError, match="q must be a torch.Tensor, got ndarray"):
        op(**{**x, "q": x["q"].numpy()})
    with pytest.raises(TypeError, match="k must be a floating-point tensor, got torch.int64"):
        op(**{**x, "k": x["k"].long()})
    with pytest.raises(ValueError, match="beta is on meta, q on cpu"):
        op(**{**x, "beta": x["beta"].to("meta")})
    with pytest.raises(ValueError, match="cu_seqlens is on meta, q on cpu"):
        op(**x, cu_seqlens=torch.tensor([0, 8], device="meta"))
    with pytest.raises(ValueError, match="scale=nan is not valid; it must be a finite number"):
        op(**x, scale=float("nan"))
    for index in (0, 2, 3):  # B, H, K
        with pytest.raises(ValueError, match=r"q, k, v need B, H, K, V >= 1 \(T may be 0\)"):
            op(**{n: t.narrow(index, 0, 0) if (index < 3 or n in ("q", "k")) and t.dim() > index else t
                  for n, t in x.items()})  # fmt: skip
    o, _ = op(**{n: t[:, :0] for n, t in x.items()})  # T = 0 is no error: an empty output
    assert o.shape == (1, 0, 2, 16)
