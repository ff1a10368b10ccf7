"""The objectives used with verifiable rewards: DAPO's decoupled clip, overlong shaping and
filtering, dynamic sampling's group test, GSPO's sequence ratio, whole-group minibatches."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.ppo import (
    informative_groups,
    overlong_penalty,
    policy_loss,
    ppo_minibatch_indices,
    truncated_loss_mask,
)


def _one_token(advantage: float, ratio: float, **kw):
    r = torch.tensor([[ratio]], dtype=torch.float64, requires_grad=True)
    loss, stats = policy_loss(torch.log(r), torch.zeros(1, 1, dtype=torch.float64),
                              torch.tensor([[advantage]], dtype=torch.float64), torch.ones(1, 1), **kw)
    loss.backward()
    return loss.item(), r.grad.item(), stats


def test_clip_high_lets_a_positive_advantage_grow_past_the_low_clip():
    # A=+1, r=1.25, clip_range (low) 0.2, clip_high 0.28: clip(1.25, 0.8, 1.28) = 1.25, so both
    # branches are -1.25 and dL/dr = -1 (the symmetric clip would stop at 1.2: loss -1.2, grad 0)
    loss, grad, stats = _one_token(1.0, 1.25, clip_range=0.2, clip_high=0.28)
    assert loss == pytest.approx(-1.25) and grad == pytest.approx(-1.0)
    assert stats["clipfrac"].item() == 0.0
    loss, grad, _ = _one_token(1.0, 1.25, clip_range=0.2)
    assert loss == pytest.approx(-1.2) and grad == 0.0
    # past the high clip: r=1.5 -> max(-1.5, -1.28) = -1.28, no gradient
    loss, grad, stats = _one_token(1.0, 1.5, clip_range=0.2, clip_high=0.28)
    assert loss == pytest.approx(-1.28) and grad == 0.0 and stats["clipfrac"].item() == 1.0


def test_clip_high_leaves_the_low_side_alone():
    # A=-1, r=0.5: max(0.5, clip(0.5, 0.8, 1.28) = 0.8) = 0.8 whatever clip_high is
    loss, grad, _ = _one_token(-1.0, 0.5, clip_range=0.2, clip_high=0.28)
    assert loss == pytest.approx(0.8) and grad == 0.0


def test_gspo_sequence_ratio_is_the_geometric_mean_of_token_ratios():
    # one response, 2 real tokens + 1 pad; token log-ratios 0.2 and -0.1 -> sequence log-ratio
    # (0.2 - 0.1) / 2 = 0.05, s = exp(0.05) = 1.0513 (inside [0.8, 1.2]); A = 1 on each token.
    # Loss (token-mean of 2 tokens) = -s. Gradient: d(-s * exp(lp_t - sg lp_t))/d lp_t = -s per
    # token, then / 2 tokens: -s/2 on each real token, 0 on the pad.
    old = torch.zeros(1, 3, dtype=torch.float64)
    lp = torch.tensor([[0.2, -0.1, 5.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv = torch.ones(1, 3, dtype=torch.float64)
    loss, stats = policy_loss(lp, old, adv, mask, clip_range=0.2, ratio_level="sequence")
    loss.backward()
    s = math.exp(0.05)
    assert loss.item() == pytest.approx(-s)
    assert lp.grad.tolist()[0] == pytest.approx([-s / 2, -s / 2, 0.0])
    assert stats["ratio_mean"].item() == pytest.approx(s)


def test_gspo_clips_the_whole_sequence():
    # token log-ratios 0.5 and 0.3: per token both ratios (1.65, 1.35) are clipped at 1.2; the
    # sequence ratio exp(0.4) = 1.49 is clipped too -> loss -1.2, no gradient on any token.
    # With one token at -0.3 instead: sequence log-ratio 0.1, s = 1.105 inside the clip, so every
    # token keeps a gradient, although the token-level ratio exp(0.5) alone would be clipped.
    old = torch.zeros(1, 2, dtype=torch.float64)
    mask, adv = torch.ones(1, 2), torch.ones(1, 2, dtype=torch.float64)
    lp = torch.tensor([[0.5, 0.3]], dtype=torch.float64, requires_grad=True)
    loss, stats = policy_loss(lp, old, adv, mask, ratio_level="sequence")
    loss.backward()
    assert loss.item() == pytest.approx(-1.2) and lp.grad.abs().sum().item() == 0.0
    assert stats["clipfrac"].item() == 1.0
    lp = torch.tensor([[0.5, -0.3]], dtype=torch.float64, requires_grad=True)
    loss, _ = policy_loss(lp, old, adv, mask, ratio_level="sequence")
    loss.backward()
    assert loss.item() == pytest.approx(-math.exp(0.1))
    assert (lp.grad != 0).all()
    lp_tok = torch.tensor([[0.5, -0.3]], dtype=torch.float64, requires_grad=True)
    policy_loss(lp_tok, old, adv, mask)[0].backward()
    assert lp_tok.grad[0, 0].item() == 0.0  # token level: the first token is clipped


def test_unknown_ratio_level_is_an_error():
    with pytest.raises(ValueError, match="ratio_level"):
        policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), ratio_level="seq")


def test_overlong_penalty_ramp():
    # max 16, buffer 4: free up to 12 tokens, then -(len - 12)/4 * penalty, -penalty at 16
    lengths = torch.tensor([3, 12, 13, 14, 16])
    got = overlong_penalty(lengths, max_length=16, buffer=4, penalty=0.5)
    assert got.tolist() == pytest.approx([0.0, 0.0, -0.125, -0.25, -0.5])
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(lengths, max_length=16, buffer=0)


def test_truncated_loss_mask_removes_rows_without_stop():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    got = truncated_loss_mask(mask, torch.tensor([True, False]))
    assert got.tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]


def test_informative_groups_drops_groups_with_equal_scores():
    # groups (by id): 7 -> [1, 1] equal, 3 -> [0, 1] informative, 5 -> [0.1 * 3 / 3 ...] equal
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.1, 0.1])
    groups = torch.tensor([3, 3, 7, 7, 5, 5])
    assert informative_groups(scores, groups).tolist() == [True, True, False, False, False, False]


def test_minibatches_keep_groups_whole():
    parts = ppo_minibatch_indices(24, 2, torch.Generator().manual_seed(1), group_size=4)
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(24))
    for p in parts:
        groups = (p // 4).tolist()
        assert all(groups.count(g) == 4 for g in set(groups))  # every group in one minibatch, whole
        assert p.view(-1, 4).tolist() == [[g * 4 + j for j in range(4)] for g in p.view(-1, 4)[:, 0].div(4).tolist()]
    assert not torch.equal(torch.cat(parts), torch.arange(24))  # groups shuffled
    with pytest.raises(ValueError, match="group_size"):
        ppo_minibatch_indices(24, 4, group_size=4)  # minibatch of 6 cannot hold whole groups of 4


def test_group_size_one_is_the_plain_shuffle():
    a = ppo_minibatch_indices(16, 2, torch.Generator().manual_seed(3))
    b = ppo_minibatch_indices(16, 2, torch.Generator().manual_seed(3), group_size=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
