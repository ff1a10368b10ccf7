"""Advantage estimators: GAE (with a critic) and three critic-free options.

All per-token inputs are ``(batch, response_len)`` with a binary ``mask`` that
is 1 on real response tokens (up to and including the stop token) and 0 on the
padding after it. Padding positions come out as 0 and, because they are
selected away with ``torch.where`` before any arithmetic, never influence real
positions, whatever junk they hold.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["compute_gae", "grpo_advantages", "reinforce_pp_returns", "rloo_advantages"]


def _check_per_token(name: str, x: Tensor, mask: Tensor) -> None:
    if x.dim() != 2 or x.shape != mask.shape:
        raise ValueError(
            f"{name} must be (batch, response_len) and match mask; "
            f"got {name} {tuple(x.shape)} and mask {tuple(mask.shape)}"
        )


def compute_gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over response tokens.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and
    ``A_t = delta_t + gamma * lam * A_{t+1}``, where ``V_{t+1}`` and ``A_{t+1}``
    are taken as 0 past the last real token: the episode ends at the stop
    token, so there is nothing to bootstrap from (the value at a pad position
    is meaningless and must not be used).

    Args:
        rewards: per-token rewards ``(batch, response_len)``; typically
            ``-beta * KL_t`` plus the score on the last real token.
        values: critic values ``(batch, response_len)``.
        mask: ``(batch, response_len)``, 1 on real tokens, 0 on padding.
        gamma: discount; 1.0 in the references for RLHF.
        lam: GAE lambda; 0.95 in the references.

    Returns:
        ``(advantages, returns)``, each ``(batch, response_len)``, with
        ``returns = advantages + values`` on real tokens (the critic's regression
        target) and 0 on padding.
    """
    _check_per_token("rewards", rewards, mask)
    _check_per_token("values", values, mask)
    real = mask.bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    rewards = torch.where(real, rewards, zero)
    values = torch.where(real, values, zero)
    real_f = real.to(values.dtype)

    response_len = rewards.shape[1]
    advantages_reversed = []
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    # A Python loop over time: T is the response length (hundreds at most) and
    # each step is a (batch,) vector op, so this is cheap next to the forward
    # passes; a closed-form cumulative product would lose precision for long T.
    for t in reversed(range(response_len)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = (delta + gamma * lam * next_advantage) * real_f[:, t]
        advantages_reversed.append(advantage)
        # Carry only real positions backwards: a pad at t contributes 0 to t-1,
        # which is exactly "bootstrap with 0 past the last real token".
        next_value = values[:, t]
        next_advantage = advantage
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = torch.where(real, advantages + values, zero)
    return advantages, returns


def reinforce_pp_returns(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Discounted reward-to-go, the REINFORCE++ advantage before whitening.

    REINFORCE++ (Hu 2025, arXiv 2501.03262) drops the critic: the advantage of
    token t is the discounted sum of the per-token rewards from t to the end of
    the response (the KL penalties plus the score at the last real token), and
    the caller then whitens it over the whole batch with
    :func:`rlhf.ppo.masked_whiten`. This is GAE with ``V = 0`` and ``lambda = 1``.

    Args:
        rewards: per-token rewards ``(batch, response_len)``.
        mask: ``(batch, response_len)``, 1 on real tokens, 0 on padding.
        gamma: discount; 1.0 by default.

    Returns:
        ``(batch, response_len)`` returns, 0 on padding.
    """
    _check_per_token("rewards", rewards, mask)
    real = mask.bool()
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    rewards = torch.where(real, rewards, zero)
    real_f = real.to(rewards.dtype)
    running = torch.zeros_like(rewards[:, 0])
    reversed_returns = []
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * real_f[:, t]
        reversed_returns.append(running)
    return torch.stack(reversed_returns[::-1], dim=1)


def rloo_advantages(scores: Tensor, group_ids: Tensor) -> Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024, arXiv 2402.14740).

    Each prompt is sampled k times; the baseline for sample i is the mean score
    of the other k - 1 samples of the same prompt, so
    ``A_i = s_i - (sum_group - s_i) / (k - 1)``. The baseline does not depend on
    the sample itself, so the estimator stays unbiased without a critic.

    A group of size 1 has no other sample to compare with; its advantage is 0
    (it contributes no gradient) rather than the raw score, which would
    reintroduce the variance the baseline is there to remove.

    Args:
        scores: sequence-level scores ``(batch,)`` (reward minus any
            sequence-level KL penalty, as the caller chooses).
        group_ids: ``(batch,)`` integer id of the prompt each sample came from;
            any values, in any order.

    Returns:
        ``(batch,)`` advantages in the dtype of ``scores``.
    """
    if scores.dim() != 1 or group_ids.shape != scores.shape:
        raise ValueError(
            f"scores and group_ids must both be (batch,); got {tuple(scores.shape)} "
            f"and {tuple(group_ids.shape)}"
        )
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max().item()) + 1 if inverse.numel() else 0
    group_sum = torch.zeros(num_groups, dtype=scores.dtype, device=scores.device)
    group_sum = group_sum.index_add(0, inverse, scores)
    group_count = torch.zeros(num_groups, dtype=scores.dtype, device=scores.device)
    group_count = group_count.index_add(0, inverse, torch.ones_like(scores))
    k = group_count[inverse]
    others_mean = (group_sum[inverse] - scores) / (k - 1).clamp(min=1)
    return torch.where(k > 1, scores - others_mean, torch.zeros_like(scores))


def _group_index(scores: Tensor, group_ids: Tensor) -> tuple[Tensor, int]:
    if scores.dim() != 1 or group_ids.shape != scores.shape:
        raise ValueError(
            f"scores and group_ids must both be (batch,); got {tuple(scores.shape)} "
            f"and {tuple(group_ids.shape)}"
        )
    _, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, int(inverse.max().item()) + 1 if inverse.numel() else 0


def grpo_advantages(scores: Tensor, group_ids: Tensor, scale_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """Group-relative advantages of GRPO (Shao et al. 2024, arXiv 2402.03300).

    Each prompt is sampled k times; ``A_i = (s_i - mean_group) / (std_group + eps)``
    with the unbiased (k - 1) standard deviation, as in the paper's and TRL's
    implementations. With ``scale_by_std=False`` (Dr. GRPO, Liu et al. 2025,
    arXiv 2503.20783) the advantage is just ``s_i - mean_group``: dividing by the
    std up-weights prompts whose samples all score alike (too easy or too hard).

    A group whose scores are all equal carries no signal: its advantages are
    exactly 0 (they are set to 0 before any division, so no 0/0), and a group of
    size 1 is such a group.

    Args:
        scores: sequence-level scores ``(batch,)``.
        group_ids: ``(batch,)`` integer id of the prompt each sample came from;
            any values, in any order.
        scale_by_std: divide by the group std (GRPO) or not (Dr. GRPO).
        eps: added to the std so a nearly constant group stays finite.

    Returns:
        ``(batch,)`` advantages in the dtype of ``scores``; the caller broadcasts
        them over every token of the response.
    """
    inverse, num_groups = _group_index(scores, group_ids)
    zeros = torch.zeros(num_groups, dtype=scores.dtype, device=scores.device)
    count = zeros.index_add(0, inverse, torch.ones_like(scores))
    mean = zeros.index_add(0, inverse, scores) / count
    # sum / k need not give back the common value of a constant group exactly (0.1 * 3 / 3
    # is 0.10000000000000002), so constant groups are found by max == min and zeroed
    high = zeros.scatter_reduce(0, inverse, scores, "amax", include_self=False)
    low = zeros.scatter_reduce(0, inverse, scores, "amin", include_self=False)
    constant = (high == low)[inverse]
    centred = torch.where(constant, torch.zeros_like(scores), scores - mean[inverse])
    if not scale_by_std:
        return centred
    k = count[inverse]
    var = zeros.index_add(0, inverse, centred.square())[inverse] / (k - 1).clamp(min=1)
    return centred / (var.sqrt() + eps)
