"""The gla memory rule: naive.py (PyTorch reference), chunk.py and fused_recurrent.py (Triton)."""
