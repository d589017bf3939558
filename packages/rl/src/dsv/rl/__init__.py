"""dsv-rl: GRPO with the DeepSeek-V3.2 stabilisers, rollouts on the dsv serve Engine.

The loop and its settings are in :mod:`dsv.rl.trainer`, rollouts (single-turn and multi-turn tool
episodes) in :mod:`dsv.rl.rollout`, prompt sources in :mod:`dsv.rl.data`, rewards in
:mod:`dsv.rl.rewards`, the objective in :mod:`dsv.rl.objective`. torch is imported on first
attribute access.

    from dsv.rl import GRPOConfig, grpo
    grpo(GRPOConfig(model="runs/sft/final", tasks=["arithmetic"], out="runs/rl", steps=20))
"""

from __future__ import annotations

from dsv.core.lazy import lazy_exports

__all__ = [
    "GRPOConfig",
    "GRPOSummary",
    "RLError",
    "RewardError",
    "RewardInput",
    "RewardSet",
    "Rollout",
    "RolloutSettings",
    "TaskSource",
    "evaluate_accuracy",
    "grpo",
    "load_reward",
    "rollout",
]

_LAZY = {
    "GRPOConfig": "dsv.rl.trainer",
    "GRPOSummary": "dsv.rl.trainer",
    "RLError": "dsv.rl.trainer",
    "evaluate_accuracy": "dsv.rl.trainer",
    "grpo": "dsv.rl.trainer",
    "RewardError": "dsv.rl.rewards",
    "RewardInput": "dsv.rl.rewards",
    "RewardSet": "dsv.rl.rewards",
    "load_reward": "dsv.rl.rewards",
    "Rollout": "dsv.rl.rollout",
    "RolloutSettings": "dsv.rl.rollout",
    "rollout": "dsv.rl.rollout",
    "TaskSource": "dsv.rl.data",
}

__getattr__, __dir__ = lazy_exports(globals(), _LAZY)
