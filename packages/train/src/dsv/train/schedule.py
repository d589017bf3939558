"""Learning-rate schedules as pure functions of the step (so a resumed run needs no scheduler state).

- ``cosine``: linear warm-up, then cosine decay from ``lr`` to ``lr * min_lr_ratio``;
- ``wsd`` (warmup-stable-decay): linear warm-up, constant ``lr``, then a linear decay to
  ``lr * min_lr_ratio`` over the last ``decay_fraction`` of the steps;
- ``constant``: linear warm-up, then constant (what the DSA stages of V3.2-Exp use).
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "wsd", "constant")


def lr_at(
    step: int,
    *,
    lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.1,
    decay_fraction: float = 0.2,
) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    floor = lr * min_lr_ratio
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        t = min(1.0, (step - warmup_steps) / span)
        return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
    decay_steps = max(1, round(total_steps * decay_fraction))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return lr
    t = min(1.0, (step - decay_start + 1) / decay_steps)
    return lr + (floor - lr) * t
