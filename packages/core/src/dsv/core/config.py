"""Model configuration: one dataclass, read from and written to Hugging Face ``config.json``.

Field names are the Hub's (``kv_lora_rank``, ``index_topk``, ``first_k_dense_replace``...), so a
``config.json`` of deepseek-ai/DeepSeek-V3.2 maps one-to-one. ``model_type`` is ``deepseek_v32``
(MLA + lightning indexer + DSA) or ``deepseek_v3`` (dense attention, no indexer; the form
``dsv model convert --add-indexer`` starts from).

Reading is strict: an unknown key is an error that names it (Hub metadata such as
``architectures`` or ``torch_dtype`` is recognised and ignored), and every value is validated
with a message naming the field. RoPE settings are read from either the Hub's
``rope_theta`` + ``rope_scaling`` or transformers' ``rope_parameters`` and written in the Hub form.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsv.core.errors import ConfigError

MODEL_TYPES = ("deepseek_v32", "deepseek_v3")

# Keys found in real config.json files that carry no model maths (or that dsv derives itself).
_IGNORED_KEYS = frozenset(
    {
        "architectures", "auto_map", "torch_dtype", "dtype", "transformers_version", "quantization_config",
        "use_cache", "pretraining_tp", "attention_dropout", "aux_loss_alpha", "seq_aux", "ep_size",
        "moe_layer_freq", "num_key_value_heads", "pad_token_id", "output_router_logits", "mlp_layer_types",
        "layer_types", "head_dim", "qk_head_dim", "rope_interleave", "router_aux_loss_coef", "base_model",
        "_name_or_path", "is_decoder", "mlp_bias", "return_dict", "output_hidden_states",
        "output_attentions", "chunk_size_feed_forward", "id2label", "label2id", "problem_type",
        "tokenizer_class", "tf_legacy_loss", "use_bfloat16", "num_experts", "index_fp8",
    }
)  # fmt: skip


@dataclass(kw_only=True)
class ModelConfig:
    """DeepSeek-V3.2 (or V3) architecture hyper-parameters, named as in the Hub ``config.json``."""

    model_type: str = "deepseek_v32"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    first_k_dense_replace: int = 3
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(
        default_factory=lambda: {
            "type": "yarn",
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        }
    )
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    num_nextn_predict_layers: int = 1
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def has_indexer(self) -> bool:
        """True for ``deepseek_v32`` (DSA); ``deepseek_v3`` attends densely."""
        return self.model_type == "deepseek_v32"

    @property
    def kv_latent_dim(self) -> int:
        """Values cached per token per layer for MLA: ``kv_lora_rank + qk_rope_head_dim`` (576 in V3.2)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def yarn(self) -> dict[str, Any] | None:
        """The YaRN settings when YaRN is active, else None."""
        rs = self.rope_scaling
        if not rs:
            return None
        kind = rs.get("type", rs.get("rope_type"))
        return rs if kind == "yarn" and float(rs.get("factor", 1.0)) > 1.0 else None

    @property
    def softmax_scale(self) -> float:
        """MLA softmax scale: ``qk_head_dim**-0.5``, times ``mscale**2`` when YaRN is active.

        ``mscale = 0.1 * mscale_all_dim * ln(factor) + 1`` as in DeepSeek's Hub modelling code and
        transformers; the reference inference code uses its ``mscale`` argument instead. The two agree
        for every released config (both 1.0).
        """
        scale = self.qk_head_dim**-0.5
        y = self.yarn
        if y is not None and y.get("mscale_all_dim"):
            m = 0.1 * float(y["mscale_all_dim"]) * math.log(float(y["factor"])) + 1.0
            scale *= m * m
        return scale

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_routed_experts > 0 and layer >= self.first_k_dense_replace

    # ------------------------------------------------------------------ validation

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""

        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"invalid config field '{name}' = {getattr(self, name)!r}: {why}")

        need(self.model_type in MODEL_TYPES, "model_type", f"must be one of {', '.join(MODEL_TYPES)}")
        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings",
        ):  # fmt: skip
            value = getattr(self, name)
            need(
                isinstance(value, int) and not isinstance(value, bool) and value > 0,
                name,
                "must be a positive integer",
            )
        for name in ("qk_nope_head_dim", "n_routed_experts", "n_shared_experts", "first_k_dense_replace",
                     "num_nextn_predict_layers", "moe_intermediate_size"):  # fmt: skip
            value = getattr(self, name)
            need(
                isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                name,
                "must be an integer >= 0",
            )
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        need(
            self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
            "q_lora_rank",
            "must be a positive integer or null",
        )
        need(self.hidden_act == "silu", "hidden_act", "only 'silu' (SwiGLU) is supported")
        need(
            self.scoring_func == "sigmoid",
            "scoring_func",
            "only 'sigmoid' routing (DeepSeek-V3/V3.2) is supported",
        )
        need(
            self.topk_method == "noaux_tc",
            "topk_method",
            "only 'noaux_tc' (group-limited, bias-corrected) is supported",
        )
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
        need(self.rope_theta > 0, "rope_theta", "must be > 0")
        need(self.routed_scaling_factor > 0, "routed_scaling_factor", "must be > 0")
        need(not self.tie_word_embeddings, "tie_word_embeddings", "DeepSeek-V3.2 does not tie embeddings")
        if self.n_routed_experts > 0:
            need(
                self.moe_intermediate_size > 0,
                "moe_intermediate_size",
                "must be > 0 when there are routed experts",
            )
            need(self.n_group >= 1 and self.n_routed_experts % self.n_group == 0, "n_group",
                 f"must divide n_routed_experts ({self.n_routed_experts})")  # fmt: skip
            need(self.n_routed_experts // self.n_group >= 2, "n_group",
                 "each expert group needs at least 2 experts (group score = sum of its top-2)")  # fmt: skip
            need(
                1 <= self.topk_group <= self.n_group, "topk_group", f"must be in [1, n_group={self.n_group}]"
            )
            need(
                1 <= self.num_experts_per_tok <= self.topk_group * (self.n_routed_experts // self.n_group),
                "num_experts_per_tok",
                "must be >= 1 and fit in the experts of the topk_group selected groups",
            )
        if self.has_indexer:
            need(self.q_lora_rank is not None, "q_lora_rank",
                 "deepseek_v32 needs a q LoRA rank: the indexer reads the q latent")  # fmt: skip
            for name in ("index_n_heads", "index_head_dim", "index_topk"):
                value = getattr(self, name)
                need(isinstance(value, int) and value > 0, name, "must be a positive integer")
            need(self.index_head_dim >= self.qk_rope_head_dim, "index_head_dim",
                 f"must be >= qk_rope_head_dim ({self.qk_rope_head_dim}): the indexer ropes its first dims")  # fmt: skip
        if self.rope_scaling is not None:
            need(isinstance(self.rope_scaling, dict), "rope_scaling", "must be an object or null")
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            need(kind in ("yarn", "default", None), "rope_scaling", "only 'yarn' scaling is supported")
            if kind == "yarn":
                for key in ("factor", "original_max_position_embeddings"):
                    need(key in self.rope_scaling, "rope_scaling", f"yarn needs '{key}'")
                need(float(self.rope_scaling["factor"]) >= 1.0, "rope_scaling", "yarn 'factor' must be >= 1")

    # ------------------------------------------------------------------ HF mapping

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], *, source: str = "config") -> ModelConfig:
        """Build from a parsed ``config.json``; unknown keys and bad values raise :class:`ConfigError`."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        if "model_type" not in data:
            raise ConfigError(
                f"{source}: missing field 'model_type' (expected one of {', '.join(MODEL_TYPES)})"
            )
        rope_params = data.pop("rope_parameters", None)
        if isinstance(rope_params, dict):
            rope_params = dict(rope_params)
            data.setdefault("rope_theta", rope_params.pop("rope_theta", 10000.0))
            kind = rope_params.pop("rope_type", None) or rope_params.pop("type", None)
            rope_params.pop("type", None)
            data.setdefault(
                "rope_scaling", None if kind in (None, "default") else {"type": kind, **rope_params}
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in data if k not in names and k not in _IGNORED_KEYS)
        if unknown:
            raise ConfigError(
                f"{source}: unknown field(s) {', '.join(repr(k) for k in unknown)}; "
                f"remove them or check the spelling (known fields: see dsv.core.config.ModelConfig)"
            )
        kwargs = {k: v for k, v in data.items() if k in names}
        if kwargs.get("model_type") == "deepseek_v3":
            for key in ("index_n_heads", "index_head_dim", "index_topk"):
                kwargs.setdefault(key, 0)
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        except TypeError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` object (Hub field names; loads in transformers)."""
        d = dataclasses.asdict(self)
        arch = "DeepseekV32ForCausalLM" if self.has_indexer else "DeepseekV3ForCausalLM"
        d["architectures"] = [arch]
        d["num_key_value_heads"] = self.num_attention_heads
        d["attention_dropout"] = 0.0
        d["use_cache"] = True
        if not self.has_indexer:
            for key in ("index_n_heads", "index_head_dim", "index_topk"):
                d.pop(key)
            d["rope_interleave"] = True
        return d

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        return cls.from_hf_dict(data, source=str(path))

    def replace(self, **changes: Any) -> ModelConfig:
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)
