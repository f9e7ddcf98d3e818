"""AR: single-query associative recall (as in H3 and Hyena).

Parameters: vocabulary V = `vocab_size`, length L = `seq_len`, K = `num_kv_pairs`.

- Keys: K distinct tokens from [1, V // 2); values: K distinct tokens from [V // 2, V).
- Context, positions 0 .. 2K-1: `k1 v1 k2 v2 ... kK vK`; then filler (0, or uniform tokens from [0, V)
  with `random_filler`) up to position L-2.
- Query: one of the K keys, chosen uniformly, at the last position L-1. Its label is the value that
  followed it in the context; every other label is -100.

Needs 2K + 1 <= L and V // 2 - 1 >= K.
Slices: `num_kv_pairs`, `seq_len`, `query_pair` (the queried pair's index in the context, 0 = first).
"""

import numpy as np

from tasks.common import check_bool, check_int, check_vocab_size, constant_slice, new_sequences, sample_distinct

DEFAULTS = {"vocab_size": 8192, "seq_len": 64, "num_kv_pairs": 16, "random_filler": False}


def validate(*, vocab_size, seq_len, num_kv_pairs, random_filler) -> None:
    check_int("ar", "seq_len", seq_len, 3)
    check_int("ar", "num_kv_pairs", num_kv_pairs, 1, (seq_len - 1) // 2,
              f"(seq_len - 1) // 2 for seq_len={seq_len}")
    check_vocab_size("ar", vocab_size, 2 * num_kv_pairs + 2,
              f"keys need num_kv_pairs={num_kv_pairs} distinct tokens in [1, vocab_size // 2)")
    check_bool("ar", "random_filler", random_filler)


def chance(*, num_kv_pairs, **_) -> float:
    """A guess among the K values of the context."""
    return 1 / num_kv_pairs


def generate(rng: np.random.Generator, num_examples: int, *, vocab_size, seq_len, num_kv_pairs,
             random_filler):
    n, k = num_examples, num_kv_pairs
    keys = sample_distinct(rng, n, k, 1, vocab_size // 2)
    values = sample_distinct(rng, n, k, vocab_size // 2, vocab_size)
    inputs, labels = new_sequences(rng, n, seq_len, vocab_size, random_filler)
    inputs[:, 0:2 * k:2] = keys
    inputs[:, 1:2 * k:2] = values

    query_pair = rng.integers(0, k, size=n)
    rows = np.arange(n)
    inputs[:, -1] = keys[rows, query_pair]
    labels[:, -1] = values[rows, query_pair]
    slices = {"num_kv_pairs": constant_slice(n, k), "seq_len": constant_slice(n, seq_len),
              "query_pair": query_pair}
    return inputs, labels, slices
