"""MQAR: multi-query associative recall (Zoology, Arora et al. 2023).

Parameters: vocabulary V = `vocab_size`, length L = `seq_len`, K = `num_kv_pairs`, a = `power_a`.

- Keys: K distinct tokens from [1, V // 2); values: K distinct tokens from [V // 2, V).
- Context, positions 0 .. 2K-1: `k1 v1 k2 v2 ... kK vK`.
- After it lie G = (L - 2K) // 2 gap slots; slot g (g = 0 .. G-1) is position 2K + 2g. K slots are drawn
  without replacement, slot g with probability proportional to a * (g + 1) ** (a - 1) (a = 0.01: close to
  1 / (g + 1), so queries crowd right after the context; a = 1: uniform). Each key is asked exactly once:
  the keys go to the drawn slots in a uniformly random order, independent of their order in the context.
- Labels: at a query position the label is the value that followed that key in the context (the token to
  predict after reading the query key); every other label is -100. The value itself never appears
  after the context.
- Every other position holds filler: 0, or (`random_filler`) a uniform token from [0, V).

Needs K <= G, i.e. L >= 4K, and V // 2 - 1 >= K (keys) which also leaves room for K values.
Slices: `num_kv_pairs`, `seq_len`.
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

DEFAULTS = {"vocab_size": 8192, "seq_len": 64, "num_kv_pairs": 4, "power_a": 0.01, "random_filler": False}


def validate(*, vocab_size, seq_len, num_kv_pairs, power_a, random_filler) -> None:
    check_int("mqar", "seq_len", seq_len, 4)
    check_int("mqar", "num_kv_pairs", num_kv_pairs, 1, seq_len // 4, f"seq_len // 4 for seq_len={seq_len}")
    check_vocab_size("mqar", vocab_size, 2 * num_kv_pairs + 2,
              f"keys need num_kv_pairs={num_kv_pairs} distinct tokens in [1, vocab_size // 2)")
    check_float("mqar", "power_a", power_a, 0.0, 1.0, include_low=False, include_high=True)
    check_bool("mqar", "random_filler", random_filler)


def chance(*, num_kv_pairs, **_) -> float:
    """A guess among the K values of the context."""
    return 1 / num_kv_pairs


def generate(rng: np.random.Generator, num_examples: int, *, vocab_size, seq_len, num_kv_pairs, power_a,
             random_filler):
    n, k = num_examples, num_kv_pairs
    keys = sample_distinct(rng, n, k, 1, vocab_size // 2)
    values = sample_distinct(rng, n, k, vocab_size // 2, vocab_size)
    inputs, labels = new_sequences(rng, n, seq_len, vocab_size, random_filler)
    inputs[:, 0:2 * k:2] = keys
    inputs[:, 1:2 * k:2] = values

    positions = 2 * k + 2 * power_law_slots(rng, n, (seq_len - 2 * k) // 2, k, power_a)
    asked = random_permutations(rng, n, k)  # asked[:, j]: the pair queried at the j-th query position
    np.put_along_axis(inputs, positions, np.take_along_axis(keys, asked, axis=1), axis=1)
    np.put_along_axis(labels, positions, np.take_along_axis(values, asked, axis=1), axis=1)
    return inputs, labels, {"num_kv_pairs": constant_slice(n, k), "seq_len": constant_slice(n, seq_len)}
