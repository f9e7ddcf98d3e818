"""S5: the running composition of permutations of 5 elements (the S5 word problem; state tracking).

Parameters: vocabulary V = `vocab_size`, length L = `seq_len`, `labels_at`.

- The 120 permutations of (0, 1, 2, 3, 4), numbered in lexicographic order of their images
  (g(0), .., g(4)), number 0 the identity; permutation number i is the token 1 + i.
- Inputs: g_t uniform over the 120, independently.
- State after position t: p_t = g_t o g_{t-1} o ... o g_0, the permutation that applies g_0 first:
  p_t(i) = g_t(p_{t-1}(i)). The label at t is the token 1 + number of p_t at every position
  (`labels_at: every`), or at the last only (`labels_at: last`; the others -100).

S5 is the smallest non-solvable group: the hard end of the state-tracking tasks, `parity` the easy one.
Needs V >= 121.
Slices: `seq_len`.
"""

import itertools

import numpy as np

from tasks.common import check_state_tracking, constant_slice, state_chance, state_labels

DEFAULTS = {"vocab_size": 121, "seq_len": 64, "labels_at": "every"}
PERMUTATIONS = np.array(list(itertools.permutations(range(5))))  # [120, 5], row i = images of permutation i


def composition_table() -> np.ndarray:
    """int64 [120, 120]: entry (a, b) is the number of the permutation a o b (apply b, then a)."""
    composed = PERMUTATIONS[:, PERMUTATIONS]  # [a, b, i] = a(b(i))
    place_values = 5 ** np.arange(4, -1, -1)
    number_of_code = np.zeros(5**5, dtype=np.int64)
    number_of_code[PERMUTATIONS @ place_values] = np.arange(len(PERMUTATIONS))
    return number_of_code[composed @ place_values]


COMPOSE = composition_table()


def validate(*, vocab_size, seq_len, labels_at) -> None:
    check_state_tracking("s5", vocab_size=vocab_size, seq_len=seq_len, num_symbols=len(PERMUTATIONS),
                         labels_at=labels_at)


def chance(*, seq_len, labels_at, start=0, **_) -> float:
    """A guess among the 120 permutations, but at the first position, whose state is its input (`state_chance`)."""
    return state_chance(1 / len(PERMUTATIONS), seq_len=seq_len, labels_at=labels_at, start=start)


def generate(rng: np.random.Generator, num_examples: int, *, vocab_size, seq_len, labels_at):
    elements = rng.integers(0, len(PERMUTATIONS), size=(num_examples, seq_len))
    states = np.empty_like(elements)
    state = np.zeros(num_examples, dtype=np.int64)  # the identity
    for t in range(seq_len):
        state = COMPOSE[elements[:, t], state]
        states[:, t] = state
    return 1 + elements, state_labels(states, labels_at), {"seq_len": constant_slice(num_examples, seq_len)}
