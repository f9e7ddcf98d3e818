"""The gated_deltanet memory rule (declared in kernels/rules.py): its parallel PyTorch form (naive.py) and its
math (README.md)."""
