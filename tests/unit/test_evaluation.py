"""rlhf.evaluation's statistics and sampler, shared by PPO, DPO, `rlhf eval` and `rlhf generate`
(hand-computed numbers)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf import evaluate as cli_eval, evaluation as E
from rlhf.config import PPOConfig


def test_mean_and_standard_error():
    # (1, 2, 3, 6): mean 3, sample variance (4 + 1 + 0 + 9) / 3 = 14/3, s.e. sqrt(14/3 / 4)
    mean, se = E.mean_se([1.0, 2.0, 3.0, 6.0])
    assert mean == 3.0 and se == pytest.approx(math.sqrt(14 / 12))
    assert E.mean_se([5.0]) == (5.0, 0.0)


def test_rlhf_eval_reports_the_same_numbers_as_the_pipeline():
    assert E.statistic([1.0, 2.0, 3.0, 6.0]) == {"mean": 3.0, "se": E.mean_se([1.0, 2.0, 3.0, 6.0])[1], "n": 4}
    assert E.statistic([]) == {"mean": None, "se": None, "n": 0}
    # wins (1, 0.5, 0): the pipeline's win rate over SFT
    rate = E.win_rate([1.0, 2.0, 3.0], [0.0, 2.0, 4.0])
    assert (rate["mean"], rate["se"]) == E.mean_se(E.win_rates([{"s": 1.0}, {"s": 2.0}, {"s": 3.0}],
                                                               [{"s": 0.0}, {"s": 2.0}, {"s": 4.0}], "s"))


def test_rlhf_eval_compares_each_policy_with_the_first():
    judged = {"sft": {"rm_score": [1.0, 2.0, 3.0], "length": [4.0, 4.0, 5.0]},
              "ppo": {"rm_score": [2.0, 2.0, 1.0], "length": [6.0, 6.0, 6.0]}}
    report = E.compare_policies(judged, "sft", cli_eval.WIN_RATES)
    assert report["sft"] == {"rm_score": E.statistic([1.0, 2.0, 3.0]), "length": E.statistic([4.0, 4.0, 5.0])}
    # ppo over sft by the reward model: a win, a tie, a loss
    assert report["ppo"]["win_rate_rm"] == E.statistic([1.0, 0.5, 0.0])
    assert set(report["ppo"]) == {"rm_score", "length", "win_rate_rm"}  # no win rate by length, none by an absent objective


class _ScriptedEngine:
    """Answers every prompt with the tokens of "about cats", the stop token, then "write"; records
    the batches it was given and draws one random number per batch (to see the seed)."""

    def __init__(self, tok):
        self.tok, self.batches, self.draws = tok, [], []

    def sample(self, ids, mask):
        from rlhf.ppo.rollout import finish_responses

        self.batches.append(tuple(ids.shape))
        self.draws.append(float(torch.rand(())))
        words = self.tok("about cats", add_special_tokens=False).input_ids
        junk = self.tok("write", add_special_tokens=False).input_ids
        resp = torch.tensor([words + [self.tok.eos_token_id] + junk] * ids.shape[0])
        return finish_responses(resp, [self.tok.eos_token_id], self.tok.pad_token_id, 8, ids, mask)


def test_the_commands_sampler_encodes_batches_and_cuts_at_the_stop_token():
    from rlhf.generation import encode_prompts
    from rlhf.tasks.synthetic import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    prompts = [[{"role": "user", "content": "write about cats"}]] * 5
    width = len(encode_prompts(tok, prompts[:1], 64)[0])
    runs = []
    for _ in range(2):
        engine = _ScriptedEngine(tok)
        texts = E.sample_completions(engine, tok, prompts, max_prompt_length=64, batch_size=2, seed=3, device="cpu")
        runs.append(engine.draws)
    assert texts == ["about cats"] * 5  # the stop token and what follows it are no part of the text
    assert engine.batches == [(2, width), (2, width), (1, width)]  # batch_size prompts at a time, encoded as PPO's
    assert runs[0] == runs[1]  # seeded: the same random stream every time


def test_held_out_prompts_are_a_seeded_slice_never_trained_on():
    prompts = list(range(100))
    cfg = PPOConfig(eval_fraction=0.1, eval_min_prompts=4, seed=3)
    train, held = E.split_eval_prompts(prompts, [], cfg)
    assert len(held) == 10 and not set(train) & set(held) and sorted(train + held) == prompts
    assert E.split_eval_prompts(prompts, [], cfg) == (train, held)  # the same slice every time
    assert E.split_eval_prompts(prompts, ["given"], cfg) == (prompts, ["given"])
    with pytest.warns(UserWarning, match="holding out 4"):
        assert len(E.split_eval_prompts(prompts, [], PPOConfig(eval_fraction=0.01, eval_min_prompts=4))[1]) == 4
