"""The task registry and the two ways to build a dataset: `make` (one setting) and `make_mixture` (several).

A task is a generator `generate(rng, num_examples, **params) -> (inputs, labels, slices)` of numpy arrays,
a `validate(**params)` that raises ValueError naming a bad setting, a `chance(**params, start=0)` (the accuracy
per labelled position, at `start` and after, of a guess among the answers the context allows: what a model scores
that learnt the format and not the task; only a task whose chance differs by position reads `start`, the others
take it in `**_`; `chance_accuracy` weighs it over a dataset's labelled positions), and its default params.
`make` checks everything (task name, unknown params, every value) before it draws a single number, and
returns numpy arrays: `inputs` and `labels` int64 [N, L], with `labels[:, t]` the token to predict after reading
`inputs[:, :t+1]` and -100 where nothing is predicted, and `slices` int64 [N] per slice name. Every task has a
`seq_len` slice, so a test segment longer than the training ones is reported apart (length extrapolation).

MAD's compression task is left out: it needs an encoder that pools the whole sequence into one vector and a
decoder that rebuilds every token from that vector alone. The sandbox's backbone is a causal language model
that predicts at labelled positions from what it has read; put after the sequence, a reconstruction can read
the tokens themselves (attention looks back, a recurrence carries its state), so the bottleneck that defines
the task is not there, and what would remain is a copying task (`selective_copying` covers that).
"""

from collections.abc import Callable, Mapping
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
from tasks.common import FILLER, IGNORE, check_int, physical_memory


@dataclass(frozen=True)
class Task:
    generate: Callable
    validate: Callable
    chance: Callable[..., float]  # (**params) -> the accuracy of a guess that learnt the format, not the task
    defaults: dict
    summary: str
    shared: tuple = ()  # params that every segment of every split must give the same value (`check_shared`)

    @classmethod
    def of(cls, module, summary: str) -> "Task":
        """The task that `module` defines (its generate, validate, chance, DEFAULTS and SHARED, if any)."""
        return cls(module.generate, module.validate, module.chance, module.DEFAULTS, summary,
                   getattr(module, "SHARED", ()))


TASKS = {
    "mqar": Task.of(mqar, "multi-query associative recall (Zoology): K pairs, then every key queried once"),
    "ar": Task.of(ar, "associative recall: K pairs, then one key queried at the last position"),
    "noisy_ar": Task.of(noisy_ar, "associative recall with noise tokens from a reserved vocabulary between the pairs"),
    "overwrite_mqar": Task.of(overwrite_mqar,
                              "MQAR where some keys get a new value later; the latest value is the answer"),
    "fuzzy_recall": Task.of(fuzzy_recall,
                            "MQAR with multi-token key and value motifs (MAD); the labels are the value's motif"),
    "selective_copying": Task.of(selective_copying,
                                 "data tokens scattered among blanks, produced in order after a separator (MAD)"),
    "memorization": Task.of(memorization,
                            "a fixed key-to-value map shared by all splits, learnt into the weights (MAD)"),
    "parity": Task.of(parity, "state tracking: the parity of the bits read so far"),
    "modular_sum": Task.of(modular_sum, "state tracking: the running sum of residues modulo `modulus`"),
    "s5": Task.of(s5, "state tracking: the running composition of permutations of 5 elements"),
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
    # numpy scalars (a sweep over np.arange) become Python ones: their fixed-width arithmetic wrapped round in the
    # checks and the generators (fuzzy_recall's motif counts, the memory bounds), letting through bad settings
    full = {key: value.item() if isinstance(value, np.generic) else value
            for key, value in {**task.defaults, **params}.items()}
    task.validate(**full)
    return full


def check_shared(name: str, segments: list[dict], labels: list[str] | None = None, **common_params) -> None:
    """Refuse segments (of one split or of all) that differ in a param of the task's `shared`: memorization's map
    is a function of vocab_size and map_seed, and a segment with its own was drawn from another map (within a
    split, other labels for the same keys; in val or test, a map that training never saw). `labels` name the
    segments in the message (default: segment 0, 1, ...)."""
    task = get(name)
    labels = labels or [f"segment {i}" for i in range(len(segments))]
    for key in task.shared:
        values = [{**task.defaults, **common_params, **segment}.get(key) for segment in segments]
        for label, value in zip(labels, values):
            if value != values[0]:
                raise ValueError(f"{name}: {label} has {key}={value!r}, {labels[0]} {key}={values[0]!r}; valid: one "
                                 f"{key} for every segment of every split, set in the task's params and not in a "
                                 f"segment ({name} draws the one map of all its examples from "
                                 f"{' and '.join(task.shared)})")


def model_shape(name: str, segments: list[dict], **common_params) -> dict[str, int]:
    """What a model of these segments (each overriding `common_params`, the task's defaults where neither sets a
    key) is built for: the largest `vocab_size` and `seq_len` of any segment."""
    resolved = [resolve(name, {k: v for k, v in {**common_params, **segment}.items() if k != "num_examples"})
                for segment in segments]
    return {key: max(int(params[key]) for params in resolved) for key in ("vocab_size", "seq_len")}


def make(name: str, *, num_examples: int, seed: int, **params) -> TaskData:
    """`num_examples` examples of task `name` drawn from `numpy.random.default_rng(seed)`."""
    full = resolve(name, params)
    check_int(name, "num_examples", num_examples, 1)
    check_int(name, "seed", seed, 0)
    check_fits_memory(name, "num_examples", num_examples, full["seq_len"])
    return _task_data(*get(name).generate(np.random.default_rng(seed), num_examples, **full))


def make_mixture(name: str, segments: list[dict], *, seed: int, **common_params) -> TaskData:
    """Examples from several settings of one task, segment after segment (shuffle when loading).

    Each segment dict holds `num_examples` and the params that vary (e.g. `seq_len`, `num_kv_pairs`);
    they override `common_params`. Segment i draws from the i-th child of `SeedSequence(seed)`. Examples
    shorter than the longest are right-padded with input 0 and label -100; the `seq_len` slice keeps each
    example's own length. Where segments differ in a param that no slice of the task names (a noise level, a
    vocabulary), a `segment` slice (the segment's index) keeps their accuracies apart.
    """
    plans, parts = _mixture_parts(name, segments, seed, common_params)
    width = max(params["seq_len"] for _, params in plans)
    inputs = np.concatenate([pad_right(x, width, FILLER) for x, _, _ in parts])
    labels = np.concatenate([pad_right(y, width, IGNORE) for _, y, _ in parts])
    slices = {key: np.concatenate([s[key] for _, _, s in parts]) for key in parts[0][2]}
    varying = {key for key, value in plans[0][1].items() if any(params[key] != value for _, params in plans)}
    if varying - set(slices):
        slices["segment"] = np.concatenate([np.full(len(x), i) for i, (x, _, _) in enumerate(parts)])
    return _task_data(inputs, labels, slices)


def chance_accuracy(name: str, segments: list[dict], *, seed: int, start: int = 0, **common_params) -> float:
    """The accuracy at chance of the labelled positions of `make_mixture(name, segments, seed=seed,
    **common_params)` at position `start` and after (past a training length, say): each segment's `chance` (a
    guess among the answers its context allows, e.g. 1/K on MQAR: the format learnt, not the bindings) weighted
    by its labelled positions there."""
    plans, parts = _mixture_parts(name, segments, seed, common_params)
    labelled = [int((labels[:, start:] != IGNORE).sum()) for _, labels, _ in parts]
    chances = [get(name).chance(**params, start=start) for _, params in plans]
    return sum(n * c for n, c in zip(labelled, chances)) / max(sum(labelled), 1)


def _mixture_parts(name: str, segments: list[dict], seed: int, common_params: dict) -> tuple[list, list]:
    """Each segment's (num_examples, full params), checked before anything is drawn, and its generated
    (inputs, labels, slices)."""
    check_int(name, "seed", seed, 0)
    if not isinstance(segments, (list, tuple)) or not segments:
        raise ValueError(f"{name}: segments={segments!r} is invalid; valid: a non-empty list of dicts")
    plans = []
    for i, segment in enumerate(segments):
        if not isinstance(segment, Mapping):  # `{**segment}` would raise a TypeError that names no segment
            raise ValueError(f"{name}: segment {i}={segment!r} is invalid; valid: a dict of num_examples and params")
        params = {**common_params, **segment}
        num_examples = params.pop("num_examples", None)
        check_int(f"{name} segment {i}", "num_examples", num_examples, 1)
        try:
            plans.append((num_examples, resolve(name, params)))
        except ValueError as error:
            raise ValueError(f"segment {i}: {error}") from None
    check_shared(name, segments, **common_params)
    check_fits_memory(name, "the segments' num_examples summed", sum(n for n, _ in plans),
                      max(params["seq_len"] for _, params in plans))
    children = np.random.SeedSequence(seed).spawn(len(plans))
    parts = [get(name).generate(np.random.default_rng(child), num_examples, **params)
             for child, (num_examples, params) in zip(children, plans)]
    return plans, parts


def check_fits_memory(name: str, what: str, num_examples: int, seq_len: int) -> None:
    """Refuse, before drawing anything, more examples of `seq_len` tokens than this machine's memory holds (once a
    MemoryError traceback, or the OOM killer): making and padding a dataset peaks at about 5 int64 arrays of its
    size (measured with tracemalloc over every task), 6 here for margin."""
    memory = physical_memory()
    if memory is not None:
        holds = f"what this machine's {memory / 2**30:.0f} GiB holds"
        check_int(name, "seq_len", seq_len, 1, memory // (6 * 8), f"{holds} for one example")
        check_int(name, what, num_examples, 1, memory // (6 * 8 * seq_len), f"{holds} at seq_len={seq_len}")


def pad_right(rows: np.ndarray, width: int, value: int) -> np.ndarray:
    return np.pad(rows, ((0, 0), (0, width - rows.shape[1])), constant_values=value)


def _task_data(inputs: np.ndarray, labels: np.ndarray, slices: dict) -> TaskData:
    return TaskData(inputs, labels, {key: np.asarray(value, dtype=np.int64) for key, value in slices.items()})
