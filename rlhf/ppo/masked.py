"""Reductions and whitening over the real (unmasked) tokens of a padded batch.

Every function here selects with ``torch.where`` instead of multiplying by the
mask, so junk in padding positions (including ``inf`` or ``nan`` from a model
that never saw those positions) cannot leak into the result or its gradient:
``nan * 0`` is ``nan``, while ``where(mask, nan, 0)`` is ``0``.

The mask is binary (bool, or float/int holding 0 and 1); it is not a weight.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["masked_sum", "masked_mean", "masked_var", "masked_whiten"]

# Sums a tensor over every process and returns the result (``rlhf.distributed.all_reduce_sum``).
AllReduce = Callable[[Tensor], Tensor]


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


def _sum_and_count(x: Tensor, mask: Tensor, all_reduce: AllReduce | None) -> tuple[Tensor, Tensor]:
    """Sum of ``x`` over real tokens and their count (both scalars, in ``x``'s dtype),
    summed over every process by ``all_reduce`` when given (one collective for both)."""
    total, count = masked_sum(x, mask), _select(torch.ones_like(x), mask).sum()
    if all_reduce is not None:
        total, count = all_reduce(torch.stack([total, count])).unbind()
    return total, count


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None, all_reduce: AllReduce | None = None) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is set.

    Args:
        x: values, e.g. ``(batch, response_len)``.
        mask: same shape as ``x``; 1/True on real tokens.
        dim: dimension to reduce; ``None`` averages over all real tokens of the
            batch (a token-level mean, not a mean of per-row means).
        all_reduce: sums a tensor over processes (e.g. ``rlhf.distributed.all_reduce_sum``);
            with it, the mean covers the real tokens of every process's batch (``dim``
            must then be None). None: this batch only.

    Returns:
        A scalar when ``dim`` is None, else the per-slice means (e.g. ``(batch,)``).
        A slice with no real token gives ``nan`` (0 / 0): there is no mean of
        nothing, and a silent 0 would hide an empty response upstream.
    """
    if dim is None:
        total, count = _sum_and_count(x, mask, all_reduce)
        return total / count
    if all_reduce is not None:
        raise ValueError("masked_mean: all_reduce needs dim=None (a per-slice mean is local to a process)")
    count = _select(torch.ones_like(x), mask)
    return masked_sum(x, mask, dim=dim) / count.sum(dim=dim)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True, all_reduce: AllReduce | None = None) -> Tensor:
    """Variance of ``x`` over all real tokens of the batch.

    Two passes (the mean, then the mean squared deviation) rather than
    ``E[x^2] - E[x]^2``, which loses precision when the mean is large compared
    with the spread.

    Args:
        x: values, e.g. ``(batch, response_len)``.
        mask: same shape as ``x``; 1/True on real tokens.
        unbiased: apply Bessel's correction ``n / (n - 1)``. The N+ details
            paper (arXiv 2403.17031) and OpenAI's lm-human-preferences whiten
            with the unbiased estimate.
        all_reduce: sums a tensor over processes; with it, the variance is that of
            the real tokens of every process's batch together. None: this batch only.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: if the mask selects no token, or a single token with
            ``unbiased=True`` (the correction would divide by zero).
    """
    mean = masked_mean(x, mask, all_reduce=all_reduce)
    centered = x - mean
    total, count = _sum_and_count(centered * centered, mask, all_reduce)
    var = total / count
    if unbiased:
        # One host sync per call; this runs once per rollout, not per token.
        n = int(count.item())
        if n < 2:
            where = " over all processes" if all_reduce is not None else ""
            raise ValueError(
                f"masked_var(unbiased=True) needs at least 2 real tokens{where}, the mask selects {n}"
            )
        var = var * (n / (n - 1))
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  all_reduce: AllReduce | None = None) -> Tensor:
    """Normalise ``x`` to zero mean and unit variance over the real tokens.

    Statistics are taken over every real token of the whole batch (not per
    row), which is what the references do for advantages; padding values have
    no effect on them. Under data parallelism pass ``all_reduce``: each process's
    share is then whitened exactly as the concatenated batch would be in one
    process.

    Args:
        x: values, e.g. advantages ``(batch, response_len)``.
        mask: same shape as ``x``; 1/True on real tokens.
        shift_mean: when False the mean is added back, so only the scale
            changes. Used for reward whitening, where shifting the mean would
            change which responses are rewarded (N+ paper, detail on reward
            normalisation).
        eps: added to the variance before the square root.
        all_reduce: sums a tensor over processes (global statistics); None: this batch only.

    Returns:
        Tensor of the same shape as ``x``: whitened values on real tokens and 0
        on padding.
    """
    mean = masked_mean(x, mask, all_reduce=all_reduce)
    var = masked_var(x, mask, unbiased=True, all_reduce=all_reduce)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _select(whitened, mask)
