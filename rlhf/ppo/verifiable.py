"""Pieces of the objectives used with verifiable rewards (DAPO, arXiv 2503.14476).

A verifiable reward (a checked answer, a format, unit tests) is often the same for every
sample of a prompt, and it says nothing about a response cut off at the length limit.
These functions shape and select for that; the clipping side (``clip_high``, GSPO's
sequence ratio) is in :func:`rlhf.ppo.policy_loss`. Shapes: ``B`` responses, ``T`` tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["informative_groups", "overlong_penalty", "truncated_loss_mask"]


def overlong_penalty(lengths: Tensor, max_length: int, buffer: int, penalty: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment: a length penalty (B,) to add to the scores.

    0 up to ``max_length - buffer`` tokens, then falling linearly to ``-penalty`` at
    ``max_length`` (the generation limit, where a response is cut off):
    ``-penalty * clamp((len - (max_length - buffer)) / buffer, 0, 1)``. The ramp tells the
    policy that it is getting close to the limit before it is truncated.

    Args:
        lengths: (B,) response lengths in tokens (real tokens, stop token included).
        max_length: the configured maximum response length.
        buffer: length of the ramp, ``1 <= buffer <= max_length``.
        penalty: the penalty at ``max_length``.

    Returns:
        (B,) values in ``[-penalty, 0]``, in the dtype of ``lengths`` as float.
    """
    if not 1 <= buffer <= max_length:
        raise ValueError(f"overlong buffer must be in [1, max_length={max_length}], got {buffer}")
    excess = (lengths.float() - (max_length - buffer)) / buffer
    return -penalty * excess.clamp(0.0, 1.0)


def truncated_loss_mask(mask: Tensor, has_stop: Tensor) -> Tensor:
    """The loss mask (B, T) with responses that never stopped taken out (DAPO's overlong
    filtering): a cut-off response's reward judges a text the policy did not finish, so
    its tokens give no gradient and do not count in the loss normalisation.

    Args:
        mask: (B, T) 1 on real response tokens.
        has_stop: (B,) bool, whether the response ended with a stop token.
    """
    return mask * has_stop.to(mask.dtype)[:, None]


def informative_groups(scores: Tensor, group_ids: Tensor) -> Tensor:
    """(B,) bool: True for the rows of groups whose scores are not all equal.

    A group (the samples of one prompt) whose rewards are all equal has group-relative
    advantages of exactly 0: it adds no policy gradient, only noise to the batch statistics.
    DAPO's dynamic sampling drops such groups and samples more prompts to fill the batch.

    Args:
        scores: (B,) sequence rewards.
        group_ids: (B,) the prompt each row came from; any values, in any order.
    """
    if scores.dim() != 1 or group_ids.shape != scores.shape:
        raise ValueError(f"scores and group_ids must both be (batch,); got {tuple(scores.shape)} "
                         f"and {tuple(group_ids.shape)}")
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n = int(inverse.max()) + 1 if inverse.numel() else 0
    empty = torch.zeros(n, dtype=scores.dtype, device=scores.device)
    high = empty.scatter_reduce(0, inverse, scores, "amax", include_self=False)
    low = empty.scatter_reduce(0, inverse, scores, "amin", include_self=False)
    return (high != low)[inverse]
