"""The PPO update loop on the tiny model: exact gradient accumulation,
the number of optimizer steps, and a smoke run of every estimator / KL option."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rlhf.estimators import advantages_and_returns
from rlhf import ppo as F
from rlhf.ppo.rollout import ScoredRollout
from rlhf.stages.ppo import _ppo_update, run_ppo, shaped_rewards


def _grads_of_update(model, batch, adv, returns, cfg) -> tuple[list[torch.Tensor], dict]:
    """Gradients the optimizer sees at the one step of ``_ppo_update`` (lr 0: nothing
    moves), and the update's statistics (losses)."""
    params = model.trainable_parameters("policy") + model.trainable_parameters("value")
    opt = torch.optim.Adam(params, lr=0.0, eps=cfg.adam_epsilon)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    seen: list[list[torch.Tensor]] = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append([p.grad.detach().clone() for p in params]))
    stats = _ppo_update(model, opt, sched, batch, adv, returns, cfg, 0.05, update=0)
    assert stats["optimizer_steps"] == len(seen) == 1
    return seen[0], stats


def _pad_more(batch: ScoredRollout, adv, returns, left: int, right: int, pad_id: int):
    """The same rollout with ``left`` more prompt pad columns and ``right`` more response pad
    columns; per-token tensors get junk (not zeros) there, which masks must ignore."""
    B = batch.prompt_ids.shape[0]

    def right_pad(x, fill):
        return torch.cat([x, torch.full((B, right), fill, dtype=x.dtype)], dim=1)

    padded = ScoredRollout(
        prompt_ids=torch.cat([torch.full((B, left), pad_id, dtype=torch.long), batch.prompt_ids], dim=1),
        prompt_mask=torch.cat([torch.zeros((B, left), dtype=batch.prompt_mask.dtype), batch.prompt_mask], dim=1),
        response_ids=right_pad(batch.response_ids, pad_id),
        response_mask=right_pad(batch.response_mask, 0.0),
        has_stop=batch.has_stop,
        logprobs=right_pad(batch.logprobs, -30.0),
        ref_logprobs=right_pad(batch.ref_logprobs, 5.0),
        entropy=right_pad(batch.entropy, 1.0),
        values=right_pad(batch.values, 100.0),
        scores=batch.scores,
    )
    return padded, right_pad(adv, 50.0), right_pad(returns, -50.0)


def test_accumulated_micro_batches_give_the_minibatch_gradient(role_model, make_rollout):
    """One minibatch of 8 in one micro-batch, in 4 x 2, and with extra padding on both
    sides: the same gradient on policy and value parameters (1e-6, fp32)."""
    model, tok, cfg = role_model
    cfg = replace(cfg, num_ppo_epochs=1, num_mini_batches=1, per_device_train_batch_size=8, max_grad_norm=0.0)
    with torch.no_grad():  # policy != sft and value != reward: every loss term has a gradient
        for n, p in model.peft.named_parameters():
            if ".policy." in n or ".value." in n:
                p.add_(torch.randn_like(p) * 0.05)
    batch = make_rollout(model, tok, cfg)
    assert (batch.response_mask == 0).any(), "want rows of different lengths"
    scores, kl, rewards = shaped_rewards(batch, cfg, 0.05)
    adv, returns = advantages_and_returns(batch, rewards, scores, kl, cfg, 0.05, None)

    whole, whole_stats = _grads_of_update(model, batch, adv, returns, cfg)
    micro, micro_stats = _grads_of_update(model, batch, adv, returns, replace(cfg, per_device_train_batch_size=2))
    padded, padded_stats = _grads_of_update(model, *_pad_more(batch, adv, returns, 3, 2, tok.pad_token_id), cfg)
    for key in ("loss/policy", "loss/value"):
        assert micro_stats[key] == pytest.approx(whole_stats[key], rel=1e-6, abs=1e-6)
        assert padded_stats[key] == pytest.approx(whole_stats[key], rel=1e-6, abs=1e-6)

    n_policy = len(model.trainable_parameters("policy"))
    assert sum(float(g.abs().sum()) for g in whole[:n_policy]) > 0
    assert sum(float(g.abs().sum()) for g in whole[n_policy:]) > 0
    for a, b, c in zip(whole, micro, padded):
        assert (a - b).abs().max() < 1e-6
        assert (a - c).abs().max() < 1e-6


def test_optimizer_steps_per_rollout_are_epochs_times_minibatches(role_model, make_rollout):
    model, tok, cfg = role_model
    cfg = replace(cfg, num_ppo_epochs=3, num_mini_batches=4, per_device_train_batch_size=2)
    batch = make_rollout(model, tok, cfg)
    scores, kl, rewards = shaped_rewards(batch, cfg, 0.05)
    adv, returns = advantages_and_returns(batch, rewards, scores, kl, cfg, 0.05, None)
    params = model.trainable_parameters("policy") + model.trainable_parameters("value")
    opt = torch.optim.Adam(params, lr=cfg.learning_rate)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    steps = []
    opt.register_step_post_hook(lambda o, a, k: steps.append(1))
    stats = _ppo_update(model, opt, sched, batch, adv, returns, cfg, 0.05, update=0)
    assert stats["optimizer_steps"] == len(steps) == 12
    assert sched.last_epoch == 12


# --------------------------------------------------------------------------- options smoke


def read_metrics(out: Path) -> list[dict]:
    """Per-update metrics of a run, one record per step (a resumed run's later line wins)."""
    by_step: dict[int, dict] = {}
    for line in (out.parent / "ppo" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "reward/score_mean" in rec:
            by_step[rec["step"]] = rec
    return [by_step[k] for k in sorted(by_step)]


OPTIONS = {
    "rloo": dict(advantage_estimator="rloo", num_generations=2),
    "grpo": dict(advantage_estimator="grpo", num_generations=2),
    "dr_grpo": dict(advantage_estimator="grpo", num_generations=2, grpo_scale_by_std=False,
                    loss_aggregation="token-sum-norm"),
    "gae_k2_seq_mean": dict(num_generations=2, loss_aggregation="seq-mean-token-mean"),
    "reinforce++": dict(advantage_estimator="reinforce++"),
    "kl_as_loss": dict(kl_in_reward=False, kl_estimator="k3"),
    "k3": dict(kl_estimator="k3"),
    "adaptive_kl": dict(kl_controller="adaptive", kl_coef=0.15, kl_target=6.0, kl_horizon=10000),
    "entropy_bonus": dict(entropy_coef=0.01),
    "whiten_rewards": dict(whiten_rewards=True),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_option_runs_with_finite_metrics(name, ppo_config):
    cfg = ppo_config(total_episodes=8, rollout_batch_size=4, response_length=6, **OPTIONS[name])
    result = run_ppo(cfg)
    assert result.finished and set(result.artifacts) == (
        {"policy", "value"} if cfg.advantage_estimator == "gae" else {"policy"})
    metrics = read_metrics(Path(cfg.output_dir))
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        bad = {k: v for k, v in m.items() if v is None or not math.isfinite(v)}
        assert not bad, bad
    assert metrics[0]["kl/mean"] == 0.0  # the policy starts as an exact copy of sft
    assert metrics[0]["optimizer_steps"] == cfg.num_ppo_epochs * cfg.num_mini_batches
    out = Path(cfg.output_dir)
    assert (out / "policy" / "adapter_model.safetensors").is_file()
    assert (out / "value").is_dir() == (cfg.advantage_estimator == "gae")
    if name == "adaptive_kl":  # KL 0 is below target: beta shrinks by the clipped 20% rule
        assert metrics[0]["kl/coef"] == pytest.approx(0.15)
        assert metrics[1]["kl/coef"] == pytest.approx(0.15 * (1 - 0.2 * 4 / 10000), rel=1e-12)
    if name == "entropy_bonus":
        assert "loss/policy" in metrics[0]


# --------------------------------------------------------------------------- options that must act


def _sampled(batch: ScoredRollout):
    from rlhf.ppo.rollout import Sampled

    return Sampled(batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask, batch.has_stop)


def _kl_loss_setup(role_model, make_rollout, **overrides):
    model, tok, cfg = role_model
    cfg = replace(cfg, num_ppo_epochs=1, num_mini_batches=1, per_device_train_batch_size=8, max_grad_norm=0.0, **overrides)
    with torch.no_grad():  # policy != sft: the KL and its gradient are non-zero
        for n, p in model.peft.named_parameters():
            if ".policy." in n:
                p.add_(torch.randn_like(p) * 0.05)
    batch = make_rollout(model, tok, cfg)
    zeros = torch.zeros_like(batch.logprobs)  # no advantage: the KL term is the whole policy gradient
    return model, cfg, batch, zeros


@pytest.mark.parametrize("estimator", ["k3", "k2"])
def test_kl_loss_gradient_depends_on_the_reference(estimator, role_model, make_rollout):
    """KL as a loss (k3 or k2): replacing ref_logprobs by noise changes the policy gradient
    (with k1 it would not: d(logp - ref)/dθ = d logp/dθ)."""
    from dataclasses import replace as dc_replace

    model, cfg, batch, zeros = _kl_loss_setup(role_model, make_rollout, kl_in_reward=False, kl_estimator=estimator)
    n_policy = len(model.trainable_parameters("policy"))
    real, _ = _grads_of_update(model, batch, zeros, zeros, cfg)
    noisy_ref = batch.ref_logprobs + torch.randn(batch.ref_logprobs.shape, generator=torch.Generator().manual_seed(0))
    noisy, _ = _grads_of_update(model, dc_replace(batch, ref_logprobs=noisy_ref), zeros, zeros, cfg)
    assert max(float(g.abs().max()) for g in real[:n_policy]) > 0
    assert max(float((a - b).abs().max()) for a, b in zip(real[:n_policy], noisy[:n_policy])) > 1e-4


def test_kl_loss_pulls_the_policy_towards_the_reference(role_model, make_rollout):
    """With zero advantages, a KL loss step (k3) lowers the policy's KL to the reference;
    ignored, nothing would move; inverted, the KL would grow."""
    from rlhf.scoring import score_rollout

    model, cfg, batch, zeros = _kl_loss_setup(role_model, make_rollout, kl_in_reward=False, kl_estimator="k3",
                                              learning_rate=0.05)
    m = batch.response_mask.bool()
    before = float(F.kl_penalty(batch.logprobs, batch.ref_logprobs, "k3")[m].mean())  # k3 >= 0 per token
    # plain gradient descent: a small step along -grad lowers the loss (Adam's sign-like
    # steps of fixed size can overshoot a KL this small)
    opt = torch.optim.SGD(model.trainable_parameters("policy"), lr=cfg.learning_rate)
    _ppo_update(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), batch, zeros, zeros,
                replace(cfg, advantage_estimator="reinforce++"), 1.0, update=0)
    after = score_rollout(model, _sampled(batch), cfg, chunk=8)
    kl_after = float(F.kl_penalty(after.logprobs, after.ref_logprobs, "k3")[m].mean())
    assert before > 0 and kl_after < 0.9 * before, (before, kl_after)


def test_entropy_bonus_raises_entropy(role_model, make_rollout):
    """With zero advantages and no KL loss, the only policy gradient is the entropy bonus:
    one step raises the policy's mean entropy on the batch (inverted, it would fall)."""
    from rlhf.scoring import score_rollout

    model, tok, cfg = role_model
    cfg = replace(cfg, num_ppo_epochs=1, num_mini_batches=1, per_device_train_batch_size=8, entropy_coef=1.0, max_grad_norm=0.0,
                  advantage_estimator="reinforce++", learning_rate=3e-3)
    batch = make_rollout(model, tok, cfg)
    zeros = torch.zeros_like(batch.logprobs)
    m = batch.response_mask.bool()
    params = model.trainable_parameters("policy")
    opt = torch.optim.Adam(params, lr=cfg.learning_rate)
    _ppo_update(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), batch, zeros, zeros, cfg, 0.0, update=0)
    after = score_rollout(model, _sampled(batch), cfg, chunk=8)
    assert float(after.entropy[m].mean()) > float(batch.entropy[m].mean()) + 1e-3
