"""Minibatch index plans for the PPO update epochs."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ppo_minibatch_indices"]


def ppo_minibatch_indices(
    batch_size: int, num_minibatches: int, generator: torch.Generator | None = None, group_size: int = 1
) -> list[Tensor]:
    """Shuffle the rollout once and split it into equal minibatches.

    Call once per PPO epoch. Equal sizes keep every optimizer step's gradient
    on the same number of episodes, so "steps per rollout = epochs x
    minibatches" holds exactly; an uneven last minibatch
    would be a noisier, differently scaled step.

    With ``group_size`` k > 1 the rows come in groups of k adjacent rows (the samples of
    one prompt): the groups are shuffled, never split, so every minibatch holds whole
    groups and each optimizer step sees a prompt's samples together.

    Args:
        batch_size: number of episodes in the rollout batch.
        num_minibatches: minibatches per epoch; must divide ``batch_size``.
        generator: a seeded ``torch.Generator`` so that resumed runs replay
            the same order; None uses the global RNG.
        group_size: rows per group; must divide the minibatch size.

    Returns:
        ``num_minibatches`` LongTensors of shape ``(batch_size // num_minibatches,)``,
        disjoint, together a permutation of ``range(batch_size)``.

    Raises:
        ValueError: if either count is not positive or ``batch_size`` is not
            divisible by ``num_minibatches``.
    """
    if batch_size < 1 or num_minibatches < 1:
        raise ValueError(
            f"batch_size ({batch_size}) and num_minibatches ({num_minibatches}) must be >= 1"
        )
    if batch_size % num_minibatches:
        raise ValueError(
            f"batch_size {batch_size} is not divisible by num_minibatches {num_minibatches}; "
            f"choose a batch size that is a multiple of it"
        )
    if group_size < 1 or (batch_size // num_minibatches) % group_size:
        raise ValueError(f"group_size {group_size} must be >= 1 and divide the minibatch size "
                         f"{batch_size // num_minibatches}")
    device = generator.device if generator is not None else "cpu"
    groups = torch.randperm(batch_size // group_size, generator=generator, device=device)
    permutation = (groups[:, None] * group_size + torch.arange(group_size, device=device)).reshape(-1)
    return list(permutation.view(num_minibatches, -1).unbind(0))
