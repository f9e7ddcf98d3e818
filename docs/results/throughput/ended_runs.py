"""What a stack pays for runs that have ended: 4 gated DeltaNet runs stacked (d_model 64, 150 steps, validation
every 10, the CPU), two of them diverging at once (lr 1e30, 1e31), timed through `train_stack`.

    python docs/results/throughput/ended_runs.py [--json FILE]

Run it at two commits (e.g. in a `git worktree` of the older one) to compare them on one machine.
"""

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from sandbox.stacked_run import train_stack
from sandbox.train import CONF_DIR

SETTINGS = ["model=gated_deltanet", "model.d_model=64", "task.params.vocab_size=64", "task.batch_size=16",
            "callbacks.progress=none", "trainer.accelerator=cpu", "trainer.max_steps=150",
            "trainer.val_check_interval=8", "trainer.check_val_every_n_epoch=null", "trainer.log_every_n_steps=5",
            "task.segments.train=[{seq_len: 32, num_kv_pairs: 4, num_examples: 256}]",
            "task.segments.val=[{seq_len: 32, num_kv_pairs: 4, num_examples: 32}]",
            "task.segments.test=[{seq_len: 32, num_kv_pairs: 4, num_examples: 32}]"]
LEARNING_RATES = ("3e-3", "1e30", "1e-3", "1e31")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ended-runs-"))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfgs = [compose(config_name="train", overrides=[*SETTINGS, f"output_root={root}", f"optim.lr={lr}"])
                for lr in LEARNING_RATES]
    start = time.perf_counter()
    results = train_stack(cfgs, [root / str(i) for i in range(len(cfgs))])
    record = {"commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip(),
              "seconds": round(time.perf_counter() - start, 2),
              "runs": [{"lr": lr, "status": r["status"], "steps": r["steps"]}
                       for lr, r in zip(LEARNING_RATES, results)]}
    print(json.dumps(record))
    if args.json:
        args.json.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
