"""Modular sum: the running sum modulo m of a string of residues (state tracking; `parity` is m = 2).

Parameters: vocabulary V = `vocab_size`, length L = `seq_len`, m = `modulus`, `labels_at`.

- Inputs: x_t uniform over {0, .., m-1}, independently, written as the tokens 1 + x_t (0 stays the filler,
  which pads the shorter examples of a mixture).
- State after position t: s_t = (x_0 + ... + x_t) mod m. The label at t is the token 1 + s_t at every
  position (`labels_at: every`), or at the last position only (`labels_at: last`; the others -100).

Tracking the state needs transitions with negative eigenvalues (Grazzi et al. 2024): the delta rules with
beta in (0, 2) have them, positive-only recurrences do not. Test segments longer than the training ones
measure how far what was learnt carries.
Needs V >= m + 1.
Slices: `modulus`, `seq_len`.
"""

import numpy as np

from tasks.common import check_int, check_state_tracking, constant_slice, state_chance, state_labels

DEFAULTS = {"vocab_size": 6, "seq_len": 64, "modulus": 5, "labels_at": "every"}


def validate(*, vocab_size, seq_len, modulus, labels_at, where: str = "modular_sum") -> None:
    check_int(where, "modulus", modulus, 2)
    check_state_tracking(where, vocab_size=vocab_size, seq_len=seq_len, num_symbols=modulus, labels_at=labels_at)


def chance(*, seq_len, modulus, labels_at, start=0, **_) -> float:
    """A guess among the m residues, but at the first position, whose state is its input (`state_chance`)."""
    return state_chance(1 / modulus, seq_len=seq_len, labels_at=labels_at, start=start)


def running_sums(residues: np.ndarray, modulus: int) -> np.ndarray:
    """int64 [N, L]: (x_0 + ... + x_t) mod m. A cumulative sum passes int64 once (m - 1) L >= 2**63 (m goes up to
    2**62 - 1), so it runs over blocks short enough that a block's sum plus the state carried into it never does."""
    block = max(1, (2**63 - 1) // modulus - 1)  # (block + 1) (m - 1) < 2**63
    states = np.empty_like(residues)
    carried = np.zeros((residues.shape[0], 1), dtype=np.int64)
    for start in range(0, residues.shape[1], block):
        states[:, start:start + block] = (carried + np.cumsum(residues[:, start:start + block], axis=1)) % modulus
        carried = states[:, start + block - 1:start + block]
    return states


def generate(rng: np.random.Generator, num_examples: int, *, vocab_size, seq_len, modulus, labels_at):
    residues = rng.integers(0, modulus, size=(num_examples, seq_len))
    states = running_sums(residues, modulus)
    slices = {"modulus": constant_slice(num_examples, modulus), "seq_len": constant_slice(num_examples, seq_len)}
    return 1 + residues, state_labels(states, labels_at), slices
