"""Truncation, score placement and the missing-stop penalty."""

from __future__ import annotations

import pytest
import torch

from rlhf.ppo import (
    apply_missing_stop_penalty,
    ensemble_score,
    first_stop_truncate,
    kl_penalty,
    last_token_index,
    per_token_rewards,
)

EOS, PAD = 2, 0


def test_first_stop_truncate_positions():
    ids = torch.tensor(
        [
            [EOS, 5, 6, EOS, 7],  # stop at position 0: only the stop token is real
            [5, 6, EOS, 8, EOS],  # stop in the middle; the later EOS is junk
            [5, 6, 7, 8, EOS],  # stop at the last position
            [5, 6, 7, 8, 9],  # no stop: the response hit the length limit, all real
        ]
    )
    out, mask, has_stop = first_stop_truncate(ids, stop_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(
        out,
        torch.tensor(
            [[EOS, PAD, PAD, PAD, PAD], [5, 6, EOS, PAD, PAD], [5, 6, 7, 8, EOS], [5, 6, 7, 8, 9]]
        ),
    )
    assert mask.dtype == torch.bool
    assert torch.equal(mask.sum(1), torch.tensor([1, 3, 5, 5]))
    assert torch.equal(has_stop, torch.tensor([True, True, True, False]))
    assert torch.equal(last_token_index(mask), torch.tensor([0, 2, 4, 4]))
    assert torch.equal(ids[0], torch.tensor([EOS, 5, 6, EOS, 7]))  # input untouched


def test_first_stop_truncate_when_pad_is_a_sampled_token():
    # The pad id is a real token the policy sampled (ids 0 before the stop):
    # a mask built from ids != pad would wrongly drop them.
    ids = torch.tensor([[PAD, 5, PAD, EOS, 9]])
    out, mask, _ = first_stop_truncate(ids, stop_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(mask, torch.tensor([[True, True, True, True, False]]))
    assert torch.equal(out, torch.tensor([[PAD, 5, PAD, EOS, PAD]]))


def test_first_stop_truncate_pad_equal_to_stop():
    ids = torch.tensor([[5, EOS, 6, 7]])
    out, mask, has_stop = first_stop_truncate(ids, stop_token_id=EOS, pad_token_id=EOS)
    assert torch.equal(out, torch.tensor([[5, EOS, EOS, EOS]]))
    assert torch.equal(mask, torch.tensor([[True, True, False, False]]))
    assert has_stop.item()


def test_last_token_index_empty_row_is_zero():
    mask = torch.tensor([[0, 0, 0], [1, 1, 0]])
    assert torch.equal(last_token_index(mask), torch.tensor([0, 1]))


def test_score_lands_on_stop_token_and_pad_gets_no_kl():
    # [a, b, EOS, PAD, PAD]: the score goes to index 2 (the stop token), not 3
    # (TRL <= 1.12 put it one late, trl issues 1893 / 3750); 3 and 4 get no KL.
    ids = torch.tensor([[11, 12, EOS, 13, 14]])  # 13, 14 were sampled after the stop
    _, mask, has_stop = first_stop_truncate(ids, EOS, PAD)
    logp = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -4.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -9.0, -9.0]])
    kl = kl_penalty(logp, ref)  # [.5, -1, 0, 6, 5]
    scores = apply_missing_stop_penalty(torch.tensor([2.0]), has_stop, "replace", -1.0)
    rewards = per_token_rewards(scores, kl, mask, kl_coef=0.1)
    # -0.1 * kl on real tokens, + 2.0 at index 2
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 2.0, 0.0, 0.0]]))


def test_per_token_rewards_ragged_batch():
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]])
    kl = torch.ones(3, 4)
    rewards = per_token_rewards(torch.tensor([10.0, 20.0, 30.0]), kl, mask, torch.tensor(0.5))
    expected = torch.tensor(
        [[-0.5, -0.5, -0.5, 9.5], [19.5, 0.0, 0.0, 0.0], [-0.5, 29.5, 0.0, 0.0]]
    )
    torch.testing.assert_close(rewards, expected)


def test_per_token_rewards_rejects_empty_rows():
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        per_token_rewards(torch.zeros(2), torch.zeros(2, 3), torch.tensor([[1, 0, 0], [0, 0, 0]]), 0.1)


def test_missing_stop_penalty_modes():
    scores = torch.tensor([3.0, 3.0, -2.0])
    has_stop = torch.tensor([True, False, False])
    torch.testing.assert_close(
        apply_missing_stop_penalty(scores, has_stop, "replace", -1.0), torch.tensor([3.0, -1.0, -1.0])
    )
    torch.testing.assert_close(
        apply_missing_stop_penalty(scores, has_stop, "subtract", 1.5), torch.tensor([3.0, 1.5, -3.5])
    )
    unchanged = apply_missing_stop_penalty(scores, has_stop, "none", 99.0)
    torch.testing.assert_close(unchanged, scores)
    assert unchanged.data_ptr() != scores.data_ptr()
    with pytest.raises(ValueError, match="multiply"):
        apply_missing_stop_penalty(scores, has_stop, "multiply", 1.0)


def test_missing_stop_penalty_uses_configured_stop_token():
    # With stop id 7 instead of EOS, a response that ends in EOS has no stop.
    ids = torch.tensor([[5, 6, EOS], [5, 7, 6]])
    _, _, has_stop = first_stop_truncate(ids, stop_token_id=7, pad_token_id=PAD)
    out = apply_missing_stop_penalty(torch.tensor([1.0, 1.0]), has_stop, "replace", -1.0)
    torch.testing.assert_close(out, torch.tensor([-1.0, 1.0]))


def test_ensemble_score_is_mean_minus_k_population_std():
    # members' scores per response: (1, 3) -> mean 2, std 1; (2, 2) -> 2, 0; (0, 6) -> 3, 3
    member_scores = torch.tensor([[1.0, 3.0], [2.0, 2.0], [0.0, 6.0]])
    torch.testing.assert_close(ensemble_score(member_scores, 1.0), torch.tensor([1.0, 2.0, 0.0]))
    torch.testing.assert_close(ensemble_score(member_scores, 0.5), torch.tensor([1.5, 2.0, 1.5]))
    torch.testing.assert_close(ensemble_score(member_scores, 0.0), torch.tensor([2.0, 2.0, 3.0]))
    # three members (0, 3, 6): mean 3, population std sqrt((9 + 0 + 9) / 3) = sqrt(6)
    torch.testing.assert_close(ensemble_score(torch.tensor([[0.0, 3.0, 6.0]]), 2.0), torch.tensor([3.0 - 2 * 6 ** 0.5]))


def test_ensemble_of_one_is_exactly_its_member():
    scores = torch.tensor([[0.1234567], [-3.3], [7.0]])
    assert torch.equal(ensemble_score(scores, 1.0), scores[:, 0])
