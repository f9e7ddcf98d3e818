"""`sandbox-bench tasks`: task generation speed (tasks/bench.py, which `sandbox-tasks bench` runs too)."""

from tasks.bench import main

__all__ = ["main"]
