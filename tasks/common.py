"""Pieces shared by the task generators: parameter checks and vectorised sampling.

Every sampler takes an explicit `numpy.random.Generator` and draws a whole batch of examples at once;
nothing here touches global random state.

Token conventions shared by all tasks: token 0 is the filler (also the padding of mixtures), keys come from
the lower half of the vocabulary `[1, V // 2)` and values from the upper half `[V // 2, V)` (`noisy_ar`
keeps the top quarter for its noise tokens, see there). Labels hold `IGNORE` wherever nothing is predicted.
Tasks with their own token sets (copying, state tracking) say so in their docstrings; they too keep 0 free.
"""

import numbers
import os

import numpy as np

IGNORE = -100
FILLER = 0  # the filler token (unless `random_filler`), also the padding of mixtures
MAX_VOCAB_SIZE = 2**62  # tokens are int64, and numpy draws integers only below 2**63


def physical_memory() -> int | None:
    """This machine's memory in bytes; None where the system does not say (Windows has no sysconf)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_int(where: str, name: str, value, low: int, high: int | None = None, why: str = "") -> None:
    """Raise ValueError unless `value` is an integer with low <= value (<= high when high is given).

    `why` explains where `high` comes from (e.g. "seq_len // 4 for seq_len=64")."""
    is_int = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if is_int and value >= low and (high is None or value <= high):
        return
    upper = f" <= {high}" if high is not None else ""
    because = f" ({why})" if why else ""
    raise ValueError(f"{where}: {name}={value!r} is out of range; valid: integer {low} <= {name}{upper}{because}")


def check_vocab_size(where: str, vocab_size, low: int, why: str) -> None:
    """`check_int` of vocab_size >= low (`why` says where low comes from), then of its upper bound: a larger one
    failed inside numpy with a message that named no setting, or a traceback."""
    check_int(where, "vocab_size", vocab_size, low, None, why)
    check_int(where, "vocab_size", vocab_size, low, MAX_VOCAB_SIZE, "tokens are int64")


def check_float(where: str, name: str, value, low: float, high: float, *, include_low: bool,
                include_high: bool) -> None:
    """Raise ValueError unless `value` is a real number in the interval from low to high."""
    is_real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if is_real and (low <= value if include_low else low < value) and (
            value <= high if include_high else value < high):
        return
    interval = f"{'[' if include_low else '('}{low}, {high}{']' if include_high else ')'}"
    raise ValueError(f"{where}: {name}={value!r} is out of range; valid: a number in {interval}")


def check_bool(where: str, name: str, value) -> None:
    if isinstance(value, (bool, np.bool_)):
        return
    raise ValueError(f"{where}: {name}={value!r} is invalid; valid: true or false")


def check_choice(where: str, name: str, value, choices: tuple) -> None:
    if isinstance(value, str) and value in choices:
        return
    raise ValueError(f"{where}: {name}={value!r} is invalid; valid: one of {list(choices)}")


def sample_distinct(rng: np.random.Generator, num_rows: int, k: int, low: int, high: int) -> np.ndarray:
    """int64 [num_rows, k]: each row k distinct integers from [low, high), uniform over ordered k-tuples.

    For k <= n / 2 (n = high - low) every entry is drawn uniformly and, while a row holds a repeated value,
    the later copies are drawn again. The rule only looks at which entries are equal, never at the values
    themselves, so the result is invariant under relabelling the values: uniform over distinct k-tuples.
    Each redraw succeeds with probability >= 1/2, so few rounds are needed. For k > n / 2 a row is the
    first k entries of a random permutation of [low, high) (the [num_rows, n] buffer is then < 2k wide).
    """
    n = high - low
    if 2 * k > n:
        return low + np.argsort(rng.random((num_rows, n)), axis=1)[:, :k]
    out = rng.integers(0, n, size=(num_rows, k))
    rows = np.arange(num_rows)
    while rows.size:
        sub = out[rows]
        order = np.argsort(sub, axis=1, kind="stable")
        ranked = np.take_along_axis(sub, order, axis=1)
        repeat = np.zeros(sub.shape, dtype=bool)
        np.put_along_axis(repeat, order[:, 1:], ranked[:, 1:] == ranked[:, :-1], axis=1)
        has_repeat = repeat.any(axis=1)
        rows, sub, repeat = rows[has_repeat], sub[has_repeat], repeat[has_repeat]
        sub[repeat] = rng.integers(0, n, size=int(repeat.sum()))
        out[rows] = sub
    return low + out


def random_permutations(rng: np.random.Generator, num_rows: int, n: int) -> np.ndarray:
    """int64 [num_rows, n]: each row an independent uniform permutation of range(n)."""
    return np.argsort(rng.random((num_rows, n)), axis=1)


def power_law_slots(rng: np.random.Generator, num_rows: int, num_slots: int, k: int,
                    power_a: float) -> np.ndarray:
    """int64 [num_rows, k], each row sorted ascending: k slots of range(num_slots) drawn one after another
    without replacement, slot g drawn with probability proportional to a * (g + 1) ** (a - 1), a = power_a.

    Exponential race (the Efraimidis-Spirakis key trick in log form): slot g gets an arrival time E_g / w_g
    with E_g ~ Exp(1); the first arrival is g with probability w_g / sum(w), and by memorylessness each
    later arrival is drawn in proportion to the weights left, so the k earliest are such a sample.
    """
    weights = np.arange(1, num_slots + 1, dtype=np.float64) ** (power_a - 1.0)
    arrival = rng.standard_exponential((num_rows, num_slots)) / weights
    earliest = np.argpartition(arrival, k - 1, axis=1)[:, :k]
    return np.sort(earliest, axis=1)


def new_sequences(rng: np.random.Generator, num_rows: int, seq_len: int, vocab_size: int,
                  random_filler: bool) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels), int64 [num_rows, seq_len]: inputs all filler (0, or uniform tokens from
    [0, vocab_size) when `random_filler`), labels all IGNORE. Generators then write their tokens in."""
    if random_filler:
        inputs = rng.integers(0, vocab_size, size=(num_rows, seq_len))
    else:
        inputs = np.full((num_rows, seq_len), FILLER, dtype=np.int64)
    return inputs, np.full((num_rows, seq_len), IGNORE, dtype=np.int64)


def constant_slice(num_rows: int, value: int) -> np.ndarray:
    return np.full(num_rows, value, dtype=np.int64)


# ---- state tracking: a state after every input token; labels at every position or only at the last

LABELS_AT = ("every", "last")


def check_state_tracking(where: str, *, vocab_size, seq_len, num_symbols: int, labels_at) -> None:
    """The checks shared by the state-tracking tasks, whose tokens are 1 .. num_symbols (0 stays the filler)."""
    check_int(where, "seq_len", seq_len, 1)
    check_vocab_size(where, vocab_size, num_symbols + 1,
              f"tokens 1 .. {num_symbols} for the inputs and states, 0 kept for padding")
    check_choice(where, "labels_at", labels_at, LABELS_AT)


def state_chance(guess: float, *, seq_len: int, labels_at: str, start: int = 0) -> float:
    """The accuracy per labelled position (at `start` and after) of a guess (`guess`: one among the states) that
    reads the first input: the state after one input is that input (the token 1 + x_0 is the label), so the first
    position's answer is in its context and a model that copies its input (as a tied-embedding model does at
    initialisation) scores it. Labels at every position: (1 + (L - 1) guess) / L, so chance depends on the length;
    past the first position (`start` >= 1, e.g. past a training length) guess alone; at the last: guess (unless
    L = 1)."""
    if labels_at == "every":
        return guess if start else (1 + (seq_len - 1) * guess) / seq_len
    return 1.0 if seq_len == 1 else guess


def state_labels(states: np.ndarray, labels_at: str) -> np.ndarray:
    """int64 [N, L]: the token 1 + state at every position (`every`) or at the last only (`last`)."""
    labels = 1 + states
    if labels_at == "last":
        labels[:, :-1] = IGNORE
    return labels
