"""Hydra discovers plugins in the hydra_plugins namespace package: the launcher of `sandbox-train -m`."""
