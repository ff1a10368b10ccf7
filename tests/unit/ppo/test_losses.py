"""Clipped policy and value losses."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.ppo import policy_loss, value_loss


def _loss_and_grad_wrt_ratio(advantage: float, ratio: float):
    """Policy loss of one token and dL/dr, by autograd through logprobs = log r."""
    r = torch.tensor([[ratio]], dtype=torch.float64, requires_grad=True)
    loss, stats = policy_loss(
        torch.log(r), torch.zeros(1, 1, dtype=torch.float64),
        torch.tensor([[advantage]], dtype=torch.float64), torch.ones(1, 1), clip_range=0.2,
    )
    loss.backward()
    return loss.item(), r.grad.item(), stats


def test_policy_loss_positive_advantage_clipped_above():
    # A=+1, r=1.5: max(-1.5, -clip(1.5) = -1.2) = -1.2, the clipped branch is
    # constant in r, so the gradient is 0 (the update already went far enough).
    loss, grad, stats = _loss_and_grad_wrt_ratio(1.0, 1.5)
    assert loss == pytest.approx(-1.2)
    assert grad == 0.0
    assert stats["clipfrac"].item() == 1.0
    assert stats["ratio_mean"].item() == pytest.approx(1.5)
    # approxkl = 0.5 * (log 1.5)^2
    assert stats["approxkl"].item() == pytest.approx(0.5 * math.log(1.5) ** 2)


def test_policy_loss_negative_advantage_clipped_below():
    # A=-1, r=.5: max(.5, clip(.5) = .8) = .8, gradient 0.
    loss, grad, stats = _loss_and_grad_wrt_ratio(-1.0, 0.5)
    assert loss == pytest.approx(0.8)
    assert grad == 0.0
    assert stats["clipfrac"].item() == 1.0


def test_policy_loss_inside_clip_range():
    # A=+1, r=.9: both branches are -.9 (clip inactive), dL/dr = -A = -1.
    loss, grad, stats = _loss_and_grad_wrt_ratio(1.0, 0.9)
    assert loss == pytest.approx(-0.9)
    assert grad == pytest.approx(-1.0)
    assert stats["clipfrac"].item() == 0.0


def test_policy_loss_pessimistic_side_is_never_clipped():
    # A=+1, r=.5 (moved against the advantage): unclipped -.5 > clipped -.8,
    # so the loss keeps the full gradient -1 to pull the ratio back.
    loss, grad, stats = _loss_and_grad_wrt_ratio(1.0, 0.5)
    assert loss == pytest.approx(-0.5)
    assert grad == pytest.approx(-1.0)
    assert stats["clipfrac"].item() == 0.0


def test_policy_loss_gradient_wrt_logprobs():
    # dL/dlogp = dL/dr * r = -A * r / N on unclipped tokens; 0 on clipped and padding.
    logp = torch.log(torch.tensor([[0.9, 1.5, 1.1, 7.0]])).requires_grad_()
    adv = torch.tensor([[2.0, 1.0, -1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = policy_loss(logp, torch.zeros(1, 4), adv, mask)
    loss.backward()
    expected = torch.tensor([[-2.0 * 0.9 / 3, 0.0, 1.1 / 3, 0.0]])
    torch.testing.assert_close(logp.grad, expected)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    assert all(not v.requires_grad for v in stats.values())


def test_value_loss_clipped():
    # V_old 0, v 1, R 1, c .2: unclipped (1-1)^2 = 0; clipped (0.2-1)^2 = .64;
    # 0.5 * max(0, .64) = .32 and the clipped term is the active one.
    loss, stats = value_loss(
        torch.ones(1, 1, requires_grad=True), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1)
    )
    assert loss.item() == pytest.approx(0.32)
    assert stats["vf_clipfrac"].item() == 1.0


def test_value_loss_unclipped_gradient():
    # V_old 0, v .1, R 1: inside the clip, loss .5 * .81 = .405, dL/dv = v - R = -.9
    v = torch.tensor([[0.1]], requires_grad=True)
    loss, stats = value_loss(v, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1))
    loss.backward()
    assert loss.item() == pytest.approx(0.405)
    assert v.grad.item() == pytest.approx(-0.9)
    assert stats["vf_clipfrac"].item() == 0.0


def test_value_clipfrac_counts_only_tokens_the_clip_touched():
    # A token seen in a 2-process PPO update: V_old and v have opposite signs, |v - V_old| = .079
    # is well inside c = .2, yet in fp32 V_old + (v - V_old) does not round back to v, and the
    # reconstructed value's square loss is larger by an ulp. The clip never touched this token,
    # so the fraction must be 0 (comparing the two squares alone counted it as clipped).
    old = torch.tensor([[0.06939398497343063]])
    v = torch.tensor([[-0.009122999384999275]])
    returns = torch.tensor([[-0.9150725603103638]])
    reconstructed = old + torch.clamp(v - old, -0.2, 0.2)
    assert ((reconstructed - returns).square() > (v - returns).square()).all()  # the trap is real
    _, stats = value_loss(v, old, returns, torch.ones_like(v))
    assert stats["vf_clipfrac"].item() == 0.0


def _random_batch(seed: int, batch: int = 8, length: int = 6):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    old = -torch.rand(batch, length, generator=gen, dtype=torch.float64) * 3
    new = old + 0.3 * torch.randn(batch, length, generator=gen, dtype=torch.float64)
    adv = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    returns = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    return mask, old, new, adv, returns


def _grads(fn, leaf_value):
    leaf = leaf_value.clone().requires_grad_()
    loss = fn(leaf)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad


@pytest.mark.parametrize("which", ["policy", "value"])
def test_accumulated_micro_batches_equal_full_minibatch(which):
    # One minibatch of 8 vs 4 micro-batches of 2 whose losses use the full
    # minibatch token count as normalizer: summed losses and gradients agree.
    mask, old, new, adv, returns = _random_batch(0)
    total_tokens = mask.sum()

    def loss_fn(leaf, rows=slice(None), normalizer=None):
        if which == "policy":
            return policy_loss(leaf[rows], old[rows], adv[rows], mask[rows], normalizer=normalizer)[0]
        return value_loss(leaf[rows], old[rows], returns[rows], mask[rows], normalizer=normalizer)[0]

    full_loss, full_grad = _grads(loss_fn, new)
    leaf = new.clone().requires_grad_()
    accumulated = 0.0
    for start in range(0, 8, 2):
        micro = loss_fn(leaf, slice(start, start + 2), normalizer=total_tokens)
        micro.backward()  # gradients accumulate in leaf.grad, as in training
        accumulated += micro.item()
    assert accumulated == pytest.approx(full_loss.item(), abs=1e-12)
    torch.testing.assert_close(leaf.grad, full_grad, atol=1e-6, rtol=0)
    # And the naive per-micro-batch mean does NOT match (ragged lengths): the
    # test above would catch a regression to it.
    naive = sum(loss_fn(new, slice(s, s + 2)).item() for s in range(0, 8, 2)) / 4
    assert abs(naive - full_loss.item()) > 1e-4


@pytest.mark.parametrize("which", ["policy", "value"])
def test_extra_padding_leaves_loss_and_gradient_unchanged(which):
    mask, old, new, adv, returns = _random_batch(1)
    pad = 3
    junk = torch.tensor([40.0, -1e4, float("nan")], dtype=torch.float64).expand(8, pad)

    def widen(x):
        return torch.cat([x, junk], dim=1)

    wide_mask = torch.cat([mask, torch.zeros(8, pad, dtype=torch.bool)], dim=1)

    def loss_fn(leaf, m, o, a, r):
        if which == "policy":
            return policy_loss(leaf, o, a, m)[0]
        return value_loss(leaf, o, r, m)[0]

    loss, grad = _grads(lambda x: loss_fn(x, mask, old, adv, returns), new)
    wide_loss, wide_grad = _grads(
        lambda x: loss_fn(x, wide_mask, widen(old), widen(adv), widen(returns)), widen(new)
    )
    assert wide_loss.item() == pytest.approx(loss.item(), abs=1e-12)
    torch.testing.assert_close(wide_grad[:, :-pad], grad, atol=1e-12, rtol=0)
    assert torch.equal(wide_grad[:, -pad:], torch.zeros(8, pad, dtype=torch.float64))


def test_policy_loss_first_minibatch_ratio_one():
    # Same logprobs as at rollout: ratio 1, no clipping, approxkl 0, loss = -mean(A).
    mask, old, _, adv, _ = _random_batch(2)
    loss, stats = policy_loss(old.clone(), old, adv, mask)
    assert stats["ratio_mean"].item() == 1.0
    assert stats["clipfrac"].item() == 0.0
    assert stats["approxkl"].item() == 0.0
    assert loss.item() == pytest.approx(-(adv[mask].mean().item()))


def test_loss_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="returns"):
        value_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, 3), torch.ones(2, 3))


# --------------------------------------------------------------------------- loss aggregation

# Two responses, ratio 1 everywhere (logprobs == old), so every per-token loss is -A:
#   row 0: 4 real tokens, A = 1   -> per-token losses (-1, -1, -1, -1)
#   row 1: 1 real token,  A = 2   -> per-token losses (-2, pad, pad, pad)
# token-mean:           (-4 - 2) / 5 tokens                 = -1.2
# seq-mean-token-mean:  mean(-4 / 4, -2 / 1) = (-1 - 2) / 2 = -1.5
# token-sum-norm (L=4): (-4 - 2) / (2 responses * 4)        = -0.75
_MASK = torch.tensor([[1.0, 1, 1, 1], [1, 0, 0, 0]])
_ADV = torch.tensor([[1.0, 1, 1, 1], [2, 2, 2, 2]])


@pytest.mark.parametrize("aggregation,want", [("token-mean", -1.2), ("seq-mean-token-mean", -1.5),
                                              ("token-sum-norm", -0.75)])
def test_loss_aggregation_hand_worked(aggregation, want):
    from rlhf.ppo import aggregation_weights

    lp = torch.zeros(2, 4)
    w = aggregation_weights(_MASK, aggregation, num_tokens=_MASK.sum(), num_sequences=2, response_length=4)
    loss, _ = policy_loss(lp, lp, _ADV, _MASK, weights=w)
    assert float(loss) == pytest.approx(want, abs=1e-6)
    assert (w[_MASK == 0] == 0).all()


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "token-sum-norm"])
def test_loss_aggregation_is_exact_under_accumulation(aggregation):
    """Rows of different lengths: the gradient of the whole minibatch equals the sum of the
    gradients of its micro-batches (1 row each), weights from the whole minibatch's counts."""
    from rlhf.ppo import aggregation_weights

    g = torch.Generator().manual_seed(0)
    B, T = 6, 5
    lengths = torch.tensor([5, 1, 3, 2, 5, 4])
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    old = torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    theta = (old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).requires_grad_()

    def grad(rows_list):
        theta.grad = None
        for rows in rows_list:
            w = aggregation_weights(mask[rows], aggregation, mask.sum(), B, T)
            loss, _ = policy_loss(theta[rows], old[rows], adv[rows], mask[rows], weights=w)
            loss.backward()
        return theta.grad.clone()

    whole = grad([torch.arange(B)])
    split = grad([torch.tensor([i]) for i in range(B)])
    assert whole.abs().sum() > 0
    assert (whole - split).abs().max() < 1e-6
    # the naive alternative, each micro-batch normalised by its own counts, is not exact
    theta.grad = None
    for i in range(B):
        m = mask[i:i + 1]
        w = aggregation_weights(m, aggregation, m.sum(), 1, T) / B
        policy_loss(theta[i:i + 1], old[i:i + 1], adv[i:i + 1], m, weights=w)[0].backward()
    if aggregation == "token-mean":
        assert (whole - theta.grad).abs().max() > 1e-3


def test_unknown_loss_aggregation_is_refused():
    from rlhf.ppo import aggregation_weights

    with pytest.raises(ValueError, match="token-mean"):
        aggregation_weights(_MASK, "sum", 5, 2, 4)
