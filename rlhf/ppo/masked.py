"""Reductions and whitening over the real (unmasked) tokens of a padded batch.

Every function here selects with ``torch.where`` instead of multiplying by the
mask, so junk in padding positions (including ``inf`` or ``nan`` from a model
that never saw those positions) cannot leak into the result or its gradient:
``nan * 0`` is ``nan``, while ``where(mask, nan, 0)`` is ``0``.

The mask is binary (bool, or float/int holding 0 and 1); it is not a weight.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["masked_sum", "masked_mean", "masked_var", "masked_whiten"]


def _select(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` on real positions, 0 elsewhere (gradient 0 on padding)."""
    if mask.shape != x.shape:
        mask = mask.expand_as(x)
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over the positions where ``mask`` is set.

    Args:
        x: values, e.g. ``(batch, response_len)``.
        mask: same shape as ``x`` (or broadcastable to it); 1/True on real tokens.
        dim: dimension to reduce; ``None`` reduces everything to a scalar.

    Returns:
        A scalar when ``dim`` is None, else ``x`` reduced over ``dim``
        (e.g. ``(batch,)`` for ``dim=1``).
    """
    selected = _select(x, mask)
    return selected.sum() if dim is None else selected.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is set.

    Args:
        x: values, e.g. ``(batch, response_len)``.
        mask: same shape as ``x``; 1/True on real tokens.
        dim: dimension to reduce; ``None`` averages over all real tokens of the
            batch (a token-level mean, not a mean of per-row means).

    Returns:
        A scalar when ``dim`` is None, else the per-slice means (e.g. ``(batch,)``).
        A slice with no real token gives ``nan`` (0 / 0): there is no mean of
        nothing, and a silent 0 would hide an empty response upstream.
    """
    count = _select(torch.ones_like(x), mask)
    if dim is None:
        return masked_sum(x, mask) / count.sum()
    return masked_sum(x, mask, dim=dim) / count.sum(dim=dim)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over all real tokens of the batch.

    Args:
        x: values, e.g. ``(batch, response_len)``.
        mask: same shape as ``x``; 1/True on real tokens.
        unbiased: apply Bessel's correction ``n / (n - 1)``. The N+ details
            paper (arXiv 2403.17031) and OpenAI's lm-human-preferences whiten
            with the unbiased estimate; ppo.md test 8 pins this choice.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: if the mask selects no token, or a single token with
            ``unbiased=True`` (the correction would divide by zero).
    """
    mean = masked_mean(x, mask)
    centered = x - mean
    var = masked_mean(centered * centered, mask)
    if unbiased:
        # One host sync per call; this runs once per rollout, not per token.
        n = int(mask.bool().expand_as(x).sum().item())
        if n < 2:
            raise ValueError(
                f"masked_var(unbiased=True) needs at least 2 real tokens, the mask selects {n}"
            )
        var = var * (n / (n - 1))
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise ``x`` to zero mean and unit variance over the real tokens.

    Statistics are taken over every real token of the whole batch (not per
    row), which is what the references do for advantages; padding values have
    no effect on them.

    Args:
        x: values, e.g. advantages ``(batch, response_len)``.
        mask: same shape as ``x``; 1/True on real tokens.
        shift_mean: when False the mean is added back, so only the scale
            changes. Used for reward whitening, where shifting the mean would
            change which responses are rewarded (N+ paper, detail on reward
            normalisation).
        eps: added to the variance before the square root.

    Returns:
        Tensor of the same shape as ``x``: whitened values on real tokens and 0
        on padding.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _select(whitened, mask)
