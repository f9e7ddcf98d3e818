"""Train, validation and test splits from disjoint seed ranges, and a check for examples shared by two sets.

A split seed s in [0, SEEDS_PER_SPLIT) becomes `split_seed(s, split)` = s + offset, with offset 0 for
train, SEEDS_PER_SPLIT for val and 2 * SEEDS_PER_SPLIT for test, so no two splits ever share a random
stream. Different streams can still produce the same example by chance (likely only for tiny vocabularies
or lengths): `overlap` finds such examples.
"""

import numbers
from collections.abc import Mapping

import numpy as np

from tasks.common import check_int
from tasks.registry import TaskData, make, make_mixture, pad_right

SPLITS = ("train", "val", "test")
SEEDS_PER_SPLIT = 1_000_000


def split_seed(seed: int, split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown; valid: one of {list(SPLITS)}")
    check_int("split_seed", "seed", seed, 0, SEEDS_PER_SPLIT - 1)
    return SPLITS.index(split) * SEEDS_PER_SPLIT + seed


def make_split(name: str, split: str, *, num_examples: int | None = None, segments: list[dict] | None = None,
               seed: int, **params) -> TaskData:
    """`make` (given num_examples) or `make_mixture` (given segments) with the split's seed."""
    if (num_examples is None) == (segments is None):
        raise ValueError(f"{name}: give exactly one of num_examples={num_examples!r} and segments={segments!r}")
    if segments is None:
        return make(name, num_examples=num_examples, seed=split_seed(seed, split), **params)
    return make_mixture(name, segments, seed=split_seed(seed, split), **params)


def capped(segments: list[dict], limit_examples: int | None) -> list[dict]:
    """The segments with each one's num_examples at most `limit_examples` (None: as they are). A segment that is
    not a dict or has no integer num_examples is left as it is, for `make_mixture`'s checks to name it."""
    out = []
    for s in segments:
        if not isinstance(s, Mapping):
            out.append(s)
        elif limit_examples is not None and isinstance(s.get("num_examples"), numbers.Integral):  # numpy's too
            out.append({**s, "num_examples": min(s["num_examples"], limit_examples)})
        else:
            out.append(dict(s))
    return out


def overlap(a: TaskData, b: TaskData) -> np.ndarray:
    """int64 indices (ascending) of the examples of `b` whose inputs also occur in `a`.

    Rows are compared after right-padding both sets with 0 to a common width. Each row is hashed to 64 bits
    (a random linear hash with wrap-around), `b`'s hashes are looked up among `a`'s, and every hit is then
    confirmed token by token, so every reported example is a true duplicate. A match is missed only if the
    row it matches shares its hash with another, different row of `a` (odds below 2^-50 per pair of rows).
    """
    width = max(a.inputs.shape[1], b.inputs.shape[1])
    rows_a = pad_right(a.inputs, width, 0)
    rows_b = pad_right(b.inputs, width, 0)
    hash_a, hash_b = row_hashes(rows_a), row_hashes(rows_b)
    order = np.argsort(hash_a)
    at = np.searchsorted(hash_a[order], hash_b).clip(max=len(order) - 1)
    hit = np.nonzero(hash_a[order[at]] == hash_b)[0]
    same = (rows_a[order[at[hit]]] == rows_b[hit]).all(axis=1)
    return hit[same]


def row_hashes(rows: np.ndarray) -> np.ndarray:
    """uint64 [N]: sum over t of rows[:, t] * m_t modulo 2^64, with fixed random 64-bit multipliers m."""
    multipliers = np.random.default_rng(0).integers(0, 2**64, size=rows.shape[1], dtype=np.uint64)
    return np.ascontiguousarray(rows).view(np.uint64) @ multipliers  # tokens are >= 0: the view keeps them
