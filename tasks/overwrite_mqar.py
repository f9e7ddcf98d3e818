"""Overwrite MQAR: MQAR in which some keys are given a new value later in the context.

A probe of interference between old and new associations: the answer is always the latest value.
Parameters as in `mqar` plus r = `overwrite_fraction`; R = round(r * K) of the K keys are overwritten.

- Keys: K distinct tokens from [1, V // 2). Values: K + R distinct tokens from [V // 2, V): one first
  value per key and one new value per overwritten key, all different.
- Context, positions 0 .. 2(K + R) - 1: K + R pairs `key value` in a uniformly random order; each key
  appears once, an overwritten key twice. An overwritten key's earlier pair carries its first value and the
  later pair its new value.
- Queries as in MQAR after the context: G = (L - 2(K + R)) // 2 gap slots, slot g at position
  2(K + R) + 2g, K slots drawn without replacement with probability proportional to a * (g + 1) ** (a - 1);
  each key asked once, in a random order. The label at a query is the key's latest value in the context;
  every other label is -100. Other positions are filler (0, or uniform tokens from [0, V)).

Needs K <= G, i.e. L >= 4K + 2R, and V // 2 - 1 >= K and V - V // 2 >= K + R.
Slices: `num_kv_pairs`, `seq_len`, `overwritten` (R, the number of overwritten keys in the example).
"""

import numpy as np

from tasks.common import (
    check_bool,
    check_float,
    check_int,
    check_vocab_size,
    constant_slice,
    new_sequences,
    power_law_slots,
    random_permutations,
    sample_distinct,
)

DEFAULTS = {"vocab_size": 8192, "seq_len": 64, "num_kv_pairs": 4, "overwrite_fraction": 0.5,
            "power_a": 0.01, "random_filler": False}


def num_overwritten(num_kv_pairs: int, overwrite_fraction: float) -> int:
    return round(overwrite_fraction * num_kv_pairs)


def validate(*, vocab_size, seq_len, num_kv_pairs, overwrite_fraction, power_a, random_filler) -> None:
    where = "overwrite_mqar"
    check_float(where, "overwrite_fraction", overwrite_fraction, 0.0, 1.0, include_low=True, include_high=True)
    # the least L of one pair: below it no K fits, and num_kv_pairs' range would read 1 .. 0
    check_int(where, "seq_len", seq_len, 4 + 2 * num_overwritten(1, overwrite_fraction), None,
              f"one pair, its overwrite at overwrite_fraction={overwrite_fraction} and its query")
    # L >= 4K + 2R with R = round(r K): the largest K that fits, by bisection (4K + 2R grows with K), so that it
    # takes no time even at an L that the memory check after it refuses
    low, high = 0, seq_len // 4  # K = low fits (or is 0), K = high + 1 does not
    while low < high:
        mid = (low + high + 1) // 2
        if 4 * mid + 2 * num_overwritten(mid, overwrite_fraction) <= seq_len:
            low = mid
        else:
            high = mid - 1
    most = low
    check_int(where, "num_kv_pairs", num_kv_pairs, 1, most,
              f"needs seq_len >= 4K + 2 round(overwrite_fraction K) for seq_len={seq_len}, "
              f"overwrite_fraction={overwrite_fraction}")
    r = num_overwritten(num_kv_pairs, overwrite_fraction)
    smallest = max(2 * num_kv_pairs + 2, 2 * (num_kv_pairs + r) - 1)
    check_vocab_size(where, vocab_size, smallest,
              f"num_kv_pairs={num_kv_pairs} distinct keys in [1, vocab_size // 2) and {num_kv_pairs + r} "
              "distinct values in [vocab_size // 2, vocab_size)")
    check_float(where, "power_a", power_a, 0.0, 1.0, include_low=False, include_high=True)
    check_bool(where, "random_filler", random_filler)


def chance(*, num_kv_pairs, overwrite_fraction, **_) -> float:
    """A guess among the K + R values of the context."""
    return 1 / (num_kv_pairs + num_overwritten(num_kv_pairs, overwrite_fraction))


def generate(rng: np.random.Generator, num_examples: int, *, vocab_size, seq_len, num_kv_pairs,
             overwrite_fraction, power_a, random_filler):
    n, k = num_examples, num_kv_pairs
    r = num_overwritten(k, overwrite_fraction)
    keys = sample_distinct(rng, n, k, 1, vocab_size // 2)  # keys 0 .. r-1 of each row get overwritten
    values = sample_distinct(rng, n, k + r, vocab_size // 2, vocab_size)
    first, new = values[:, :k], values[:, k:]
    inputs, labels = new_sequences(rng, n, seq_len, vocab_size, random_filler)

    # Items 0 .. k-1 write key i; items k .. k+r-1 write key i - k again. Shuffle them into pair slots.
    item_at = random_permutations(rng, n, k + r)
    key_at = np.where(item_at < k, item_at, item_at - k)
    slot_of = np.argsort(item_at, axis=1)
    once, twice = slot_of[:, :r], slot_of[:, k:]
    value_at = np.take_along_axis(first, key_at, axis=1)
    np.put_along_axis(value_at, np.maximum(once, twice), new, axis=1)
    context = 2 * (k + r)
    inputs[:, 0:context:2] = np.take_along_axis(keys, key_at, axis=1)
    inputs[:, 1:context:2] = value_at

    latest = np.concatenate([new, first[:, r:]], axis=1)
    positions = context + 2 * power_law_slots(rng, n, (seq_len - context) // 2, k, power_a)
    asked = random_permutations(rng, n, k)
    np.put_along_axis(inputs, positions, np.take_along_axis(keys, asked, axis=1), axis=1)
    np.put_along_axis(labels, positions, np.take_along_axis(latest, asked, axis=1), axis=1)
    slices = {"num_kv_pairs": constant_slice(n, k), "seq_len": constant_slice(n, seq_len),
              "overwritten": constant_slice(n, r)}
    return inputs, labels, slices
