"""Stacked runs: R runs of one model configuration, differing only in seed, learning rate or weight decay, trained
as one model whose parameters carry a leading run dimension [R, ...].

Each kernel is then launched once for all R runs instead of once per run, which is what a launch-bound step at
the sandbox's sizes needs (docs/results/throughput/). The model code is the zoo's, unchanged: `torch.func.vmap`
runs it over the run dimension with each run's own parameters (`functional_call`), and the custom autograd
functions say how they batch (`vmap` of `kernels.conv_torch`, a generated rule in `models.routing`); the chunked
Triton ops and softmax attention's fused kernel (which torch's vmap would run once per run) fold the runs into
their batch (`kernels.runs`). Runs stay independent: no operation mixes two runs, each run's loss is its own, and the
optimizer (`StackedAdamW`) and clipping (`clip_per_run`) act on each run's slice as `torch.optim.AdamW` and
`torch.nn.utils.clip_grad_norm_` act on a run alone; `tests/test_stacked.py` checks that a stacked run equals the
same runs alone.
"""

from __future__ import annotations

import functools
from collections import defaultdict

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from models import build_model
from sandbox.module import decay_groups, labelled_loss


def _attribute(name: str) -> str:
    """A parameter's dotted name as an attribute name (dots are not allowed there)."""
    return name.replace(".", "/")


class StackedModel(nn.Module):
    """R language models of one configuration as one module: parameter `name` is the R models' `name` stacked,
    [R, *shape]; the models themselves are not kept (a template on the meta device holds the code)."""

    def __init__(self, models: list[nn.Module]):
        super().__init__()
        configs = [m.config for m in models]
        if any(c != configs[0] for c in configs):
            raise ValueError("stacked models must share one configuration (they differ only in their weights)")
        with torch.device("meta"):
            self._template = [build_model(**configs[0])]  # a list: not a submodule, not in the state dict
        params, buffers = stack_module_state(models)
        if buffers:  # a stack changes its runs by its parameters alone (`replace`)
            raise ValueError(f"models with buffers ({', '.join(buffers)}) cannot be stacked")
        self.param_names = list(params)
        for name, value in params.items():
            self.register_parameter(_attribute(name), nn.Parameter(value.detach()))
        self.config = configs[0]

    @property
    def template(self) -> nn.Module:
        return self._template[0]

    def stacked(self) -> dict[str, torch.Tensor]:
        """The parameters by their names in one model, each [R, ...]."""
        return {n: getattr(self, _attribute(n)) for n in self.param_names}

    @torch.no_grad()
    def replace(self, values: dict[str, torch.Tensor]) -> dict[nn.Parameter, nn.Parameter]:
        """Every parameter replaced by one holding `values[name]` (by `named_parameters()`' names; [R', ...]: other
        runs, or fewer of them); returns {old parameter: new}. New objects: autograd keeps a parameter's shape
        from its first use."""
        renamed = {}
        for name, old in list(self.named_parameters()):
            renamed[old] = nn.Parameter(values[name].clone())
            self.register_parameter(name, renamed[old])
        return renamed

    def losses(self, inputs: torch.Tensor, labels: torch.Tensor, max_labels: int):
        """Each run's `labelled_loss` on its batch, all runs at once (vmap over the run dimension): inputs, labels
        [R, B, T] -> (loss [R], aux loss [R], hits [R, B, T], mask [R, B, T], router statistics {name: [R]} of
        this forward)."""
        def one(params, x, y):
            def model(*args, **kwargs):
                return functional_call(self.template, params, args, kwargs)

            return (*labelled_loss(model, x, y, max_labels), self.template.router_stats(as_tensors=True))

        return vmap(one, randomness="error")(self.stacked(), inputs, labels)


class StackedAdamW(torch.optim.Optimizer):
    """AdamW over stacked parameters [R, ...] with each run's own learning rate and weight decay.

    The groups are `sandbox.module.decay_groups`' (weight_decay 1 on matrices, 0 on vectors: a factor of each
    run's); a group's `lr` is the schedule's factor (what LambdaLR sets when the base lr is 1), and `run_lr`,
    `run_weight_decay` [R] are each run's settings.
    The update is torch's AdamW on each run's slice: p *= 1 - lr wd; m, v as Adam's; p -= lr m_hat /
    (sqrt(v_hat) + eps)."""

    def __init__(self, params, run_lr: torch.Tensor, run_weight_decay: torch.Tensor, betas, eps: float = 1e-8):
        super().__init__(params, {"lr": 1.0, "betas": tuple(betas), "eps": eps, "weight_decay": 1.0})
        self.run_lr, self.run_weight_decay = run_lr, run_weight_decay

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            beta1, beta2 = group["betas"]
            grads = [p.grad for p in params]
            states = [self.state[p] for p in params]
            for p, state in zip(params, states):
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
            step = states[0]["step"]  # one count for the group: every parameter steps together
            exp_avg, exp_avg_sq = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
            # the moments, as Adam's, for every parameter at once (foreach kernels)
            torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sq, beta2)
            torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
            denom = torch._foreach_sqrt(exp_avg_sq)
            torch._foreach_div_(denom, (1 - beta2**step) ** 0.5)
            torch._foreach_add_(denom, group["eps"])
            update = torch._foreach_div(exp_avg, denom)
            # each run's own rate: p *= 1 - lr wd (decoupled decay, before the step), p -= lr / (1 - beta1^t) m / denom
            lr = group["lr"] * self.run_lr
            decay = (1 - lr * group["weight_decay"] * self.run_weight_decay).to(params[0])
            rate = (lr / (1 - beta1**step)).to(params[0])
            for p, u in zip(params, update):
                shape = (-1,) + (1,) * (p.ndim - 1)
                p.mul_(decay.view(shape))
                p.sub_(u.mul_(rate.view(shape)))
        return loss

    def keep_runs(self, index: torch.Tensor, renamed: dict[nn.Parameter, nn.Parameter]) -> None:
        """Only the runs at `index` go on, in that order, in the parameters `renamed` gives (the model's, sliced
        alike: `StackedModel.replace`): their moments and settings."""
        for group in self.param_groups:
            group["params"] = [renamed[p] for p in group["params"]]
        self.state = defaultdict(dict, {renamed[p]: {**state, "exp_avg": state["exp_avg"][index],
                                                    "exp_avg_sq": state["exp_avg_sq"][index]}
                                       for p, state in self.state.items()})
        self.run_lr, self.run_weight_decay = self.run_lr[index], self.run_weight_decay[index]


def stacked_adamw(model: StackedModel, optims: list[dict]) -> StackedAdamW:
    """StackedAdamW of the runs' `optim` settings (they may differ in lr and weight_decay only)."""
    for key in optims[0]:
        if key not in ("lr", "weight_decay") and any(o[key] != optims[0][key] for o in optims):
            raise ValueError(f"optim.{key} differs between stacked runs; only optim.lr and optim.weight_decay may")
    params = list(model.parameters())
    tensor = functools.partial(torch.tensor, dtype=torch.float64, device=params[0].device)
    return StackedAdamW(
        decay_groups(params, decay=1.0, run_dims=1),
        run_lr=tensor([o["lr"] for o in optims]), run_weight_decay=tensor([o["weight_decay"] for o in optims]),
        betas=optims[0]["betas"])


@torch.no_grad()
def clip_per_run(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Each run's gradients scaled to total norm <= max_norm, as `clip_grad_norm_` does for one run; returns
    the runs' norms before clipping [R]."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view((-1,) + (1,) * (g.ndim - 1)))
    return norms
