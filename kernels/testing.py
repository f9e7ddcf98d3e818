"""Random inputs and error measures for the kernel tests and the benchmark."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.rules import get_rule


# The relative error against float64 that an op of bf16 inputs must stay below, per Triton backend: bf16 products
# (triton_bf16) put the decays' gradient, which sums products over whole sequences, at some 1e-2 to 6e-2
# (docs/results/bf16_products/README.md); the interpreter's bf16 casts truncate, so CPU errors run higher still
BF16_TOLERANCE = {"triton": 1e-2, "triton_bf16": 1e-1}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 (0 when both are zero)."""
    x, ref = x.double(), ref.double()
    denom = ref.norm().item()
    return (x - ref).norm().item() / denom if denom > 0 else (x - ref).norm().item()


def make_inputs(
    rule, B, T, H, K, V, *, dtype=torch.float32, device="cpu", generator=None, initial_state=False, N=None,
    beta_max=1.0,
) -> dict[str, torch.Tensor]:
    """Inputs as the models produce them: unit-norm keys, log decays <= 0, beta in (0, beta_max) (2: the delta
    rules' negative eigenvalues, `allow_neg_eigval`).

    Returns q, k, v and the rule's g / beta (and initial_state [N or B, H, K, V] in float32, float64 for
    float64 inputs, when asked), all leaf tensors that require grad.
    """

    def rand(*shape):
        return torch.randn(*shape, generator=generator, device=device, dtype=torch.float64)

    g_layout, takes_beta = get_rule(rule).gate, get_rule(rule).delta
    out = {"q": rand(B, T, H, K), "k": F.normalize(rand(B, T, H, K), dim=-1), "v": rand(B, T, H, V)}
    if g_layout == "channel":
        out["g"] = F.logsigmoid(rand(B, T, H, K) + 2.0) * 0.5
    elif g_layout == "head":
        out["g"] = F.logsigmoid(rand(B, T, H) + 2.0)
    if takes_beta:
        out["beta"] = beta_max * torch.sigmoid(rand(B, T, H))
    out = {name: x.to(dtype) for name, x in out.items()}
    if initial_state:
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        out["initial_state"] = rand(B if N is None else N, H, K, V).to(state_dtype)
    return {name: x.requires_grad_() for name, x in out.items()}
