"""Parity: the parity of the bits read so far (state tracking): `modular_sum` with modulus 2.

Parameters: vocabulary V = `vocab_size`, length L = `seq_len`, `labels_at`.

- Inputs: uniform bits b_t, written as the tokens 1 + b_t (token 1 is a 0 bit, token 2 a 1 bit).
- The label at t is the token 1 + (b_0 + ... + b_t) mod 2 at every position (`labels_at: every`), or at the
  last only (`labels_at: last`; the others -100).

Needs V >= 3.
Slices: `seq_len`.
"""

import numpy as np

from tasks import modular_sum

DEFAULTS = {"vocab_size": 3, "seq_len": 64, "labels_at": "every"}


def validate(*, vocab_size, seq_len, labels_at) -> None:
    modular_sum.validate(vocab_size=vocab_size, seq_len=seq_len, modulus=2, labels_at=labels_at, where="parity")


def chance(*, seq_len, labels_at, start=0, **_) -> float:
    """A guess of one of the two parities, but at the first position, whose parity is its input bit."""
    return modular_sum.chance(seq_len=seq_len, modulus=2, labels_at=labels_at, start=start)


def generate(rng: np.random.Generator, num_examples: int, *, vocab_size, seq_len, labels_at):
    inputs, labels, slices = modular_sum.generate(rng, num_examples, vocab_size=vocab_size, seq_len=seq_len,
                                                  modulus=2, labels_at=labels_at)
    return inputs, labels, {"seq_len": slices["seq_len"]}
