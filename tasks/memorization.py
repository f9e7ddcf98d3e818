"""Memorization (MAD): a fixed key-to-value map, the same in every example of every split; nothing to recall.

Parameters: vocabulary V = `vocab_size`, length L = `seq_len`, `map_seed`.

- The map sends key k in [1, V // 2) to the value V // 2 + p[k - 1], where p is the permutation of
  range(V - V // 2) drawn by `numpy.random.default_rng(map_seed)`: one-to-one, and a function of the task's
  parameters only, never of the split's seed, so training, validation and test examples share it.
- An example is L // 2 pairs `key 0`: each key uniform over [1, V // 2), independently (keys repeat). The
  label at a key is its value under the map; the filler after it (which stands for MAD's insert token) and,
  for odd L, the last position are filler with label -100.

The values never appear in the inputs: they can only be learnt from the training set, into the weights. So a
key that no training example holds cannot be answered: with MAD's 256 training examples of L = 32, the test keys
of seed 0 that occur in training are 97.8% at V = 2048, 85.1% at 4096 and 62.8% at 8192 (100% up to 1024), the
most test accuracy those settings allow (MAD's data has the same property); their runs never reach an early
stop at 0.999 validation accuracy either.
Needs L >= 2 and V >= 4, and one `vocab_size` and `map_seed` for all segments (`SHARED`): a segment with its own
would be drawn from another map.
Slices: `seq_len`.
"""

import numpy as np

from tasks.common import check_int, check_vocab_size, constant_slice, new_sequences, physical_memory

DEFAULTS = {"vocab_size": 256, "seq_len": 32, "map_seed": 0}
SHARED = ("vocab_size", "map_seed")  # the map is a function of these: every segment of every split must agree


def validate(*, vocab_size, seq_len, map_seed) -> None:
    check_vocab_size("memorization", vocab_size, 4, "keys from [1, vocab_size // 2) need one token")
    memory = physical_memory()
    if memory is not None:  # the map is made as about 3 int64 arrays of vocab_size // 2 entries: 12 bytes a token
        check_int("memorization", "vocab_size", vocab_size, 4, memory // 16,
                  f"what this machine's {memory / 2**30:.0f} GiB holds for the map")
    check_int("memorization", "seq_len", seq_len, 2)
    check_int("memorization", "map_seed", map_seed, 0)


def value_of_key(vocab_size: int, map_seed: int) -> np.ndarray:
    """int64 [V // 2]: entry k is key k's value (entry 0, not a key, is unused)."""
    values = vocab_size // 2 + np.random.default_rng(map_seed).permutation(vocab_size - vocab_size // 2)
    return np.concatenate([[0], values[:vocab_size // 2 - 1]])


def chance(*, vocab_size, **_) -> float:
    """A guess among the V // 2 - 1 values the map takes (equally likely: keys are uniform), which needs no
    memorised pair."""
    return 1 / (vocab_size // 2 - 1)


def generate(rng: np.random.Generator, num_examples: int, *, vocab_size, seq_len, map_seed):
    n = num_examples
    inputs, labels = new_sequences(rng, n, seq_len, vocab_size, False)
    keys = rng.integers(1, vocab_size // 2, size=(n, seq_len // 2))
    inputs[:, 0:2 * keys.shape[1]:2] = keys
    labels[:, 0:2 * keys.shape[1]:2] = value_of_key(vocab_size, map_seed)[keys]
    return inputs, labels, {"seq_len": constant_slice(n, seq_len)}
