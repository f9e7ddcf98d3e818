"""Fuzzy recall: MQAR whose keys and values are short multi-token motifs (MAD's fuzzy in-context recall).

Parameters: vocabulary V = `vocab_size`, length L = `seq_len`, K = `num_kv_pairs`, a = `power_a`, motif
sizes m_k = `key_motif_size` and m_v = `value_motif_size`; a pair is w = m_k + m_v tokens.

- Keys: K distinct motifs of m_k tokens from [1, V // 2) (a token may repeat inside a motif; two keys differ
  in at least one place), uniform over such K-tuples. Values: K distinct motifs of m_v tokens from [V // 2, V).
- Context, positions 0 .. Kw-1: the K pairs `key motif, value motif`, back to back.
- After it lie G = (L - Kw) // w query slots of w tokens, slot g at position Kw + wg. K slots are drawn as in
  MQAR (without replacement, slot g with probability proportional to a * (g + 1) ** (a - 1)) and each key is
  asked in one of them, in a random order. A query slot holds the key's motif, then the first m_v - 1 tokens
  of its value motif, then a filler token. The labels are the value motif: its token j at the slot's offset
  m_k - 1 + j, the token to predict after reading the key and the value tokens before it.
- Every other label is -100, every other position filler 0.

m_k = m_v = 1 is MQAR's layout. MAD trains on keys of every motif size 1 .. m_k and tests at m_k: train
segments with different `key_motif_size` do that.
Needs K <= G, i.e. L >= 2Kw; K <= (V // 2 - 1) ** m_k and K <= (V - V // 2) ** m_v; and at most 2**62
motifs of each size, so that a motif's number fits an int64.
Slices: `num_kv_pairs`, `seq_len`, `key_motif_size`.
"""

import numpy as np

from tasks.common import (
    check_float,
    check_int,
    check_vocab_size,
    constant_slice,
    new_sequences,
    power_law_slots,
    random_permutations,
    sample_distinct,
)

DEFAULTS = {"vocab_size": 16, "seq_len": 128, "num_kv_pairs": 8, "key_motif_size": 3, "value_motif_size": 3,
            "power_a": 0.01}
MOST_MOTIFS = 2**62


def largest_motif_size(num_tokens: int) -> int:
    """The largest m <= 62 with num_tokens ** m <= MOST_MOTIFS (62 bounds it for a single token too)."""
    size = 1
    while size < 62 and num_tokens ** (size + 1) <= MOST_MOTIFS:
        size += 1
    return size


def validate(*, vocab_size, seq_len, num_kv_pairs, key_motif_size, value_motif_size, power_a) -> None:
    where = "fuzzy_recall"
    check_vocab_size(where, vocab_size, 4, "keys from [1, vocab_size // 2) need one token")
    num_keys, num_values = vocab_size // 2 - 1, vocab_size - vocab_size // 2
    check_int(where, "key_motif_size", key_motif_size, 1, largest_motif_size(num_keys),
              f"at most 2**62 motifs of {num_keys} key tokens for vocab_size={vocab_size}")
    check_int(where, "value_motif_size", value_motif_size, 1, largest_motif_size(num_values),
              f"at most 2**62 motifs of {num_values} value tokens for vocab_size={vocab_size}")
    width = key_motif_size + value_motif_size
    check_int(where, "seq_len", seq_len, 2 * width, None,
              f"one pair and one query of {width} tokens each")
    most = min(seq_len // (2 * width), num_keys ** key_motif_size, num_values ** value_motif_size)
    check_int(where, "num_kv_pairs", num_kv_pairs, 1, most,
              f"the smallest of seq_len // (2 * {width}) for seq_len={seq_len} and the numbers of distinct key "
              f"and value motifs, {num_keys} ** {key_motif_size} and {num_values} ** {value_motif_size}")
    check_float(where, "power_a", power_a, 0.0, 1.0, include_low=False, include_high=True)


def sample_motifs(rng: np.random.Generator, num_rows: int, k: int, size: int, low: int, high: int) -> np.ndarray:
    """int64 [num_rows, k, size]: k distinct motifs per row, each `size` tokens from [low, high).

    A motif is the base-(high - low) number of its tokens, so k distinct numbers are k distinct motifs."""
    base = high - low
    numbers = sample_distinct(rng, num_rows, k, 0, base**size)
    place_values = base ** np.arange(size - 1, -1, -1, dtype=np.int64)
    return low + numbers[:, :, None] // place_values % base


def chance(*, vocab_size, num_kv_pairs, value_motif_size, **_) -> float:
    """Token j of one of the K value motifs of the context, guessed: its own (1/K), or another whose token j
    is the same. The K motifs are distinct, so another motif is uniform over the n ** m_v - 1 motifs other
    than the answer (n = V - V // 2 value tokens), of which n ** (m_v - 1) - 1 share its token j: none for
    m_v = 1, where the values are K distinct tokens and the chance is MQAR's 1/K."""
    n, m = vocab_size - vocab_size // 2, value_motif_size
    others = n**m - 1  # 0 only where a single motif exists, and then K = 1
    same_token = (n ** (m - 1) - 1) / others if others else 0.0
    return 1 / num_kv_pairs + (1 - 1 / num_kv_pairs) * same_token


def generate(rng: np.random.Generator, num_examples: int, *, vocab_size, seq_len, num_kv_pairs, key_motif_size,
             value_motif_size, power_a):
    n, k, width = num_examples, num_kv_pairs, key_motif_size + value_motif_size
    context = k * width
    keys = sample_motifs(rng, n, k, key_motif_size, 1, vocab_size // 2)
    values = sample_motifs(rng, n, k, value_motif_size, vocab_size // 2, vocab_size)
    pairs = np.concatenate([keys, values], axis=2)  # [n, k, width]
    inputs, labels = new_sequences(rng, n, seq_len, vocab_size, False)
    inputs[:, :context] = pairs.reshape(n, context)

    slot_start = context + width * power_law_slots(rng, n, (seq_len - context) // width, k, power_a)
    asked = np.take_along_axis(pairs, random_permutations(rng, n, k)[:, :, None], axis=1)
    shown = slot_start[:, :, None] + np.arange(width - 1)  # the slot but its last token, which stays filler
    np.put_along_axis(inputs, shown.reshape(n, -1), asked[:, :, :-1].reshape(n, -1), axis=1)
    labelled = slot_start[:, :, None] + key_motif_size - 1 + np.arange(value_motif_size)
    np.put_along_axis(labels, labelled.reshape(n, -1), asked[:, :, key_motif_size:].reshape(n, -1), axis=1)
    slices = {"num_kv_pairs": constant_slice(n, k), "seq_len": constant_slice(n, seq_len),
              "key_motif_size": constant_slice(n, key_motif_size)}
    return inputs, labels, slices
