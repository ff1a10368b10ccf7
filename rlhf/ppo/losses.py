"""Clipped PPO surrogate losses for the policy and the critic.

Both losses are a masked *sum* divided by a ``normalizer`` that defaults to
the number of real tokens. When one minibatch is split into micro-batches for
gradient accumulation, the caller passes the token count of the whole
minibatch as the normalizer of every micro-batch; the accumulated gradient is
then exactly the gradient of the unsplit minibatch. Averaging per-micro-batch
means instead weights tokens of short micro-batches more, a known source of
divergence between accumulated and unaccumulated runs (the "gradient
accumulation loss bug" fixed in transformers 4.46).

:func:`aggregation_weights` generalises the normalizer to the other ways of
turning per-token losses into one number (the ``loss_aggregation`` option): a
weight per token computed from counts of the *whole* minibatch, so the same
exactness holds for each of them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf.ppo.masked import masked_mean, masked_sum

__all__ = ["aggregation_weights", "policy_loss", "value_loss"]


def _zero_padding(x: Tensor, real: Tensor) -> Tensor:
    return torch.where(real, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _normalise(total: Tensor, mask: Tensor, normalizer: float | Tensor | None) -> Tensor:
    if normalizer is None:
        normalizer = mask.bool().sum()
    return total / normalizer


def aggregation_weights(
    mask: Tensor,
    aggregation: str,
    num_tokens: float | Tensor,
    num_sequences: float | Tensor,
    response_length: int,
) -> Tensor:
    """Per-token weights ``w`` such that the aggregated loss is ``sum(w * loss_t)``.

    The counts are those of the whole minibatch (every micro-batch, every
    process), so the weights of a row do not depend on how the minibatch is
    split: summing the micro-batch losses gives the minibatch loss exactly.

    * ``token-mean``: ``1 / num_tokens``; every token counts alike, so long
      responses weigh more (PPO's usual choice).
    * ``seq-mean-token-mean``: ``1 / (len_i * num_sequences)``; the mean over
      responses of each response's token mean (the GRPO paper's formula).
    * ``token-sum-norm``: ``1 / (num_sequences * response_length)``; a constant
      normaliser, so no length bias either way (Dr. GRPO, arXiv 2503.20783).

    Args:
        mask: ``(batch, response_len)``, 1 on real tokens, 0 on padding.
        aggregation: one of the three names above.
        num_tokens: real tokens in the whole minibatch.
        num_sequences: responses in the whole minibatch.
        response_length: the configured maximum response length (the constant).

    Returns:
        ``(batch, response_len)`` weights in the dtype of ``mask`` as float,
        0 on padding (and on rows with no real token).
    """
    m = mask.float()
    if aggregation == "token-mean":
        return m / num_tokens
    if aggregation == "seq-mean-token-mean":
        lengths = m.sum(dim=1, keepdim=True).clamp(min=1.0)
        return m / (lengths * num_sequences)
    if aggregation == "token-sum-norm":
        return m / (num_sequences * response_length)
    raise ValueError(f"unknown loss aggregation {aggregation!r}; expected token-mean, seq-mean-token-mean "
                     "or token-sum-norm")


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float = 0.2,
    normalizer: float | Tensor | None = None,
    weights: Tensor | None = None,
    clip_high: float | None = None,
    ratio_level: str = "token",
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate loss (Schulman et al. 2017), token or sequence level.

    Per token, with ``ratio = exp(logprobs - old_logprobs)``:
    ``pg = max(-A * ratio, -A * clip(ratio, 1 - c_low, 1 + c_high))``. Once the ratio
    has moved past the clip boundary in the direction the advantage favours,
    the clipped branch is the max and is constant in the ratio, so that token
    stops contributing gradient.

    Decoupled clipping (DAPO, Yu et al. 2025, arXiv 2503.14476): ``clip_high`` above
    ``clip_range`` lets unlikely tokens with a positive advantage grow further before
    the clip stops them ("clip-higher", against entropy collapse); 0.2 / 0.28 in the paper.

    ``ratio_level="sequence"`` is GSPO (Zheng et al. 2025, arXiv 2507.18071): one
    importance ratio per response, ``s_i = exp(mean_t (logprobs - old_logprobs))`` over
    its real tokens, clipped as a whole. It is applied in the paper's GSPO-token form,
    ``s_i * exp(logprobs_t - sg(logprobs_t))`` per token: the value of every token's
    ratio is ``s_i`` and, with the same advantage on every token (the critic-free
    estimators) and ``seq-mean-token-mean`` aggregation, loss and gradient are GSPO's.

    Args:
        logprobs: current policy log-probabilities ``(batch, response_len)``,
            with gradient.
        old_logprobs: log-probabilities at rollout time ``(batch, response_len)``
            (treated as constants).
        advantages: ``(batch, response_len)`` (constants; usually whitened).
        mask: ``(batch, response_len)``, 1 on real tokens, 0 on padding.
        clip_range: c (the lower clip, 1 - c), 0.2 in the references.
        normalizer: divisor of the masked sum; defaults to the number of real
            tokens in ``mask``. Pass the token count of the whole minibatch
            when accumulating micro-batches.
        weights: per-token weights ``(batch, response_len)`` from
            :func:`aggregation_weights`; when given, the loss is
            ``sum(weights * pg)`` and ``normalizer`` is ignored.
        clip_high: the upper clip (1 + clip_high); None uses ``clip_range``.
        ratio_level: ``"token"`` (PPO) or ``"sequence"`` (GSPO).

    Returns:
        ``(loss, stats)``: the scalar loss, and detached scalar tensors
        ``clipfrac`` (fraction of real tokens where the clipped branch is
        strictly larger, i.e. active), ``approxkl``
        (``0.5 * mean((logprobs - old_logprobs)^2)``, the k2 estimator of
        KL(old || new) used by the references to monitor the update) and
        ``ratio_mean``. Stats are means over the real tokens of this call.
    """
    if not (logprobs.shape == old_logprobs.shape == advantages.shape == mask.shape):
        raise ValueError(
            f"policy_loss inputs must share one (batch, response_len) shape; got logprobs "
            f"{tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)}, advantages "
            f"{tuple(advantages.shape)}, mask {tuple(mask.shape)}"
        )
    # Padding may hold junk (exp of a large junk log-ratio is inf, and inf times
    # a zero gradient is nan in backward), so zero every input there first.
    real = mask.bool()
    logprobs = _zero_padding(logprobs, real)
    old_logprobs = _zero_padding(old_logprobs.detach(), real)
    advantages = _zero_padding(advantages.detach(), real)
    log_ratio = logprobs - old_logprobs
    if ratio_level == "sequence":
        lengths = mask.float().sum(dim=1, keepdim=True).clamp(min=1.0)
        seq_log_ratio = (log_ratio.sum(dim=1, keepdim=True) / lengths).detach()
        ratio = torch.exp(seq_log_ratio + logprobs - logprobs.detach())
    elif ratio_level == "token":
        ratio = torch.exp(log_ratio)
    else:
        raise ValueError(f"unknown ratio_level {ratio_level!r}; expected token or sequence")
    high = clip_range if clip_high is None else clip_high
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + high)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    if weights is None:
        loss = _normalise(masked_sum(pg, mask), mask, normalizer)
    else:
        loss = masked_sum(pg * weights.detach(), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_clipped > pg_unclipped).to(pg.dtype), mask),
            "approxkl": 0.5 * masked_mean(log_ratio.square(), mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range: float = 0.2,
    normalizer: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss, as in the PPO references for RLHF.

    ``0.5 * max((v - R)^2, (clip(v, V_old - c, V_old + c) - R)^2)`` per token:
    the critic is not rewarded for moving more than ``c`` from its rollout-time
    prediction (N+ paper, arXiv 2403.17031, value clipping detail).

    Args:
        values: current critic values ``(batch, response_len)``, with gradient.
        old_values: critic values at rollout time ``(batch, response_len)``.
        returns: regression targets ``(batch, response_len)`` from
            :func:`rlhf.ppo.compute_gae`.
        mask: ``(batch, response_len)``, 1 on real tokens, 0 on padding.
        clip_range: c, 0.2 in the references.
        normalizer: divisor of the masked sum; defaults to the number of real
            tokens. Pass the minibatch token count when accumulating.

    Returns:
        ``(loss, stats)``: the scalar loss and ``{"vf_clipfrac": ...}``, the
        detached fraction of real tokens where the clip is active (``|v - V_old| > c``)
        and the clipped term is the larger one. Testing the clamp itself keeps the
        statistic exact: ``V_old + (v - V_old)`` need not round back to ``v``, so comparing
        the two squares alone counts tokens the clip never touched.
    """
    if not (values.shape == old_values.shape == returns.shape == mask.shape):
        raise ValueError(
            f"value_loss inputs must share one (batch, response_len) shape; got values "
            f"{tuple(values.shape)}, old_values {tuple(old_values.shape)}, returns "
            f"{tuple(returns.shape)}, mask {tuple(mask.shape)}"
        )
    real = mask.bool()
    values = _zero_padding(values, real)
    old_values = _zero_padding(old_values.detach(), real)
    returns = _zero_padding(returns.detach(), real)
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    vf_unclipped = (values - returns).square()
    vf_clipped = (values_clipped - returns).square()
    vf = 0.5 * torch.maximum(vf_unclipped, vf_clipped)
    loss = _normalise(masked_sum(vf, mask), mask, normalizer)
    with torch.no_grad():
        clipped = ((values - old_values).abs() > clip_range) & (vf_clipped > vf_unclipped)
        vf_clipfrac = masked_mean(clipped.to(vf.dtype), mask)
    return loss, {"vf_clipfrac": vf_clipfrac.detach()}
