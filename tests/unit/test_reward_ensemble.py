"""reward.ensemble: member seeds, bootstrap resamples and the ensemble's held-out accuracy
(rlhf/stages/reward.py), on hand-made numbers."""

from __future__ import annotations

import pytest
import torch

from rlhf.config import ConfigError, RewardConfig, from_dict
from rlhf.stages.reward import bootstrap, ensemble_accuracy, member_seeds


def test_ensemble_accuracy_is_the_accuracy_of_the_mean_score():
    # 3 members x 4 pairs. Member by member (chosen > rejected):
    #   m0: pairs 0, 1, 2 right, 3 wrong   -> 3/4
    #   m1: pairs 0, 3 right, 1, 2 wrong   -> 2/4
    #   m2: pair 0 right, 1 tie (wrong), 2, 3 wrong -> 1/4
    # means: chosen (1, 5/3, 2/3, 1) vs rejected (0, 1, 1, 2/3) -> pairs 0, 1, 3 right -> 3/4
    chosen = torch.tensor([[1.0, 3.0, 2.0, 0.0],
                           [1.0, 0.0, 0.0, 2.0],
                           [1.0, 2.0, 0.0, 1.0]])
    rejected = torch.tensor([[0.0, 0.0, 0.0, 1.0],
                             [0.0, 1.0, 1.0, 0.0],
                             [0.0, 2.0, 2.0, 1.0]])
    assert [ensemble_accuracy(chosen[j: j + 1], rejected[j: j + 1]) for j in range(3)] == [0.75, 0.5, 0.25]
    assert ensemble_accuracy(chosen, rejected) == 0.75
    # the mean of the members' accuracies (0.5) is not the ensemble's accuracy
    assert ensemble_accuracy(chosen[1:], rejected[1:]) == 0.5  # means (1, 1, 0, 1.5) vs (0, 1.5, 1.5, 0.5): 0, 3
    # a tie of the means counts as wrong, as in TRL's RewardTrainer
    assert ensemble_accuracy(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, -1.0]])) == 0.5


def test_members_get_their_own_seed_and_resample():
    one = from_dict(RewardConfig, {"seed": 5, "ensemble": 1})
    assert member_seeds(one, 0) == (5, None)  # one reward model: today's seed, no resample
    three = from_dict(RewardConfig, {"seed": 5, "ensemble": 3})
    seeds = [member_seeds(three, j) for j in range(3)]
    assert [s for s, _ in seeds] == [5, 6, 7]
    assert len({r for _, r in seeds}) == 3 and None not in {r for _, r in seeds}
    with pytest.raises(ConfigError, match="ensemble must be >= 1"):
        from_dict(RewardConfig, {"ensemble": 0})


def test_bootstrap_draws_with_replacement_seeded():
    rows = [{"i": i} for i in range(200)]
    a, b, c = bootstrap(rows, 1), bootstrap(rows, 1), bootstrap(rows, 2)
    assert a == b and a != c and len(a) == len(rows)
    distinct = len({r["i"] for r in a})
    assert 100 < distinct < 160  # about 1 - 1/e = 63% of the pairs appear, some several times


def test_three_members_are_the_default():
    # issue 30: enough members for PPO to see where they disagree (README, "Safe defaults")
    assert from_dict(RewardConfig, {}).ensemble == 3
