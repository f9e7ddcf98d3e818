"""Every committed report is what `sandbox-report` makes today of the committed runs it was made from: a change to
how the report chooses, averages or counts must remake them (with the command their README shows), so that no
table in docs/results/ states what the code would no longer say.
"""

import io
import re
from pathlib import Path

import pytest
from rich.console import Console

from sandbox.report import report

REPO = Path(__file__).resolve().parent.parent
# The files of a report that depend on the runs alone (the PNGs are drawn from the same numbers).
COMPARED = ("report.md", "results.csv", "lr_sensitivity.csv")


def committed_reports() -> list[tuple[str, str]]:
    """(runs folder, report folder) of each `sandbox-report RUNS --out OUT` in a README under docs/results/ whose
    runs folder is committed."""
    found = set()
    for readme in (REPO / "docs" / "results").rglob("README.md"):
        text = readme.read_text()
        for runs, out in re.findall(r"sandbox-report (docs/results/\S+) --out (docs/results/[^\s`]+)", text):
            if (REPO / runs).is_dir():
                found.add((runs, out))
    return sorted(found)


def test_committed_reports_are_found():
    assert ("docs/results/zoology", "docs/results/zoology") in committed_reports()
    assert len(committed_reports()) >= 6


@pytest.mark.parametrize(("runs", "out"), committed_reports())
def test_committed_report_is_what_the_report_makes_today(runs, out, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the report names runs by the path it was given, as the README's command gives it
    report(Path(runs), tmp_path, console=Console(file=io.StringIO()))
    for name in COMPARED:
        assert (tmp_path / name).read_text() == (REPO / out / name).read_text(), (
            f"{out}/{name} is stale: remake it with `sandbox-report {runs} --out {out}`")
