"""The train/inference mismatch: the sampler's logprobs against the trainer's.

An engine that samples with other kernels than the trainer's forward (vLLM above all, but
also a bf16 KV cache or a merged copy of the weights) draws tokens from a slightly
different distribution than the one PPO's ratio assumes. The rollout keeps the sampler's
logprobs of the tokens it drew; the trainer recomputes its own (the "old" logprobs of the
update). Their gap is logged at every rollout, and can be corrected by truncated
importance sampling (Yao et al., "Your efficient RL framework secretly brings you off-policy
RL training", 2025; TRL's ``vllm_importance_sampling_cap``, veRL's ``rollout_is``): each
token's policy loss is weighted by ``min(pi_train / pi_sampler, cap)``, computed once per
rollout, without gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["logprob_diff_stats", "truncated_is_weights"]


def logprob_diff_stats(trainer_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and max of ``|trainer - sampler|`` over the real response tokens.

    Args:
        trainer_logprobs: ``(batch, response_len)`` logprobs of the sampled tokens under the
            trainer's forward (the update's old logprobs).
        sampler_logprobs: ``(batch, response_len)`` the sampling engine's logprobs of the same tokens.
        mask: ``(batch, response_len)``, 1 on real tokens, 0 on padding.

    Returns:
        ``(mean, max)``, 0-d tensors; both 0 when the mask is empty.
    """
    real = mask.bool()
    diff = (trainer_logprobs.float() - sampler_logprobs.float()).abs()[real]
    if diff.numel() == 0:
        zero = torch.zeros((), device=diff.device)
        return zero, zero
    return diff.mean(), diff.max()


def truncated_is_weights(trainer_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, cap: float) -> Tensor:
    """Per-token truncated importance weights ``min(exp(trainer - sampler), cap)``.

    The samples came from the sampler's distribution ``pi_sampler``, while the PPO ratio is
    taken against the trainer's ``pi_train`` (the old logprobs); weighting each token's policy
    loss by ``pi_train / pi_sampler`` makes the update on-policy for ``pi_train`` again, and the
    cap bounds the variance of rare tokens the sampler under-weighted.

    Args:
        trainer_logprobs: ``(batch, response_len)`` the trainer's logprobs of the sampled tokens.
        sampler_logprobs: ``(batch, response_len)`` the sampler's logprobs of the same tokens.
        mask: ``(batch, response_len)``, 1 on real tokens; padding gets weight 0.
        cap: upper bound of a weight (> 0).

    Returns:
        ``(batch, response_len)`` float weights, detached.
    """
    if not cap > 0:
        raise ValueError(f"truncated_is_weights: cap must be positive, got {cap}")
    log_ratio = (trainer_logprobs.detach().float() - sampler_logprobs.detach().float())
    weights = torch.exp(log_ratio).clamp(max=cap)
    return torch.where(mask.bool(), weights, torch.zeros_like(weights))
