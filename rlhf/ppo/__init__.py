"""Pure tensor functions of PPO for RLHF: advantages, KL, whitening, losses.

No I/O and no model code: everything here maps tensors to tensors, so each
piece is unit-tested against hand-worked numbers (tests/unit/ppo) and the PPO
loop in ``rlhf/stages/ppo.py`` reads as a sequence of these calls. Shapes use
``batch`` (B) and ``response_len`` (T); ``mask`` is 1 on real response tokens
(up to and including the stop token) and 0 on the padding after it.
"""

from rlhf.ppo.advantages import compute_gae, grpo_advantages, reinforce_pp_returns, rloo_advantages
from rlhf.ppo.batching import ppo_minibatch_indices
from rlhf.ppo.kl import AdaptiveKLController, FixedKLController, kl_penalty, kl_per_unit
from rlhf.ppo.logits import LogitTransform, entropy_from_logits, head_logprobs, logprobs_from_logits
from rlhf.ppo.losses import aggregation_weights, policy_loss, value_loss
from rlhf.ppo.mismatch import logprob_diff_stats, truncated_is_weights
from rlhf.ppo.masked import masked_mean, masked_sum, masked_var, masked_whiten
from rlhf.ppo.rewards import (
    apply_missing_stop_penalty,
    ensemble_score,
    first_stop_truncate,
    last_token_index,
    per_token_rewards,
)
from rlhf.ppo.verifiable import informative_groups, overlong_penalty, truncated_loss_mask

__all__ = [
    "aggregation_weights",
    "AdaptiveKLController",
    "FixedKLController",
    "LogitTransform",
    "apply_missing_stop_penalty",
    "compute_gae",
    "grpo_advantages",
    "ensemble_score",
    "entropy_from_logits",
    "first_stop_truncate",
    "head_logprobs",
    "informative_groups",
    "kl_penalty",
    "kl_per_unit",
    "last_token_index",
    "logprob_diff_stats",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "overlong_penalty",
    "per_token_rewards",
    "policy_loss",
    "ppo_minibatch_indices",
    "reinforce_pp_returns",
    "rloo_advantages",
    "truncated_is_weights",
    "truncated_loss_mask",
    "value_loss",
]
