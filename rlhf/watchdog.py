"""The over-optimisation watchdog of the PPO stage (``ppo.watchdog``).

Optimising a learned reward too hard makes it rise while true quality falls (Gao et al.
2022, "Scaling laws for reward model overoptimization", arXiv 2210.10760). When a held-out
judge exists (the task's objective when it is not a training reward, or a function named by
``ppo.watchdog_judge``), every evaluation gives two numbers on the same held-out prompts: the
mean training reward and the mean judge score. The watchdog trips when the training reward
rose while the judge fell, between consecutive evaluations, ``patience`` times in a row; the
stage then stops and publishes the policy of the evaluation the judge liked best (the SFT
policy of step 0 included).

This module holds only the bookkeeping (no torch, no I/O), so it is tested on numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Watchdog"]


@dataclass
class Watchdog:
    """Consecutive "reward up, judge down" evaluations, and the best evaluation by the judge.

    Attributes:
        patience: how many such evaluations in a row trip it (>= 1).
        history: ``(step, training reward, judge)`` of every evaluation seen, in order.
        streak: the current run of "reward up, judge down" evaluations.
        best_step: the step of the evaluation with the highest judge score (the first on a tie).
        tripped_at: the step of the evaluation that tripped it, or None.
    """

    patience: int
    history: list[tuple[int, float, float]] = field(default_factory=list)
    streak: int = 0
    best_step: int | None = None
    best_judge: float = float("-inf")
    tripped_at: int | None = None

    def observe(self, step: int, reward: float, judge: float) -> bool:
        """Record the evaluation at ``step``; True when this one trips the watchdog.

        Returns:
            True once ``patience`` evaluations in a row each had a higher training reward
            and a lower judge score than the evaluation before.
        """
        if self.history:
            _, last_reward, last_judge = self.history[-1]
            self.streak = self.streak + 1 if (reward > last_reward and judge < last_judge) else 0
        self.history.append((step, reward, judge))
        if judge > self.best_judge:
            self.best_step, self.best_judge = step, judge
        if self.streak >= self.patience and self.tripped_at is None:
            self.tripped_at = step
            return True
        return False

    def is_new_best(self, step: int) -> bool:
        """Whether the evaluation just observed at ``step`` is the best by the judge so far."""
        return self.best_step == step

    def summary(self) -> dict:
        """``watchdog/*`` numbers for the metrics and the summary (steps as floats)."""
        out = {"watchdog/evaluations": float(len(self.history)), "watchdog/tripped": float(self.tripped_at is not None)}
        if self.tripped_at is not None:
            out["watchdog/tripped_step"] = float(self.tripped_at)
        if self.best_step is not None:
            out["watchdog/best_step"] = float(self.best_step)
            out["watchdog/best_judge"] = self.best_judge
        return out
