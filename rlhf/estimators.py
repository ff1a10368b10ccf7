"""Advantage estimators by name: ``ppo.advantage_estimator`` picks one row of :data:`ESTIMATORS`.

Each row is a plain function from the scored rollout to ``(advantages, returns)`` plus what
the rest of the stage needs to know about it (veRL keeps its estimators the same way):

  * ``needs_critic``: a value role is loaded, scored and trained (only GAE);
  * ``needs_groups``: the baseline is the other samples of the same prompt, so the
    rollout samples ``ppo.num_generations >= 2`` responses per prompt;
  * ``kl_in_reward``: where the KL penalty goes by default (``ppo.kl_in_reward: null``):
    into the reward, or (GRPO) a loss term of the policy;
  * ``whiten``: the advantages are whitened over the whole rollout batch afterwards.

The KL coefficient is applied in one place per form: per token in
:func:`rlhf.ppo.per_token_rewards` (GAE, REINFORCE++), per sequence in :func:`sequence_rewards`
(RLOO, GRPO). A new estimator is one function here and one row in :data:`ESTIMATORS`.

The tensor math itself lives in :mod:`rlhf.ppo.advantages` (pure functions with hand-worked
tests); this module imports it only when an estimator runs, so the config can read the
table without loading torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

    from rlhf.config import PPOConfig
    from rlhf.ppo.masked import AllReduce
    from rlhf.ppo.rollout import ScoredRollout


@dataclass(frozen=True)
class EstimatorInput:
    """What every estimator may read; shapes are (B,) per response and (B, T) per token."""

    rewards: Tensor  # (B, T) per-token rewards: the score on the last real token, minus beta * KL when in the reward
    values: Tensor  # (B, T) the critic's values (zeros without a critic)
    mask: Tensor  # (B, T) 1 on real response tokens
    scores: Tensor  # (B,) reward-model scores after the missing-stop penalty and clipping
    kl: Tensor  # (B, T) per-token KL to the reference (0 on padding)
    kl_coef: float  # beta this update
    group_ids: Tensor | None  # (B,) the prompt each response came from (None: one sample per prompt)


def sequence_rewards(x: EstimatorInput, cfg: PPOConfig) -> Tensor:
    """(B,) sequence reward of the critic-free group estimators: the score, minus
    ``beta * sum_t KL_t`` when the KL is in the reward (otherwise the KL is a loss term)."""
    return x.scores - (x.kl_coef * (x.kl * x.mask).sum(1) if cfg.kl_in_reward else 0.0)


def gae(x: EstimatorInput, cfg: PPOConfig) -> tuple[Tensor, Tensor]:
    """GAE over the critic's values (Schulman et al. 2016); returns are the value targets."""
    from rlhf.ppo import compute_gae

    return compute_gae(x.rewards, x.values, x.mask, cfg.gamma, cfg.lam)


def reinforce_pp(x: EstimatorInput, cfg: PPOConfig) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (arXiv 2501.03262): the discounted reward-to-go, whitened over the batch."""
    from rlhf.ppo import reinforce_pp_returns

    returns = reinforce_pp_returns(x.rewards, x.mask, cfg.gamma)
    return returns, returns


def rloo(x: EstimatorInput, cfg: PPOConfig) -> tuple[Tensor, Tensor]:
    """RLOO (arXiv 2402.14740): the leave-one-out baseline over each prompt's samples, on
    every token of the response. Not whitened unless ``ppo.whiten_advantages: true``: each
    group's advantages sum to zero, which whitening over tokens would undo."""
    from rlhf.ppo import rloo_advantages

    adv = rloo_advantages(sequence_rewards(x, cfg), x.group_ids)[:, None].expand_as(x.mask).contiguous()
    return adv, adv


def grpo(x: EstimatorInput, cfg: PPOConfig) -> tuple[Tensor, Tensor]:
    """GRPO (arXiv 2402.03300; Dr. GRPO with ``grpo_scale_by_std: false``): group-relative
    advantages on every token of the response. Not whitened again: they are normalised within
    each group, and whitening over the batch would bring back the std division Dr. GRPO leaves out."""
    from rlhf.ppo import grpo_advantages

    adv = grpo_advantages(sequence_rewards(x, cfg), x.group_ids, scale_by_std=cfg.grpo_scale_by_std)[:, None] * x.mask
    return adv, adv


@dataclass(frozen=True)
class Estimator:
    """One row of :data:`ESTIMATORS`."""

    fn: Callable[[EstimatorInput, PPOConfig], tuple[Tensor, Tensor]]  # -> advantages (B, T), returns (B, T)
    needs_critic: bool = False
    needs_groups: bool = False
    kl_in_reward: bool = True  # the default of ppo.kl_in_reward
    whiten: bool = True


ESTIMATORS: dict[str, Estimator] = {
    "gae": Estimator(gae, needs_critic=True),
    "reinforce++": Estimator(reinforce_pp),
    "rloo": Estimator(rloo, needs_groups=True, whiten=False),
    "grpo": Estimator(grpo, needs_groups=True, kl_in_reward=False, whiten=False),
}


def uses_critic(cfg: PPOConfig) -> bool:
    """Whether the run has a value role (the estimator needs a critic)."""
    return ESTIMATORS[cfg.advantage_estimator].needs_critic


def advantages_and_returns(batch: ScoredRollout, rewards: Tensor, scores: Tensor, kl: Tensor, cfg: PPOConfig,
                           kl_coef: float, group_ids: Tensor | None,
                           all_reduce: AllReduce | None = None) -> tuple[Tensor, Tensor]:
    """Advantages (B, T) (0 on padding) and returns (B, T) of ``cfg.advantage_estimator``.

    ``group_ids`` (B,) names each row's prompt (needed by the group estimators);
    ``all_reduce`` (several processes) makes advantage whitening use global statistics.
    """
    from rlhf.ppo import masked_whiten

    est = ESTIMATORS[cfg.advantage_estimator]
    if est.needs_groups and group_ids is None:
        raise ValueError(f"advantage estimator {cfg.advantage_estimator} needs group_ids (several samples per prompt)")
    mask = batch.response_mask
    adv, returns = est.fn(EstimatorInput(rewards, batch.values, mask, scores, kl, kl_coef, group_ids), cfg)
    if est.whiten if cfg.whiten_advantages is None else cfg.whiten_advantages:
        adv = masked_whiten(adv, mask, all_reduce=all_reduce) * mask
    return adv, returns
