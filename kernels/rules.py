"""The memory rules, each declared once: everything else (the ops, the mixers, MoM, the benchmark, the tests)
reads its list of rules and what each takes from `RULES`.

A rule is a matrix state S [K, V] per head, written once per token and read with the query after the write:

    S_t = update(S_{t-1}; k_t, v_t, g_t, beta_t),        o_t = scale * S_t^T q_t

Its declaration says what the kernels need to know: the layout of its log decays g (none, one per head
[B, T, H], or one per key channel [B, T, H, K]), whether it writes with the delta rule (then it takes write
strengths beta [B, T, H]), its one-token update as a small PyTorch function (from which the token-by-token
reference and the mixers' `step` are built), the module of its parallel PyTorch form if it has one, and the
name of its fla counterpart (the benchmark's comparison). The Triton chunk kernels (`kernels/chunk/`) are
one family parameterised by (gate, delta); a combination they cannot run is refused here, at declaration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

GATES = (None, "head", "channel")
# The (gate, delta) forms the chunk kernels implement; a per-channel decay with the delta rule is not one.
CHUNK_FORMS = {(None, False), ("head", False), ("channel", False), (None, True), ("head", True)}


@dataclass(frozen=True)
class Rule:
    name: str
    gate: str | None  # None, "head" (g [B, T, H]) or "channel" (g [B, T, H, K])
    delta: bool  # the delta rule: takes beta [B, T, H]
    # (S [..., K, V], q, k [..., K], v [..., V], g [...] / [..., K] / None, beta [...] / None) -> (S', S'^T q)
    update: Callable
    parallel: str | None = None  # module with the parallel PyTorch form `naive_chunk` (None: token by token)
    fla: str | None = None  # fla's chunk op, "module.function", called as fn(q, k, v, [g=...], [beta=...])

    @property
    def gate_code(self) -> int:
        """The kernels' GATE: 0 none, 1 per channel, 2 per head."""
        return {None: 0, "channel": 1, "head": 2}[self.gate]


RULES: dict[str, Rule] = {}


def declare(name: str, *, gate: str | None, delta: bool, update: Callable, parallel=None, fla=None) -> Rule:
    """Add a rule to `RULES`. Refused: a taken name, an unknown gate, a form the chunk kernels cannot run, and an
    update that is not that form (the kernels would compute another rule than the reference)."""
    if name in RULES:
        raise ValueError(f"memory rule {name!r} is already declared")
    if gate not in GATES:
        raise ValueError(f"rule {name!r}: gate={gate!r} is not valid; choose one of {GATES}")
    if (gate, delta) not in CHUNK_FORMS:
        raise ValueError(f"rule {name!r}: the chunk kernels cannot run gate={gate!r} with delta={delta}")
    if not _is_form(update, gate, delta):
        raise ValueError(
            f"rule {name!r}: its update is not the form that the kernels compute for gate={gate!r}, delta={delta} "
            "(S' = decay(g) S, then the write k v^T or the delta rule's; o = S'^T q)"
        )
    RULES[name] = Rule(name, gate, delta, update, parallel, fla)
    return RULES[name]


def get_rule(name: str) -> Rule:
    if name not in RULES:
        raise ValueError(f"unknown memory rule {name!r}; choose one of {tuple(RULES)}")
    return RULES[name]


def _is_form(update: Callable, gate: str | None, delta: bool) -> bool:
    """Whether `update` computes the kernels' form for (gate, delta), on random float64 inputs."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    H, K, V = 2, 3, 4
    S, q, k, v = rand(H, K, V), rand(H, K), rand(H, K), rand(H, V)
    g = {None: None, "head": -rand(H), "channel": -rand(H, K)}[gate]
    beta = rand(H) if delta else None
    decayed = S if gate is None else S * (g.exp()[:, None, None] if gate == "head" else g.exp()[:, :, None])
    want = delta_write(decayed, k, v, beta) if delta else write(decayed, k, v)
    got, o = update(S, q, k, v, g, beta)
    return torch.allclose(got, want) and torch.allclose(o, read(want, q))


# --- the updates ---------------------------------------------------------------------------------------


def read(S: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """S^T q for S [..., K, V], q [..., K]."""
    return torch.einsum("...k,...kv->...v", q, S)


def write(S, k, v):
    """S + k v^T."""
    return S + k[..., :, None] * v[..., None, :]


def delta_write(S, k, v, beta):
    """S + beta k (v - S^T k)^T = (I - beta k k^T) S + beta k v^T."""
    return write(S, beta[..., None] * k, v - read(S, k))


def _linear_attention(S, q, k, v, g, beta):
    S = write(S, k, v)
    return S, read(S, q)


def _gla(S, q, k, v, g, beta):
    S = write(g.exp()[..., None] * S, k, v)
    return S, read(S, q)


def _simple_gla(S, q, k, v, g, beta):
    S = write(g.exp()[..., None, None] * S, k, v)
    return S, read(S, q)


def _deltanet(S, q, k, v, g, beta):
    S = delta_write(S, k, v, beta)
    return S, read(S, q)


def _gated_deltanet(S, q, k, v, g, beta):
    S = delta_write(g.exp()[..., None, None] * S, k, v, beta)
    return S, read(S, q)


# S_t = S_{t-1} + k_t v_t^T
declare("linear_attention", gate=None, delta=False, update=_linear_attention,
        parallel="kernels.linear_attention.naive", fla="fla.ops.simple_gla.chunk_simple_gla")  # fmt: skip
# S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T
declare("gla", gate="channel", delta=False, update=_gla, parallel="kernels.gla.naive", fla="fla.ops.gla.chunk_gla")
# S_t = exp(g_t) S_{t-1} + k_t v_t^T  (per head: the Mamba-2 / RetNet form)
declare("simple_gla", gate="head", delta=False, update=_simple_gla,
        parallel="kernels.simple_gla.naive", fla="fla.ops.simple_gla.chunk_simple_gla")  # fmt: skip
# S_t = (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T
declare("deltanet", gate=None, delta=True, update=_deltanet,
        parallel="kernels.deltanet.naive", fla="fla.ops.delta_rule.chunk_delta_rule")  # fmt: skip
# S_t = exp(g_t) (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T
declare("gated_deltanet", gate="head", delta=True, update=_gated_deltanet,
        parallel="kernels.gated_deltanet.naive", fla="fla.ops.gated_delta_rule.chunk_gated_delta_rule")  # fmt: skip
