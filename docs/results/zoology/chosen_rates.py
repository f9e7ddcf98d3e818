"""The learning rate the report chooses on validation for each model of a Zoology run folder, as run.sh's
MODEL:LR arguments, for the protocol's second pass (seeds 1 and 2 at the chosen rate):

    python docs/results/zoology/chosen_rates.py FOLDER        # e.g. mom_m8:0.0022 attention:0.01

Only rows where every rate that ran finished on seed 0 are printed: a choice among some of the rates could change
when the others finish. The rows left out are named on stderr. Give it the folder once the seed-0 pass has ended
(protocol.sh does): a rate not started yet is not seen."""

import re
import sys
from pathlib import Path

from sandbox.report import by_choice, finished, make_rows, to_runs
from sandbox.results import collect_results


def main(folder: str) -> None:
    for row in make_rows(to_runs(collect_results(Path(folder)))):
        seed0 = {choice: [run for run in members if run.get("config.seed") == 0]
                 for choice, members in by_choice(row.runs, row.tuned).items()}
        if not all(finished(runs) for runs in seed0.values()):
            print(f"{row.label} (d_model {row.runs[0].get('config.model.d_model')}): not every rate finished on "
                  f"seed 0, no choice yet", file=sys.stderr)
            continue
        model = re.search(r"[,/]model=([^,/]+)", row.chosen[0]["run_dir"]).group(1)
        print(f"{model}:{row.choice[0]}", end=" ")
    print()


if __name__ == "__main__":
    main(*sys.argv[1:])
