"""docs/extending.md's recipes, followed here: a toy memory rule declared in this file runs through the model zoo
and MoM on the torch backend (forward, backward, the recurrent form, a few training steps)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kernels
import models
from kernels import rules
from models.common import compute_dtype
from models.memory import MemoryMixer
from models.mom import MoM


def toy_update(S, q, k, v, g, beta):
    """S' = exp(g) S + k v^T (one decay per head), o = S'^T q: the form gate="head", delta=False."""
    S = g.exp()[..., None, None] * S + torch.einsum("...k,...v->...kv", k, v)
    return S, torch.einsum("...kv,...k->...v", S, q)


@pytest.fixture
def toy():
    """The rule `toy_decay` and its mixer, for this test only (the registry is left as it was)."""
    rules.declare("toy_decay", gate="head", delta=False, update=toy_update)

    class ToyDecay(MemoryMixer):
        rule = "toy_decay"
        slot_gates = ("a_proj",)

        def build_gates(self):
            self.a_proj = nn.Linear(self.d_model, self.num_slots * self.num_heads, bias=False)

        def activate_gates(self, a):
            return -F.softplus(a.to(compute_dtype(a))), None  # log decays <= 0, one per head

    yield ToyDecay
    del rules.RULES["toy_decay"]


def test_a_rule_declared_here_is_a_mixer_and_a_mom_memory(toy):
    assert models.MIXERS["toy_decay"] is toy and "toy_decay" in kernels.RULES
    torch.manual_seed(0)
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    for layer in (toy(16, num_heads=2, backend="torch"), MoM(16, rule="toy_decay", num_heads=2, backend="torch")):
        layer = layer.double()
        y = layer(x)
        state, steps = layer.init_state(2), []
        for t in range(x.shape[1]):
            y_t, state = layer.step(x[:, t], state)
            steps.append(y_t)
        torch.testing.assert_close(y, torch.stack(steps, 1), rtol=1e-10, atol=1e-10)  # parallel = recurrent
        y.square().sum().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize("mixer,options", [("toy_decay", {}), ("mom", {"rule": "toy_decay", "num_memories": 2})])
def test_a_rule_declared_here_trains(toy, mixer, options):
    torch.manual_seed(0)
    model = models.build_model(vocab_size=32, max_seq_len=16, mixer=mixer, d_model=16, backend="torch",
                               mixer_options=options)  # fmt: skip
    ids = torch.randint(1, 32, (4, 16), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        out = model(ids[:, :-1])
        loss = F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten()) + out.aux_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
