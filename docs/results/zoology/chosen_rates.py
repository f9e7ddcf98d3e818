"""The learning rate the report chooses on validation for each model of a Zoology run folder, as run.sh's
MODEL:LR arguments, for the protocol's second pass (seeds 1 and 2 at the chosen rate):

    python docs/results/zoology/chosen_rates.py FOLDER        # e.g. mom_m8:0.0022 attention:0.01

Only rows where every rate that ran has ended on seed 0 (finished, diverged, not trained or pruned: what training
again leaves as it is) are printed: a choice among some of the rates could change when the others end. A rate whose
seed-0 run diverged is one the report's rule ranks below the others, not one still to come. The rows left out are
named on stderr, as are rows where no rate finished (nothing to choose). Give it the folder once the seed-0 pass
has ended (protocol.sh does): a rate not started yet is not seen. Exit code 1 where a chosen run's folder name does
not give its model."""

import re
import sys
from pathlib import Path

from sandbox.report import by_choice, make_rows, to_runs
from sandbox.results import TERMINAL, collect_results
from sandbox.train import CONF_DIR


def main(folder: str) -> None:
    for row in make_rows(to_runs(collect_results(Path(folder)))):
        seed0 = {choice: [run for run in members if run.get("config.seed") == 0]
                 for choice, members in by_choice(row.runs, row.tuned).items()}
        name = f"{row.label} (d_model {row.runs[0].get('config.model.d_model')})"
        if not all(runs and all(run["status"] in TERMINAL for run in runs) for runs in seed0.values()):
            print(f"{name}: not every rate has ended on seed 0, no choice yet", file=sys.stderr)
            continue
        if row.choice is None:
            print(f"{name}: no rate finished on seed 0, nothing to choose", file=sys.stderr)
            continue
        # the model's config name, as the folder's name gives it (cut where the overrides before it are long)
        named = re.search(r"[,/]model=([^,/]+)", row.chosen[0]["run_dir"])
        if not named or not (CONF_DIR / "model" / f"{named.group(1)}.yaml").is_file():
            sys.exit(f"chosen_rates.py: error: {row.chosen[0]['run_dir']}: its folder's name gives no model (model="
                     f"one of {CONF_DIR / 'model'}), so no rate can be given to run.sh for {name}")
        model = named.group(1)
        print(f"{model}:{row.choice[0]}", end=" ")
    print()


if __name__ == "__main__":
    main(*sys.argv[1:])
