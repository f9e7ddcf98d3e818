"""`sandbox-routing` (sandbox/recall_routing.py): where a trained MoM run routes the pairs its queries recall."""

import json
import math
import shutil

import pytest
import torch

from models import build_model
from sandbox.recall_routing import chance_overlap, main, pair_positions, routing_of_queries
from sandbox.results import config_hash
from sandbox.train import train
from tasks import IGNORE
from commands import exit_code
from test_train import make_cfg


def test_pair_positions_finds_the_earliest_key_followed_by_the_answer():
    inputs = torch.tensor([[5, 9, 7, 8, 5, 9, 0, 5, 7, 3],
                           [1, 2, 3, 4, 0, 0, 3, 0, 1, 0]])
    labels = torch.full_like(inputs, IGNORE)
    labels[0, 7], labels[0, 8], labels[0, 9] = 9, 8, 4  # 5 -> 9 at 0 and 4: the earliest; 7 -> 8 at 2; 3 -> 4 nowhere
    labels[1, 6], labels[1, 8], labels[1, 1] = 4, 2, 2  # 3 -> 4 at 2; 1 -> 2 at 0; position 1 has nothing before
    rows, queries, keys = pair_positions(inputs, labels)
    assert rows.tolist() == [0, 0, 0, 1, 1, 1] and queries.tolist() == [7, 8, 9, 1, 6, 8]
    assert keys.tolist() == [0, 2, -1, -1, 2, 0]


def _fuzzy_pair(inputs, slices, b, q):
    """The position, in the context, of the pair's token that the fuzzy-recall query at (b, q) recalls from, as
    tasks/fuzzy_recall.py lays it out: K pairs of w = 6 tokens (key motif of 3, value motif of 3), then query slots
    of w (the key motif, the value's first tokens, filler)."""
    K, w, m = int(slices["num_kv_pairs"][b]), 6, 3
    start = K * w + (q - K * w) // w * w
    [pair] = [i for i in range(K) if inputs[b, i * w:i * w + m].tolist() == inputs[b, start:start + m].tolist()]
    return pair * w + q - start


@pytest.mark.parametrize("name, params", [
    ("mqar", {"vocab_size": 16, "seq_len": 128, "num_kv_pairs": 7, "random_filler": True}),
    ("overwrite_mqar", {"vocab_size": 32, "seq_len": 128, "num_kv_pairs": 8, "random_filler": True}),
    ("ar", {"vocab_size": 16, "seq_len": 128, "num_kv_pairs": 7, "random_filler": True}),
    ("fuzzy_recall", {"vocab_size": 16, "seq_len": 128, "num_kv_pairs": 8}),  # MAD's fuzzy recall
])
def test_pair_positions_find_the_pair_of_the_context_that_each_query_recalls(name, params):
    """With random filler at a small vocabulary a bigram after the context often equals a query's pair (9% of the
    MQAR queries here), and fuzzy recall's motifs share bigrams with other pairs' and with earlier queries' (one
    query in ten): the latest match, taken as the pair, was filler or another pair, and its routing was counted."""
    import tasks

    data = tasks.make(name, num_examples=100, seed=0, **params)
    inputs, labels = torch.from_numpy(data.inputs), torch.from_numpy(data.labels)
    rows, queries, keys = pair_positions(inputs, labels, motifs=name == "fuzzy_recall")
    assert len(keys) == int((labels != IGNORE).sum())
    for b, q, p in zip(rows.tolist(), queries.tolist(), keys.tolist()):
        if name == "fuzzy_recall":
            assert p == _fuzzy_pair(inputs, data.slices, b, q)
        else:  # the context's one pair of the query's key and its label (an overwritten key's latest)
            overwritten = int(data.slices["overwritten"][b]) if "overwritten" in data.slices else 0
            context = 2 * (int(data.slices["num_kv_pairs"][b]) + overwritten)
            assert p < context and inputs[b, p] == inputs[b, q] and inputs[b, p + 1] == labels[b, q]


@pytest.mark.parametrize("memories, top_k", [(4, 2), (8, 2), (4, 1), (2, 2), (5, 3)])
def test_chance_overlap_is_what_independent_uniform_routing_gives(memories, top_k):
    g = torch.Generator().manual_seed(0)
    draws = 20000
    a = torch.rand(draws, memories, generator=g).topk(top_k, -1).indices
    b = torch.rand(draws, memories, generator=g).topk(top_k, -1).indices
    met = (a[:, :, None] == b[:, None, :]).any(-1).any(-1).float().mean().item()
    assert abs(met - chance_overlap(memories, top_k)) < 4 * math.sqrt(0.25 / draws)


def test_queries_always_meet_their_pair_when_every_memory_sees_every_token():
    """top_k = num_memories: each token goes to every memory, so every query meets its pair's key and value."""
    torch.manual_seed(0)
    model = build_model(vocab_size=32, max_seq_len=24, mixer="mom", d_model=16, backend="torch",
                        mixer_options={"num_memories": 2, "top_k": 2, "shared_memory": False}).eval()
    inputs = torch.randint(1, 32, (6, 24))
    labels = torch.full_like(inputs, IGNORE)
    inputs[:, 20], labels[:, 20] = inputs[:, 3], inputs[:, 4]
    summary = routing_of_queries(model, inputs, labels, batch_size=4)
    assert summary["queries"] == 6 and summary["chance_overlap"] == 1.0
    for layer in summary["layers"]:
        assert layer["meets_key"]["share"] == layer["meets_value"]["share"] == 1.0
        assert math.isnan(layer["meets_key"]["accuracy_if_not"])


def test_the_mom_runs_below_a_folder_are_read(tmp_path, capsys):
    """End to end on short runs of the quickstart's task: the MoM run below the folder is read (the attention run
    beside it is not), one table row per layer, the shares in [0, 1]."""
    runs = tmp_path / "runs"
    train(make_cfg("experiment=quickstart", "model=mom_noshared", "debug=fast"), runs / "mom")
    train(make_cfg("experiment=quickstart", "model=attention", "debug=fast"), runs / "attention")
    assert main([str(runs), "--limit", "40", "--json", str(tmp_path / "routing.json")]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert [line.startswith("## ") for line in lines].count(True) == 1
    assert [line.split("|")[1].strip() for line in lines if line.startswith("| ") and "layer" not in line] == ["0", "1"]
    summary = json.loads((tmp_path / "routing.json").read_text())[str(runs / "mom")]
    assert summary["queries"] > 0 and not summary["shared_memory"]
    assert all(0 <= layer[f"meets_{role}"]["share"] <= 1 for layer in summary["layers"] for role in ("key", "value"))

BAD = {  # arguments -> the message, after `sandbox-routing: error: `
    "missing": (["{runs}/missing"], "{runs}/missing is not a folder"),
    "no-mom-run": (["{runs}/attention"], "{runs}/attention holds no finished MoM run of a recall task"),
    "limit-0": (["{runs}", "--limit", "0"], "--limit 0 --batch-size 100: both must be at least 1"),
    "device-unknown": (["{runs}", "--device", "gpu"], "--device gpu is invalid on this machine"),
    "json-is-a-folder": (["{runs}", "--json", "{runs}"], "--json {runs} cannot be written"),
    "json-in-no-folder": (["{runs}", "--json", "{runs}/no/r.json"], "--json {runs}/no/r.json cannot be written"),
    # found before any run is read, not a traceback after them
    "json-in-unwritable-folder": (["{runs}", "--json", "/proc/r.json"], "--json /proc/r.json cannot be written: "
                                  "its folder /proc is not writable (No such file or directory: /proc)"),
    # one line, without argparse's usage text
    "limit-a-fraction": (["{runs}", "--limit", "1.5"], "argument --limit: invalid int value: '1.5'"),
    "split-unknown": (["{runs}", "--split", "tset"], "argument --split: invalid choice: 'tset'"),
    # not the runs below the working folder
    "path-empty": ([""], "argument paths: '' is not a path (empty)"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_arguments_are_one_line_before_any_work(case, tmp_path, capsys):
    runs = tmp_path / "runs"
    train(make_cfg("experiment=quickstart", "model=attention", "debug=fast"), runs / "attention")
    args, message = BAD[case]
    assert exit_code(main, [a.format(runs=runs) for a in args]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(f"sandbox-routing: error: {message.format(runs=runs)}")
    assert len(captured.err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def mom_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "mom"
    train(make_cfg("experiment=quickstart", "model=mom_noshared", "debug=fast"), run)
    return run


def _other_configuration(run):
    """The run's result says another seed (with that config's hash): its best.ckpt is another configuration's."""
    result = json.loads((run / "result.json").read_text())
    result["config"]["seed"] += 1
    result["config_hash"] = config_hash(result["config"])
    (run / "result.json").write_text(json.dumps(result))


def _config_edit(edit):
    """A change to the run's config, with its config_hash made again: a result as another version writes it."""
    def damage(run):
        result = json.loads((run / "result.json").read_text())
        edit(result["config"])
        result["config_hash"] = config_hash(result["config"])
        (run / "result.json").write_text(json.dumps(result))
    return damage


DAMAGED = {  # what is done to a MoM run -> the message, after `sandbox-routing: error: ` (not a traceback)
    "checkpoint-truncated": (lambda run: (run / "checkpoints/best.ckpt").write_bytes(
        (run / "checkpoints/best.ckpt").read_bytes()[:1000]), "{run}/checkpoints/best.ckpt cannot be used: truncated"),
    "checkpoint-empty": (lambda run: (run / "checkpoints/best.ckpt").write_bytes(b""),
                         "{run}/checkpoints/best.ckpt cannot be used: empty or truncated"),
    "checkpoint-of-another-configuration": (
        _other_configuration, "{run}/checkpoints/best.ckpt cannot be used: it was written by another configuration"),
    # a traceback from building its model
    "config-without-a-key": (_config_edit(lambda config: config.pop("optim")),
                             "{run}/checkpoints/best.ckpt cannot be used: its run's config does not build a model "
                             "(Missing key optim"),
    # not left out without a word
    "result-truncated": (lambda run: (run / "result.json").write_text((run / "result.json").read_text()[:200]),
                         "{run}/result.json cannot be read: not valid JSON, perhaps truncated"),
}


@pytest.mark.parametrize("case", DAMAGED)
def test_damaged_run_is_one_line_before_any_run_is_read(case, mom_run, tmp_path, capsys):
    """A good run beside a damaged one: nothing is printed for the good one either, and nothing is written."""
    runs = tmp_path / "runs"
    shutil.copytree(mom_run, runs / "a-good")
    shutil.copytree(mom_run, runs / "b-damaged")
    damage, message = DAMAGED[case]
    damage(runs / "b-damaged")
    assert main([str(runs), "--limit", "4", "--json", str(tmp_path / "r.json")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(
        f"sandbox-routing: error: {message.format(run=runs / 'b-damaged')}")
    assert len(captured.err.strip().splitlines()) == 1 and not (tmp_path / "r.json").exists()


def test_a_run_trained_in_a_stack_is_not_read_from_an_earlier_best_checkpoint(mom_run, tmp_path, capsys):
    """Its result says it trained in a stack: the best.ckpt in its folder is of a segment that ran alone before. It
    is named in a warning (it was left out without a word, so the runs printed looked like all of them), and the
    run beside it is read."""
    runs = tmp_path / "runs"
    shutil.copytree(mom_run, runs / "a-alone")
    run = runs / "b-stacked"
    shutil.copytree(mom_run, run)
    result = json.loads((run / "result.json").read_text())
    result["stack"] = {"folder": str(tmp_path / ".stacks" / "abc"), "runs": 2}
    (run / "result.json").write_text(json.dumps(result))
    assert main([str(runs), "--limit", "4"]) == 0
    captured = capsys.readouterr()
    assert [line for line in captured.out.splitlines() if line.startswith("## ")] == [f"## {runs / 'a-alone'}"]
    assert captured.err == (f"sandbox-routing: warning: {run} left out: it was trained in a stack, whose checkpoint "
                            "holds its best weights\n")
    assert main([str(run), "--limit", "4"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "holds no finished MoM run" in err[1] and "stack" in err[1]


def test_a_run_of_a_task_without_pairs_to_recall_is_not_read(mom_run, tmp_path, capsys):
    """On parity (state tracking) a "pair" of a query is a coincidence of tokens: its routing was reported as if
    recalled."""
    run = tmp_path / "parity"
    shutil.copytree(mom_run, run)
    _config_edit(lambda config: config["task"].update(name="parity"))(run)
    assert main([str(run), "--limit", "4"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == (
        f"sandbox-routing: error: {run} holds no finished MoM run of a recall task (ar, fuzzy_recall, mqar, noisy_ar, "
        "overwrite_mqar) with its best weights (result.json and checkpoints/best.ckpt; runs trained in a stack are "
        "not read)\n")


@pytest.mark.parametrize("status", ["interrupted", "failed", "diverged"])
def test_a_run_that_did_not_finish_is_named_not_read_as_trained(status, mom_run, tmp_path, capsys):
    """An interrupted, failed or diverged run keeps the best.ckpt of its partial training: its routing and accuracy
    were printed under its folder as a trained run's. It is left out with one warning line naming its status; the
    finished run beside it is read."""
    runs = tmp_path / "runs"
    shutil.copytree(mom_run, runs / "a-finished")
    shutil.copytree(mom_run, runs / "b-unfinished")
    path = runs / "b-unfinished" / "result.json"
    result = json.loads(path.read_text())
    result.update(status=status, status_reason="SIGTERM at step 1", best_val_acc=math.nan, test_acc=math.nan,
                  test_acc_per_slice={})
    path.write_text(json.dumps(result))
    assert main([str(runs), "--limit", "4"]) == 0
    captured = capsys.readouterr()
    assert [line for line in captured.out.splitlines() if line.startswith("## ")] == [f"## {runs / 'a-finished'}"]
    assert captured.err == (f"sandbox-routing: warning: {runs / 'b-unfinished'} left out: its run is {status} "
                            "(SIGTERM at step 1), not trained to its end\n")
    assert main([str(runs / "b-unfinished"), "--limit", "4"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[1].startswith(f"sandbox-routing: error: {runs / 'b-unfinished'} holds no finished MoM")


def test_a_cuda_device_the_machine_lacks_is_one_line_before_any_work(mom_run, monkeypatch, capsys):
    """On a machine of one GPU, cuda:1 passed the check (cuda is there) and was a traceback once the first run's
    model was moved to it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert exit_code(main, [str(mom_run), "--limit", "4", "--device", "cuda:1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == (
        "sandbox-routing: error: --device cuda:1 is invalid on this machine: use cpu, or cuda where there is one "
        "(here: cuda:0)\n")


def test_the_json_holds_no_nan(mom_run, tmp_path, monkeypatch, capsys):
    """An accuracy over no query (every query met its pair, or none did) is NaN: written as such, the file was not
    JSON (jq and JavaScript refuse it); it is null there."""
    real = routing_of_queries

    def every_query_met(*args, **kwargs):
        summary = real(*args, **kwargs)
        summary["layers"][0]["meets_key"]["accuracy_if_not"] = float("nan")
        return summary

    monkeypatch.setattr("sandbox.recall_routing.routing_of_queries", every_query_met)
    assert main([str(mom_run), "--limit", "4", "--json", str(tmp_path / "r.json")]) == 0

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    summary = json.loads((tmp_path / "r.json").read_text(), parse_constant=refuse)[str(mom_run)]
    assert summary["layers"][0]["meets_key"]["accuracy_if_not"] is None
    assert "nan" in capsys.readouterr().out  # the printed table still says there was nothing to measure


def test_a_run_trained_on_the_triton_kernels_is_measured_on_the_cpu(mom_run, tmp_path, monkeypatch, capsys):
    """A run trained with model.backend=triton (on a GPU) was a traceback after the checks on the CPU, the default
    --device: its model asked for Triton there. It is measured on the PyTorch reference, the same computation."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # as on a machine without a GPU outside the tests
    assert main([str(mom_run), "--limit", "8", "--json", str(tmp_path / "torch.json")]) == 0
    run = tmp_path / "triton"
    shutil.copytree(mom_run, run)
    _config_edit(lambda config: config["model"].update(backend="triton"))(run)
    best = run / "checkpoints" / "best.ckpt"
    checkpoint = torch.load(best, weights_only=True)
    checkpoint["config_hash"] = json.loads((run / "result.json").read_text())["config_hash"]  # as that run wrote it
    torch.save(checkpoint, best)
    assert main([str(run), "--limit", "8", "--json", str(tmp_path / "triton.json")]) == 0
    capsys.readouterr()
    [on_torch] = json.loads((tmp_path / "torch.json").read_text()).values()
    [on_triton] = json.loads((tmp_path / "triton.json").read_text()).values()
    assert on_triton == on_torch
