"""The sparse_mla op: Triton kernels (triton.py) and the torch reference (reference.py)."""
