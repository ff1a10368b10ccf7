"""Each advantage / reward option of the PPO stage changes the numbers the way it claims:
hand-made batches through the stage's own functions. Each test fails if its option were
ignored or inverted."""

from __future__ import annotations

import pytest
import torch

from rlhf.estimators import advantages_and_returns
from rlhf import ppo as F
from rlhf.config import ConfigError, PPOConfig
from rlhf.ppo.rollout import ScoredRollout
from rlhf.stages.ppo import shaped_rewards


def _batch(scores, logprobs, ref_logprobs, mask=None) -> ScoredRollout:
    lp = torch.tensor(logprobs)
    B, T = lp.shape
    mask = torch.ones(B, T) if mask is None else torch.tensor(mask)
    return ScoredRollout(prompt_ids=torch.zeros(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.long),
                         response_ids=torch.zeros(B, T, dtype=torch.long), response_mask=mask,
                         has_stop=torch.ones(B, dtype=torch.bool), logprobs=lp, ref_logprobs=torch.tensor(ref_logprobs),
                         entropy=torch.ones(B, T), values=torch.zeros(B, T), scores=torch.tensor(scores))


def test_rloo_baseline_is_the_other_samples_of_the_same_prompt():
    """Groups (0, 0, 1, 1), scores (1, 3, 0, 10), no KL: raw advantages (-2, 2, -10, 10);
    whitening (mean 0 here) keeps their ratios. Ignoring the grouping (one group) gives a
    leave-one-out baseline over all four: (1 - 13/3, ...) with other ratios."""
    cfg = PPOConfig(advantage_estimator="rloo", num_generations=2, rollout_batch_size=4, num_mini_batches=1, per_device_train_batch_size=4)
    b = _batch([1.0, 3.0, 0.0, 10.0], [[-1.0, -1.0]] * 4, [[-1.0, -1.0]] * 4)
    scores, kl, rewards = shaped_rewards(b, cfg, 0.05)
    adv, _ = advantages_and_returns(b, rewards, scores, kl, cfg, 0.05, torch.tensor([0, 0, 1, 1]))
    raw = torch.tensor([-2.0, 2.0, -10.0, 10.0])
    assert torch.allclose(adv[:, 0] / adv[3, 0], raw / raw[3], atol=1e-6)
    assert torch.allclose(adv[:, 0], adv[:, 1])


def test_reinforce_pp_advantages_are_whitened_discounted_returns():
    """Scores 1 and 2 on each row's last real token, no KL: returns with gamma 1 carry the
    score to every earlier token, [[1, 1, 1], [2, 2, pad]]; advantages are those whitened."""
    cfg = PPOConfig(advantage_estimator="reinforce++", rollout_batch_size=2, num_mini_batches=1, per_device_train_batch_size=2)
    b = _batch([1.0, 2.0], [[-1.0] * 3] * 2, [[-1.0] * 3] * 2, mask=[[1.0, 1, 1], [1, 1, 0]])
    scores, kl, rewards = shaped_rewards(b, cfg, 0.05)
    adv, returns = advantages_and_returns(b, rewards, scores, kl, cfg, 0.05, None)
    assert torch.allclose(returns * b.response_mask, torch.tensor([[1.0, 1, 1], [2, 2, 0]]))
    want = F.masked_whiten(torch.tensor([[1.0, 1, 1], [2, 2, 0]]), b.response_mask) * b.response_mask
    assert torch.allclose(adv, want, atol=1e-6)
    gae, _ = advantages_and_returns(b, rewards, scores, kl, PPOConfig(rollout_batch_size=2, num_mini_batches=1,
                                                                      per_device_train_batch_size=2), 0.05, None)
    assert not torch.allclose(adv, gae, atol=1e-3)  # GAE (lambda .95, values 0) is another answer


def test_k3_in_the_reward():
    """p = .5, p_ref = .25 at every token: k3 = 0.193147 (k1 would be 0.693147)."""
    cfg = PPOConfig(kl_estimator="k3", rollout_batch_size=1, num_mini_batches=1, per_device_train_batch_size=1)
    lp, ref = torch.log(torch.tensor(0.5)).item(), torch.log(torch.tensor(0.25)).item()
    b = _batch([0.0], [[lp, lp]], [[ref, ref]])
    _, kl, rewards = shaped_rewards(b, cfg, 0.1)
    assert torch.allclose(kl, torch.full((1, 2), 0.193147), atol=1e-6)
    assert torch.allclose(rewards, -0.1 * kl)


def test_kl_as_a_loss_keeps_it_out_of_the_reward_and_refuses_k1():
    cfg = PPOConfig(kl_in_reward=False, kl_estimator="k3", rollout_batch_size=1, num_mini_batches=1, per_device_train_batch_size=1)
    b = _batch([1.0], [[-1.0, -2.0]], [[-3.0, -1.0]])
    _, kl, rewards = shaped_rewards(b, cfg, 0.1)
    assert kl.abs().sum() > 0 and torch.equal(rewards, torch.tensor([[0.0, 1.0]]))
    with pytest.raises(ConfigError, match="kl_estimator.*kl_in_reward.*k3 or k2"):
        PPOConfig(kl_in_reward=False, kl_estimator="k1")


def test_reward_whitening_scales_to_unit_variance_and_keeps_the_mean():
    cfg = PPOConfig(whiten_rewards=True, rollout_batch_size=2, num_mini_batches=1, per_device_train_batch_size=2)
    b = _batch([4.0, -2.0], [[-1.0, -2.0, -1.0]] * 2, [[-1.5, -1.0, -3.0]] * 2)
    _, kl, rewards = shaped_rewards(b, cfg, 0.5)
    raw = F.per_token_rewards(b.scores, kl, b.response_mask, 0.5)
    assert F.masked_var(rewards, b.response_mask) == pytest.approx(1.0, rel=1e-5)
    assert F.masked_mean(rewards, b.response_mask) == pytest.approx(float(F.masked_mean(raw, b.response_mask)), abs=1e-6)
    assert F.masked_var(raw, b.response_mask) > 2.0  # the premise: unwhitened variance is far from 1


# --------------------------------------------------------------------------- GRPO


def _grpo_cfg(**kw) -> PPOConfig:
    return PPOConfig(advantage_estimator="grpo", num_generations=2, rollout_batch_size=4, num_mini_batches=1,
                     per_device_train_batch_size=4, **kw)


def test_grpo_defaults_kl_as_a_k3_loss_term():
    cfg = _grpo_cfg()
    assert (cfg.kl_in_reward, cfg.kl_estimator) == (False, "k3")
    gae = PPOConfig()
    assert (gae.kl_in_reward, gae.kl_estimator) == (True, "k1")  # the other estimators keep PPO's defaults
    assert _grpo_cfg(kl_in_reward=True).kl_estimator == "k1"


def test_grpo_stage_advantages_are_group_normalised_not_whitened():
    """Groups (0, 0, 1, 1), scores (1, 3, 0, 10), policy != reference (KL > 0, but a loss term
    by default, so not in the advantage). Group 0: mean 2, std sqrt(2) -> (-.707107, .707107);
    group 1: mean 5, std sqrt(50) -> (-.707107, .707107); the same on every real token and 0
    on padding. Whitening over the batch, or RLOO, or GAE, would give other numbers (RLOO:
    (-2, 2, -10, 10) up to a scale; the rows would differ)."""
    b = _batch([1.0, 3.0, 0.0, 10.0], [[-1.0, -1.0]] * 4, [[-2.0, -2.0]] * 4, mask=[[1.0, 1], [1, 1], [1, 0], [1, 1]])
    cfg = _grpo_cfg()
    scores, kl, rewards = shaped_rewards(b, cfg, 0.05)
    assert (kl[b.response_mask.bool()] > 0).all()
    adv, _ = advantages_and_returns(b, rewards, scores, kl, cfg, 0.05, torch.tensor([0, 0, 1, 1]))
    s = 0.7071068
    assert torch.allclose(adv, torch.tensor([[-s, -s], [s, s], [-s, 0.0], [s, s]]), atol=1e-5)


def test_dr_grpo_stage_advantages_keep_the_scale():
    b = _batch([1.0, 3.0, 0.0, 10.0], [[-1.0, -1.0]] * 4, [[-1.0, -1.0]] * 4)
    cfg = _grpo_cfg(grpo_scale_by_std=False)
    scores, kl, rewards = shaped_rewards(b, cfg, 0.05)
    adv, _ = advantages_and_returns(b, rewards, scores, kl, cfg, 0.05, torch.tensor([0, 0, 1, 1]))
    assert torch.allclose(adv[:, 0], torch.tensor([-1.0, 1.0, -5.0, 5.0]), atol=1e-6)


def test_grpo_with_kl_in_the_reward_subtracts_the_summed_kl():
    """kl_in_reward: true, k1, beta 1: sequence reward = score - sum KL. Rows of group 0 share
    the score 1 but row 1 has KL 2 * (-1 - -2) = 2: rewards (1, -1), advantages (-s, s) flipped."""
    b = _batch([1.0, 1.0, 0.0, 0.0], [[-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0]],
               [[-1.0, -1.0], [-2.0, -2.0], [-1.0, -1.0], [-1.0, -1.0]])
    cfg = _grpo_cfg(kl_in_reward=True)
    scores, kl, rewards = shaped_rewards(b, cfg, 1.0)
    adv, _ = advantages_and_returns(b, rewards, scores, kl, cfg, 1.0, torch.tensor([0, 0, 1, 1]))
    assert torch.allclose(adv[:, 0], torch.tensor([0.7071068, -0.7071068, 0.0, 0.0]), atol=1e-5)


def test_num_generations_checks_and_the_deprecated_rloo_k():
    with pytest.raises(ConfigError, match="grpo needs ppo.num_generations >= 2"):
        PPOConfig(advantage_estimator="grpo")
    with pytest.raises(ConfigError, match="divisible by ppo.num_generations"):
        PPOConfig(num_generations=3, rollout_batch_size=64)
    from rlhf.config import from_dict

    with pytest.warns(FutureWarning, match="use ppo.num_generations"):  # shown by default, unlike DeprecationWarning
        cfg = from_dict(PPOConfig, {"advantage_estimator": "rloo", "rloo_k": 4}, prefix="ppo")
    assert cfg.num_generations == 4
    with pytest.raises(ConfigError, match="deprecated name of num_generations"):
        from_dict(PPOConfig, {"rloo_k": 4, "num_generations": 2}, prefix="ppo")
    with pytest.raises(ConfigError, match="loss_aggregation"):
        from_dict(PPOConfig, {"loss_aggregation": "sum"}, prefix="ppo")


def test_long_prompts_lose_whole_early_turns_and_keep_the_system_turn(tiny_assets):
    import warnings

    from rlhf.models import load_tokenizer
    from rlhf.generation import _render_prompt, encode_prompts
    from rlhf.tasks.synthetic import VOCABULARY

    tok = load_tokenizer(str(tiny_assets.base))
    words = list(VOCABULARY)
    system = {"role": "system", "content": " ".join(words[:3])}
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": " ".join(words[i: i + 8])},
                  {"role": "assistant", "content": " ".join(words[i + 1: i + 9])}]
    last = {"role": "user", "content": " ".join(words[20:24])}
    convo = [system, *turns, last]
    kept = [system, *turns[-4:], last]  # what fits: the system turn, two exchanges, the last turn
    limit = len(_render_prompt(tok, kept))
    assert len(_render_prompt(tok, [system, *turns[-6:], last])) > limit
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (ids,) = encode_prompts(tok, [convo], limit)
    assert ids == _render_prompt(tok, kept)  # whole turns dropped, starting with a user turn
    assert any("1 of 1 prompts" in str(w.message) and "1 lost early turns" in str(w.message) for w in caught)
    # the last turn alone is too long: cut from the left, and counted as such
    (ids,) = encode_prompts(tok, [[system, {"role": "user", "content": " ".join(words * 3)}]], 10)
    assert len(ids) == 10
    # short prompts are untouched and nothing is said
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert encode_prompts(tok, [[last]], 1000) == [_render_prompt(tok, [last])]


def test_a_first_rollout_mostly_cut_off_is_named_with_its_length_and_stop_set():
    import warnings

    from rlhf.config import PPOConfig
    from rlhf.stages.ppo import warn_if_cut_off

    cfg = PPOConfig(response_length=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert warn_if_cut_off(0.75, cfg, ["<|im_end|>"])  # a quarter cut off: more than a fifth
        assert not warn_if_cut_off(0.8, cfg, ["<|im_end|>"])  # exactly a fifth: quiet
    (w,) = caught
    assert "25%" in str(w.message) and "response_length=32" in str(w.message) and "<|im_end|>" in str(w.message)


class _NoRoles:
    """Stands in for the role model: build_optimization asks it for trainable parameters."""

    def trainable_parameters(self, role):
        return [torch.nn.Parameter(torch.zeros(2))]


def test_safe_defaults_control_kl_per_token_and_leave_set_keys_alone():
    """safe_defaults: adaptive controller, per-token target, horizon total_episodes / 8; the
    stage's controller is built in that unit and fed the rollout's per-token KL, which
    rollout_statistics computes as summed KL / real tokens (hand-worked below)."""
    from rlhf.config import SAFE_KL_TARGET_PER_TOKEN
    from rlhf.stages.ppo import build_optimization
    from rlhf.update import rollout_statistics

    old = PPOConfig(safe_defaults=False)
    assert (old.kl_controller, old.kl_unit, old.kl_horizon, old.kl_target_per_token) == ("fixed", "response", 10000, None)
    assert PPOConfig().safe_defaults  # the default since issue 30
    safe = PPOConfig(safe_defaults=True, total_episodes=4096)
    assert (safe.kl_controller, safe.kl_unit, safe.kl_horizon) == ("adaptive", "token", 512)
    assert safe.kl_target_per_token == SAFE_KL_TARGET_PER_TOKEN
    ctl = build_optimization(_NoRoles(), safe, 8).kl_ctl
    assert (type(ctl).__name__, ctl.unit, ctl.target, ctl.horizon) == ("AdaptiveKLController", "token",
                                                                       SAFE_KL_TARGET_PER_TOKEN, 512.0)
    # a recipe's own keys win over the preset
    mine = PPOConfig(safe_defaults=True, kl_controller="fixed", kl_horizon=100)
    assert (mine.kl_controller, mine.kl_unit, mine.kl_horizon) == ("fixed", "response", 100)
    assert type(build_optimization(_NoRoles(), mine, 8).kl_ctl).__name__ == "FixedKLController"
    with pytest.raises(ConfigError, match="kl_target_per_token"):
        PPOConfig(safe_defaults=False, kl_target_per_token=0.1)
    # k1 KL = logp - ref: row 0 has 0.25 + 0.5 over two real tokens, row 1 has 0.25 over one:
    # per response (0.75 + 0.25) / 2 = 0.5, per token (0.25 + 0.5 + 0.25) / 3 = 1/3
    b = _batch([1.0, 0.0], [[-1.0, -1.0], [-1.0, -1.0]], [[-1.25, -1.5], [-1.25, -7.0]], mask=[[1.0, 1.0], [1.0, 0.0]])
    scores, kl, rewards = shaped_rewards(b, old, 0.05)
    stats = rollout_statistics(b, scores, kl, rewards, torch.zeros(2, 2), 0.05)
    assert stats["kl/mean"] == pytest.approx(0.5, abs=1e-6)
    assert stats["kl/per_token"] == pytest.approx(1 / 3, abs=1e-6)
