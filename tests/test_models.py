"""Model zoo tests: parallel form = recurrent form, MoM routing semantics, gradients, configs, backbone."""

from __future__ import annotations

import pytest
import torch

import kernels
import models
from models import build_model
from models.attention import Attention
from models.mom import MoM

RULES = tuple(kernels.RULES)
DELTA_RULES = tuple(r for r in RULES if kernels.get_rule(r).delta)
D, H = 8, 2  # tiny mixers: d_model 8, 2 heads of dim 4


def make(mixer: str, seed: int = 0, **options) -> torch.nn.Module:
    torch.manual_seed(seed)
    options.setdefault("num_heads", H)
    return models.MIXERS[mixer](D, backend="torch", **options).double()


def randn(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run_steps(mixer, x):
    state, ys = mixer.init_state(x.shape[0]), []
    for t in range(x.shape[1]):
        y, state = mixer.step(x[:, t], state)
        ys.append(y)
    return torch.stack(ys, 1), state


MIXER_CASES = [
    ("attention", {}),
    ("attention", {"conv_size": 0, "rope": False}),
    *[(r, {}) for r in RULES],
    ("gated_deltanet", {"conv_size": 0, "expand_v": 2}),
    *[(r, {"allow_neg_eigval": True}) for r in DELTA_RULES],
    *[("mom", {"rule": r, "num_memories": 3, "top_k": 2, "shared_memory": True}) for r in RULES],
    (
        "mom",
        {"rule": "gated_deltanet", "num_memories": 4, "top_k": 1, "shared_memory": False, "conv_size": 2},
    ),
    ("mom", {"rule": "deltanet", "num_memories": 3, "top_k": 2, "allow_neg_eigval": True}),
]


@pytest.mark.parametrize("mixer,options", MIXER_CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("T", [1, 13, 70])  # 70: past the chunked forms' first 64-token chunk
def test_parallel_equals_recurrent(mixer, options, T):
    m = make(mixer, **options)
    x = randn(2, T, D)
    y = m(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y_rec, _ = run_steps(m, x)
    torch.testing.assert_close(y, y_rec, rtol=1e-10, atol=1e-10)


def forced_router(mom: MoM, x: torch.Tensor, gains: list[float]) -> torch.Tensor:
    """Make channel 0 of x a constant 1 and give memory m the router logit gains[m] from it; the memories
    with gain 0 compete through the other channels. Returns the modified x."""
    x = x.clone()
    x[..., 0] = 1.0
    with torch.no_grad():
        w = mom.router.weight
        w[:, 0] = torch.tensor(gains, dtype=w.dtype)
        for m, gain in enumerate(gains):
            if gain:
                w[m, 1:] = 0
            else:
                w[m, 1:] *= 4
    return x


@pytest.mark.parametrize("rule", RULES)
def test_mom_ragged_routing(rule):
    """Memory 0 gets every token, memory 3 none, memories 1 and 2 share the rest unevenly."""
    mom = make("mom", rule=rule, num_memories=4, top_k=2, shared_memory=True)
    x = forced_router(mom, randn(2, 11, D), [20.0, 0.0, 0.0, -20.0])
    mask = mom.route(x)[1].dense_mask
    assert mask[..., 0].all() and not mask[..., 3].any() and mask[..., 4].all()
    assert 0 < mask[..., 1].sum() < mask[..., 1].numel()  # ragged

    y = mom(x)
    stats = mom.router_stats()
    assert stats["load_m0"] == pytest.approx(0.5) and stats["load_m3"] == 0.0
    assert sum(stats[f"load_m{j}"] for j in range(4)) == pytest.approx(1.0)
    y_rec, state = run_steps(mom, x)
    torch.testing.assert_close(y, y_rec, rtol=1e-10, atol=1e-10)
    assert (state["S"][:, 3] == 0).all() and (state["S"][:, 0] != 0).any()

    # the memory that gets no token learns nothing: its key and value rows get no gradient
    y.square().sum().backward()
    HK, HV = mom.memory.num_heads * mom.memory.key_dim, mom.memory.num_heads * mom.memory.value_dim
    assert (mom.memory.k_proj.weight.grad[3 * HK : 4 * HK] == 0).all()
    assert (mom.memory.v_proj.weight.grad[3 * HV : 4 * HV] == 0).all()
    assert (mom.memory.k_proj.weight.grad[:HK] != 0).any()


def test_router_weights_and_aux_loss():
    mom = make("mom", num_memories=4, top_k=2, shared_memory=True)
    x = randn(2, 6, D)
    probs, routing = mom.route(x.float())
    mask, weight = routing.dense_mask, routing.dense_weight
    assert probs.dtype == torch.float32 and mask.shape == weight.shape == (2, 6, 5)
    assert (mask.sum(-1) == 3).all() and (weight[..., 4] == 1).all() and (weight[~mask] == 0).all()
    top = probs.topk(2, -1).values
    torch.testing.assert_close(
        weight[..., :4].sort(-1, descending=True).values[..., :2], top / top.sum(-1, keepdim=True)
    )
    # aux = M * sum_m c_m P_m is exactly k when the router is uniform, more when it is not
    with torch.no_grad():
        mom.router.weight.zero_()
    mom(x)
    torch.testing.assert_close(mom.aux_loss, torch.tensor(2 * 1e-3, dtype=torch.float64))
    assert mom.router_stats()["router_entropy"] == pytest.approx(torch.log(torch.tensor(4.0)).item())
    mom(forced_router(mom, x, [20.0, 0.0, 0.0, -20.0]))
    assert mom.router_stats()["aux_loss"] > 2.5


def slot_weights(mom: MoM, single: torch.nn.Module, slot: int) -> dict:
    """The single-memory mixer's parameters for memory `slot` of `mom`: slot blocks sliced, shared copied."""
    out = {}
    for name, p in mom.memory.state_dict().items():
        rows = single.state_dict()[name].shape[0]
        out[name] = p if p.shape == single.state_dict()[name].shape else p[slot * rows : (slot + 1) * rows]
    return out


@pytest.mark.parametrize("rule", RULES)
def test_mom_memory_sees_its_own_subsequence(rule):
    """Top-1, no shared memory: at the tokens routed to memory m, MoM's output is the single-memory mixer with
    memory m's weights run on that subsequence alone (short conv and state within the subsequence)."""
    mom = make("mom", rule=rule, num_memories=2, top_k=1, shared_memory=False)
    x = randn(2, 17, D)
    with torch.no_grad():
        mom.router.weight.zero_()
        mom.router.weight[:, 0] = torch.tensor([10.0, -10.0], dtype=torch.float64)
    y = mom(x)
    for slot, side in ((0, x[..., 0] > 0), (1, x[..., 0] <= 0)):
        single = make(rule)
        single.load_state_dict(slot_weights(mom, single, slot))
        for b in range(x.shape[0]):
            idx = side[b].nonzero()[:, 0]
            assert 0 < len(idx) < x.shape[1]
            torch.testing.assert_close(y[b, idx], single(x[b : b + 1, idx])[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rule", RULES)
def test_one_memory_mom_is_the_single_mixer(rule):
    single = make(rule, seed=3)
    mom = make("mom", seed=4, rule=rule, num_memories=1, top_k=1, shared_memory=False)
    mom.memory.load_state_dict(single.state_dict())
    x = randn(2, 9, D)
    torch.testing.assert_close(mom(x), single(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(run_steps(mom, x)[0], run_steps(single, x)[0], rtol=1e-12, atol=1e-12)
    assert mom.state_size(9) == single.state_size(9)


@pytest.mark.parametrize("rule", RULES)
def test_mom_gradcheck(rule):
    mom = make(
        "mom", rule=rule, num_memories=3, top_k=2, shared_memory=True, num_heads=1, head_dim=3, conv_size=2
    )
    x = randn(1, 5, D, seed=2).requires_grad_()
    w = mom.router.weight.detach().clone().requires_grad_()

    def f(x, w):
        y = torch.func.functional_call(mom, {"router.weight": w}, (x,))
        return y, mom.aux_loss

    assert torch.autograd.gradcheck(f, (x, w), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_state_sizes():
    L = 100
    assert make("attention").state_size(L) == 2 * D * L
    for rule in RULES:
        assert make(rule).state_size(L) == H * (D // H) ** 2
    mom = make("mom", num_memories=4, top_k=2, shared_memory=True)
    assert mom.state_size(L) == 5 * H * (D // H) ** 2
    # the "single expanded memory" control: one memory, value dim x (M + shared), the same state size
    assert make("gated_deltanet", expand_v=5).state_size(L) == mom.state_size(L)
    assert make("mom", num_memories=1, top_k=1, shared_memory=False, expand_v=5).state_size(
        L
    ) == mom.state_size(L)
    lm = models.build_model(
        vocab_size=16, max_seq_len=L, mixer="mom", d_model=D, n_layers=3, mixer_options={"num_heads": H}
    )
    assert lm.state_size(L) == 3 * mom.state_size(L)


@pytest.mark.parametrize(
    "kwargs,key,valid",
    [
        ({"mixer": "transformer"}, "mixer", "gated_deltanet"),
        ({"mixer": "gla", "d_model": 10, "mixer_options": {"num_heads": 3}}, "num_heads", "[1, 2, 5, 10]"),
        (
            {"mixer": "attention", "d_model": 10, "mixer_options": {"num_heads": 4}},
            "num_heads",
            "[1, 2, 5, 10]",
        ),
        ({"mixer": "mom", "mixer_options": {"num_memories": 4, "top_k": 0}}, "top_k", "1..num_memories=4"),
        ({"mixer": "mom", "mixer_options": {"num_memories": 4, "top_k": 5}}, "top_k", "1..num_memories=4"),
        ({"mixer": "mom", "mixer_options": {"rule": "mamba"}}, "rule", "gated_deltanet"),
        ({"mixer": "gla", "mixer_options": {"num_memories": 2}}, "num_memories", "conv_size"),
        ({"mixer": "gla", "mixer_options": {"num_slots": 2}}, "num_slots", "expand_v"),
        ({"mixer": "gla", "backend": "cuda"}, "backend", "triton"),
        ({"mixer": "deltanet", "mixer_options": {"conv_size": -1}}, "conv_size", ">= 0"),
        ({"mixer": "deltanet", "mixer_options": {"expand_v": 0.3}}, "expand_v", "integer"),
        ({"mixer": "mom", "mixer_options": {"shared_memory": "yes"}}, "shared_memory", "true or false"),
        ({"mixer": "mom", "mixer_options": {"aux_loss_coef": -1.0}}, "aux_loss_coef", ">= 0"),
        # a top-1 weight is 1: with no balance loss the router never gets a gradient (it was trained frozen)
        ({"mixer": "mom", "mixer_options": {"top_k": 1, "aux_loss_coef": 0}}, "aux_loss_coef=0", "top_k >= 2"),
        ({"mixer": "attention", "d_model": 0}, "d_model", ">= 1"),
        ({"mixer": "mom", "mixer_options": ["top_k"]}, "mixer_options", "mapping"),
        ({"mixer": "gla", "mixer_options": 2}, "mixer_options", "num_heads"),
    ],
)
def test_bad_config(kwargs, key, valid):
    with pytest.raises(ValueError) as err:
        models.build_model(vocab_size=16, max_seq_len=8, **kwargs)
    assert key in str(err.value) and valid in str(err.value)


@pytest.mark.parametrize("head_dim,expand_v,value_dim", [(50, 1.1, 55), (90, 0.7, 63), (25, 4.6, 115), (64, 1.5, 96)])
def test_expand_v_giving_a_whole_value_dim_is_accepted(head_dim, expand_v, value_dim):
    """head_dim * expand_v a whole number that binary floating point misses by an ulp (50 * 1.1 = 55.00000000000001)
    was refused as "must be a positive integer"."""
    mixer = models.MIXERS["gated_deltanet"](head_dim, expand_v=expand_v)
    assert mixer.value_dim == value_dim and mixer.state_size(1) == head_dim * value_dim


def test_content_loads_count_only_the_positions_given():
    """`stats_positions`: each MoM layer's content_load_m{j} is the share of the routed slots of those positions
    alone (the sandbox passes its tasks' tokens, leaving out the filler), beside the loads over every position."""
    torch.manual_seed(0)
    lm = models.build_model(vocab_size=20, max_seq_len=16, mixer="mom", d_model=D, backend="torch",
                            mixer_options={"num_heads": H, "num_memories": 4, "top_k": 2})
    ids = torch.randint(1, 20, (3, 12))
    ids[:, 7:] = 0
    counted = torch.rand(3, 12) < 0.5
    routes = []
    for block in lm.blocks:  # each layer's routing, as its forward computes it
        block.mixer.register_forward_hook(lambda mod, args, out: routes.append(mod.route(args[0])[1].dense_mask))
    lm(ids, stats_positions=counted)
    stats = lm.router_stats()
    for layer, mask in enumerate(routes):
        expected = mask[..., :4][counted].double().mean(0) / 2
        got = torch.tensor([stats[f"layer{layer}/content_load_m{j}"] for j in range(4)], dtype=torch.float64)
        torch.testing.assert_close(got, expected)
        everywhere = torch.tensor([stats[f"layer{layer}/load_m{j}"] for j in range(4)], dtype=torch.float64)
        torch.testing.assert_close(everywhere, mask[..., :4].flatten(0, 1).double().mean(0) / 2)
    assert all(block.mixer.stats_positions is None for block in lm.blocks)  # not kept past the forward
    lm(ids)
    assert not any("content_load" in key for key in lm.router_stats())


def test_backbone_outputs_and_config():
    torch.manual_seed(0)
    lm = models.build_model(
        vocab_size=20,
        max_seq_len=16,
        mixer="mom",
        d_model=D,
        mlp=True,
        learned_positions=True,
        mixer_options={"num_heads": H, "aux_loss_coef": 0.01},
    )
    assert lm.config["backend"] == "auto" and lm.config["mixer_options"]["rule"] == "gated_deltanet"
    assert lm.config["mixer_options"]["num_memories"] == 4  # the resolved defaults are recorded
    ids = torch.randint(0, 20, (3, 10))
    mask = torch.rand(3, 10) < 0.4
    full, part = lm(ids), lm(ids, label_mask=mask)
    assert full.logits.shape == (3, 10, 20) and part.logits.shape == (int(mask.sum()), 20)
    torch.testing.assert_close(part.logits, full.logits[mask])
    layer_aux = [b.mixer.aux_loss for b in lm.blocks]
    torch.testing.assert_close(part.aux_loss, sum(layer_aux))
    assert part.aux_loss.requires_grad and part.aux_loss > 0
    stats = lm.router_stats()
    assert set(stats) == {
        f"layer{i}/{k}"
        for i in range(2)
        for k in ["load_m0", "load_m1", "load_m2", "load_m3", "router_entropy", "aux_loss"]
    }
    assert all(isinstance(v, float) for v in stats.values())
    assert stats["layer0/aux_loss"] == pytest.approx(layer_aux[0].item() / 0.01)
    (part.logits.logsumexp(-1).mean() + part.aux_loss).backward()
    assert all(p.grad is not None for p in lm.parameters())
    assert lm.num_parameters() == sum(p.numel() for p in lm.parameters())
    with pytest.raises(ValueError, match="max_seq_len"):
        lm(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("mixer", ["attention", "gla", "mom"])
def test_backbone_step_equals_forward(mixer):
    torch.manual_seed(0)
    lm = models.build_model(
        vocab_size=20,
        max_seq_len=16,
        mixer=mixer,
        d_model=D,
        mlp=True,
        learned_positions=True,
        backend="torch",
        mixer_options={"num_heads": H},
    ).double()
    ids = torch.randint(0, 20, (2, 7))
    out = lm(ids)
    if mixer != "mom":
        assert out.aux_loss.item() == 0.0 and lm.router_stats() == {}
    state, logits = lm.init_state(2), []
    for t in range(7):
        step_logits, state = lm.step(ids[:, t], state)
        logits.append(step_logits)
    torch.testing.assert_close(out.logits, torch.stack(logits, 1), rtol=1e-10, atol=1e-10)


def test_backend_is_the_setting_not_the_length(monkeypatch):
    """The op is chosen from the backend setting and the device only, whatever the sequence length."""
    calls = []
    get_op = kernels.get_op

    def spy(rule, backend, mode="chunk"):
        calls.append((rule, backend, mode))
        return get_op(rule, backend, mode)

    monkeypatch.setattr(kernels, "get_op", spy)
    mom = make("mom", rule="gla", num_memories=2, top_k=1)
    for T in (2, 130):
        mom(randn(1, T, D))
    assert calls == [("gla", "torch", "chunk")] * 2
    assert kernels.resolve_backend("auto", torch.device("cpu")) == "torch"


def test_float32_forward_close_to_float64():
    mom = make("mom", rule="gated_deltanet")
    x = randn(2, 9, D)
    y64 = mom(x)
    y32 = mom.float()(x.float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y64, rtol=1e-4, atol=1e-5)


def test_mixed_precision_keeps_the_router_in_fp32():
    mom = make("mom", rule="gla").float()
    x = randn(2, 9, D).float()
    probs, _ = mom.route(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs_amp, routing = mom.route(x)
        weight_amp = routing.dense_weight
        y = mom(x)
    assert probs_amp.dtype == weight_amp.dtype == torch.float32
    torch.testing.assert_close(probs_amp, probs)
    assert torch.isfinite(y).all()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_mom_forward_backward_on_gpu_without_host_sync(backend):
    if backend == "auto":  # Triton on CUDA
        pytest.importorskip("triton")
    torch.manual_seed(0)
    mom = MoM(64, num_heads=2, backend=backend).cuda()
    ref = MoM(64, num_heads=2, backend="torch").cuda().double()
    ref.load_state_dict(mom.state_dict())
    x = torch.randn(2, 100, 64, device="cuda", requires_grad=True)
    y_ref = ref(x.detach().double())  # float64 torch reference on the same device
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = mom(x)
        (y.square().sum() + mom.aux_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("T,size", [(1, 4), (7, 4), (13, 2), (5, 1)])
def test_short_conv_matches_conv1d(T, size):
    """The short conv's hand-written forward and backward against torch's depthwise conv1d, in float64."""
    from kernels.conv_torch import causal_conv_silu

    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs every run; the seed is in the failure message
    x = randn(3, 2, T, 5, seed=seed).requires_grad_()
    w = randn(5, size, seed=seed + 1).requires_grad_()
    conv = torch.nn.functional.conv1d(x.reshape(6, T, 5).transpose(1, 2), w[:, None], padding=size - 1, groups=5)
    ref = torch.nn.functional.silu(conv[..., :T]).transpose(1, 2).reshape(3, 2, T, 5)
    y = causal_conv_silu(x, w)
    dy = randn(*y.shape, seed=seed + 2)
    assert torch.allclose(y, ref, atol=1e-12), seed
    grads = torch.autograd.grad(y, (x, w), dy)
    ref_grads = torch.autograd.grad(ref, (x, w), dy)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(grads, ref_grads)), seed


def test_init_std_scales_every_weight_and_the_output_projections():
    torch.manual_seed(0)
    lm = build_model(vocab_size=512, max_seq_len=16, mixer="gated_deltanet", d_model=64, n_layers=2, init_std=0.02)
    std = {name: p.std().item() for name, p in lm.named_parameters() if p.ndim == 2}
    assert abs(std["embed.weight"] - 0.02) < 0.002 and abs(std["blocks.0.mixer.q_proj.weight"] - 0.02) < 0.002
    assert abs(std["blocks.1.mixer.o_proj.weight"] - 0.01) < 0.001  # 0.02 / sqrt(2 * 2 layers)
    default = build_model(vocab_size=512, max_seq_len=16, mixer="gated_deltanet", d_model=64, init_std=None)
    assert default.blocks[0].mixer.q_proj.weight.std().item() > 0.05  # PyTorch's 1 / sqrt(3 * 64)


def test_detach_head_keeps_the_output_loss_from_training_the_tied_embedding():
    torch.manual_seed(0)
    x = torch.randint(0, 32, (2, 8))
    grads = {}
    for detach in (False, True):
        lm = build_model(vocab_size=32, max_seq_len=8, mixer="attention", d_model=16, n_layers=1, detach_head=detach)
        # rows never read as inputs get gradient only from the output layer
        unused = torch.ones(32, dtype=torch.bool)
        unused[x.flatten()] = False
        lm(x).logits.logsumexp(-1).sum().backward()
        grads[detach] = lm.embed.weight.grad[unused].abs().sum().item()
    assert grads[False] > 0 and grads[True] == 0


def test_qk_norm_makes_attention_independent_of_the_query_and_key_scale():
    x = torch.randn(2, 10, 16)
    for qk_norm in (True, False):
        torch.manual_seed(0)
        layer = Attention(16, num_heads=2, conv_size=0, qk_norm=qk_norm)
        y = layer(x)
        with torch.no_grad():
            layer.qkv_proj.weight[:32] *= 7.0  # the q and k rows only
        changed = (layer(x) - y).abs().max().item()
        assert changed < 1e-4 if qk_norm else changed > 1e-2


@pytest.mark.parametrize("mom", [False, True], ids=["single", "mom"])
@pytest.mark.parametrize("rule", DELTA_RULES)
def test_negative_eigenvalues_let_beta_reach_two(rule, mom):
    """allow_neg_eigval: beta = 2 sigmoid(.) in (0, 2), so that 1 - beta, the erase factor's eigenvalue along k,
    can be negative; off (the default) beta = sigmoid(.) in (0, 1), the same weights."""
    mixer, options = ("mom", {"rule": rule, "num_memories": 2, "top_k": 1}) if mom else (rule, {})
    on, off = make(mixer, allow_neg_eigval=True, **options), make(mixer, **options)
    x = randn(2, 50, D) * 10
    beta_on, beta_off = ((m.memory if mom else m).gates(x)[1] for m in (on, off))
    assert 1 < beta_on.max() < 2 and beta_on.min() > 0
    assert beta_off.max() < 1
    torch.testing.assert_close(beta_on, 2 * beta_off)


@pytest.mark.parametrize("rule", [r for r in RULES if r not in DELTA_RULES])
def test_negative_eigenvalues_need_a_delta_rule(rule):
    with pytest.raises(ValueError, match=f"allow_neg_eigval=True is not valid for rule '{rule}'"):
        make(rule, allow_neg_eigval=True)
    with pytest.raises(ValueError, match="allow_neg_eigval"):
        make("mom", rule=rule, allow_neg_eigval=True)


_IDS = torch.arange(10).view(2, 5)  # vocab_size 16 below
# id: (call on the model, exception, message naming the argument and what is valid)
BAD_FORWARD_INPUTS = {
    "empty-sequence": (lambda lm: lm(_IDS[:, :0]), ValueError,
                       r"input_ids must have shape \[B, T\] with every size >= 1, got \[2, 0\]"),
    "empty-batch": (lambda lm: lm(_IDS[:0]), ValueError, r"input_ids must have shape \[B, T\] .*got \[0, 5\]"),
    "ids-1d": (lambda lm: lm(_IDS[0]), ValueError, r"input_ids must have shape \[B, T\]"),
    "ids-float": (lambda lm: lm(_IDS.float()), TypeError, "input_ids must be an int64 .*got torch.float32"),
    "ids-list": (lambda lm: lm(_IDS.tolist()), TypeError, "input_ids must be an int64 .*got list"),
    "id-past-vocab": (lambda lm: lm(_IDS + 7), ValueError,
                      r"input_ids must lie in \[0, vocab_size=16\), got values from 7 to 16"),
    "id-negative": (lambda lm: lm(_IDS - 1), ValueError,
                    r"input_ids must lie in \[0, vocab_size=16\), got values from -1 to 8"),
    "label-index-past-end": (lambda lm: lm(_IDS, label_index=torch.tensor([0, 10])), ValueError,
                             r"label_index must lie in \[0, B \* T=10\)"),
    "label-index-and-mask": (lambda lm: lm(_IDS, label_index=torch.tensor([0]), label_mask=_IDS > 0), ValueError,
                             "label_mask or label_index, not both"),
    "stats-positions-shape": (lambda lm: lm(_IDS, stats_positions=_IDS[:, :4] > 0), ValueError,
                              r"stats_positions must be a bool tensor of shape \[2, 5\]"),
    "step-ids-2d": (lambda lm: lm.step(_IDS[:, :1], lm.init_state(2)), ValueError, r"input_ids must have shape \[B\]"),
    "step-batch-not-the-state's": (lambda lm: lm.step(_IDS[:1, 0], lm.init_state(2)), ValueError,
                                   r"batch size 1, the state 2: use init_state\(1\)"),
    "init-state-zero": (lambda lm: lm.init_state(0), ValueError,
                        "batch_size=0 is not valid; it must be an integer >= 1"),
    "state-size-negative": (lambda lm: lm.state_size(-1), ValueError, "seq_len=-1 is not valid"),
}  # fmt: skip


@pytest.mark.parametrize("mixer", list(models.MIXERS))
@pytest.mark.parametrize("case", list(BAD_FORWARD_INPUTS))
def test_bad_forward_input_is_refused_naming_it(mixer, case):
    """Every model refuses bad inputs at its entry, in one line naming the argument: an empty batch or sequence
    failed in a reshape deep in the mixers (for MoM its load statistics would be NaN), ids past the vocabulary in
    the embedding (on CUDA: a device-side assert), a wrong shape in an unpack, a matmul or a cat."""
    call, error, message = BAD_FORWARD_INPUTS[case]
    torch.manual_seed(0)
    options = {} if mixer == "attention" else {"num_heads": H}
    lm = build_model(vocab_size=16, max_seq_len=8, mixer=mixer, d_model=D, backend="torch", mixer_options=options)
    with pytest.raises(error, match=message):
        call(lm)


@pytest.mark.parametrize("mixer", list(models.MIXERS))
def test_bad_mixer_input_is_refused_naming_it(mixer):
    m = make(mixer)
    x = randn(2, 5, D)
    with pytest.raises(ValueError, match=rf"x must have shape \[B, T, d_model\] with d_model={D} .*got \[2, 5, 7\]"):
        m(x[..., :7])
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, d_model\] .*got \[2, 0, 8\]"):
        m(x[:, :0])
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, d_model\] .*got \[5, 8\]"):
        m(x[0])
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        m(x.long())
    with pytest.raises(ValueError, match=r"x must have shape \[B, d_model\]"):
        m.step(x[:, 0, :7], m.init_state(2))
