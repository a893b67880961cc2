"""Learning-rate schedules as a pure function of the global step, so resuming needs only the step."""

from __future__ import annotations

import math

from normcore.spec import OptimSpec

__all__ = ["lr_at"]


def lr_at(step: int, optim: OptimSpec, steps_per_epoch: int, total_steps: int) -> float:
    """Learning rate of the update that follows ``step`` completed updates.

    Linear warm-up over ``warmup_epochs`` (fractional epochs allowed, counted in steps) up to
    ``optim.lr``, then constant, step (``step_gamma`` every ``step_epochs``) or cosine to zero
    at ``total_steps``.
    """
    warmup = round(optim.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return optim.lr * (step + 1) / warmup
    if optim.schedule == "constant":
        return optim.lr
    if optim.schedule == "step":
        return optim.lr * optim.step_gamma ** (step // (optim.step_epochs * steps_per_epoch))
    progress = (step - warmup) / max(1, total_steps - warmup)
    return optim.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
