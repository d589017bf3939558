"""The indexer_kl op: Triton kernels (triton.py) and the torch reference (reference.py)."""
