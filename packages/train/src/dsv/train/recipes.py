"""Published training recipes as named settings: ``dsv train STAGE --recipe v32``.

The stage defaults of :class:`dsv.train.trainer.TrainConfig` are sized for the embedded tiny model
on a CPU (a sparse-stage lr of 3e-4 and 100 steps). A recipe replaces them with the values a paper
published for that stage, each with its source, so a run at scale gets the paper's numbers; a flag
given on the command line (or a keyword given to :func:`apply_recipe`) still wins.

``v32`` is DeepSeek-V3.2's continued pre-training (V3.2-Exp report §2.1, "Continued Pre-Training";
the V3.2 report keeps it) for the two DSA stages, and DeepSeek-V3's pre-training (arXiv:2412.19437
§4.2, "Hyper-Parameters") for what the V3.2 reports do not restate: the balance loss weight, the
bias update speed and its drop to 0, the MTP weight, AdamW's weight decay and clipping. V3.2
starts from a V3.1-Terminus checkpoint whose pre-training was V3's, so ``pretrain`` takes V3's
values. SFT has no published hyper-parameters, so ``--recipe v32`` refuses it.

Model-side values (``index_topk`` 2048, 64 index heads of 128 dims) are the ``v32`` preset's
config, not training settings; the recipe lists them so a run can be checked against them.

    dsv train recipe v32                      # print every stage's values and sources
    dsv train dsa-sparse --recipe v32 --model CKPT --out runs/sparse
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dsv.core.errors import DSVError

V32_EXP = "DeepSeek-V3.2-Exp report §2.1"
V3 = "DeepSeek-V3 report (arXiv:2412.19437) §4.2"
DSV = "dsv (not published)"


class RecipeError(DSVError):
    """An unknown recipe, or a stage the recipe has no published values for."""


@dataclass(frozen=True)
class Setting:
    """One recipe value and where it comes from."""

    value: Any
    source: str


@dataclass(frozen=True)
class Recipe:
    """A stage's published settings (``TrainConfig`` field -> value and source) and notes."""

    name: str
    stage: str
    settings: Mapping[str, Setting]
    notes: tuple[str, ...] = field(default=())


# The 128K-token sequences of V3.2's continued pre-training and the global batches in sequences;
# the global batch is micro_batch_size x grad_accum x processes, so the recipe spells it for one
# process and a launch of N processes divides --grad-accum by N.
_SEQ_128K = 128 * 1024
# V3 §4.2: gamma = 0.001 for the first 14.3T tokens, 0 for the remaining 500B of 14.8T.
_GAMMA_UNTIL = 14.3 / 14.8


def _batch(sequences: int, source: str) -> dict[str, Setting]:
    return {
        "micro_batch_size": Setting(1, f"{DSV}: one 128K sequence per micro-step"),
        "grad_accum": Setting(sequences, f"{source}, one process (N processes: {sequences}/N)"),
    }


def _v3_balance_and_optim() -> dict[str, Setting]:
    return {
        "aux_loss_alpha": Setting(1e-4, f"{V3}: sequence-wise balance factor alpha = 0.0001"),
        "bias_update_speed": Setting(1e-3, f"{V3}: bias update speed gamma = 0.001"),
        "bias_update_until": Setting(
            round(_GAMMA_UNTIL, 4), f"{V3}: gamma = 0.001 for the first 14.3T of 14.8T tokens, then 0"
        ),
        "weight_decay": Setting(0.1, f"{V3}: AdamW weight decay 0.1 (betas 0.9 / 0.95, as dsv's)"),
        "max_grad_norm": Setting(1.0, f"{V3}: gradient clipping norm 1.0"),
    }


def _v32(stage: str) -> Recipe:
    topk = f"index_topk 2048, 64 index heads x 128 ({V32_EXP}; the v32 preset's config)"
    if stage == "dsa-warmup":
        settings = {
            "lr": Setting(1e-3, f"{V32_EXP}: dense warm-up, learning rate 1e-3"),
            "schedule": Setting("constant", f"{DSV}: the report gives one learning rate per stage"),
            "steps": Setting(1000, f"{V32_EXP}: 1000 steps"),
            "seq_len": Setting(_SEQ_128K, f"{V32_EXP}: sequences of 128K tokens"),
            **_batch(16, f"{V32_EXP}: 16 sequences x 128K = 2.1B tokens"),
            "weight_decay": Setting(0.1, f"{V3}: AdamW weight decay 0.1"),
            "max_grad_norm": Setting(1.0, f"{V3}: gradient clipping norm 1.0"),
        }
        notes = (
            "Only the indexers train (every one, the MTP layer's included); dense attention.",
            topk,
        )
    elif stage == "dsa-sparse":
        settings = {
            "lr": Setting(7.3e-6, f"{V32_EXP}: sparse training, learning rate 7.3e-6"),
            "schedule": Setting("constant", f"{DSV}: the report gives one learning rate per stage"),
            "steps": Setting(15000, f"{V32_EXP}: 15000 steps"),
            "seq_len": Setting(_SEQ_128K, f"{V32_EXP}: sequences of 128K tokens"),
            **_batch(480, f"{V32_EXP}: 480 sequences x 128K = 943.7B tokens"),
            "mtp_loss_weight": Setting(0.1, f"{V3}: MTP weight 0.3 for the first 10T tokens, 0.1 after"),
            "indexer_loss_weight": Setting(
                1.0, f"{V32_EXP}: the indexer learns only from L_I (inputs detached), unweighted"
            ),
            **_v3_balance_and_optim(),
        }
        notes = (
            "The V3.2 reports give no balance settings for this stage; V3's pre-training values "
            "(alpha, gamma and its drop to 0 for the last 500B of 14.8T tokens) are the published ones.",
            topk,
        )
    elif stage == "pretrain":
        settings = {
            "lr": Setting(2.2e-4, f"{V3}: peak learning rate 2.2e-4"),
            "warmup_steps": Setting(2000, f"{V3}: linear warm-up over the first 2K steps"),
            "schedule": Setting(
                "wsd", f"{V3}: constant until 10T tokens, then decay over 4.3T (cosine there; wsd decays linearly)"
            ),
            "decay_fraction": Setting(round(4.3 / 14.8, 4), f"{V3}: decay over 4.3T of 14.8T tokens"),
            "min_lr_ratio": Setting(0.1, f"{V3}: decay to 2.2e-5"),
            "seq_len": Setting(4096, f"{V3}: maximum sequence length 4K in pre-training"),
            "mtp_loss_weight": Setting(0.3, f"{V3}: MTP weight 0.3 for the first 10T tokens (0.1 after)"),
            **_v3_balance_and_optim(),
        }
        notes = (
            "V3's batch size ramps from 3072 to 15360 sequences over the first 469B tokens and the "
            "learning rate ends at 7.3e-6 over the last 167B tokens; neither is a dsv setting, so "
            "steps and batch stay yours.",
        )
    else:
        raise RecipeError(
            f"--recipe v32 has no published values for the {stage} stage (it covers pretrain, dsa-warmup "
            "and dsa-sparse); drop --recipe or pass the settings as flags"
        )
    return Recipe(name="v32", stage=stage, settings=settings, notes=notes)


RECIPES: dict[str, Callable[[str], Recipe]] = {"v32": _v32}
RECIPE_STAGES: dict[str, tuple[str, ...]] = {"v32": ("pretrain", "dsa-warmup", "dsa-sparse")}


def get_recipe(name: str, stage: str) -> Recipe:
    """The recipe ``name`` for ``stage``; :class:`RecipeError` names the choices otherwise."""
    if name not in RECIPES:
        raise RecipeError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    return RECIPES[name](stage)


def apply_recipe(recipe: Recipe, given: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` (settings chosen explicitly) over the recipe's values: the ``TrainConfig`` keywords."""
    return {**{k: s.value for k, s in recipe.settings.items()}, **given}


def describe(recipe: Recipe, overridden: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """Lines naming each value and its source (and which ones a flag replaced), then the notes."""
    width = max(len(k) for k in recipe.settings)
    lines = [f"recipe {recipe.name} for {recipe.stage}:"]
    for key, s in recipe.settings.items():
        flag = "--" + key.replace("_", "-")
        kept = "  (replaced by your flag)" if key in overridden else ""
        lines.append(f"  {flag:<{width + 2}} {s.value!s:<10} {s.source}{kept}")
    lines += [f"  note: {n}" for n in recipe.notes]
    return lines


__all__ = ["RECIPES", "RECIPE_STAGES", "Recipe", "RecipeError", "Setting", "apply_recipe", "describe", "get_recipe"]
