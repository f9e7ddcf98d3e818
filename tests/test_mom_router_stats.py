"""MoM's router statistics (`MoM.router_stats`), as result.json and metrics.csv record them."""

import math

import torch

from models.mom import MoM


def test_router_entropy_of_one_memory_is_zero_not_negative_zero():
    """With one memory every token's router distribution is (1,): entropy 0. It was -0.0 (the negation of a sum of
    zeros), which result.json printed as `"router_entropy": -0.0`."""
    mom = MoM(16, num_memories=1, top_k=1, shared_memory=False, backend="torch")
    mom(torch.randn(2, 8, 16))
    entropy = mom.router_stats()["router_entropy"]
    assert entropy == 0.0 and math.copysign(1.0, entropy) == 1.0
