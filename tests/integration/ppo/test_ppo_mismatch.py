"""The train/inference mismatch on the engines of the main environment (hf, static): every
engine keeps its own logprobs of the drawn tokens, the rollout logs their gap to the trainer's,
and ``ppo.rollout_is_cap`` weights the policy loss (tiny model, fp32)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rlhf.generation import HFEngine, StaticEngine
from rlhf.estimators import advantages_and_returns
from rlhf.generation import encode_prompts, generation_config, left_pad
from rlhf.scoring import score_rollout
from rlhf.stages.ppo import _ppo_update, rollout_mismatch, run_ppo, shaped_rewards


def _prompts(tok, cfg, n=8):
    from rlhf.data import load_prompts

    return left_pad(encode_prompts(tok, load_prompts(cfg.prompts)[:n], cfg.max_prompt_length), tok.pad_token_id, "cpu")


@pytest.mark.parametrize("engine", ["hf", "static"])
def test_engine_logprobs_match_the_trainers(engine, role_model):
    model, tok, cfg = role_model
    stop, pad = tok.eos_token_id, tok.pad_token_id
    T = 10
    if engine == "hf":
        gen_cfg = generation_config(cfg, stop, pad)
        gen_cfg.max_new_tokens = T
        eng = HFEngine(model, gen_cfg, stop, pad, T)
    else:
        eng = StaticEngine(model, cfg.temperature, stop, pad, T, compile=False)
    ids, mask = _prompts(tok, cfg)
    torch.manual_seed(3)
    sampled = eng.sample(ids, mask)
    assert sampled.sampler_logprobs.shape == sampled.response_ids.shape
    real = sampled.response_mask.bool()
    assert bool((sampled.sampler_logprobs[real] < 0).all())  # a drawn token's logprob, never 0 at T=0.7
    assert bool((sampled.sampler_logprobs[~real] == 0).all())  # nothing after the stop
    scored = score_rollout(model, sampled, replace(cfg, response_length=T), chunk=4)
    torch.testing.assert_close(scored.sampler_logprobs, sampled.sampler_logprobs)  # carried through scoring
    # same fp32 model, cache vs full forward: equal up to rounding
    torch.testing.assert_close(scored.logprobs * sampled.response_mask, sampled.sampler_logprobs, atol=1e-4, rtol=0)
    stats, weights = rollout_mismatch(scored, replace(cfg, rollout_is_cap=2.0))
    assert 0 <= stats["rollout/logprob_diff_mean"] <= stats["rollout/logprob_diff_max"] < 1e-4
    assert stats["rollout/is_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    assert weights.shape == sampled.response_ids.shape


def test_run_logs_the_mismatch_every_rollout(ppo_config):
    from test_ppo_update import read_metrics

    cfg = ppo_config(total_episodes=8, rollout_batch_size=4, response_length=6, rollout_is_cap=2.0)
    assert run_ppo(cfg).finished
    metrics = read_metrics(Path(cfg.output_dir))
    assert len(metrics) == 2
    for m in metrics:
        assert math.isfinite(m["rollout/logprob_diff_mean"]) and 0 <= m["rollout/logprob_diff_max"] < 1e-3
        assert m["rollout/is_weight_mean"] == pytest.approx(1.0, abs=1e-3)


def test_importance_weights_scale_the_policy_loss(role_model, make_rollout):
    """One minibatch, one epoch: the first (only) step's surrogate is taken at ratio 1, so
    weights of 2 double ``loss/policy`` exactly, and weights of 0 leave the policy unchanged."""
    model, tok, cfg = role_model
    cfg = replace(cfg, num_ppo_epochs=1, num_mini_batches=1, per_device_train_batch_size=8)
    assert cfg.kl_in_reward and cfg.entropy_coef == 0
    batch = make_rollout(model, tok, cfg)
    scores, kl, rewards = shaped_rewards(batch, cfg, 0.05)
    adv, returns = advantages_and_returns(batch, rewards, scores, kl, cfg, 0.05, None)
    policy = model.trainable_parameters("policy")
    start = [p.detach().clone() for p in policy]

    def update(weights):
        for p, s in zip(policy, start):
            p.data.copy_(s)
        opt = torch.optim.SGD(policy, lr=1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        # KL in the reward and no entropy bonus: the surrogate is the policy's only loss
        stats = _ppo_update(model, opt, sched, batch, adv, returns, cfg, 0.05, update=0, is_weights=weights)
        return stats, [p.detach().clone() for p in policy]

    plain, moved = update(None)
    doubled, _ = update(torch.full_like(batch.logprobs, 2.0) * batch.response_mask)
    zero, still = update(torch.zeros_like(batch.logprobs))
    assert doubled["loss/policy"] == pytest.approx(2 * plain["loss/policy"], rel=1e-5)
    assert plain["loss/policy"] != 0.0
    assert any(not torch.equal(a, b) for a, b in zip(moved, start))
    assert all(torch.equal(a, b) for a, b in zip(still, start))
    assert zero["loss/policy"] == 0.0


def test_rollout_mismatch_by_hand(ppo_config):
    """Two rows; |trainer - sampler| on real tokens: 0.1, 0.3 | 0.2 (the padded 5.0 is left out):
    mean 0.2, max 0.3; with cap 1.2 the weights are min(e^d, 1.2) on real tokens."""
    import math

    from rlhf.ppo.rollout import ScoredRollout

    z = torch.zeros(2, 2)
    trainer = torch.tensor([[-1.0, -2.0], [-0.5, -1.0]])
    sampler = torch.tensor([[-1.1, -1.7], [-0.7, 4.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    batch = ScoredRollout(prompt_ids=torch.zeros(2, 1, dtype=torch.long), prompt_mask=torch.ones(2, 1, dtype=torch.long),
                          response_ids=torch.zeros(2, 2, dtype=torch.long), response_mask=mask,
                          has_stop=torch.ones(2, dtype=torch.bool), logprobs=trainer, ref_logprobs=z, entropy=z, values=z,
                          scores=torch.zeros(2), sampler_logprobs=sampler)
    cfg = ppo_config(rollout_is_cap=1.2)
    stats, w = rollout_mismatch(batch, cfg)
    assert stats["rollout/logprob_diff_mean"] == pytest.approx(0.2, abs=1e-6)
    assert stats["rollout/logprob_diff_max"] == pytest.approx(0.3, abs=1e-6)
    expected = torch.tensor([[min(math.exp(0.1), 1.2), min(math.exp(-0.3), 1.2)], [min(math.exp(0.2), 1.2), 0.0]])
    torch.testing.assert_close(w, expected, rtol=1e-5, atol=1e-6)
    assert stats["rollout/is_weight_mean"] == pytest.approx(float(expected.sum() / 3), rel=1e-5)
    assert rollout_mismatch(batch, ppo_config())[1] is None  # no cap: no weights, metrics still logged
