"""Where a trained MoM run routes what it recalls: `sandbox-routing FOLDER ...` (a run folder, or a folder whose
MoM runs below it are each read).

A MoM memory is read only at the tokens routed to it, so a query can recall a key-value pair only from a memory
that its own token and the token that wrote the pair were both routed to (or from the shared memory, which every
token writes and reads). For every labelled position of a recall task (MQAR and the other tasks whose query token
appeared earlier followed by the answer), this finds the pair in the context (the earliest position holding the
query's token, followed by the label; on fuzzy recall, whose keys and values are motifs of several tokens, the one
whose tokens before it agree longest with the query's), then, per MoM layer, whether the query's routed memories
meet those of the pair's key and of its value (the short conv lets the value's position write the key with it). It
reports how often they meet, what top-k of M routed independently would give, and the accuracy at the queries that
meet their pair and at those that do not.

It runs the run's best checkpoint (`checkpoints/best.ckpt`) on its split (test by default), regenerated from the
config in `result.json`, on the CPU unless `--device` says otherwise (a run trained on the Triton kernels on the
PyTorch reference there).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

import kernels
from models.mom import MoM
from sandbox.results import RESULT_FILE, collect_results, file_problem, path_argument, status_of
from tasks import IGNORE, SPLITS
from tasks.cli import OneLineParser

BEST = Path("checkpoints") / "best.ckpt"
# The recall tasks (tasks/__init__.py): their queries recall a pair of the context. On the others (copying,
# memorization, state tracking) a "pair" found is a coincidence of tokens, and its routing means nothing.
RECALL_TASKS = ("ar", "fuzzy_recall", "mqar", "noisy_ar", "overwrite_mqar")


def pair_positions(inputs: torch.Tensor, labels: torch.Tensor,
                   motifs: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each labelled position (b, q), in row-major order: (b, q, p) with p the position of its pair's key, the
    earliest p < q - 1 with inputs[b, p] == inputs[b, q] and inputs[b, p + 1] == labels[b, q], or -1 where there is
    none. Three 1-d tensors.

    The earliest, as the context comes first: a later match is filler (`random_filler`: at V = 16, 9% of MQAR's
    queries had a filler bigram after the context equal to their pair) or another query's tokens. With `motifs`
    (keys and values of several tokens, fuzzy_recall), of those matches the ones whose tokens before p agree longest
    with those before q: the query's whole key motif and the value tokens before the label, where a bigram alone also
    matches other pairs' motifs sharing it."""
    rows, queries = (labels != IGNORE).nonzero(as_tuple=True)
    T = inputs.shape[1]
    t = torch.arange(T - 1)
    x = inputs[rows]
    match = ((x[:, :-1] == inputs[rows, queries, None]) & (x[:, 1:] == labels[rows, queries, None])
             & (t < queries[:, None] - 1))
    if motifs:
        agree, length = match.clone(), match.long()
        for back in range(1, T):  # do the tokens `back` before p and before q agree too (as long as all nearer did)
            before = torch.nn.functional.pad(x, (back, 0), value=-1)[:, :T - 1]
            at_query = torch.where(queries >= back, x[torch.arange(len(x)), (queries - back).clamp(min=0)], -2)
            agree &= before == at_query[:, None]
            if not agree.any():
                break
            length += agree
        match &= length == length.max(1, keepdim=True).values
    first = torch.where(match, t, T).min(1).values
    return rows, queries, torch.where(first < T, first, -1)


def chance_overlap(memories: int, top_k: int) -> float:
    """How often two tokens routed to top_k of `memories` independently and uniformly share a memory."""
    return 1 - math.comb(memories - top_k, top_k) / math.comb(memories, top_k)


def routing_of_queries(model, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int,
                       motifs: bool = False) -> dict:
    """Per MoM layer, for the queries whose pair is in the context: whether the query meets the pair's key and
    value in a routed memory, and whether it was predicted right. `motifs`: as in `pair_positions`."""
    layers = [module for module in model.modules() if isinstance(module, MoM)]
    if not layers:
        raise ValueError("the run's model has no MoM layer: nothing is routed")
    masks: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda mod, args, out: masks.append(
        mod.route(args[0])[1].dense_mask[..., :mod.num_memories].cpu())) for layer in layers]
    meets = {i: {"key": [], "value": []} for i in range(len(layers))}
    right, found_all = [], 0
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for start in range(0, len(inputs), batch_size):
                x, y = inputs[start:start + batch_size], labels[start:start + batch_size]
                masks.clear()
                logits = model(x.to(device), label_mask=(y != IGNORE).to(device)).logits.cpu()  # row-major
                rows, queries, keys = pair_positions(x, y, motifs)
                found = keys >= 0
                found_all += int(found.sum())
                rows, queries, keys = rows[found], queries[found], keys[found]
                right.append(logits[found].argmax(-1) == y[rows, queries])
                for i, mask in enumerate(masks):
                    query = mask[rows, queries]
                    meets[i]["key"].append((query & mask[rows, keys]).any(-1))
                    meets[i]["value"].append((query & mask[rows, keys + 1]).any(-1))
    finally:
        for hook in hooks:
            hook.remove()
    right = torch.cat(right)
    return {
        "queries": len(right),
        "queries_without_pair": int((labels != IGNORE).sum()) - found_all,
        "accuracy": right.float().mean().item(),
        "shared_memory": layers[0].shared_memory,
        "chance_overlap": chance_overlap(layers[0].num_memories, layers[0].top_k),
        "layers": [{"layer": i, **{f"meets_{role}": _split_accuracy(torch.cat(met), right)
                                   for role, met in meets[i].items()}} for i in range(len(layers))],
    }


def _split_accuracy(met: torch.Tensor, right: torch.Tensor) -> dict:
    """The share of queries that meet, and the accuracy of those that do and of those that do not."""
    def accuracy(where):
        return right[where].float().mean().item() if where.any() else float("nan")
    return {"share": met.float().mean().item(), "accuracy_if_met": accuracy(met), "accuracy_if_not": accuracy(~met)}


def mom_runs(path: Path) -> dict[Path, dict]:
    """The run folders of finished MoM runs of a recall task with their best weights, `path` itself or every one
    below it, each with its config (one that did not finish is named in a warning). A result.json that cannot be
    read, or best weights that cannot be loaded into their run's model, is an error: that run would be left out."""
    if not path.is_dir():
        raise ValueError(f"{path} is not a folder")

    def unreadable(file: Path, why: str) -> None:
        raise ValueError(f"{file} cannot be read: {why}")

    results = collect_results(path, on_skip=unreadable)
    moms = [r for r in results if r["config"]["model"]["mixer"] == "mom"
            and (r["config"].get("task") or {}).get("name") in RECALL_TASKS]
    readable = []
    for r in moms:
        # a run trained in a stack keeps its best weights in the stack's checkpoint: a best.ckpt in its own folder
        # is of an earlier segment that ran alone
        why = ("it was trained in a stack, whose checkpoint holds its best weights" if "stack" in r
               else None if (Path(r["run_dir"]) / BEST).is_file() else f"it has no {BEST}")
        if why is None:
            readable.append(r)
        elif status_of(r) == "finished":  # named, so that the runs printed are not taken for all of them
            print(f"sandbox-routing: warning: {r['run_dir']} left out: {why}", file=sys.stderr)
    # an interrupted, failed or diverged run's best.ckpt is of a training cut short: named, never read as trained
    for r in readable:
        if status_of(r) != "finished":
            reason = f" ({r['status_reason']})" if r.get("status_reason") else ""
            print(f"sandbox-routing: warning: {r['run_dir']} left out: its run is {status_of(r)}{reason}, not trained "
                  "to its end", file=sys.stderr)
    found = {Path(r["run_dir"]): r["config"] for r in readable if status_of(r) == "finished"}
    if not found:
        raise ValueError(f"{path} holds no finished MoM run of a recall task ({', '.join(RECALL_TASKS)}) with its "
                         f"best weights ({RESULT_FILE} and {BEST}; runs trained in a stack are not read)")
    for folder, config in found.items():
        problem = weights_problem(folder, config)
        if problem:
            raise ValueError(f"{folder / BEST} cannot be used: {problem}")
    return found


def run_module(config: dict):
    """The run's model with fresh weights (on torch's default device) and its data module, not generated yet."""
    from sandbox.train import build_module, data_module

    cfg = OmegaConf.create(config)
    datamodule = data_module(cfg)
    return build_module(cfg, datamodule), datamodule


def weights_problem(folder: Path, config: dict) -> str | None:
    """Why the run's best weights cannot be loaded into its model (built on the meta device: no memory, no
    data), as sandbox-train finds it for its checkpoints; None if they can."""
    from omegaconf.errors import OmegaConfBaseException

    from sandbox.results import config_hash
    from sandbox.runs import checkpoint_problem
    from sandbox.train import one_line

    try:
        with torch.device("meta"):
            weights = run_module(config)[0].state_dict()
    except (ValueError, TypeError, OmegaConfBaseException) as err:  # a config of another version: a key missing
        return f"its run's config does not build a model ({one_line(err)})"
    return checkpoint_problem(folder / BEST, config_hash(config), weights)


def load_run(folder: Path, config: dict, device: str):
    """The run's model on its best weights, and its data. A run trained on the Triton kernels (a GPU's) runs on the
    PyTorch reference off CUDA, where Triton would refuse the device: the same computation (triton_bf16's bf16
    products become float32 ones)."""
    if kernels.on_triton(config["model"].get("backend")) and torch.device(device).type != "cuda":
        config = {**config, "model": {**config["model"], "backend": "torch"}}
    module, datamodule = run_module(config)
    state = torch.load(folder / BEST, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    datamodule.generate()
    return module.model.to(device).eval(), datamodule


def table(summary: dict) -> str:
    """The summary as a markdown table, one row per layer."""
    lines = [f"{summary['queries']} queries with their pair in the context ({summary['queries_without_pair']} "
             f"without), accuracy {summary['accuracy']:.3f}; a query and a position routed independently would "
             f"share a memory {summary['chance_overlap']:.3f} of the time"
             + ("; every query also meets its pair in the shared memory" if summary["shared_memory"] else ""),
             "",
             "| layer | meets the key | accuracy if so / if not | meets the value | accuracy if so / if not |",
             "|---|---|---|---|---|"]
    for layer in summary["layers"]:
        cells = [f"{m['share']:.3f} | {m['accuracy_if_met']:.3f} / {m['accuracy_if_not']:.3f}"
                 for m in (layer["meets_key"], layer["meets_value"])]
        lines.append(f"| {layer['layer']} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def nan_as_null(value):
    """`value` with every NaN (an accuracy over no query) as None: NaN is not JSON, and readers other than Python's
    (jq, JavaScript, most JSON libraries) refuse a file holding it."""
    if isinstance(value, dict):
        return {key: nan_as_null(v) for key, v in value.items()}
    if isinstance(value, list):
        return [nan_as_null(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def _device_ok(name: str) -> bool:
    try:
        device = torch.device(name)
    except RuntimeError:
        return False
    # a GPU index past the machine's would fail only once the first run's model is moved there
    return device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_available()
                                    and (device.index or 0) < torch.cuda.device_count())


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="sandbox-routing", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=path_argument, help="run folders, or folders with MoM runs below them")
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--limit", type=int, default=1000,
                        help="examples of the split at most, evenly spaced over it (a split is ordered by segment)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=path_argument, help="write every run's summary here")
    args = parser.parse_args(argv)
    try:
        if args.limit < 1 or args.batch_size < 1:
            raise ValueError(f"--limit {args.limit} --batch-size {args.batch_size}: both must be at least 1")
        if not _device_ok(args.device):
            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
            here = f" (here: {', '.join(f'cuda:{i}' for i in range(gpus))})" if gpus else ""
            raise ValueError(f"--device {args.device} is invalid on this machine: use cpu, or cuda where there is one"
                             + here)
        problem = args.json and file_problem(args.json)
        if problem:
            raise ValueError(f"--json {args.json} cannot be written: {problem}")
        runs = {folder: config for path in args.paths for folder, config in mom_runs(path).items()}
    except ValueError as err:
        print(f"sandbox-routing: error: {err}", file=sys.stderr)
        return 2
    summaries = {}
    for folder, config in runs.items():
        model, datamodule = load_run(folder, config, args.device)
        data = datamodule.datasets[args.split]
        chosen = torch.linspace(0, len(data) - 1, min(args.limit, len(data))).round().long()
        summaries[str(folder)] = summary = routing_of_queries(
            model, data.inputs[chosen], data.labels[chosen], args.batch_size,
            motifs=config["task"]["name"] == "fuzzy_recall")
        print(f"## {folder}\n\n{table(summary)}\n")
    if args.json:
        args.json.write_text(json.dumps(nan_as_null(summaries), indent=1, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
