"""Train/inference mismatch: logprob gaps and the truncated importance weights, by hand."""

import math

import pytest
import torch

from rlhf import ppo as F


def test_logprob_diff_stats_over_real_tokens_only():
    trainer = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    sampler = torch.tensor([[-1.1, -1.8, -3.0], [-0.5, -0.2, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # |diff| on real tokens: 0.1, 0.2, 0.0, 0.0, 0.3 (the padded 9.0 is left out)
    mean, mx = F.logprob_diff_stats(trainer, sampler, mask)
    assert mean.item() == pytest.approx((0.1 + 0.2 + 0.0 + 0.0 + 0.3) / 5, abs=1e-6)
    assert mx.item() == pytest.approx(0.3, abs=1e-6)


def test_logprob_diff_stats_empty_mask_is_zero():
    z = torch.zeros(2, 3)
    mean, mx = F.logprob_diff_stats(z, z + 1, z)
    assert mean.item() == 0.0 and mx.item() == 0.0


def test_truncated_is_weights_by_hand():
    # log(pi_train / pi_sampler) per token: 0, log 2, log 4, -log 2, and a padded position
    trainer = torch.tensor([[math.log(0.5), math.log(0.4), math.log(0.8), math.log(0.1), -1.0]])
    sampler = torch.tensor([[math.log(0.5), math.log(0.2), math.log(0.2), math.log(0.2), -5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    # ratios 1, 2, 4, 0.5 -> capped at 3: 1, 2, 3, 0.5; padding gets 0 (ratio e^4 there)
    w = F.truncated_is_weights(trainer, sampler, mask, cap=3.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 2.0, 3.0, 0.5, 0.0]]), rtol=1e-6, atol=1e-6)
    assert not w.requires_grad


def test_truncated_is_weights_are_detached_and_cap_checked():
    trainer = torch.zeros(1, 2, requires_grad=True)
    w = F.truncated_is_weights(trainer, torch.zeros(1, 2), torch.ones(1, 2), cap=2.0)
    assert not w.requires_grad
    torch.testing.assert_close(w, torch.ones(1, 2))
    with pytest.raises(ValueError, match="cap"):
        F.truncated_is_weights(trainer, torch.zeros(1, 2), torch.ones(1, 2), cap=0.0)


def test_weighted_policy_loss_scales_each_token():
    """The weights multiply each token's clipped surrogate: with ratio 1 (new == old) the
    token loss is -A, so the weighted token-mean loss is -sum(w * A) / n."""
    lp = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, -2.0, 3.0]])
    mask = torch.ones(1, 3)
    isw = torch.tensor([[1.0, 0.5, 2.0]])
    agg = F.aggregation_weights(mask, "token-mean", 3.0, 1.0, 3)
    loss, _ = F.policy_loss(lp, lp, adv, mask, 0.2, weights=agg * isw)
    # -(1*1 + 0.5*(-2) + 2*3) / 3 = -6/3 = -2
    assert loss.item() == pytest.approx(-2.0, abs=1e-6)
