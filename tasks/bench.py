"""`sandbox-bench tasks` (also `sandbox-tasks bench`): task generation speed, in examples per second, at Zoology's
four MQAR settings.

Generates `--num-examples` examples (default 100k, the Zoology training-set size) at each (seq_len,
num_kv_pairs) in (64, 4), (128, 8), (256, 16), (512, 64) with the task's other defaults, through
`tasks.make` (so the time includes the validation of the settings). Target: 100k examples at
(512, 64) in at most 10 s on the 2-core CPU. The numbers are printed, not asserted.
"""

import sys
import time

import tasks
from tasks.common import check_int
from tasks.registry import check_fits_memory

SETTINGS = ((64, 4), (128, 8), (256, 16), (512, 64))
MQAR_LIKE = ("ar", "mqar", "noisy_ar", "overwrite_mqar")  # the tasks that take all four settings


def main(argv: list[str] | None = None, prog: str = "sandbox-bench tasks") -> int:
    from tasks.cli import OneLineParser  # tasks.cli imports this module

    parser = OneLineParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-examples", type=int, default=100_000, help="examples per setting")
    parser.add_argument("--task", default="mqar", choices=MQAR_LIKE)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:  # before any generation: one line, as for the other bad settings
        check_int(args.task, "num_examples", args.num_examples, 1)
        check_fits_memory(args.task, "num_examples", args.num_examples, max(seq_len for seq_len, _ in SETTINGS))
        check_int(args.task, "seed", args.seed, 0)
    except ValueError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    for seq_len, num_kv_pairs in SETTINGS:
        start = time.perf_counter()
        data = tasks.make(args.task, num_examples=args.num_examples, seed=args.seed, seq_len=seq_len,
                          num_kv_pairs=num_kv_pairs)
        seconds = time.perf_counter() - start
        print(f"{args.task} seq_len={seq_len:<4} num_kv_pairs={num_kv_pairs:<3} {len(data)} examples in "
              f"{seconds:6.2f} s: {len(data) / seconds:12,.0f} examples/s")
    return 0
