"""Learning-rate schedules: linear warmup, then cosine, warmup-stable-decay or linear decay."""

from __future__ import annotations

import math


def learning_rate(
    step: int,
    *,
    lr: float,
    min_lr: float,
    warmup_steps: int,
    total_steps: int,
    schedule: str,
    decay_fraction: float = 0.2,
) -> float:
    """Learning rate of optimizer update `step` (0-based) out of `total_steps`.

    Warmup rises linearly to `lr` over `warmup_steps` updates. After it the schedule moves from `lr`
    towards `min_lr`, reaching it when the budget ends (the last update runs just above it):
    `cosine` follows half a cosine, `linear` a straight line (with min_lr 0: decay to zero),
    `warmup-stable-decay` holds `lr` and decays linearly over the last `decay_fraction` of the steps.
    """
    warmup = min(warmup_steps, max(total_steps - 1, 0))
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "warmup-stable-decay":
        decay_steps = max(1, math.ceil(decay_fraction * total_steps))
        start = max(warmup, total_steps - decay_steps)
        if step < start:
            return lr
        progress = (step - start) / max(1, total_steps - start)
        return lr + (min_lr - lr) * progress
    progress = (step - warmup) / max(1, total_steps - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return lr + (min_lr - lr) * progress
    raise ValueError(f"unknown schedule {schedule!r}")
