"""From sampled responses to per-token rewards: truncation, score placement, penalties."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "first_stop_truncate",
    "last_token_index",
    "per_token_rewards",
    "apply_missing_stop_penalty",
    "ensemble_score",
]

_PENALTY_MODES = ("none", "replace", "subtract")


def first_stop_truncate(
    response_ids: Tensor, stop_token_id: int | Sequence[int], pad_token_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Keep each response up to and including its first stop token; pad the rest.

    The mask is built from the position of the stop token, never from
    ``ids != pad_token_id``: the pad id can be a real vocabulary token the
    policy samples (or equal the stop id), and a pad-based mask would then
    drop real tokens or keep junk (N+ paper, arXiv 2403.17031, on truncation).

    Args:
        response_ids: sampled response tokens ``(batch, response_len)``, without
            the query.
        stop_token_id: the token that ends a response (usually EOS), or several (Qwen2.5
            ships two EOS ids); a response ends at the first of any of them.
        pad_token_id: written into every position after the first stop token.

    Returns:
        ``(ids, mask, has_stop)``:
        ``ids`` ``(batch, response_len)`` truncated copy;
        ``mask`` ``(batch, response_len)`` bool, True up to and including the
        first stop token, all True for a row with no stop token (the response
        ran to the length limit, every token is real);
        ``has_stop`` ``(batch,)`` bool, whether the row contains a stop token.
    """
    if response_ids.dim() != 2:
        raise ValueError(f"response_ids must be (batch, response_len), got {tuple(response_ids.shape)}")
    stop_ids = [stop_token_id] if isinstance(stop_token_id, int) else list(stop_token_id)
    is_stop = torch.isin(response_ids, torch.tensor(stop_ids, dtype=response_ids.dtype, device=response_ids.device))
    has_stop = is_stop.any(dim=1)
    response_len = response_ids.shape[1]
    # argmax returns the first maximal index, i.e. the first stop token; rows
    # without one get the last index so that every position stays real.
    first_stop = torch.where(
        has_stop,
        is_stop.int().argmax(dim=1),
        torch.full_like(has_stop, response_len - 1, dtype=torch.long),
    )
    positions = torch.arange(response_len, device=response_ids.device)
    mask = positions.unsqueeze(0) <= first_stop.unsqueeze(1)
    ids = torch.where(mask, response_ids, torch.full_like(response_ids, pad_token_id))
    return ids, mask, has_stop


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last real token of each row.

    Args:
        mask: ``(batch, response_len)``, 1/True on real tokens.

    Returns:
        ``(batch,)`` LongTensor. A row with no real token gets 0 (an index that
        is always valid); callers that can meet empty rows must check
        ``mask.any(dim=1)`` themselves. After :func:`first_stop_truncate` every
        row has at least one real token.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be (batch, response_len), got {tuple(mask.shape)}")
    positions = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).amax(dim=1)


def per_token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float | Tensor) -> Tensor:
    """Per-token reward: ``-kl_coef * kl`` on real tokens plus the score at the last one.

    The score lands on the last real token (the stop token), not on the pad
    after it: TRL up to 1.12 put it one position late for truncated responses
    (huggingface/trl issues 1893 and 3750), which hands the reward to a token
    the policy never chose.

    Args:
        scores: sequence-level reward-model scores ``(batch,)``, after any
            missing-stop penalty.
        kl: per-token KL estimates ``(batch, response_len)``.
        mask: ``(batch, response_len)``, 1 on real tokens, 0 on padding.
        kl_coef: beta, a float or a 0-dim tensor.

    Returns:
        ``(batch, response_len)`` rewards, 0 on padding, in the dtype of ``kl``.

    Raises:
        ValueError: if a row has no real token (its score would have nowhere
            to go).
    """
    if kl.dim() != 2 or kl.shape != mask.shape or scores.shape != kl.shape[:1]:
        raise ValueError(
            f"expected scores (batch,), kl and mask (batch, response_len); got scores "
            f"{tuple(scores.shape)}, kl {tuple(kl.shape)}, mask {tuple(mask.shape)}"
        )
    real = mask.bool()
    empty_rows = (~real.any(dim=1)).nonzero().flatten()
    if empty_rows.numel():
        raise ValueError(f"rows {empty_rows.tolist()} have no real response token")
    rewards = torch.where(real, -kl_coef * kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    last = last_token_index(real)
    rows = torch.arange(kl.shape[0], device=kl.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards


def apply_missing_stop_penalty(scores: Tensor, has_stop: Tensor, mode: str, value: float) -> Tensor:
    """Penalise responses that never produced the stop token.

    A response cut off at the length limit is usually unfinished, and a
    reward model may still score it well; the N+ paper (arXiv 2403.17031)
    replaces such scores with a fixed -1.

    Args:
        scores: reward-model scores ``(batch,)``.
        has_stop: ``(batch,)`` bool from :func:`first_stop_truncate`.
        mode: ``"none"`` (scores unchanged), ``"replace"`` (score := value)
            or ``"subtract"`` (score := score - value).
        value: the replacement score or the amount subtracted.

    Returns:
        ``(batch,)`` new scores; ``scores`` itself is not modified.
    """
    if scores.shape != has_stop.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and has_stop {tuple(has_stop.shape)} differ")
    has_stop = has_stop.bool()
    if mode == "none":
        return scores.clone()
    if mode == "replace":
        return torch.where(has_stop, scores, torch.full_like(scores, value))
    if mode == "subtract":
        return torch.where(has_stop, scores, scores - value)
    raise ValueError(f"missing-stop penalty mode must be one of {_PENALTY_MODES}, got {mode!r}")


def ensemble_score(member_scores: Tensor, k: float) -> Tensor:
    """The score of a reward-model ensemble: the members' mean minus ``k`` times their
    standard deviation, so that a response the members disagree on earns less (the
    uncertainty penalty of Coste et al. 2023, arXiv 2310.02743, and Eisenstein et al. 2023,
    arXiv 2312.09244, with the standard deviation as the disagreement).

    Args:
        member_scores: ``(batch, members)`` each member's score of each response.
        k: the weight of the disagreement (0: the plain mean).

    Returns:
        ``(batch,)``. The standard deviation is the population one (divided by the number of
        members), so one member's ensemble score is exactly its score.
    """
    if member_scores.shape[1] == 1:
        return member_scores[:, 0]
    return member_scores.mean(1) - k * member_scores.std(1, unbiased=False)
