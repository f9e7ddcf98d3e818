"""Synthetic tasks: generators (pure functions of parameters and a numpy Generator) and a registry.

    tasks.available()                                   -> ['ar', 'fuzzy_recall', 'memorization', ...]
    tasks.make(name, *, num_examples, seed, **params)   -> TaskData(inputs, labels, slices), numpy arrays
    tasks.make_mixture(name, segments, *, seed, **common_params)
    tasks.chance_accuracy(name, segments, *, seed, start=0, **common_params) -> a guess's accuracy on that mixture
                                                        (at positions >= start)
    tasks.model_shape(name, segments, **common_params)  -> the largest vocab_size and seq_len of the segments
    tasks.check_shared(name, segments, labels=None, **common_params) -> refuses segments that differ where all must
                                                        agree (a memorization map's vocab_size and map_seed)
    tasks.split_seed(seed, split); tasks.make_split(name, split, *, num_examples | segments, seed, **params)
    tasks.overlap(a, b)                                 -> indices of b's examples whose inputs occur in a

Each task's definition is in its module's docstring: recall (tasks/mqar.py, ar.py, noisy_ar.py,
overwrite_mqar.py, fuzzy_recall.py), copying and memorization (selective_copying.py, memorization.py), state
tracking (parity.py, modular_sum.py, s5.py). Why MAD's compression task is not here: tasks/registry.py.
"""

from tasks.common import FILLER, IGNORE
from tasks.registry import (TaskData, available, chance_accuracy, check_shared, defaults, make, make_mixture,
                            model_shape)
from tasks.splits import SPLITS, capped, make_split, overlap, split_seed

__all__ = ["FILLER", "IGNORE", "SPLITS", "TaskData", "available", "capped", "chance_accuracy", "check_shared",
           "defaults", "make", "make_mixture", "make_split", "model_shape", "overlap", "split_seed"]
