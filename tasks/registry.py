"""The task registry and the two ways to build a dataset: `make` (one setting) and `make_mixture` (several).

A task is a generator `generate(rng, num_examples, **params) -> (inputs, labels, slices)` of numpy arrays,
a `validate(**params)` that raises ValueError naming a bad setting, and its default params. `make` checks
everything (task name, unknown params, every value) before it draws a single number, and returns numpy
arrays: `inputs` and `labels` int64 [N, L], with `labels[:, t]` the token to predict after reading
`inputs[:, :t+1]` and -100 where nothing is predicted, and `slices` int64 [N] per slice name. Every task
has a `seq_len` slice, so a test segment longer than the training ones is reported apart (length
extrapolation).

MAD's compression task is left out: it needs an encoder that pools the whole sequence into one vector and a
decoder that rebuilds every token from that vector alone. The sandbox's backbone is a causal language model
that predicts at labelled positions from what it has read; put after the sequence, a reconstruction can read
the tokens themselves (attention looks back, a recurrence carries its state), so the bottleneck that defines
the task is not there, and what would remain is a copying task (`selective_copying` covers that).
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tasks import (
    ar,
    fuzzy_recall,
    memorization,
    modular_sum,
    mqar,
    noisy_ar,
    overwrite_mqar,
    parity,
    s5,
    selective_copying,
)
from tasks.common import IGNORE, check_int


@dataclass(frozen=True)
class Task:
    generate: Callable
    validate: Callable
    defaults: dict
    summary: str


TASKS = {
    "mqar": Task(mqar.generate, mqar.validate, mqar.DEFAULTS,
                 "multi-query associative recall (Zoology): K pairs, then every key queried once"),
    "ar": Task(ar.generate, ar.validate, ar.DEFAULTS,
               "associative recall: K pairs, then one key queried at the last position"),
    "noisy_ar": Task(noisy_ar.generate, noisy_ar.validate, noisy_ar.DEFAULTS,
                     "associative recall with noise tokens from a reserved vocabulary between the pairs"),
    "overwrite_mqar": Task(overwrite_mqar.generate, overwrite_mqar.validate, overwrite_mqar.DEFAULTS,
                           "MQAR where some keys get a new value later; the latest value is the answer"),
    "fuzzy_recall": Task(fuzzy_recall.generate, fuzzy_recall.validate, fuzzy_recall.DEFAULTS,
                         "MQAR with multi-token key and value motifs (MAD); the labels are the value's motif"),
    "selective_copying": Task(selective_copying.generate, selective_copying.validate, selective_copying.DEFAULTS,
                              "data tokens scattered among blanks, produced in order after a separator (MAD)"),
    "memorization": Task(memorization.generate, memorization.validate, memorization.DEFAULTS,
                         "a fixed key-to-value map shared by all splits, learnt into the weights (MAD)"),
    "parity": Task(parity.generate, parity.validate, parity.DEFAULTS,
                   "state tracking: the parity of the bits read so far"),
    "modular_sum": Task(modular_sum.generate, modular_sum.validate, modular_sum.DEFAULTS,
                        "state tracking: the running sum of residues modulo `modulus`"),
    "s5": Task(s5.generate, s5.validate, s5.DEFAULTS,
               "state tracking: the running composition of permutations of 5 elements"),
}


@dataclass
class TaskData:
    inputs: np.ndarray  # int64 [N, L]
    labels: np.ndarray  # int64 [N, L], IGNORE (-100) where nothing is predicted
    slices: dict[str, np.ndarray]  # name -> int64 [N]

    def __len__(self) -> int:
        return self.inputs.shape[0]


def available() -> list[str]:
    return sorted(TASKS)


def get(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"task={name!r} is unknown; valid: one of {available()}")
    return TASKS[name]


def defaults(name: str) -> dict:
    return dict(get(name).defaults)


def resolve(name: str, params: dict) -> dict:
    """The task's full parameter dict: defaults overridden by `params`, validated."""
    task = get(name)
    unknown = sorted(set(params) - set(task.defaults))
    if unknown:
        raise ValueError(f"{name}: unknown parameter(s) {unknown}; valid: {sorted(task.defaults)}")
    full = {**task.defaults, **params}
    task.validate(**full)
    return full


def make(name: str, *, num_examples: int, seed: int, **params) -> TaskData:
    """`num_examples` examples of task `name` drawn from `numpy.random.default_rng(seed)`."""
    full = resolve(name, params)
    check_int(name, "num_examples", num_examples, 1)
    check_int(name, "seed", seed, 0)
    return _task_data(*get(name).generate(np.random.default_rng(seed), num_examples, **full))


def make_mixture(name: str, segments: list[dict], *, seed: int, **common_params) -> TaskData:
    """Examples from several settings of one task, segment after segment (shuffle when loading).

    Each segment dict holds `num_examples` and the params that vary (e.g. `seq_len`, `num_kv_pairs`);
    they override `common_params`. Segment i draws from the i-th child of `SeedSequence(seed)`. Examples
    shorter than the longest are right-padded with input 0 and label -100; the `seq_len` slice keeps each
    example's own length.
    """
    check_int(name, "seed", seed, 0)
    if not isinstance(segments, (list, tuple)) or not segments:
        raise ValueError(f"{name}: segments={segments!r} is invalid; valid: a non-empty list of dicts")
    plans = []
    for i, segment in enumerate(segments):
        params = {**common_params, **segment}
        num_examples = params.pop("num_examples", None)
        check_int(f"{name} segment {i}", "num_examples", num_examples, 1)
        try:
            plans.append((num_examples, resolve(name, params)))
        except ValueError as error:
            raise ValueError(f"segment {i}: {error}") from None

    width = max(params["seq_len"] for _, params in plans)
    children = np.random.SeedSequence(seed).spawn(len(plans))
    parts = [get(name).generate(np.random.default_rng(child), num_examples, **params)
             for child, (num_examples, params) in zip(children, plans)]
    inputs = np.concatenate([pad_right(x, width, 0) for x, _, _ in parts])
    labels = np.concatenate([pad_right(y, width, IGNORE) for _, y, _ in parts])
    slices = {key: np.concatenate([s[key] for _, _, s in parts]) for key in parts[0][2]}
    return _task_data(inputs, labels, slices)


def pad_right(rows: np.ndarray, width: int, value: int) -> np.ndarray:
    return np.pad(rows, ((0, 0), (0, width - rows.shape[1])), constant_values=value)


def _task_data(inputs: np.ndarray, labels: np.ndarray, slices: dict) -> TaskData:
    return TaskData(inputs, labels, {key: np.asarray(value, dtype=np.int64) for key, value in slices.items()})
