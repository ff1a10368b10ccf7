"""The advantage-estimator table (rlhf.estimators): what each row declares is what the stage
and the config use, a new estimator is one function plus one row, and the sequence form of
the KL penalty is applied in one place."""

from __future__ import annotations

import pytest
import torch

from rlhf import estimators as E
from rlhf.config import ConfigError, PPOConfig, from_dict
from rlhf.ppo.rollout import ScoredRollout


def _batch(scores, kl_lp, mask) -> ScoredRollout:
    lp = torch.tensor(kl_lp)
    B, T = lp.shape
    return ScoredRollout(prompt_ids=torch.zeros(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.long),
                         response_ids=torch.zeros(B, T, dtype=torch.long), response_mask=torch.tensor(mask),
                         has_stop=torch.ones(B, dtype=torch.bool), logprobs=lp, ref_logprobs=torch.zeros(B, T),
                         entropy=torch.ones(B, T), values=torch.zeros(B, T), scores=torch.tensor(scores))


def test_the_rows_declare_what_the_stage_and_the_config_rely_on():
    assert {n: (e.needs_critic, e.needs_groups, e.kl_in_reward, e.whiten) for n, e in E.ESTIMATORS.items()} == {
        "gae": (True, False, True, True), "reinforce++": (False, False, True, True),
        "rloo": (False, True, True, False), "grpo": (False, True, False, False)}
    # the config's choices, its num_generations check and its kl_in_reward default come from the table
    with pytest.raises(ConfigError, match="unknown estimator 'grpo[+]'; choose from gae, reinforce[+][+], rloo, grpo"):
        PPOConfig(advantage_estimator="grpo+")
    with pytest.raises(ConfigError, match="ppo.advantage_estimator"):
        from_dict(PPOConfig, {"advantage_estimator": "rlo"}, prefix="ppo")
    for name, row in E.ESTIMATORS.items():
        k = 2 if row.needs_groups else 1
        cfg = PPOConfig(advantage_estimator=name, num_generations=k, rollout_batch_size=4, num_mini_batches=1,
                        per_device_train_batch_size=4)
        assert (cfg.kl_in_reward, E.uses_critic(cfg)) == (row.kl_in_reward, row.needs_critic)
        if row.needs_groups:
            with pytest.raises(ConfigError, match="needs ppo.num_generations >= 2"):
                PPOConfig(advantage_estimator=name, num_generations=1)


def test_sequence_rewards_subtract_beta_times_the_summed_kl_only_when_the_kl_is_in_the_reward():
    """Row 0: KL (1, 2) on two real tokens, score 5, beta 0.5 -> 5 - 0.5 * 3 = 3.5; row 1: the
    KL at the padded position (7) must not count -> 1 - 0.5 * 1 = 0.5."""
    x = E.EstimatorInput(rewards=None, values=None, mask=torch.tensor([[1.0, 1.0], [1.0, 0.0]]),
                         scores=torch.tensor([5.0, 1.0]), kl=torch.tensor([[1.0, 2.0], [1.0, 7.0]]), kl_coef=0.5,
                         group_ids=None)
    in_reward = PPOConfig(advantage_estimator="rloo", num_generations=2, rollout_batch_size=2, num_mini_batches=1,
                          per_device_train_batch_size=2)
    assert E.sequence_rewards(x, in_reward).tolist() == [3.5, 0.5]
    as_loss = PPOConfig(advantage_estimator="grpo", num_generations=2, rollout_batch_size=2, num_mini_batches=1,
                        per_device_train_batch_size=2)
    assert E.sequence_rewards(x, as_loss).tolist() == [5.0, 1.0]


def test_a_new_estimator_is_one_function_and_one_row(monkeypatch):
    """A registered estimator is what advantages_and_returns runs; its flags decide the critic,
    the group check and the whitening."""
    seen = {}

    def constant(x, cfg):
        seen["groups"] = x.group_ids
        adv = torch.full_like(x.mask, 2.0) * x.mask
        return adv, adv + 1

    cfg = PPOConfig(rollout_batch_size=2, num_mini_batches=1, per_device_train_batch_size=2)
    monkeypatch.setitem(E.ESTIMATORS, "gae", E.Estimator(constant, needs_critic=False, needs_groups=True, whiten=False))
    b = _batch([1.0, 2.0], [[0.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 0.0]])
    assert not E.uses_critic(cfg)
    with pytest.raises(ValueError, match="needs group_ids"):
        E.advantages_and_returns(b, torch.zeros(2, 2), b.scores, torch.zeros(2, 2), cfg, 0.1, None)
    adv, returns = E.advantages_and_returns(b, torch.zeros(2, 2), b.scores, torch.zeros(2, 2), cfg, 0.1,
                                            torch.tensor([0, 0]))
    assert adv.tolist() == [[2.0, 2.0], [2.0, 0.0]] and returns.tolist() == [[3.0, 3.0], [3.0, 1.0]]
    assert seen["groups"].tolist() == [0, 0]
    monkeypatch.setitem(E.ESTIMATORS, "gae", E.Estimator(constant, whiten=True))
    adv, _ = E.advantages_and_returns(b, torch.zeros(2, 2), b.scores, torch.zeros(2, 2), cfg, 0.1, None)
    assert adv.abs().max() < 1e-4  # a constant whitened over the batch is 0
