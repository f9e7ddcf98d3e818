"""`sandbox-tasks`: list the tasks, summarise a generated dataset, or run the generation benchmark.

    sandbox-tasks list
    sandbox-tasks summary NAME [--num-examples N] [--seed S] [--split train|val|test] [--seq-len L] ...
    sandbox-tasks bench [ARGS]        (same as `sandbox-bench tasks [ARGS]`)

`summary` accepts one option per task parameter (`--vocab-size`, `--seq-len`, `--num-kv-pairs`,
`--power-a`, `--random-filler`/`--no-random-filler`, `--noise-fraction`, `--overwrite-fraction`,
`--key-motif-size`, `--value-motif-size`, `--num-tokens-to-copy`, `--map-seed`, `--modulus`, `--labels-at`);
only the options given are passed on, and one the task does not take is an error. Bad settings print one line to
stderr and exit with status 2.
"""

import argparse
import sys
import textwrap
from collections import Counter

import tasks
from tasks import bench
from tasks.common import FILLER, IGNORE
from tasks.registry import TASKS

SHOWN_TOKENS = 40
PARAMS = {param: default for task in TASKS.values() for param, default in task.defaults.items()}


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `PROG: error: MESSAGE`, with exit code 2 and without the usage text, as
    every bad input of the sandbox's commands (sandbox-tasks, sandbox-routing, sandbox-report, sandbox-bench)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="sandbox-tasks",
                           description="Synthetic recall, copying, memorization and state-tracking tasks.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    commands.add_parser("list", help="the tasks and their default parameters")
    summary = commands.add_parser("summary", help="generate a dataset and describe it")
    summary.add_argument("name", help=f"one of {tasks.available()}")
    summary.add_argument("--num-examples", type=int, default=1000)
    summary.add_argument("--seed", type=int, default=0)
    summary.add_argument("--split", choices=tasks.SPLITS, help="draw the seed from this split's range")
    for param, default in sorted(PARAMS.items()):
        flag = "--" + param.replace("_", "-")
        if isinstance(default, bool):
            summary.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            summary.add_argument(flag, type=type(default), default=None)
    commands.add_parser("bench", help="examples per second (sandbox-bench tasks)", add_help=False)
    return parser


def _summary(args: argparse.Namespace) -> None:
    params = {key: value for key, value in vars(args).items() if key in PARAMS and value is not None}
    if args.split is None:
        data = tasks.make(args.name, num_examples=args.num_examples, seed=args.seed, **params)
    else:
        data = tasks.make_split(args.name, args.split, num_examples=args.num_examples, seed=args.seed, **params)
    shown = {**tasks.defaults(args.name), **params}
    n, length = data.inputs.shape
    labelled = int((data.labels != IGNORE).sum())
    print(f"{args.name}: {n} examples x {length} tokens, seed {args.seed}"
          + (f" ({args.split} split)" if args.split else ""))
    print("params: " + " ".join(f"{key}={value}" for key, value in shown.items()))
    print(f"labels: {labelled} predicted positions ({labelled / n:.2f} per example)")
    print(f"example 0, first {min(SHOWN_TOKENS, length)} tokens ('.' = filler 0, 'token->label' where "
          "a label is set):")
    tokens = []
    for token, label in zip(data.inputs[0, :SHOWN_TOKENS].tolist(), data.labels[0, :SHOWN_TOKENS].tolist()):
        text = "." if token == FILLER else str(token)
        tokens.append(text if label == IGNORE else f"{text}->{label}")
    print(textwrap.fill(" ".join(tokens), width=100, initial_indent="  ", subsequent_indent="  "))
    for key, values in data.slices.items():
        counts = sorted(Counter(values.tolist()).items())
        shown_counts = ", ".join(f"{value}: {count}" for value, count in counts[:20])
        more = f", ... ({len(counts)} values)" if len(counts) > 20 else ""
        print(f"slice {key}: {{{shown_counts}{more}}}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return bench.main(argv[1:], prog="sandbox-tasks bench")
    args = _parser().parse_args(argv)
    try:
        if args.command == "list":
            for name in tasks.available():
                print(f"{name}: {TASKS[name].summary}")
                print("  defaults: " + " ".join(f"{key}={value}" for key, value in TASKS[name].defaults.items()))
        else:
            _summary(args)
    except ValueError as error:
        print(f"sandbox-tasks: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
