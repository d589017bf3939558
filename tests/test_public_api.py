"""The curated public API of every dsv distribution (``__all__``): a change here is a change for
users, so it is made on purpose. Every listed name resolves.

Run: ``pytest tests/test_public_api.py``.
"""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

PUBLIC = {
    "dsv.cli": ["ExitCode", "MissingExtra", "UserError", "exit_for", "fail", "install_hint", "run", "user_errors",
                "writable_dir"],
    "dsv.core": ["DSVError", "DSVForCausalLM", "DenseKVCache", "ModelConfig", "ModelOutput", "SamplingParams",
                 "Tokenizer", "generate", "load_pretrained", "presets", "save_pretrained"],
    "dsv.kernels": ["Fp8Linear", "act_quant", "attention_probs_summed", "availability", "dequantize_fp8_rows",
                    "dequantize_mla_kv_fp8", "flat_indices_cu_seqlens", "flat_indices_paged", "fp8_gemm",
                    "fp8_linear", "indexer_kl_loss", "indexer_scores", "indexer_scores_fp8", "indexer_scores_paged",
                    "load_fp8_linears", "quantize_fp8_rows", "quantize_linears", "quantize_mla_kv_fp8",
                    "sparse_mla", "sparse_mla_fp8_kv", "sparse_mla_varlen", "topk"],
    "dsv.train": ["BatchPlan", "DataError", "Document", "LossTerms", "PackedData", "Recipe", "STAGES", "TrainConfig",
                  "TrainError", "TrainSummary", "default_documents", "encode_chat", "get_recipe", "indexer_recall",
                  "lm_terms", "load_documents", "lr_at", "pack", "passkey_accuracy", "passkey_scores",
                  "recall_stats", "train", "validation_loss"],
    "dsv.synth": ["AnswerFormatError", "DEFAULT_DIFFICULTY", "Environment", "EpisodeResult", "Limits",
                  "SandboxResult", "Score", "Task", "TaskFileError", "TaskFormatError", "ToolCallRecord",
                  "UnknownFamilyError", "call_tool", "families", "get", "read_tasks", "register", "run_command",
                  "run_episode", "run_python", "safe_verify", "tool_schema", "write_tasks"],
    "dsv.serve": ["APIError", "BlockPool", "DecodeStaging", "Engine", "EngineProcess", "GenParams", "LocalBackend",
                  "PagedBatchView", "Piece", "ProxyBackend", "ServerSettings", "StagedBatchView", "create_app",
                  "engine_command", "load_native_app", "load_proxy_app"],
    "dsv.rl": ["GRPOConfig", "GRPOSummary", "RLError", "RewardError", "RewardInput", "RewardSet", "Rollout",
               "RolloutSettings", "TaskSource", "evaluate_accuracy", "grpo", "load_reward", "rollout"],
    "dsv.tui": ["Agent", "AgentError", "ApprovalNeeded", "ApprovalPolicy", "ChatApp", "ChatClient", "ContentDelta",
                "EditedArguments", "LocalServer", "ReasoningDelta", "Session", "SessionStore", "Status",
                "StepFinished", "Tool", "ToolCallFinished", "ToolCallStarted", "ToolRegistry", "ToolResult",
                "TurnFinished", "TurnStarted", "Usage"],
}  # fmt: skip


@pytest.mark.parametrize("package", sorted(PUBLIC))
def test_public_api_is_pinned_and_resolves(package: str) -> None:
    module = importlib.import_module(package)
    assert sorted(module.__all__) == sorted(PUBLIC[package])
    missing = [name for name in module.__all__ if getattr(module, name, None) is None]
    assert not missing, f"{package}.__all__ lists names that do not resolve: {missing}"


@pytest.mark.parametrize(
    "code",
    [
        "from dsv.core import generate",  # first access through the package
        "import dsv.core.generate\nfrom dsv.core import generate",  # the submodule imported before
        "from dsv.core import generate as g\nimport dsv.core.generate\nfrom dsv.core import generate\nassert g is generate",
    ],
    ids=["package-first", "submodule-first", "both"],
)
def test_core_generate_is_the_sampling_module_whatever_ran_before(code: str) -> None:
    check = code + "\nimport types\nassert isinstance(generate, types.ModuleType), generate\nassert callable(generate.generate)"
    subprocess.run([sys.executable, "-c", check], check=True, capture_output=True, text=True)
