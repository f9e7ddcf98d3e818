"""Tests of tasks/: each invariant of each task, recomputed independently from the generated context."""

import dataclasses
import itertools
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tasks
from sandbox import bench
from tasks import cli, noisy_ar, registry, splits
from commands import exit_code

IGNORE = -100


# ---------------------------------------------------------------- independent references


def context_table(row, context_len):
    """key -> latest value, reading the pairs of row[:context_len] left to right."""
    table = {}
    for t in range(0, context_len, 2):
        table[int(row[t])] = int(row[t + 1])
    return table


def expected_query_labels(row, context_len, table):
    """Labels for a zero-filler MQAR-style row: a key in the query region is asked, its label its value."""
    labels = np.full(len(row), IGNORE)
    for t in range(context_len, len(row)):
        if int(row[t]) in table:
            labels[t] = table[int(row[t])]
    return labels


def chi2_limit(df):
    """A bound that a chi-square variable with df degrees of freedom exceeds with odds ~1e-4 or less."""
    return df + 5 * math.sqrt(2 * df)


def slot_weights(num_slots, power_a):
    w = power_a * np.arange(1, num_slots + 1, dtype=float) ** (power_a - 1)
    return w / w.sum()


# ---------------------------------------------------------------- registry and MQAR


def test_available():
    assert tasks.available() == ["ar", "fuzzy_recall", "memorization", "modular_sum", "mqar", "noisy_ar",
                                 "overwrite_mqar", "parity", "s5", "selective_copying"]


def test_mqar_defaults_match_design():
    assert tasks.defaults("mqar") == {"vocab_size": 8192, "seq_len": 64, "num_kv_pairs": 4, "power_a": 0.01,
                                      "random_filler": False}


@pytest.mark.parametrize("vocab_size,seq_len,num_kv_pairs", [(8192, 64, 4), (8192, 512, 64), (10, 16, 4),
                                                             (64, 40, 10)])
def test_mqar_invariants(vocab_size, seq_len, num_kv_pairs):
    n, k, v = 300, num_kv_pairs, vocab_size
    data = tasks.make("mqar", num_examples=n, seed=1, vocab_size=v, seq_len=seq_len, num_kv_pairs=k)
    assert data.inputs.dtype == data.labels.dtype == np.int64
    assert data.inputs.shape == data.labels.shape == (n, seq_len) and len(data) == n
    x, y = data.inputs, data.labels
    keys, values = x[:, 0:2 * k:2], x[:, 1:2 * k:2]
    assert keys.min() >= 1 and keys.max() < v // 2
    assert values.min() >= v // 2 and values.max() < v
    for part in (keys, values):
        assert (np.diff(np.sort(part, axis=1), axis=1) > 0).all(), "keys / values repeat within an example"
    assert (y[:, :2 * k] == IGNORE).all()
    labelled_t = np.nonzero(y != IGNORE)[1]
    assert ((labelled_t - 2 * k) % 2 == 0).all()
    for row, labels in zip(x, y):
        table = context_table(row, 2 * k)
        np.testing.assert_array_equal(labels, expected_query_labels(row, 2 * k, table))
        asked = row[labels != IGNORE]
        assert sorted(asked.tolist()) == sorted(table), "each key is asked exactly once"
        assert (row[2 * k:][labels[2 * k:] == IGNORE] == 0).all(), "filler is 0"
    assert (data.slices["num_kv_pairs"] == k).all() and (data.slices["seq_len"] == seq_len).all()


def test_mqar_random_filler():
    k, v = 8, 256
    data = tasks.make("mqar", num_examples=400, seed=2, vocab_size=v, seq_len=128, num_kv_pairs=k,
                      random_filler=True)
    x, y = data.inputs, data.labels
    filler = x[:, 2 * k:][y[:, 2 * k:] == IGNORE]
    assert filler.min() >= 0 and filler.max() < v
    counts = np.bincount(filler, minlength=v)
    expected = filler.size / v
    assert ((counts - expected) ** 2 / expected).sum() < chi2_limit(v - 1), "filler is not uniform"
    for row, labels in zip(x, y):
        table = context_table(row, 2 * k)
        asked = np.nonzero(labels != IGNORE)[0]
        assert len(asked) == k and sorted(row[asked].tolist()) == sorted(table)
        assert all(labels[t] == table[row[t]] for t in asked)


@pytest.mark.parametrize("power_a", [0.01, 0.3, 1.0])
def test_mqar_single_query_gap_follows_power_law(power_a):
    num_slots, n = 30, 20000
    data = tasks.make("mqar", num_examples=n, seed=3, seq_len=2 + 2 * num_slots, num_kv_pairs=1,
                      power_a=power_a)
    t = np.nonzero(data.labels != IGNORE)[1]
    counts = np.bincount((t - 2) // 2, minlength=num_slots)
    expected = n * slot_weights(num_slots, power_a)
    assert ((counts - expected) ** 2 / expected).sum() < chi2_limit(num_slots - 1)
    if power_a < 1:  # the comparison can tell these laws from the uniform one (power_a = 1)
        uniform = np.full(num_slots, n / num_slots)
        assert ((counts - uniform) ** 2 / uniform).sum() > 10 * chi2_limit(num_slots - 1)


def test_mqar_two_queries_follow_sampling_without_replacement():
    """Inclusion odds of slot i when two slots are drawn in turn: p_i + sum_{j != i} p_j p_i / (1 - p_j)."""
    num_slots, n, power_a = 20, 20000, 0.01
    data = tasks.make("mqar", num_examples=n, seed=4, seq_len=4 + 2 * num_slots, num_kv_pairs=2,
                      power_a=power_a)
    t = np.nonzero(data.labels != IGNORE)[1]
    counts = np.bincount((t - 4) // 2, minlength=num_slots)
    p = slot_weights(num_slots, power_a)
    included = p + p * ((p / (1 - p)).sum() - p / (1 - p))
    assert included.sum() == pytest.approx(2)
    z = (counts - n * included) / np.sqrt(n * included * (1 - included))
    assert np.abs(z).max() < 4.5


def test_mqar_query_order_independent_of_context_order():
    n, k = 20000, 4
    data = tasks.make("mqar", num_examples=n, seed=5, seq_len=64, num_kv_pairs=k)
    x, y = data.inputs, data.labels
    first_query = np.argmax(y != IGNORE, axis=1)
    asks_first_pair = x[np.arange(n), first_query] == x[:, 0]
    assert abs(asks_first_pair.mean() - 1 / k) < 5 * math.sqrt((1 / k) * (1 - 1 / k) / n)


# ---------------------------------------------------------------- the other tasks


def test_ar_invariants():
    n, k, v, length = 300, 16, 64, 40
    data = tasks.make("ar", num_examples=n, seed=1, vocab_size=v, seq_len=length, num_kv_pairs=k)
    x, y = data.inputs, data.labels
    assert (y[:, :-1] == IGNORE).all() and (y[:, -1] != IGNORE).all()
    assert (x[:, 2 * k:-1] == 0).all()
    keys, values = x[:, 0:2 * k:2], x[:, 1:2 * k:2]
    assert keys.min() >= 1 and keys.max() < v // 2 and values.min() >= v // 2 and values.max() < v
    for row, labels, pair in zip(x, y, data.slices["query_pair"].tolist()):
        table = context_table(row, 2 * k)
        assert len(table) == k and len(set(table.values())) == k
        assert labels[-1] == table[row[-1]] and row[2 * pair] == row[-1]
    assert set(data.slices["query_pair"].tolist()) == set(range(k))


def walk_noisy_context(row, noise_low, value_low):
    """Split a noisy_ar context into pairs and noise tokens; stops at the first filler 0."""
    pairs, noise, t = [], 0, 0
    while row[t] != 0 and t < len(row) - 1:
        if row[t] >= noise_low:
            noise, t = noise + 1, t + 1
        else:
            assert 1 <= row[t] < value_low <= row[t + 1] < noise_low, "a key is not followed by its value"
            pairs, t = pairs + [(int(row[t]), int(row[t + 1]))], t + 2
    return pairs, noise, t


def test_noisy_ar_invariants():
    n, k, v, length, fraction = 2000, 8, 64, 64, 0.5
    m = round(2 * k * fraction / (1 - fraction))
    data = tasks.make("noisy_ar", num_examples=n, seed=1, vocab_size=v, seq_len=length, num_kv_pairs=k,
                      noise_fraction=fraction)
    x, y = data.inputs, data.labels
    noise_low = 3 * v // 4
    assert (y[:, :-1] == IGNORE).all()
    for row, labels, pair in zip(x, y, data.slices["query_pair"].tolist()):
        pairs, noise, end = walk_noisy_context(row, noise_low, v // 2)
        assert (len(pairs), noise, end) == (k, m, 2 * k + m)
        assert len({key for key, _ in pairs}) == k and len({value for _, value in pairs}) == k
        assert (row[end:-1] == 0).all()
        assert row[-1] == pairs[pair][0] and labels[-1] == pairs[pair][1]
    first_is_noise = (x[:, 0] >= noise_low).mean()  # the interleaving is uniform: odds m / (k + m)
    assert abs(first_is_noise - m / (k + m)) < 5 * math.sqrt(m * k / (k + m) ** 2 / n)


def test_noisy_ar_without_noise_is_ar_layout():
    data = tasks.make("noisy_ar", num_examples=50, seed=1, seq_len=32, num_kv_pairs=8, noise_fraction=0.0)
    x = data.inputs
    assert (x[:, 0:16:2] < 4096).all() and (x[:, 1:16:2] >= 4096).all() and (x[:, 16:-1] == 0).all()


def test_overwrite_mqar_invariants():
    n, k, v, length, fraction = 400, 8, 64, 64, 0.5
    r = round(fraction * k)
    context = 2 * (k + r)
    data = tasks.make("overwrite_mqar", num_examples=n, seed=1, vocab_size=v, seq_len=length, num_kv_pairs=k,
                      overwrite_fraction=fraction)
    x, y = data.inputs, data.labels
    rewrite_before_first_write = 0
    for row, labels in zip(x, y):
        keys, values = row[0:context:2].tolist(), row[1:context:2].tolist()
        assert all(1 <= key < v // 2 for key in keys) and all(v // 2 <= value < v for value in values)
        assert len(set(values)) == k + r, "old and new values are all different"
        seen_twice = [key for key in set(keys) if keys.count(key) == 2]
        assert len(set(keys)) == k and len(seen_twice) == r
        second = [i for i, key in enumerate(keys) if key in keys[:i]]
        rewrite_before_first_write += min(second) < max(keys.index(key) for key in set(keys))
        table = context_table(row, context)  # latest value wins
        np.testing.assert_array_equal(labels, expected_query_labels(row, context, table))
        assert (labels != IGNORE).sum() == k
    assert 0 < rewrite_before_first_write < n, "rewrites are mixed into the context, not always last"
    assert (data.slices["overwritten"] == r).all()


def test_overwrite_mqar_query_gaps_follow_power_law():
    num_slots, n, k, r = 30, 20000, 1, 1
    data = tasks.make("overwrite_mqar", num_examples=n, seed=2, seq_len=4 + 2 * num_slots, num_kv_pairs=k,
                      overwrite_fraction=1.0)
    t = np.nonzero(data.labels != IGNORE)[1]
    counts = np.bincount((t - 2 * (k + r)) // 2, minlength=num_slots)
    expected = n * slot_weights(num_slots, 0.01)
    assert ((counts - expected) ** 2 / expected).sum() < chi2_limit(num_slots - 1)


# ---------------------------------------------------------------- determinism, mixtures, splits


@pytest.mark.parametrize("name", ["ar", "mqar", "noisy_ar", "overwrite_mqar"])
def test_same_seed_same_data_other_seed_other_data(name):
    a, b, c = (tasks.make(name, num_examples=64, seed=seed, random_filler=True) for seed in (7, 7, 8))
    assert np.array_equal(a.inputs, b.inputs) and np.array_equal(a.labels, b.labels)
    assert all(np.array_equal(a.slices[key], b.slices[key]) for key in a.slices)
    assert not np.array_equal(a.inputs, c.inputs)
    assert len(tasks.overlap(a, c)) == 0


def test_mixture():
    segments = [{"num_examples": 30, "seq_len": 64, "num_kv_pairs": 4},
                {"num_examples": 20, "seq_len": 128, "num_kv_pairs": 8},
                {"num_examples": 30, "seq_len": 64, "num_kv_pairs": 4}]
    data = tasks.make_mixture("mqar", segments, seed=3, vocab_size=512)
    assert data.inputs.shape == data.labels.shape == (80, 128)
    assert data.slices["seq_len"].tolist() == [64] * 30 + [128] * 20 + [64] * 30
    assert data.slices["num_kv_pairs"].tolist() == [4] * 30 + [8] * 20 + [4] * 30
    x, y = data.inputs, data.labels
    assert x.max() < 512, "common params reach every segment"
    for row, labels, length, k in zip(x, y, data.slices["seq_len"].tolist(), data.slices["num_kv_pairs"].tolist()):
        assert (row[length:] == 0).all() and (labels[length:] == IGNORE).all()
        table = context_table(row, 2 * k)
        np.testing.assert_array_equal(labels[:length], expected_query_labels(row[:length], 2 * k, table))
    assert not np.array_equal(x[:30], x[50:]), "segments with equal params get their own seeds"
    again = tasks.make_mixture("mqar", segments, seed=3, vocab_size=512)
    assert np.array_equal(data.inputs, again.inputs)


def test_mixture_segments_differing_in_an_unsliced_param_get_a_segment_slice():
    """Two noise levels at one length and K would otherwise be one slice, their accuracies pooled."""
    segments = [{"num_examples": 5, "noise_fraction": 0.0}, {"num_examples": 7, "noise_fraction": 0.5},
                {"num_examples": 3, "noise_fraction": 0.0}]
    data = tasks.make_mixture("noisy_ar", segments, seed=0)
    assert data.slices["segment"].tolist() == [0] * 5 + [1] * 7 + [2] * 3
    by_k = [{"num_examples": 5, "num_kv_pairs": 4}, {"num_examples": 5, "num_kv_pairs": 8}]
    sliced = tasks.make_mixture("mqar", by_k, seed=0)
    assert "segment" not in sliced.slices, "K has its own slice"


def test_split_seeds_are_disjoint():
    ranges = {split: (tasks.split_seed(0, split), tasks.split_seed(999_999, split)) for split in tasks.SPLITS}
    ordered = sorted(ranges.values())
    assert all(high < next_low for (_, high), (next_low, _) in itertools.pairwise(ordered))
    assert tasks.split_seed(5, "train") == 5 and tasks.split_seed(5, "test") == 2_000_005


def test_splits_share_no_examples():
    train = tasks.make_split("mqar", "train", num_examples=5000, seed=0)
    val = tasks.make_split("mqar", "val", num_examples=500, seed=0)
    test = tasks.make_split("mqar", "test", num_examples=500, seed=0)
    assert len(tasks.overlap(train, test)) == 0 and len(tasks.overlap(train, val)) == 0
    assert np.array_equal(test.inputs, tasks.make("mqar", num_examples=500, seed=2_000_000).inputs)
    segments = [{"num_examples": 10, "seq_len": 64, "num_kv_pairs": 4}]
    assert len(tasks.make_split("mqar", "val", segments=segments, seed=0)) == 10


def test_overlap_reports_exactly_the_shared_examples():
    a = tasks.make("mqar", num_examples=200, seed=0)
    b = tasks.make("mqar", num_examples=50, seed=1)
    b.inputs[[7, 3, 40]] = a.inputs[[0, 199, 10]]
    assert tasks.overlap(a, b).tolist() == [3, 7, 40]
    # Tiny settings repeat examples by chance: compare with a brute-force search, across widths too.
    small = {"vocab_size": 8, "num_kv_pairs": 1}
    a = tasks.make_mixture("mqar", [{"num_examples": 20, "seq_len": 8}, {"num_examples": 5, "seq_len": 10}],
                           seed=2, **small)
    b = tasks.make("mqar", num_examples=40, seed=3, seq_len=8, **small)
    seen = {tuple(row) for row in a.inputs.tolist()}
    brute = [i for i, row in enumerate(b.inputs.tolist()) if tuple(row + [0, 0]) in seen]
    assert 0 < len(brute) < 40 and tasks.overlap(a, b).tolist() == brute


def test_overlap_confirms_hash_hits(monkeypatch):
    a = tasks.make("mqar", num_examples=1, seed=0)
    b = tasks.make("mqar", num_examples=3, seed=1)
    b.inputs[1] = a.inputs[0]
    monkeypatch.setattr(splits, "row_hashes", lambda rows: np.zeros(len(rows), dtype=np.uint64))
    assert tasks.overlap(a, b).tolist() == [1]


# ---------------------------------------------------------------- bad input


def boom(*args, **kwargs):
    raise AssertionError("generation started before the parameters were checked")


@pytest.fixture
def no_generation(monkeypatch):
    for name, task in registry.TASKS.items():
        monkeypatch.setitem(registry.TASKS, name, dataclasses.replace(task, generate=boom))


BAD = [
    ("mqar", {"num_kv_pairs": 17}, ["num_kv_pairs=17", "<= 16", "seq_len"]),
    ("mqar", {"seq_len": 128, "num_kv_pairs": 33}, ["num_kv_pairs=33", "<= 32"]),
    ("mqar", {"num_kv_pairs": 0}, ["num_kv_pairs=0", "1 <="]),
    ("mqar", {"seq_len": 0}, ["seq_len=0", "4 <= seq_len"]),
    ("mqar", {"seq_len": -64}, ["seq_len=-64"]),
    ("mqar", {"seq_len": 64.0}, ["seq_len=64.0", "integer"]),
    ("mqar", {"vocab_size": 9}, ["vocab_size=9", "10 <= vocab_size"]),
    ("mqar", {"vocab_size": -1}, ["vocab_size=-1"]),
    ("mqar", {"power_a": 0.0}, ["power_a=0.0", "(0.0, 1.0]"]),
    ("mqar", {"power_a": 1.5}, ["power_a=1.5", "(0.0, 1.0]"]),
    ("mqar", {"power_a": -0.2}, ["power_a=-0.2"]),
    ("mqar", {"random_filler": "yes"}, ["random_filler='yes'"]),
    ("mqar", {"noise_fraction": 0.1}, ["noise_fraction", "num_kv_pairs", "power_a"]),
    ("ar", {"seq_len": 64, "num_kv_pairs": 32}, ["num_kv_pairs=32", "<= 31"]),
    ("ar", {"vocab_size": 33}, ["vocab_size=33", "34 <="]),
    ("noisy_ar", {"noise_fraction": 1.0}, ["noise_fraction=1.0", "[0.0, 1.0)"]),
    ("noisy_ar", {"noise_fraction": 0.9}, ["noise_fraction=0.9", "seq_len=64"]),
    ("noisy_ar", {"vocab_size": 30}, ["vocab_size=30", "31 <="]),
    ("overwrite_mqar", {"overwrite_fraction": 1.5}, ["overwrite_fraction=1.5", "[0.0, 1.0]"]),
    ("overwrite_mqar", {"num_kv_pairs": 14}, ["num_kv_pairs=14", "<= 13"]),
    ("overwrite_mqar", {"vocab_size": 10}, ["vocab_size=10", "11 <="]),
    ("fuzzy_recall", {"key_motif_size": 0}, ["key_motif_size=0", "1 <="]),
    ("fuzzy_recall", {"num_kv_pairs": 11}, ["num_kv_pairs=11", "<= 10", "seq_len=128"]),
    ("fuzzy_recall", {"vocab_size": 6, "key_motif_size": 1, "value_motif_size": 1, "num_kv_pairs": 3},
     ["num_kv_pairs=3", "<= 2", "2 ** 1"]),
    ("fuzzy_recall", {"vocab_size": 8192, "key_motif_size": 6}, ["key_motif_size=6", "<= 5", "2**62"]),
    ("fuzzy_recall", {"seq_len": 11}, ["seq_len=11", "12 <= seq_len"]),
    ("fuzzy_recall", {"vocab_size": 3}, ["vocab_size=3", "4 <= vocab_size"]),
    ("fuzzy_recall", {"power_a": 0.0}, ["power_a=0.0", "(0.0, 1.0]"]),
    ("selective_copying", {"num_tokens_to_copy": 128}, ["num_tokens_to_copy=128", "<= 127", "seq_len=256"]),
    ("selective_copying", {"vocab_size": 2}, ["vocab_size=2", "3 <= vocab_size"]),
    ("memorization", {"map_seed": -1}, ["map_seed=-1", "0 <= map_seed"]),
    ("memorization", {"seq_len": 1}, ["seq_len=1", "2 <= seq_len"]),
    ("memorization", {"vocab_size": 3}, ["vocab_size=3", "4 <= vocab_size"]),
    ("parity", {"labels_at": "end"}, ["labels_at='end'", "['every', 'last']"]),
    ("parity", {"vocab_size": 2}, ["parity: vocab_size=2", "3 <= vocab_size"]),
    ("parity", {"modulus": 3}, ["modulus", "labels_at"]),
    ("modular_sum", {"modulus": 10}, ["vocab_size=6", "11 <= vocab_size"]),
    ("modular_sum", {"modulus": 1}, ["modulus=1", "2 <= modulus"]),
    ("s5", {"vocab_size": 120}, ["vocab_size=120", "121 <= vocab_size"]),
    ("s5", {"seq_len": 0}, ["seq_len=0", "1 <= seq_len"]),
    ("nope", {}, ["task='nope'", "mqar"]),
]


@pytest.mark.parametrize("name,params,words", BAD, ids=[f"{n}-{sorted(p)}" for n, p, _ in BAD])
def test_bad_params(no_generation, name, params, words):
    with pytest.raises(ValueError) as error:
        tasks.make(name, num_examples=10, seed=0, **params)
    for word in words:
        assert word in str(error.value)


@pytest.mark.parametrize("name,params", [
    ("mqar", {"num_kv_pairs": 16}), ("mqar", {"vocab_size": 10}), ("mqar", {"power_a": 1.0}),
    ("ar", {"num_kv_pairs": 31}), ("ar", {"vocab_size": 34}), ("noisy_ar", {"vocab_size": 31}),
    ("noisy_ar", {"noise_fraction": 0.74}), ("overwrite_mqar", {"num_kv_pairs": 13}),
    ("overwrite_mqar", {"vocab_size": 11}), ("fuzzy_recall", {"num_kv_pairs": 10}),
    ("fuzzy_recall", {"vocab_size": 8192, "key_motif_size": 5}),
    ("fuzzy_recall", {"vocab_size": 4, "key_motif_size": 1, "value_motif_size": 1, "num_kv_pairs": 1}),
    ("selective_copying", {"num_tokens_to_copy": 127}), ("selective_copying", {"vocab_size": 3}),
    ("memorization", {"vocab_size": 4, "seq_len": 2}), ("parity", {"seq_len": 1}),
    ("modular_sum", {"modulus": 10, "vocab_size": 11}), ("s5", {"vocab_size": 121, "seq_len": 1}),
])
def test_limits_are_valid(name, params):
    data = tasks.make(name, num_examples=20, seed=0, **params)
    assert len(data) == 20


@pytest.mark.parametrize("seq_len,num_kv_pairs", [(64, 8), (33, 16), (128, 1), (200, 37)])
def test_noisy_ar_refusal_states_the_noise_fraction_where_acceptance_ends(no_generation, seq_len, num_kv_pairs):
    params = dict(vocab_size=8192, seq_len=seq_len, num_kv_pairs=num_kv_pairs, random_filler=False)
    with pytest.raises(ValueError) as error:
        tasks.make("noisy_ar", num_examples=10, seed=0, noise_fraction=0.999, **params)
    bound = float(re.search(r"f < ([0-9.]+)", str(error.value)).group(1))
    for fraction in (bound - 2e-4, bound - 1e-3):
        noisy_ar.validate(noise_fraction=fraction, **params)
    for fraction in (bound + 2e-4, bound + 1e-3):
        with pytest.raises(ValueError, match="noise_fraction"):
            noisy_ar.validate(noise_fraction=fraction, **params)


def test_bad_sizes_seeds_splits_and_segments(no_generation):
    cases = [
        (lambda: tasks.make("mqar", num_examples=0, seed=0), "num_examples=0"),
        (lambda: tasks.make("mqar", num_examples=-5, seed=0), "num_examples=-5"),
        (lambda: tasks.make("mqar", num_examples=10, seed=-1), "seed=-1"),
        (lambda: tasks.split_seed(1_000_000, "train"), "seed=1000000"),
        (lambda: tasks.split_seed(0, "dev"), "split='dev'"),
        (lambda: tasks.make_split("mqar", "train", seed=0), "exactly one of"),
        (lambda: tasks.make_mixture("mqar", [], seed=0), "segments=[]"),
        (lambda: tasks.make_mixture("mqar", [{"seq_len": 64}], seed=0), "num_examples=None"),
        (lambda: tasks.make_mixture("mqar", [{"num_examples": 10**12}, {"num_examples": 1, "num_kv_pairs": 99}],
                                    seed=0), "segment 1: mqar: num_kv_pairs=99"),
        # a segment that is not a dict: once a TypeError naming no segment
        (lambda: tasks.make_mixture("mqar", [{"num_examples": 1}, None], seed=0), "segment 1=None is invalid"),
        (lambda: tasks.make_mixture("mqar", [[64, 4]], seed=0), "segment 0=[64, 4] is invalid"),
        # capped (debug runs) once raised a KeyError before the mixture's checks could name the segment
        (lambda: tasks.make_mixture("mqar", tasks.capped([{"seq_len": 64}, None], 8), seed=0), "num_examples=None"),
        (lambda: tasks.make_mixture("mqar", tasks.capped([{"num_examples": 9}, "x"], 8), seed=0), "segment 1='x'"),
    ]
    for call, words in cases:
        with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
            call()


# ---------------------------------------------------------------- command line and benchmark


def test_cli_summary_quickstart(capsys):
    assert cli.main(["summary", "mqar", "--num-examples", "1000", "--seq-len", "64", "--num-kv-pairs", "4"]) == 0
    out = capsys.readouterr().out
    assert "mqar: 1000 examples x 64 tokens" in out and "4000 predicted positions" in out
    assert "slice num_kv_pairs: {4: 1000}" in out and "->" in out


def test_cli_list_and_other_tasks(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(f"{name}: " in out for name in tasks.available())
    assert cli.main(["summary", "overwrite_mqar", "--num-examples", "10", "--split", "test",
                     "--overwrite-fraction", "0.25", "--random-filler"]) == 0
    assert "slice overwritten: {1: 10}" in capsys.readouterr().out


@pytest.mark.parametrize("argv,words", [
    (["summary", "mqar", "--num-kv-pairs", "40"], "num_kv_pairs=40"),
    (["summary", "mqar", "--noise-fraction", "0.5"], "noise_fraction"),
    (["summary", "mqar", "--num-examples", "0"], "num_examples=0"),
    (["summary", "nope"], "task='nope'"),
    (["summary", "mqar", "--seq-len", "x"], "--seq-len"),
    (["frobnicate"], "frobnicate"),
    (["bench", "--num-examples", "0"], "num_examples=0"),
    (["bench", "--num-examples", "-5"], "num_examples=-5"),
    (["bench", "--seed", "-1"], "seed=-1"),
    (["bench", "--task", "foo"], "--task"),
    (["bench", "--seed", "x"], "--seed"),
])
def test_cli_bad_input(capsys, argv, words):
    code = exit_code(cli.main, argv)
    err = capsys.readouterr().err
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_benchmark_runs(capsys):
    assert bench.main(["tasks", "--num-examples", "200"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "examples/s" in line]
    assert len(lines) == 4 and "seq_len=512" in lines[-1]
    assert cli.main(["bench", "--num-examples", "100", "--task", "noisy_ar"]) == 0
    assert capsys.readouterr().out.count("examples/s") == 4


def test_benchmark_command():
    command = Path(sys.executable).parent / "sandbox-bench"  # the console script installed with the project
    run = subprocess.run([str(command), "tasks", "--num-examples", "100"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("examples/s") == 4


def test_tasks_import_numpy_only():
    """tasks/ is the bottom layer: its package, command line and benchmark load neither torch nor sandbox."""
    code = ("import sys, tasks, tasks.cli, tasks.bench; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'sandbox', 'models', 'kernels')))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert run.stdout.strip() == "[]"


def _guess(name: str, params: dict, data, rng: np.random.Generator) -> np.ndarray:
    """At every labelled position, a guess among the answers its context allows, drawn as the task's definition
    says (independently of `chance`); returns whether each guess is right."""
    V = params["vocab_size"]
    hits = []
    for inputs, labels in zip(data.inputs, data.labels):
        at = np.nonzero(labels != IGNORE)[0]
        if name in ("mqar", "ar", "overwrite_mqar"):  # every value of the context (filler is 0)
            guesses = rng.choice(inputs[inputs >= V // 2], len(at))
        elif name == "noisy_ar":  # the values, not the noise tokens of the top quarter
            guesses = rng.choice(inputs[(inputs >= V // 2) & (inputs < 3 * V // 4)], len(at))
        elif name == "fuzzy_recall":  # token j of a random value motif of the context, j = offset in its run
            w, m_k, m_v = params["key_motif_size"] + params["value_motif_size"], params["key_motif_size"], \
                params["value_motif_size"]
            motifs = inputs[:params["num_kv_pairs"] * w].reshape(-1, w)[:, m_k:]
            offsets = np.arange(len(at)) % m_v
            guesses = motifs[rng.integers(0, len(motifs), len(at)), offsets]
        elif name == "selective_copying":  # a data token of the region, before the separator
            region = inputs[:np.nonzero(inputs == 1)[0][0]]
            guesses = rng.choice(region[region >= 2], len(at))
        else:  # no context to read: the labels the whole set takes
            guesses = rng.choice(np.unique(data.labels[data.labels != IGNORE]), len(at))
            if name in ("parity", "modular_sum", "s5"):  # but the first state is the first input, read
                guesses[at == 0] = inputs[0]
        hits.append(guesses == labels[at])
    return np.concatenate(hits)


@pytest.mark.parametrize("name,segments,params", [
    ("mqar", [{"num_kv_pairs": 4}, {"num_kv_pairs": 8, "seq_len": 128}], {}),
    ("ar", [{}], {}),
    ("noisy_ar", [{}], {}),
    ("overwrite_mqar", [{}], {}),
    ("fuzzy_recall", [{"vocab_size": 16}, {"vocab_size": 64}], {}),
    # one-token values are K distinct tokens, as in MQAR: chance 1/K, no other value shares the answer's token
    ("fuzzy_recall", [{"value_motif_size": 1, "num_kv_pairs": 7}], {"vocab_size": 16}),
    # few value tokens (3), two per motif: another motif shares token j with odds (3 - 1) / (3 ** 2 - 1)
    ("fuzzy_recall", [{"seq_len": 32, "num_kv_pairs": 4, "key_motif_size": 2, "value_motif_size": 2}],
     {"vocab_size": 6}),
    ("selective_copying", [{}], {}),
    ("memorization", [{}], {"vocab_size": 16}),
    ("parity", [{}], {}),
    ("modular_sum", [{}], {}),
    ("s5", [{}], {}),
    # length extrapolation: a longer test segment has its own chance; labels at the last position only
    ("s5", [{"seq_len": 16}, {"seq_len": 64}], {}),
    ("parity", [{"seq_len": 8}], {"labels_at": "last"}),
])
def test_chance_accuracy_is_what_a_guess_scores(name, segments, params):
    segments = [{"num_examples": 800, **s} for s in segments]
    rng = np.random.default_rng(0)
    hits = []
    for i, segment in enumerate(segments):
        setting = {k: v for k, v in {**params, **segment}.items() if k != "num_examples"}
        data = tasks.make_mixture(name, [segment], seed=i, **params)
        hits.append(_guess(name, registry.resolve(name, setting), data, rng))
    hits = np.concatenate(hits)
    # the segments drawn one by one with seed i are not the mixture's draws, but have its labelled positions
    expected = tasks.chance_accuracy(name, segments, seed=0, **params)
    assert abs(hits.mean() - expected) < 4 * math.sqrt(expected * (1 - expected) / len(hits)) + 1e-3, \
        (hits.mean(), expected)


@pytest.mark.parametrize("name,guess", [("parity", 1 / 2), ("modular_sum", 1 / 5), ("s5", 1 / 120)])
def test_state_tracking_chance_counts_the_first_state_which_is_the_first_input(name, guess):
    """The state after one input is that input, so a model that copies its input (a tied-embedding model at
    initialisation does) is right at the first position: chance is (1 + (L - 1) g) / L with labels at every
    position, a guess g only at the last. It was g at every length: S5's untrained runs (0.025 at L = 64, 0.012
    at 256) read as three times chance at the training length."""
    segments = [{"seq_len": 64, "num_examples": 20}, {"seq_len": 256, "num_examples": 20}]
    for segment in segments:
        length = segment["seq_len"]
        assert tasks.chance_accuracy(name, [segment], seed=0) == pytest.approx((1 + (length - 1) * guess) / length)
        assert tasks.chance_accuracy(name, [segment], seed=0, labels_at="last") == pytest.approx(guess)
    # a mixture weighs each length by its labelled positions: 64 and 256 of them per example
    expected = (64 * (1 + 63 * guess) / 64 + 256 * (1 + 255 * guess) / 256) / (64 + 256)
    assert tasks.chance_accuracy(name, segments, seed=0) == pytest.approx(expected)
    # past the training length (64) the first position is not counted: a guess alone, at 256 and in the mixture
    for start in (1, 64):
        assert tasks.chance_accuracy(name, segments[1:], seed=0, start=start) == pytest.approx(guess)
    assert tasks.chance_accuracy(name, segments, seed=0, start=64) == pytest.approx(guess)


@pytest.mark.parametrize("name,segments,params", [
    ("mqar", [{"seq_len": 64}, {"num_kv_pairs": 8, "seq_len": 128}], {}),
    ("fuzzy_recall", [{"vocab_size": 16, "seq_len": 128}], {}),
    ("selective_copying", [{"seq_len": 64}, {"seq_len": 128}], {}),
    ("memorization", [{"seq_len": 64}, {"seq_len": 128}], {"vocab_size": 16}),
    ("parity", [{"seq_len": 64}, {"seq_len": 128}], {}),
    ("s5", [{"seq_len": 16}, {"seq_len": 64}], {}),
])
def test_chance_accuracy_past_a_position_is_what_a_guess_scores_there(name, segments, params):
    """`start`: the chance of the labelled positions at `start` and after (past a training length of 32), each
    segment weighted by its labelled positions there; a state-tracking task's first position is not among them."""
    start, segments = 32, [{"num_examples": 800, **s} for s in segments]
    rng = np.random.default_rng(0)
    hits = []
    for i, segment in enumerate(segments):
        setting = {k: v for k, v in {**params, **segment}.items() if k != "num_examples"}
        data = tasks.make_mixture(name, [segment], seed=i, **params)
        positions = np.concatenate([np.nonzero(labels != IGNORE)[0] for labels in data.labels])
        hits.append(_guess(name, registry.resolve(name, setting), data, rng)[positions >= start])
    hits = np.concatenate(hits)
    expected = tasks.chance_accuracy(name, segments, seed=0, start=start, **params)
    assert abs(hits.mean() - expected) < 4 * math.sqrt(expected * (1 - expected) / len(hits)) + 1e-3, \
        (hits.mean(), expected)


@pytest.mark.parametrize("vocab_size,share", [(1024, 1.0), (2048, 0.978), (4096, 0.851), (8192, 0.628)])
def test_memorization_test_keys_seen_in_training_are_as_documented(vocab_size, share):
    """The share of MAD's memorization test keys (run seed 0) that occur in its 256 training examples: the most
    test accuracy the setting allows, quoted in tasks/memorization.py and conf/task/mad_memorize_v*.yaml."""
    made = {split: tasks.make_split("memorization", split, segments=[{"seq_len": 32, "num_examples": n}], seed=0,
                                    vocab_size=vocab_size)
            for split, n in (("train", 256), ("test", 1280))}  # as conf/task/memorization.yaml's segments
    seen = set(made["train"].inputs[:, 0::2].flatten().tolist())
    keys = made["test"].inputs[:, 0::2].flatten().tolist()
    assert round(sum(key in seen for key in keys) / len(keys), 3) == share
