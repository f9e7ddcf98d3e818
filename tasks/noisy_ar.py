"""Noisy AR: single-query associative recall with noise tokens mixed in between the pairs.

Parameters: vocabulary V = `vocab_size`, length L = `seq_len`, K = `num_kv_pairs`, f = `noise_fraction`.

- Vocabulary split: keys from [1, V // 2), values from [V // 2, 3V // 4), noise tokens from the top
  quarter [3V // 4, V), which keys and values never use. K distinct keys and K distinct values.
- Context: the K pairs `ki vi` (in order i = 1 .. K, each key right before its value) with M noise tokens
  placed between, before and after them: a uniformly random interleaving of the K pairs and the M noise
  tokens. M = round(2K f / (1 - f)), so f is the fraction of the context's 2K + M tokens that are noise.
  Noise tokens are uniform over the noise vocabulary, independently.
- Then filler (0, or uniform tokens from [0, V) with `random_filler`) up to position L-2, and one of the K
  keys, chosen uniformly, at position L-1 as the query; its label is its value, every other label -100.

f = 0 gives the layout of `ar`. Needs 2K + M + 1 <= L, and V >= max(2K + 2, 4K - 1) for the keys and
values.
Slices: `num_kv_pairs`, `seq_len`, `query_pair` (the queried pair's index in the context, 0 = first).
"""

import numpy as np

from tasks.common import (
    check_bool,
    check_float,
    check_int,
    check_vocab_size,
    constant_slice,
    new_sequences,
    random_permutations,
    sample_distinct,
)

DEFAULTS = {"vocab_size": 8192, "seq_len": 64, "num_kv_pairs": 8, "noise_fraction": 0.5,
            "random_filler": False}


def num_noise_tokens(num_kv_pairs: int, noise_fraction: float) -> int:
    return round(2 * num_kv_pairs * noise_fraction / (1 - noise_fraction))


def validate(*, vocab_size, seq_len, num_kv_pairs, noise_fraction, random_filler) -> None:
    check_int("noisy_ar", "seq_len", seq_len, 3)
    check_int("noisy_ar", "num_kv_pairs", num_kv_pairs, 1, (seq_len - 1) // 2,
              f"(seq_len - 1) // 2 for seq_len={seq_len}")
    check_vocab_size("noisy_ar", vocab_size, max(2 * num_kv_pairs + 2, 4 * num_kv_pairs - 1),
              f"num_kv_pairs={num_kv_pairs} distinct keys in [1, vocab_size // 2) and values in "
              "[vocab_size // 2, 3 * vocab_size // 4)")
    check_float("noisy_ar", "noise_fraction", noise_fraction, 0.0, 1.0, include_low=True, include_high=False)
    room = seq_len - 1 - 2 * num_kv_pairs
    if num_noise_tokens(num_kv_pairs, noise_fraction) > room:
        raise ValueError(
            f"noisy_ar: noise_fraction={noise_fraction!r} is out of range for seq_len={seq_len} and "
            f"num_kv_pairs={num_kv_pairs}; valid: round(2K f / (1 - f)) <= seq_len - 1 - 2K = {room} "
            f"noise tokens, i.e. f < {(room + 0.5) / (room + 0.5 + 2 * num_kv_pairs):.4f}")
    check_bool("noisy_ar", "random_filler", random_filler)


def chance(*, num_kv_pairs, **_) -> float:
    """A guess among the K values of the context."""
    return 1 / num_kv_pairs


def generate(rng: np.random.Generator, num_examples: int, *, vocab_size, seq_len, num_kv_pairs,
             noise_fraction, random_filler):
    n, k = num_examples, num_kv_pairs
    m = num_noise_tokens(k, noise_fraction)
    noise_low = 3 * vocab_size // 4
    keys = sample_distinct(rng, n, k, 1, vocab_size // 2)
    values = sample_distinct(rng, n, k, vocab_size // 2, noise_low)
    inputs, labels = new_sequences(rng, n, seq_len, vocab_size, random_filler)

    # The context is a row of k + m items, each a pair (2 tokens) or a noise token (1 token).
    is_pair = random_permutations(rng, n, k + m) < k
    width = 1 + is_pair
    start = np.cumsum(width, axis=1) - width
    pair_start = start[is_pair].reshape(n, k)
    noise_start = start[~is_pair].reshape(n, m)
    np.put_along_axis(inputs, pair_start, keys, axis=1)
    np.put_along_axis(inputs, pair_start + 1, values, axis=1)
    np.put_along_axis(inputs, noise_start, rng.integers(noise_low, vocab_size, size=(n, m)), axis=1)

    query_pair = rng.integers(0, k, size=n)
    rows = np.arange(n)
    inputs[:, -1] = keys[rows, query_pair]
    labels[:, -1] = values[rows, query_pair]
    slices = {"num_kv_pairs": constant_slice(n, k), "seq_len": constant_slice(n, seq_len),
              "query_pair": query_pair}
    return inputs, labels, slices
