"""GAE and the critic-free estimators against hand-worked numbers."""

from __future__ import annotations

import pytest
import torch

from rlhf.ppo import compute_gae, grpo_advantages, reinforce_pp_returns, rloo_advantages


def test_gae_hand_worked():
    # rewards r = [0, 0, 1], values V = [.5, .6, .7], gamma = 1, lambda = .95.
    # Past the last token V = 0 and A = 0 (the episode ends at the stop token).
    # t=2: delta = 1 + 0 - .7 = .3                     A2 = .3
    # t=1: delta = 0 + .7 - .6 = .1    A1 = .1 + .95 * .3    = .385
    # t=0: delta = 0 + .6 - .5 = .1    A0 = .1 + .95 * .385  = .46575
    # returns = A + V = [.96575, .985, 1.0]
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    mask = torch.ones(1, 3)
    advantages, returns = compute_gae(rewards, values, mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(advantages, torch.tensor([[0.46575, 0.385, 0.3]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(returns, torch.tensor([[0.96575, 0.985, 1.0]]), atol=1e-6, rtol=0)


def test_gae_lambda_one_returns_are_monte_carlo():
    # With gamma = lambda = 1 the deltas telescope: A_t = sum_{k>=t} r_k - V_t,
    # so every return is the total reward, 1.0, whatever the values are.
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    _, returns = compute_gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    torch.testing.assert_close(returns, torch.ones(1, 3), atol=1e-6, rtol=0)


def test_gae_padding_never_changes_real_positions():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    ref_adv, ref_ret = compute_gae(rewards, values, torch.ones(1, 3))
    # Two pad columns holding junk, including nan and inf, as a model may emit there.
    junk_rewards = torch.tensor([[0.0, 0.0, 1.0, 123.0, float("nan")]])
    junk_values = torch.tensor([[0.5, 0.6, 0.7, float("inf"), -9.0]])
    mask = torch.tensor([[1, 1, 1, 0, 0]], dtype=torch.bool)
    adv, ret = compute_gae(junk_rewards, junk_values, mask)
    torch.testing.assert_close(adv[:, :3], ref_adv)
    torch.testing.assert_close(ret[:, :3], ref_ret)
    assert torch.equal(adv[:, 3:], torch.zeros(1, 2))
    assert torch.equal(ret[:, 3:], torch.zeros(1, 2))


def _gae_reference(rewards, values, length, gamma, lam):
    """Direct sum A_t = sum_k (gamma*lam)^k delta_{t+k}, one row, real tokens only."""
    out = []
    for t in range(length):
        total = 0.0
        for k in range(t, length):
            next_v = values[k + 1] if k + 1 < length else 0.0
            delta = rewards[k] + gamma * next_v - values[k]
            total += (gamma * lam) ** (k - t) * delta
        out.append(total)
    return out


def test_gae_matches_direct_sum_on_ragged_batch():
    gen = torch.Generator().manual_seed(0)
    batch, length = 5, 9
    rewards = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    values = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    lengths = [1, 4, 9, 6, 2]
    mask = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    gamma, lam = 0.99, 0.9
    advantages, returns = compute_gae(rewards, values, mask, gamma=gamma, lam=lam)
    for b, n in enumerate(lengths):
        expected = torch.tensor(_gae_reference(rewards[b].tolist(), values[b].tolist(), n, gamma, lam))
        torch.testing.assert_close(advantages[b, :n], expected.to(advantages.dtype))
        torch.testing.assert_close(returns[b, :n], expected + values[b, :n])
        assert torch.all(advantages[b, n:] == 0) and torch.all(returns[b, n:] == 0)


def test_gae_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="values"):
        compute_gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))


def test_reinforce_pp_returns_hand_worked():
    # rewards [.1, -.2, 1 | junk], gamma .9:
    # G2 = 1;  G1 = -.2 + .9 * 1 = .7;  G0 = .1 + .9 * .7 = .73;  pad -> 0.
    rewards = torch.tensor([[0.1, -0.2, 1.0, 55.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    returns = reinforce_pp_returns(rewards, mask, gamma=0.9)
    torch.testing.assert_close(returns, torch.tensor([[0.73, 0.7, 1.0, 0.0]]), atol=1e-6, rtol=0)


def test_reinforce_pp_equals_gae_with_zero_values_and_lambda_one():
    gen = torch.Generator().manual_seed(1)
    rewards = torch.randn(4, 7, generator=gen)
    mask = torch.arange(7)[None, :] < torch.tensor([7, 3, 1, 5])[:, None]
    adv, _ = compute_gae(rewards, torch.zeros_like(rewards), mask, gamma=0.95, lam=1.0)
    torch.testing.assert_close(reinforce_pp_returns(rewards, mask, gamma=0.95), adv)


def test_rloo_leave_one_out_baseline():
    # Groups (interleaved on purpose): g0 = {1, 2, 3}, g1 = {5}, g2 = {4, 6}.
    # g0: 1 - (2+3)/2 = -1.5;  2 - (1+3)/2 = 0;  3 - (1+2)/2 = 1.5
    # g1: a lone sample has no baseline -> 0
    # g2: 4 - 6 = -2;  6 - 4 = 2
    scores = torch.tensor([1.0, 4.0, 2.0, 5.0, 3.0, 6.0])
    group_ids = torch.tensor([10, 30, 10, 20, 10, 30])
    advantages = rloo_advantages(scores, group_ids)
    torch.testing.assert_close(advantages, torch.tensor([-1.5, -2.0, 0.0, 0.0, 1.5, 2.0]))


def test_rloo_advantages_sum_to_zero_per_group():
    gen = torch.Generator().manual_seed(2)
    scores = torch.randn(12, generator=gen)
    group_ids = torch.arange(12) % 3
    advantages = rloo_advantages(scores, group_ids)
    for g in range(3):
        assert abs(advantages[group_ids == g].sum().item()) < 1e-5


# --------------------------------------------------------------------------- GRPO

# Three groups, interleaved on purpose (group ids need not be sorted or contiguous):
#   group 7: scores (1, 2, 3)  mean 2, unbiased std sqrt((1 + 0 + 1) / 2) = 1
#            GRPO     (-1, 0, 1) / (1 + eps)
#            Dr. GRPO (-1, 0, 1)
#   group 3: scores (0, 4)     mean 2, unbiased std sqrt((4 + 4) / 1) = 2 sqrt(2)
#            GRPO     (-2, 2) / 2.828427 = (-0.707107, 0.707107)
#            Dr. GRPO (-2, 2)
#   group 5: scores (5, 5, 5)  identical: no signal, advantage exactly 0 (no 0/0)
_SCORES = [1.0, 0.0, 5.0, 2.0, 5.0, 4.0, 3.0, 5.0]
_GROUPS = [7, 3, 5, 7, 5, 3, 7, 5]


def test_grpo_hand_worked():
    adv = grpo_advantages(torch.tensor(_SCORES, dtype=torch.float64), torch.tensor(_GROUPS))
    want = torch.tensor([-1.0, -0.7071068, 0.0, 0.0, 0.0, 0.7071068, 1.0, 0.0], dtype=torch.float64)
    assert torch.allclose(adv, want, atol=2e-6)
    assert (adv[[2, 4, 7]] == 0).all()


def test_dr_grpo_skips_the_std_division():
    adv = grpo_advantages(torch.tensor(_SCORES), torch.tensor(_GROUPS), scale_by_std=False)
    assert torch.allclose(adv, torch.tensor([-1.0, -2.0, 0.0, 0.0, 0.0, 2.0, 1.0, 0.0]), atol=1e-6)


@pytest.mark.parametrize("scale_by_std", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_grpo_identical_rewards_give_exact_zeros_and_no_nan(scale_by_std, dtype):
    # 0.1 * 3 / 3 != 0.1 in floating point: a naive (s - mean) / std would be ~1e-8 / ~1e-8,
    # i.e. O(1) noise, or 0 / 0 = nan with eps 0. A single-sample group is constant too.
    scores = torch.tensor([0.1, 0.1, 0.1, -3.7, 2.0], dtype=dtype)
    adv = grpo_advantages(scores, torch.tensor([0, 0, 0, 1, 2]), scale_by_std=scale_by_std)
    assert torch.isfinite(adv).all()
    assert (adv == 0).all()


def test_grpo_advantages_do_not_mix_groups():
    # the same scores with every sample in one group give other numbers: grouping is used
    one = grpo_advantages(torch.tensor(_SCORES), torch.zeros(len(_SCORES), dtype=torch.long))
    assert not torch.allclose(one, grpo_advantages(torch.tensor(_SCORES), torch.tensor(_GROUPS)), atol=1e-3)
