"""rlhf.evaluation's statistics, shared by PPO, DPO and `rlhf eval` (hand-computed numbers)."""

from __future__ import annotations

import math

import pytest

from rlhf import evaluate as cli_eval, evaluation as E
from rlhf.config import PPOConfig


def test_mean_and_standard_error():
    # (1, 2, 3, 6): mean 3, sample variance (4 + 1 + 0 + 9) / 3 = 14/3, s.e. sqrt(14/3 / 4)
    mean, se = E.mean_se([1.0, 2.0, 3.0, 6.0])
    assert mean == 3.0 and se == pytest.approx(math.sqrt(14 / 12))
    assert E.mean_se([5.0]) == (5.0, 0.0)


def test_rlhf_eval_reports_the_same_numbers_as_the_pipeline():
    assert cli_eval.mean_se([1.0, 2.0, 3.0, 6.0]) == {"mean": 3.0, "se": E.mean_se([1.0, 2.0, 3.0, 6.0])[1], "n": 4}
    assert cli_eval.mean_se([]) == {"mean": None, "se": None, "n": 0}
    # wins (1, 0.5, 0): the pipeline's win rate over SFT
    rate = cli_eval.win_rate([1.0, 2.0, 3.0], [0.0, 2.0, 4.0])
    assert (rate["mean"], rate["se"]) == E.mean_se(E.win_rates([{"s": 1.0}, {"s": 2.0}, {"s": 3.0}],
                                                               [{"s": 0.0}, {"s": 2.0}, {"s": 4.0}], "s"))


def test_held_out_prompts_are_a_seeded_slice_never_trained_on():
    prompts = list(range(100))
    cfg = PPOConfig(eval_fraction=0.1, eval_min_prompts=4, seed=3)
    train, held = E.split_eval_prompts(prompts, [], cfg)
    assert len(held) == 10 and not set(train) & set(held) and sorted(train + held) == prompts
    assert E.split_eval_prompts(prompts, [], cfg) == (train, held)  # the same slice every time
    assert E.split_eval_prompts(prompts, ["given"], cfg) == (prompts, ["given"])
    with pytest.warns(UserWarning, match="holding out 4"):
        assert len(E.split_eval_prompts(prompts, [], PPOConfig(eval_fraction=0.01, eval_min_prompts=4))[1]) == 4
