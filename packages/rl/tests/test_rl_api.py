"""The public API of dsv.rl (a change here is a change for users)."""

from __future__ import annotations

import dsv.rl


def test_public_names() -> None:
    assert sorted(dsv.rl.__all__) == [
        "GRPOConfig", "GRPOSummary", "RLError", "RewardError", "RewardInput", "RewardSet", "Rollout",
        "RolloutSettings", "TaskSource", "evaluate_accuracy", "grpo", "load_reward", "rollout",
    ]  # fmt: skip
    for name in dsv.rl.__all__:
        assert getattr(dsv.rl, name) is not None


def test_errors_are_user_errors() -> None:
    from dsv.core.errors import DSVError

    assert issubclass(dsv.rl.RLError, DSVError) and issubclass(dsv.rl.RewardError, DSVError)
