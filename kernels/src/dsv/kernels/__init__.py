"""dsv.kernels: Triton kernels for DeepSeek Sparse Attention (lightning indexer, top-k, sparse MLA
forward/backward, indexer distillation loss), each with a torch reference beside it.

dsv.core picks these up automatically on CUDA when installed (``DSV_KERNELS=triton|torch`` forces a
choice). On CPU they run in Triton's interpreter with ``TRITON_INTERPRET=1`` (tests, small shapes).

Run the tests: ``pytest kernels/tests`` (the conftest turns the interpreter on);
benchmark: ``dsv bench kernels --help``.
"""

from dsv.kernels._api import (
    attention_probs_summed,
    availability,
    indexer_kl_loss,
    indexer_scores,
    indexer_scores_fp8,
    sparse_mla,
    sparse_mla_varlen,
    topk,
)
from dsv.kernels.ops.indexer.reference import dequantize_fp8_rows, quantize_fp8_rows
from dsv.kernels.ops.sparse_mla.reference import flat_indices_cu_seqlens, flat_indices_paged

__all__ = [
    "attention_probs_summed",
    "availability",
    "dequantize_fp8_rows",
    "flat_indices_cu_seqlens",
    "flat_indices_paged",
    "indexer_kl_loss",
    "indexer_scores",
    "indexer_scores_fp8",
    "quantize_fp8_rows",
    "sparse_mla",
    "sparse_mla_varlen",
    "topk",
]
