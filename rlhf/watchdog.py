"""The over-optimisation watchdog of the PPO stage (``ppo.watchdog``).

Optimising a learned reward too hard makes it rise while true quality falls (Gao et al.
2022, "Scaling laws for reward model overoptimization", arXiv 2210.10760). When a held-out
judge exists (a function named by ``ppo.watchdog_judge``, the task's objective when it is not a
training reward, or by default the policy's agreement with the reward model's held-out pairs,
:mod:`rlhf.judge`), every evaluation gives two numbers on the same held-out prompts: the
mean training reward and the mean judge score. The watchdog trips when the training reward
rose while the judge stayed below its best so far, ``patience`` evaluations in a row
(issue 30: "the training reward keeps rising while the judge stops improving"), or when the
judge rates the final policy below the SFT policy; the stage then stops and publishes the
policy of the evaluation the judge liked best (the SFT policy of step 0 included), so the
published policy is never below SFT by the judge on the evaluation prompts.

This module holds only the bookkeeping (no torch, no I/O), so it is tested on numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from rlhf.config import ConfigError

if TYPE_CHECKING:
    from rlhf.config import PPOConfig
    from rlhf.judge import PairJudge
    from rlhf.ppo.state import Optimization, PPOSetup

__all__ = ["Watchdog"]


@dataclass
class Watchdog:
    """Consecutive "reward up, judge not improving" evaluations, and the best evaluation by the judge.

    Attributes:
        patience: how many such evaluations in a row trip it (>= 1).
        history: ``(step, training reward, judge)`` of every evaluation seen, in order.
        streak: the current run of evaluations whose training reward rose over the one before
            while their judge score stayed below the best so far.
        best_step: the step of the evaluation with the highest judge score (the first on a tie).
        tripped_at: the step of the evaluation that tripped it, or None.
        below_sft: it tripped at the end because the judge rated the final policy below SFT.
    """

    patience: int
    history: list[tuple[int, float, float]] = field(default_factory=list)
    streak: int = 0
    best_step: int | None = None
    best_judge: float = float("-inf")
    tripped_at: int | None = None
    below_sft: bool = False

    def observe(self, step: int, reward: float, judge: float) -> bool:
        """Record the evaluation at ``step``; True when this one trips the watchdog.

        Returns:
            True once ``patience`` evaluations in a row each had a higher training reward
            than the evaluation before and a judge score below the best before it (a judge
            level with its best, e.g. at its ceiling, is no sign of harm).
        """
        if self.history:
            last_reward = self.history[-1][1]
            # below its best: a judge level with it (at its ceiling, on a plateau) shows no harm
            self.streak = self.streak + 1 if (reward > last_reward and judge < self.best_judge) else 0
        self.history.append((step, reward, judge))
        if judge > self.best_judge:
            self.best_step, self.best_judge = step, judge
        if self.streak >= self.patience and self.tripped_at is None:
            self.tripped_at = step
            return True
        return False

    def observe_final(self, step: int, reward: float, judge: float) -> bool:
        """Record the final evaluation (:meth:`observe`); it also trips the watchdog when the
        judge rates the final policy below the first evaluation's (the SFT policy's)."""
        if self.observe(step, reward, judge):
            return True
        if self.tripped_at is None and self.history and judge < self.history[0][2]:
            self.tripped_at, self.below_sft = step, True
            return True
        return False

    def reason(self) -> str:
        """Why it tripped, for the console ("" when it did not)."""
        if self.tripped_at is None:
            return ""
        if self.below_sft:
            return f"the judge rated the final policy below the SFT policy ({self.history[-1][2]:.4g} < " \
                   f"{self.history[0][2]:.4g})"
        return (f"the training reward rose while the judge stayed below its best for {self.patience} "
                f"evaluation(s) in a row (update {self.tripped_at})")

    def is_new_best(self, step: int) -> bool:
        """Whether the evaluation just observed at ``step`` is the best by the judge so far."""
        return self.best_step == step

    def summary(self) -> dict:
        """``watchdog/*`` numbers for the metrics and the summary (steps as floats)."""
        out = {"watchdog/evaluations": float(len(self.history)), "watchdog/tripped": float(self.tripped_at is not None)}
        if self.tripped_at is not None:
            out["watchdog/tripped_step"] = float(self.tripped_at)
            out["watchdog/below_sft"] = float(self.below_sft)
        if self.best_step is not None:
            out["watchdog/best_step"] = float(self.best_step)
            out["watchdog/best_judge"] = self.best_judge
        return out


# The PPO stage's use of the watchdog (rlhf/stages/ppo.py)

def watchdog_judge(cfg: PPOConfig, gold_fn: Callable[[str, str], float] | None,
                   s: PPOSetup | None = None) -> Callable | str | PairJudge | None:
    """The watchdog's judge: a batch function ``(prompts, completions, metadata) -> floats``
    (``ppo.watchdog_judge``), ``"gold"`` (the task's objective, which the evaluation already
    computes, unless it is a training reward: ``{fn: task}``), a :class:`rlhf.judge.PairJudge`
    (``watchdog_judge: pairs``, or the default without the two others: the reward model's
    held-out pairs, encoded with ``s``'s tokenizer), or None when the watchdog is off or no
    held-out judge exists.

    Raises:
        ConfigError: ``ppo.watchdog: on`` without a judge; ``watchdog_judge: pairs`` without pairs.
    """
    from rlhf.reward_sources import load_function, parse_reward_sources

    if cfg.watchdog == "off":
        return None
    if cfg.watchdog_judge == "pairs":
        judge = _pair_judge(cfg, s)
        if judge is None:
            raise ConfigError(f"ppo.watchdog_judge: pairs, but the reward adapter ({cfg.reward_adapter or 'none'}) "
                              "records no held-out pairs of a data-store version (or the model is sharded)")
        return judge
    if cfg.watchdog_judge:
        return load_function(cfg.watchdog_judge, "ppo.watchdog_judge")
    task_trains = any(src.kind == "fn" and src.target == "task" for src in parse_reward_sources(cfg.rewards))
    if gold_fn is not None and not task_trains:
        return "gold"
    judge = _pair_judge(cfg, s)
    if judge is not None:
        return judge
    if cfg.watchdog == "on":
        raise ConfigError("ppo.watchdog: on, but there is no held-out judge (no task objective outside the training "
                          "rewards, no ppo.watchdog_judge, no held-out pairs of the reward model)")
    return None


def _pair_judge(cfg: PPOConfig, s: PPOSetup | None) -> PairJudge | None:
    """The held-out pairs judge, or None without a reward model's pairs (or under FSDP, whose
    forwards every rank must join while rank 0 evaluates alone)."""
    from rlhf.fsdp import is_sharded
    from rlhf.judge import PairJudge, heldout_pairs
    from rlhf.reward_sources import uses_reward_model

    if s is None or not uses_reward_model(cfg) or is_sharded(s.model):
        return None
    pairs = heldout_pairs(cfg.reward_adapter, cfg.judge_max_pairs)
    if not pairs:
        return None
    return PairJudge.build(s.tok, pairs, cfg.max_prompt_length, cfg.response_length, cfg.temperature, s.device,
                           chunk=cfg.per_device_train_batch_size * 2)


def watch_metrics(s: PPOSetup, cfg: PPOConfig, rows: list[dict], judge: Callable | str) -> dict:
    """``watchdog/reward`` (the training reward: ``ppo.rewards``, weighted) and
    ``watchdog/judge`` (:func:`watchdog_judge`), each the mean over the evaluation ``rows``
    (the pairs judge: its agreement, with its ``judge/*`` numbers beside it)."""
    from rlhf.judge import PairJudge
    from rlhf.reward_sources import RewardSource, call_source

    if not rows:
        return {}
    texts, completions = [r["prompt"] for r in rows], [r["completion"] for r in rows]
    metadata = [{**d, "messages": m, "truncated": not r["stopped"]}
                for m, d, r in zip(s.eval_prompts, s.eval_metadata, rows)]
    if s.sources:
        reward = [0.0] * len(rows)
        for src, fn in s.sources:
            raw = [r["score"] for r in rows] if src.kind == "rm" else call_source(src, fn, texts, completions, metadata)
            reward = [a + src.weight * b for a, b in zip(reward, raw)]
    else:  # the reward model alone
        reward = [r["score"] for r in rows]
    extra = {}
    if judge == "gold":
        judged = [r["gold"] for r in rows]
    elif isinstance(judge, PairJudge):  # scores the policy on the held-out pairs, not the rows
        extra = judge(s.model)
        judged = [extra["judge/pairs_agreement"]]
    else:
        judged = call_source(RewardSource("fn", cfg.watchdog_judge, name="judge"), judge, texts, completions, metadata)
    return {"watchdog/reward": sum(reward) / len(reward), "watchdog/judge": sum(judged) / len(judged), **extra}


def _watch(watchdog: Watchdog, ev: dict, step: int, opt: Optimization, best_weights: list,
           final: bool = False) -> bool:
    """Feed one evaluation to the watchdog (``final``: the run's last, :meth:`Watchdog.observe_final`);
    keep a copy of the trainable roles when the judge likes it best so far; True when the
    watchdog trips."""
    if "watchdog/reward" not in ev:
        return False
    observe = watchdog.observe_final if final else watchdog.observe
    tripped = observe(step, ev["watchdog/reward"], ev["watchdog/judge"])
    if watchdog.is_new_best(step):
        best_weights[:] = [p.detach().clone() for p in opt.params]
    return tripped


def _restore(opt: Optimization, best_weights: list) -> None:
    """Put the trainable roles back to the copy :func:`_watch` kept."""
    import torch

    with torch.no_grad():
        for p, best in zip(opt.params, best_weights):
            p.copy_(best)
