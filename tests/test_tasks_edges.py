"""Tasks at the edges of their settings: every label recomputed from the inputs at the tightest valid parameters
and at random ones, and the run's model built for every segment's settings (the task's defaults included)."""

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from test_tasks import context_table, expected_query_labels
from test_tasks_suite import FAST, S5, expected_fuzzy_labels, expected_states, s5_step

import tasks
from sandbox.train import CONF_DIR, data_module, train
from tasks import registry

IGNORE = -100


def recall_table(name, row, p):
    """{key: latest value} read from the context of a mqar, ar, noisy_ar or overwrite_mqar row, and its length."""
    k, v = p["num_kv_pairs"], p["vocab_size"]
    if name == "noisy_ar":  # pairs and noise tokens (top quarter) interleaved; a key is always right before its value
        end = 2 * k + round(2 * k * p["noise_fraction"] / (1 - p["noise_fraction"]))
        table, t = {}, 0
        while t < end:
            if row[t] >= 3 * v // 4:
                t += 1
                continue
            assert 1 <= row[t] < v // 2 <= row[t + 1] < 3 * v // 4, "a key is not followed by its value"
            table[int(row[t])], t = int(row[t + 1]), t + 2
        assert t == end
        return table, end
    end = 2 * (k + round(p.get("overwrite_fraction", 0) * k))
    for t in range(0, end, 2):
        assert 1 <= row[t] < v // 2 <= row[t + 1] < v
    return context_table(row, end), end


def check_labels(name, p, data):
    """Every label of `data` against an independent reading of its inputs under the task's definition."""
    x, y = data.inputs, data.labels
    v, length = p["vocab_size"], p["seq_len"]
    assert x.shape == y.shape == (len(data), length)
    assert x.min() >= 0 and x.max() < v
    assert ((y == IGNORE) | ((y >= 0) & (y < v))).all(), "a label outside the vocabulary"
    if name == "s5":  # state tracking: the state after each token, folded from the start
        step, start, label_of = s5_step, tuple(range(5)), lambda s: 1 + S5.index(s)
    elif name in ("parity", "modular_sum"):
        m = 2 if name == "parity" else p["modulus"]
        step, start, label_of = (lambda s, token: (s + token - 1) % m), 0, (lambda s: 1 + s)
    for row, labels in zip(x, y):
        if name in ("mqar", "overwrite_mqar", "ar", "noisy_ar"):
            table, end = recall_table(name, row, p)
            assert len(table) == p["num_kv_pairs"]
            asked = np.nonzero(labels != IGNORE)[0]
            if name in ("ar", "noisy_ar"):
                assert asked.tolist() == [length - 1]
            elif p["random_filler"]:  # filler may repeat a key: the asked positions are the labelled ones
                assert sorted(row[asked].tolist()) == sorted(table) and (asked >= end).all()
            else:
                np.testing.assert_array_equal(labels, expected_query_labels(row, end, table))
            assert all(labels[t] == table[row[t]] for t in asked)
        elif name == "fuzzy_recall":
            k, m_k, m_v = p["num_kv_pairs"], p["key_motif_size"], p["value_motif_size"]
            table, expected = expected_fuzzy_labels(row, k * (m_k + m_v), m_k, m_v)
            assert len(table) == k and len(set(table.values())) == k
            np.testing.assert_array_equal(labels, expected)
            assert (labels != IGNORE).sum() == k * m_v
        elif name == "selective_copying":
            c = p["num_tokens_to_copy"]
            separator = length - c - 1
            assert row[separator] == 1 and (row[separator + 1:] == 0).all()
            copied = [t for t in row[:separator] if t != 0]
            assert len(copied) == c and all(2 <= t < v for t in copied)
            expected = np.full(length, IGNORE)
            expected[separator + 1:] = copied
            np.testing.assert_array_equal(labels, expected)
        elif name == "memorization":
            perm = np.random.default_rng(p["map_seed"]).permutation(v - v // 2)
            keys = row[0:2 * (length // 2):2]
            assert (keys >= 1).all() and (keys < v // 2).all()
            expected = np.full(length, IGNORE)
            expected[0:2 * (length // 2):2] = v // 2 + perm[keys - 1]
            np.testing.assert_array_equal(labels, expected)
            assert (np.delete(row, np.arange(0, 2 * (length // 2), 2)) == 0).all()
        else:
            expected = [label_of(s) for s in expected_states(row.tolist(), step, start)]
            if p["labels_at"] == "last":
                expected[:-1] = [IGNORE] * (length - 1)
            np.testing.assert_array_equal(labels, expected)


# The tightest valid settings: smallest vocabulary, most pairs (or tokens) for the length, the length exactly minimal.
TIGHT = [
    ("mqar", {"vocab_size": 4, "seq_len": 4, "num_kv_pairs": 1}),
    ("mqar", {"vocab_size": 8, "seq_len": 12, "num_kv_pairs": 3, "power_a": 1.0}),
    ("mqar", {"vocab_size": 9, "seq_len": 13, "num_kv_pairs": 3, "random_filler": True}),
    ("ar", {"vocab_size": 4, "seq_len": 3, "num_kv_pairs": 1}),
    ("ar", {"vocab_size": 10, "seq_len": 9, "num_kv_pairs": 4, "random_filler": True}),
    ("noisy_ar", {"vocab_size": 4, "seq_len": 3, "num_kv_pairs": 1, "noise_fraction": 0.0}),
    ("noisy_ar", {"vocab_size": 11, "seq_len": 13, "num_kv_pairs": 3, "noise_fraction": 0.5}),
    ("noisy_ar", {"vocab_size": 11, "seq_len": 13, "num_kv_pairs": 3, "noise_fraction": 0.5, "random_filler": True}),
    ("overwrite_mqar", {"vocab_size": 11, "seq_len": 18, "num_kv_pairs": 3, "overwrite_fraction": 1.0}),
    ("overwrite_mqar", {"vocab_size": 9, "seq_len": 16, "num_kv_pairs": 3, "overwrite_fraction": 0.5}),
    ("overwrite_mqar", {"vocab_size": 8, "seq_len": 12, "num_kv_pairs": 3, "overwrite_fraction": 0.0,
                        "random_filler": True}),
    ("fuzzy_recall", {"vocab_size": 4, "seq_len": 8, "num_kv_pairs": 1, "key_motif_size": 3, "value_motif_size": 1}),
    ("fuzzy_recall", {"vocab_size": 6, "seq_len": 18, "num_kv_pairs": 3, "key_motif_size": 2, "value_motif_size": 1}),
    ("fuzzy_recall", {"vocab_size": 6, "seq_len": 32, "num_kv_pairs": 4, "key_motif_size": 2, "value_motif_size": 2}),
    ("selective_copying", {"vocab_size": 3, "seq_len": 3, "num_tokens_to_copy": 1}),
    ("selective_copying", {"vocab_size": 3, "seq_len": 11, "num_tokens_to_copy": 5}),
    ("memorization", {"vocab_size": 4, "seq_len": 2}),
    ("memorization", {"vocab_size": 5, "seq_len": 7, "map_seed": 3}),
    ("parity", {"vocab_size": 3, "seq_len": 1}),
    ("parity", {"vocab_size": 3, "seq_len": 5, "labels_at": "last"}),
    ("modular_sum", {"vocab_size": 3, "seq_len": 1, "modulus": 2}),
    ("modular_sum", {"vocab_size": 8, "seq_len": 9, "modulus": 7, "labels_at": "last"}),
    ("s5", {"vocab_size": 121, "seq_len": 1}),
    ("s5", {"vocab_size": 121, "seq_len": 6, "labels_at": "last"}),
]


@pytest.mark.parametrize("name,params", TIGHT, ids=[f"{n}-{i}" for i, (n, _) in enumerate(TIGHT)])
def test_labels_at_the_tightest_settings(name, params):
    data = tasks.make(name, num_examples=200, seed=1, **params)
    check_labels(name, registry.resolve(name, params), data)


def random_settings(name, rng):
    """Valid settings of `name` drawn from small ranges around its limits (drawn again until the task accepts)."""
    defaults = registry.defaults(name)
    while True:
        p = {"vocab_size": int(rng.choice([3, 4, 5, 6, 7, 9, 11, 16, 33, 121, 130])),
             "seq_len": int(rng.integers(1, 40))}
        draws = {"num_kv_pairs": lambda: int(rng.integers(1, 10)),
                 "num_tokens_to_copy": lambda: int(rng.integers(1, 20)),
                 "power_a": lambda: float(rng.choice([1e-6, 0.01, 0.5, 1.0])),
                 "random_filler": lambda: bool(rng.integers(2)),
                 "noise_fraction": lambda: float(rng.choice([0.0, 0.2, 0.5, 0.75])),
                 "overwrite_fraction": lambda: float(rng.choice([0.0, 0.25, 0.5, 1.0])),
                 "key_motif_size": lambda: int(rng.integers(1, 4)), "value_motif_size": lambda: int(rng.integers(1, 4)),
                 "map_seed": lambda: int(rng.integers(0, 5)), "modulus": lambda: int(rng.integers(2, 12)),
                 "labels_at": lambda: str(rng.choice(["every", "last"]))}
        p.update({key: draw() for key, draw in draws.items() if key in defaults})
        try:
            return registry.resolve(name, p)
        except ValueError:
            continue


@pytest.mark.parametrize("name", tasks.available())
def test_labels_at_random_settings(name):
    rng = np.random.default_rng(sum(map(ord, name)))
    for i in range(40):
        p = random_settings(name, rng)
        data = tasks.make(name, num_examples=8, seed=i, **p)
        check_labels(name, p, data)
        again = tasks.make(name, num_examples=8, seed=i, **p)
        assert np.array_equal(data.inputs, again.inputs) and np.array_equal(data.labels, again.labels)


# ---------------------------------------------------------------- the model's vocabulary and length


def task_cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=[*FAST, *overrides])


@pytest.mark.parametrize("overrides,vocab_size,max_seq_len", [
    # a test segment without seq_len, and no seq_len in task.params: the task's default (64)
    (["task.params.vocab_size=64", "task.segments.train=[{seq_len: 16, num_kv_pairs: 2, num_examples: 32}]",
      "task.segments.val=[{seq_len: 16, num_kv_pairs: 2, num_examples: 16}]",
      "task.segments.test=[{num_kv_pairs: 4, num_examples: 16}]"], 64, 64),
    # no vocab_size in task.params: the task's default (16 for selective_copying)
    (["task=mad_copy", "~task.params.vocab_size"], 16, 256),
    # a segment with a vocabulary of its own, larger than task.params': the model must hold its tokens
    (["task.params.vocab_size=64", "task.segments.test=[{seq_len: 64, num_kv_pairs: 4, num_examples: 16}, "
      "{seq_len: 128, num_kv_pairs: 8, vocab_size: 128, num_examples: 16}]"], 128, 128),
])
def test_model_shape_covers_every_segment(overrides, vocab_size, max_seq_len):
    datamodule = data_module(task_cfg(*overrides))
    assert (datamodule.vocab_size, datamodule.max_seq_len) == (vocab_size, max_seq_len)
    datamodule.generate()
    for data in datamodule.datasets.values():
        assert int(data.inputs.max()) < vocab_size and int(data.labels.max()) < vocab_size
        assert data.inputs.shape[1] <= max_seq_len


def test_run_with_a_test_segment_of_its_own_vocabulary_and_default_length(tmp_path):
    result = train(task_cfg("task.params.vocab_size=64",
                            "task.segments.test=[{num_kv_pairs: 4, num_examples: 16}, "
                            "{seq_len: 128, num_kv_pairs: 8, vocab_size: 256, num_examples: 16}]"), tmp_path / "run")
    assert {"seq_len=64", "seq_len=128"} <= set(result["test_acc_per_slice"])


@pytest.mark.parametrize("name", tasks.available())
def test_a_vocabulary_past_int64_tokens_is_refused_naming_it(name):
    """A vocab_size of 2**64 was a traceback (OverflowError) and 10**20 numpy's 'high is out of bounds for int64',
    which named no setting."""
    for vocab_size in (10**20, 2**64):
        with pytest.raises(ValueError, match=rf"{name}: vocab_size={vocab_size} is out of range; valid: integer "
                                             rf"\d+ <= vocab_size <= {2**62} \(tokens are int64\)"):
            tasks.make(name, num_examples=2, seed=0, vocab_size=vocab_size)
    if name != "memorization":  # the largest still works (memorization's map is bounded by memory, below)
        motifs = {"key_motif_size": 1, "value_motif_size": 1} if name == "fuzzy_recall" else {}
        data = tasks.make(name, num_examples=2, seed=0, vocab_size=2**62, **motifs)
        assert data.inputs.max() < 2**62


def test_a_memorization_map_past_memory_is_refused(monkeypatch):
    """The map is an array of vocab_size // 2 entries: vocab_size=10**10 was numpy's MemoryError traceback."""
    monkeypatch.setattr(registry.memorization, "physical_memory", lambda: 2**30)
    with pytest.raises(ValueError, match=r"memorization: vocab_size=10000000000 is out of range; .*holds for the map"):
        tasks.make("memorization", num_examples=1, seed=0, vocab_size=10**10)


@pytest.mark.parametrize("make", [
    lambda: tasks.make("mqar", num_examples=2 * 10**9, seed=0),
    lambda: tasks.make_mixture("mqar", [{"num_examples": 10**9}, {"num_examples": 10**9, "seq_len": 128}], seed=0),
    lambda: tasks.make("s5", num_examples=1, seed=0, seq_len=10**12),
], ids=["examples", "mixture", "length"])
def test_a_dataset_past_memory_is_refused_before_drawing(make, monkeypatch):
    """More examples (or a longer one) than memory holds was a MemoryError traceback or the OOM killer, after
    validation said the settings were fine."""
    monkeypatch.setattr(registry, "physical_memory", lambda: 2**30)
    with pytest.raises(ValueError, match=r"is out of range; valid: integer 1 <= .* \(what this machine's 1 GiB holds"):
        make()


# ---------------------------------------------------------------- found in review


def test_modular_sum_labels_where_the_running_sum_passes_int64():
    """With a modulus near 2**62 the running sum passed int64 after a few tokens: cumsum wrapped around and the
    labels were off by 2**64 mod m from there on."""
    modulus, length = 2**62 - 1, 40
    data = tasks.make("modular_sum", num_examples=20, seed=0, vocab_size=2**62, modulus=modulus, seq_len=length)
    for row, labels in zip(data.inputs.tolist(), data.labels.tolist()):
        expected = [1 + state for state in expected_states(row, lambda s, token: (s + token - 1) % modulus, 0)]
        assert labels == expected


def test_overwrite_mqar_bound_on_pairs_is_found_at_once(monkeypatch):
    """The largest num_kv_pairs was found by counting down from seq_len // 4: seq_len=10**12 ran for minutes
    before the memory check could refuse it. The bisection must give the same bound as counting down."""
    calls = []
    counted = registry.overwrite_mqar.num_overwritten

    def num_overwritten(k, r):
        calls.append(k)
        if len(calls) > 1000:
            raise AssertionError("the bound is searched one K at a time")
        return counted(k, r)

    monkeypatch.setattr(registry.overwrite_mqar, "num_overwritten", num_overwritten)
    monkeypatch.setattr(registry, "physical_memory", lambda: 2**30)
    with pytest.raises(ValueError, match=r"overwrite_mqar: seq_len=1000000000000 is out of range; .*1 GiB holds"):
        tasks.make("overwrite_mqar", num_examples=1, seed=0, seq_len=10**12, overwrite_fraction=1.0)
    monkeypatch.undo()
    for r in (0.0, 0.25, 1 / 3, 0.5, 0.75, 1.0):
        for length in range(6, 120):
            most = length // 4
            while 4 * most + 2 * counted(most, r) > length:
                most -= 1
            registry.resolve("overwrite_mqar", {"seq_len": length, "num_kv_pairs": most, "overwrite_fraction": r})
            with pytest.raises(ValueError, match=rf"num_kv_pairs={most + 1} is out of range; valid: integer 1 <= "
                                                 rf"num_kv_pairs <= {most} "):
                registry.resolve("overwrite_mqar", {"seq_len": length, "num_kv_pairs": most + 1,
                                                    "overwrite_fraction": r})


def test_overwrite_mqar_too_short_for_one_pair_names_seq_len():
    """seq_len=5 with every key overwritten holds no pair: the message said `1 <= num_kv_pairs <= 0`."""
    with pytest.raises(ValueError, match=r"overwrite_mqar: seq_len=5 is out of range; valid: integer 6 <= seq_len"):
        tasks.make("overwrite_mqar", num_examples=1, seed=0, seq_len=5, num_kv_pairs=1, overwrite_fraction=1.0)
    assert len(tasks.make("overwrite_mqar", num_examples=1, seed=0, seq_len=6, num_kv_pairs=1,
                          overwrite_fraction=1.0)) == 1


@pytest.mark.parametrize("segments,params,named", [
    ([{"num_examples": 4}, {"num_examples": 4, "map_seed": 3}], {}, "segment 1 has map_seed=3, segment 0 map_seed=0"),
    ([{"num_examples": 4}, {"num_examples": 4, "vocab_size": 512}], {"vocab_size": 256},
     "segment 1 has vocab_size=512, segment 0 vocab_size=256"),
], ids=["map-seed", "vocab-size"])
def test_memorization_segments_of_another_map_are_refused(segments, params, named):
    """A memorization segment with its own map_seed or vocab_size was drawn from another map: the same key had
    two values in one split."""
    with pytest.raises(ValueError, match=rf"memorization: {named}; valid: one \w+ for every segment of every split"):
        tasks.make_mixture("memorization", segments, seed=0, **params)
    with pytest.raises(ValueError, match=named):
        tasks.check_shared("memorization", segments, **params)
    tasks.check_shared("memorization", [{"num_examples": 4, "seq_len": 8}, {"num_examples": 4}], map_seed=2)
    tasks.check_shared("mqar", [{"vocab_size": 64}, {"vocab_size": 128}])  # no shared params: any mixture


@pytest.mark.parametrize("split, segments, named", [
    ("train", "[{seq_len: 32, num_examples: 8}, {seq_len: 32, num_examples: 8, map_seed: 3}]",
     "task.segments.train[1] has map_seed=3"),
    # another split's map: the test would be of a map that training never saw
    ("test", "[{seq_len: 32, num_examples: 8, vocab_size: 512}]", "task.segments.test[0] has vocab_size=512"),
], ids=["within-a-split", "across-splits"])
def test_sandbox_train_refuses_a_memorization_segment_of_another_map(split, segments, named, monkeypatch, tmp_path,
                                                                      capsys):
    from test_faults import train_cli

    code = train_cli(monkeypatch, *FAST, "task=memorization", f"output_root={tmp_path}",
                     f"task.segments.{split}={segments}")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and named in err[0], err
    assert not list(tmp_path.rglob("*.json"))


def test_numpy_integer_params_are_checked_and_drawn_as_python_integers():
    """Settings from a numpy sweep (np.int64, np.int32) were checked in fixed-width arithmetic that wrapped round:
    fuzzy_recall took key_motif_size=7 at vocab_size=4096 (2047 ** 7 motifs, past 2**62) and drew its keys from
    overflowed numbers, and np.int32 settings were an OverflowError in the memory check."""
    with pytest.raises(ValueError, match=r"fuzzy_recall: key_motif_size=7 is out of range; valid: integer 1 <= "
                                         r"key_motif_size <= 5 "):
        tasks.make("fuzzy_recall", num_examples=2, seed=0, vocab_size=np.int64(4096), key_motif_size=np.int64(7),
                   seq_len=np.int64(400), num_kv_pairs=np.int64(2))
    rng = np.random.default_rng(7)
    for name in tasks.available():
        p = random_settings(name, rng)
        expected = tasks.make(name, num_examples=4, seed=0, **p)
        for kind in (np.int64, np.int32):
            as_numpy = {key: kind(v) if isinstance(v, int) and not isinstance(v, bool) else v for key, v in p.items()}
            data = tasks.make(name, num_examples=4, seed=0, **as_numpy)
            assert np.array_equal(data.inputs, expected.inputs) and np.array_equal(data.labels, expected.labels)


def test_capped_caps_a_numpy_num_examples():
    """`capped` checked for a Python int: an np.int64 num_examples was left whole, past limit_examples."""
    assert tasks.capped([{"num_examples": np.int64(1000)}, {"num_examples": 3}], 8) == [{"num_examples": 8},
                                                                                        {"num_examples": 3}]
