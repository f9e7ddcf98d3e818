"""Selective copying (MAD): data tokens scattered among blanks, to be produced in their order after a separator.

Parameters: vocabulary V = `vocab_size`, length L = `seq_len`, C = `num_tokens_to_copy`.

- Tokens: 0 is the blank (the filler), 1 the separator, data tokens come from [2, V).
- Region, positions 0 .. R-1 with R = L - C - 1: C data tokens, each uniform over [2, V) independently (they
  may repeat), at C positions drawn uniformly without replacement; blanks everywhere else.
- Position R: the separator. Positions R+1 .. R+C hold blanks and are where the copy is produced: the label at
  R+1+j is the j-th data token of the region, counted from the left. Every other label is -100.

The copy positions show only blanks, as in MAD: nothing of the copy is fed back, so each data token must be
read from the region. Needs R >= C, i.e. L >= 2C + 1, and V >= 3.
Slices: `num_tokens_to_copy`, `seq_len`.
"""

import numpy as np

from tasks.common import check_int, check_vocab_size, constant_slice, new_sequences, sample_distinct

DEFAULTS = {"vocab_size": 16, "seq_len": 256, "num_tokens_to_copy": 16}
SEPARATOR = 1
FIRST_DATA_TOKEN = 2


def validate(*, vocab_size, seq_len, num_tokens_to_copy) -> None:
    where = "selective_copying"
    check_vocab_size(where, vocab_size, FIRST_DATA_TOKEN + 1,
              "0 is the blank, 1 the separator, data tokens from [2, vocab_size)")
    check_int(where, "seq_len", seq_len, 3)
    check_int(where, "num_tokens_to_copy", num_tokens_to_copy, 1, (seq_len - 1) // 2,
              f"(seq_len - 1) // 2 for seq_len={seq_len}: a region at least as long as the copy")


def chance(*, vocab_size, num_tokens_to_copy, **_) -> float:
    """A guess of a token of the region, at a random one of its C data positions: right with probability
    E[copies of the answer among the C] / C = (1 + (C - 1) / (V - 2)) / C."""
    return (1 + (num_tokens_to_copy - 1) / (vocab_size - 2)) / num_tokens_to_copy


def generate(rng: np.random.Generator, num_examples: int, *, vocab_size, seq_len, num_tokens_to_copy):
    n, c = num_examples, num_tokens_to_copy
    region = seq_len - c - 1
    inputs, labels = new_sequences(rng, n, seq_len, vocab_size, False)
    data = rng.integers(FIRST_DATA_TOKEN, vocab_size, size=(n, c))
    positions = np.sort(sample_distinct(rng, n, c, 0, region), axis=1)
    np.put_along_axis(inputs, positions, data, axis=1)
    inputs[:, region] = SEPARATOR
    labels[:, region + 1:] = data
    slices = {"num_tokens_to_copy": constant_slice(n, c), "seq_len": constant_slice(n, seq_len)}
    return inputs, labels, slices
