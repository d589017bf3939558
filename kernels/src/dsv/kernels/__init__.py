"""dsv.kernels: Triton kernels for DeepSeek Sparse Attention (lightning indexer, top-k, sparse MLA
forward/backward, indexer distillation loss), each with a torch reference beside it.

dsv.core picks these up automatically on CUDA when installed (``DSV_KERNELS=triton|torch`` forces a
choice). On CPU they run in Triton's interpreter with ``TRITON_INTERPRET=1`` (tests, small shapes).
For inference on a CPU, :mod:`dsv.kernels.cpu` is the DSA chain (indexer head-sum, top-k, sparse
attention) as one compiled C call, which dsv.core uses automatically there.

Run the tests: ``pytest kernels/tests`` (the conftest turns the interpreter on);
benchmark: ``dsv bench kernels --help``.
"""

from __future__ import annotations

from dsv.core.lazy import lazy_exports

# Public names -> defining module. Imported on first use so that loading the ``dsv bench kernels``
# entry point (or ``dsv --help``) does not import torch and triton, and so a caller can still set
# TRITON_INTERPRET before triton is first imported.
_EXPORTS = {
    "act_quant": "dsv.kernels._api",
    "fp8_gemm": "dsv.kernels._api",
    "fp8_linear": "dsv.kernels._api",
    "Fp8Linear": "dsv.kernels.fp8_layer",
    "quantize_linears": "dsv.kernels.fp8_layer",
    "load_fp8_linears": "dsv.kernels.fp8_layer",
    "attention_probs_summed": "dsv.kernels._api",
    "availability": "dsv.kernels._api",
    "indexer_kl_loss": "dsv.kernels._api",
    "indexer_scores": "dsv.kernels._api",
    "indexer_scores_fp8": "dsv.kernels._api",
    "indexer_scores_paged": "dsv.kernels._api",
    "sparse_mla": "dsv.kernels._api",
    "sparse_mla_varlen": "dsv.kernels._api",
    "sparse_mla_fp8_kv": "dsv.kernels._api",
    "quantize_mla_kv_fp8": "dsv.kernels._api",
    "dequantize_mla_kv_fp8": "dsv.kernels.ops.sparse_mla.kv_fp8",
    "topk": "dsv.kernels._api",
    "dequantize_fp8_rows": "dsv.kernels.ops.indexer.reference",
    "quantize_fp8_rows": "dsv.kernels.ops.indexer.reference",
    "flat_indices_cu_seqlens": "dsv.kernels.ops.sparse_mla.reference",
    "flat_indices_paged": "dsv.kernels.ops.sparse_mla.reference",
}


__all__ = [
    "Fp8Linear",
    "act_quant",
    "attention_probs_summed",
    "availability",
    "dequantize_fp8_rows",
    "dequantize_mla_kv_fp8",
    "flat_indices_cu_seqlens",
    "flat_indices_paged",
    "fp8_gemm",
    "fp8_linear",
    "indexer_kl_loss",
    "indexer_scores",
    "indexer_scores_fp8",
    "indexer_scores_paged",
    "load_fp8_linears",
    "quantize_fp8_rows",
    "quantize_linears",
    "quantize_mla_kv_fp8",
    "sparse_mla",
    "sparse_mla_fp8_kv",
    "sparse_mla_varlen",
    "topk",
]

__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS, cache=True)
