"""The learning-rate schedule and the epoch plan, sized to the corpus and to a time budget.

A run with ``train.max_minutes`` must end *annealed* inside its budget, not cut off in the middle
of a long cosine schedule with its learning rate still high. So the number of epochs is planned
from measured time: after the first steps of epoch 1 (and again after every epoch) the trainer
calls :func:`plan_epochs` with the seconds an epoch costs, and :class:`BudgetSchedule` stretches
or shrinks its cosine to end on the last planned step. The plan may grow only early (before
:data:`GROW_UNTIL` of the schedule has passed) so that the learning rate never jumps back up
once it is falling; it may always shrink.

Warmup comes from the corpus: at most ``warmup_steps``, at most half an epoch and at most 5% of
the planned steps, so a small corpus leaves warmup in its first epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["GROW_UNTIL", "BudgetSchedule", "plan_epochs", "warmup_for"]

GROW_UNTIL = 0.7  # share of the schedule after which the plan only shrinks


def warmup_for(warmup_steps: int, steps_per_epoch: int, total_steps: int) -> int:
    """Warmup steps that fit the corpus: ``<= warmup_steps``, half an epoch, 5% of the run."""
    return max(1, min(int(warmup_steps), math.ceil(0.5 * steps_per_epoch),
                      math.ceil(0.05 * max(total_steps, 1))))


def plan_epochs(*, max_epochs: int, epochs_done: float, budget_s: float, elapsed_s: float,
                epoch_s: float, reserve_s: float = 0.0) -> int:
    """Epochs the run can afford in all (at least 1, at most ``max_epochs``).

    ``budget_s`` <= 0 means no budget; ``epoch_s`` is the measured (or estimated) cost of one
    epoch including its validation; ``reserve_s`` is kept back for the work after training
    (test evaluation, calibration, export). ``epochs_done`` may be fractional (mid-epoch).
    """
    if budget_s <= 0 or epoch_s <= 0:
        return max(1, int(max_epochs))
    left = budget_s - elapsed_s - reserve_s
    affordable = epochs_done + max(0.0, left) / epoch_s
    return int(max(1, min(max_epochs, math.floor(affordable + 1e-9))))


@dataclass
class BudgetSchedule:
    """Linear warmup, then cosine from 1 to ``min_ratio`` ending at step ``total_steps``.

    Use it as a ``LambdaLR`` factor (``scheduler = LambdaLR(opt, schedule)``); call
    :meth:`replan` when the plan changes. Past ``total_steps`` the factor stays at
    ``min_ratio``.
    """

    warmup: int
    total_steps: int
    min_ratio: float = 0.05

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / max(self.warmup, 1)
        progress = min(1.0, (step - self.warmup) / max(self.total_steps - self.warmup, 1))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def progress(self, step: int) -> float:
        return min(1.0, max(0, step - self.warmup) / max(self.total_steps - self.warmup, 1))

    def replan(self, total_steps: int, step: int) -> bool:
        """Move the end to ``total_steps`` (never before ``step + 1``); grow only early.

        Returns whether the plan changed.
        """
        total_steps = max(int(total_steps), step + 1, self.warmup + 1)
        if total_steps > self.total_steps and self.progress(step) >= GROW_UNTIL:
            return False
        changed = total_steps != self.total_steps
        self.total_steps = total_steps
        return changed

    def state_dict(self) -> dict[str, float]:
        return {"warmup": self.warmup, "total_steps": self.total_steps,
                "min_ratio": self.min_ratio}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.warmup = int(state["warmup"])
        self.total_steps = int(state["total_steps"])
        self.min_ratio = float(state["min_ratio"])
