"""Mixture-of-Memories (MoM, Du et al. 2025, arXiv 2502.13685): M linear memories and a router.

Router (no noise):  p_t = softmax(W_r x_t) in fp32 (W_r: d_model -> M, no bias);  the top-k memories of p_t,
                    their weights w_{t,m} = p_{t,m} / sum over the top-k of p_t (they sum to 1; with k = 1 the
                    weight is 1 and carries no gradient, so the router learns from the auxiliary loss alone:
                    aux_loss_coef=0 with k = 1 of M > 1 is refused).
Memories:           memory m has its own key, value and gate projections and advances only on the tokens
                    routed to it: it sees its own subsequence, in token order, and its short conv runs within
                    that subsequence (in training and in `step` alike). Its update rule is one of those
                    declared in `kernels.rules` (default: gated DeltaNet):
                        S^m_t = update(S^m_{t-1}; k^m_t, v^m_t, ...)  if t is routed to m,  else S^m_{t-1}
                        o^m_t = K^{-1/2} (S^m_t)^T q^m_t
Mixing:             o_t = sum over the top-k m of w_{t,m} o^m_t  (+ o^s_t, the shared memory, weight 1:
                    an (M+1)-th memory every token writes to, when `shared_memory`)
Output:             y_t = W_o [ rmsnorm(o_t) * silu(W_gate x_t) ]   (per head)
Auxiliary loss:     aux = M * sum_m c_m P_m (Switch/Mixtral form, as in HF's load_balancing_loss_func), c_m =
                    fraction of tokens routed to m (sum_m c_m = k), P_m = mean router probability of m; it is
                    k at perfect balance and grows with imbalance. `aux_loss` holds aux_loss_coef * aux after
                    each forward, with its gradient (through P). The logged load f_m = c_m / k is the fraction
                    of routed token slots sent to m (sums to 1).

The query projection, the short-conv weights, the decay constants, the output gate, norm and projection are
shared by the memories; all of that lives in the rule's mixer class (`models/memory.py`), built here with
M (+1) slots. Each call builds one `Routing` (`models/routing.py`: the top-k and the shared slot) and hands it
with the mixer to an executor. With M = 1, top_k = 1 and no shared memory, MoM computes exactly what that
single-memory mixer computes. The paper's "single expanded memory" control (one memory, equal state size) is
the single-memory mixer with expand_v multiplied by M + shared, e.g.
`mixer="gated_deltanet", mixer_options={"expand_v": 5}` against `mixer="mom"` with 4 memories + shared.

Backends (resolved once per call): `torch` runs every memory over all the tokens, its own first (in token
order) and the others after them, where they cannot reach its routed outputs (`routing.dense`, the reference);
`triton` (what `auto` is on CUDA) and `triton_bf16` take the packed path (`routing.packed`, `kernels/mom`): each
memory runs on the tokens routed to it only, packed into segments on the device, and decoding updates only the
selected memories. Stacked runs (under vmap, `sandbox/stacked.py`) take the dense form on every backend, with the
rule's Triton op, conv and norms on the Triton backends (each one launch for all the runs, `kernels.runs`).

Shapes: x [B, T, d_model] -> [B, T, d_model]. `state_size` = (M + shared) * H * K * V values per sequence.
Router statistics (fraction per memory, entropy, aux) are kept as tensors; `router_stats()` makes floats (or
returns the tensors). They are of the last forward, over every position of x, a batch's padding included. When the
caller sets `stats_positions` (bool [..., T], as x's leading dims) before a forward, the loads over those positions
alone are kept too (`content_load_m{j}`): the sandbox counts its tasks' own tokens there, where the loads over every
position are mostly those of the filler token.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels.runs import batched
from models.common import check_choice, check_flag, check_input, check_int, check_number, compute_dtype
from models.memory import MemoryMixer
from models.routing import Routing, dense, dense_step, packed, packed_step


def rule_mixers() -> dict[str, type[MemoryMixer]]:
    """The mixer of every rule declared in `kernels.rules`, in its order: the MemoryMixer subclass whose `rule` is
    that name, from models/<rule>.py (or defined elsewhere, as the toy rule of tests/test_extending.py)."""

    def defined(name):
        return [cls for cls in MemoryMixer.__subclasses__() if cls.rule == name]

    mixers = {}
    for name in kernels.RULES:
        if not defined(name) and importlib.util.find_spec(f"models.{name}") is not None:
            importlib.import_module(f"models.{name}")
        if not defined(name):
            raise ValueError(f"memory rule {name!r} has no mixer: define a MemoryMixer subclass with rule = {name!r} "
                             f"in models/{name}.py")  # fmt: skip
        mixers[name] = defined(name)[-1]  # the latest definition
    return mixers


class MoM(nn.Module):
    def __init__(
        self,
        d_model: int,
        *,
        rule: str = "gated_deltanet",
        num_memories: int = 4,
        top_k: int = 2,
        shared_memory: bool = True,
        aux_loss_coef: float = 1e-3,
        num_heads: int = 1,
        head_dim: int | None = None,
        expand_v: float = 1.0,
        conv_size: int = 4,
        allow_neg_eigval: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        check_choice("rule", rule, tuple(kernels.RULES))
        check_int("num_memories", num_memories)
        check_int("top_k", top_k, 1, num_memories, "num_memories")
        check_flag("shared_memory", shared_memory)
        check_number("aux_loss_coef", aux_loss_coef, positive=False)
        if top_k == 1 and num_memories > 1 and aux_loss_coef == 0:
            raise ValueError(f"aux_loss_coef=0 is not valid with top_k=1 of num_memories={num_memories}: a top-1 "
                             "weight is p / p = 1, so the router learns from the auxiliary loss alone and would stay "
                             "at its initialisation; use aux_loss_coef > 0 or top_k >= 2")
        self.rule, self.num_memories, self.top_k = rule, num_memories, top_k
        self.shared_memory, self.aux_loss_coef = shared_memory, float(aux_loss_coef)

        self.router = nn.Linear(d_model, num_memories, bias=False)
        self.memory = rule_mixers()[rule](
            d_model,
            num_heads=num_heads,
            head_dim=head_dim,
            expand_v=expand_v,
            conv_size=conv_size,
            allow_neg_eigval=allow_neg_eigval,
            backend=backend,
            num_slots=num_memories + int(shared_memory),
        )
        self.backend = backend
        self.aux_loss: torch.Tensor | None = None
        self.stats_positions: torch.Tensor | None = None  # bool [..., T]: the positions content_load counts
        self._stats: dict[str, torch.Tensor] = {}

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        """x [..., d_model] -> (probs [..., M] fp32, the routing: the top-k memories and the shared one)."""
        dt = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):  # the router stays in fp32 under mixed precision
            probs = F.linear(x.to(dt), self.router.weight.to(dt)).softmax(-1)
        top, index = probs.topk(self.top_k, dim=-1)
        return probs, Routing.top_k(index, top / top.sum(-1, keepdim=True), self.num_memories, self.shared_memory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.memory.d_model)
        backend = kernels.resolve_backend(self.backend, x.device)
        probs, routing = self.route(x)
        # stacked runs (under vmap) take the dense form: the packed one's kernels take each run's weights
        y = (packed(self.memory, x, routing, backend) if kernels.on_triton(backend) and not batched(x)
             else dense(self.memory, x, routing, backend))
        # load balance and statistics, kept on the device (no host sync)
        M = self.num_memories
        slots = routing.dense_mask[..., :M].flatten(0, -2).to(probs.dtype)  # [positions, M]
        routed = slots.mean(0)  # c_m, sums to k
        mean_prob = probs.flatten(0, -2).mean(0)  # P_m
        aux = M * (routed * mean_prob).sum()
        load = routed / self.top_k  # f_m, sums to 1
        self.aux_loss = self.aux_loss_coef * aux
        entropy = torch.special.entr(probs).sum(-1).mean()  # -p ln p per term: 0, never -0.0, for p = 1
        self._stats = {"load": load.detach(), "router_entropy": entropy.detach(), "aux_loss": aux.detach()}
        if self.stats_positions is not None:
            counted = self.stats_positions.flatten().to(slots.dtype)  # a weighted mean: no host read of the count
            self._stats["content_load"] = (counted @ slots / (counted.sum() * self.top_k)).detach()
        return y

    def router_stats(self, as_tensors: bool = False) -> dict:
        """From the last forward: load_m{j} (fraction of routed slots), router_entropy, aux_loss (no coef), and
        content_load_m{j} (over `stats_positions`, if set); floats, or with `as_tensors` 0-dim tensors on the device
        (no host sync)."""
        if not self._stats:
            return {}
        stats = {f"load_m{j}": f for j, f in enumerate(self._stats["load"].unbind())}
        if "content_load" in self._stats:
            stats.update({f"content_load_m{j}": f for j, f in enumerate(self._stats["content_load"].unbind())})
        stats["router_entropy"] = self._stats["router_entropy"]
        stats["aux_loss"] = self._stats["aux_loss"]
        return stats if as_tensors else {k: v.item() for k, v in stats.items()}

    def init_state(self, batch_size: int) -> dict[str, torch.Tensor]:
        return self.memory.init_state(batch_size)

    def step(self, x: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """x [B, d_model] -> (y [B, d_model], new state); each memory advances only if x is routed to it.

        On a Triton backend without autograd (decoding), only the selected memories' states are read and
        written, in place; with autograd on, the reference step (a new state, all memories computed)."""
        check_input(x, self.memory.d_model, step=True, batch=state["S"].shape[0])
        backend = kernels.resolve_backend(self.backend, x.device)
        _, routing = self.route(x)
        if kernels.on_triton(backend) and not torch.is_grad_enabled():
            return packed_step(self.memory, x, state, routing)
        return dense_step(self.memory, x, state, routing, backend)

    def state_size(self, seq_len: int) -> int:
        return self.memory.state_size(seq_len)
