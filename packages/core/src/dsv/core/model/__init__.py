"""DeepSeek-V3.2 modules: MLA + lightning indexer (DSA), DeepSeekMoE, MTP, YaRN RoPE."""

from dsv.core.model.model import DSVForCausalLM, DSVModel, ModelOutput, count_parameters

__all__ = ["DSVForCausalLM", "DSVModel", "ModelOutput", "count_parameters"]
