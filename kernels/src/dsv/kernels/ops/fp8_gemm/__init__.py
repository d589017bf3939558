"""The FP8 block-scaled GEMM op: Triton kernels (triton.py) and the torch reference (reference.py)."""
