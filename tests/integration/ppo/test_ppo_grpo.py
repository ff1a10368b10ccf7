"""GRPO in the PPO stage on the tiny model: no critic is built, micro-batch accumulation is
exact for every loss aggregation, and a short run trains with group advantages."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf.estimators import advantages_and_returns
from rlhf import ppo as F
from rlhf.stages.ppo import _build_model, build_optimization, run_ppo, shaped_rewards



def _helpers():
    """The update-test helpers (gradient capture, extra padding, metrics reader), loaded from
    their file: the test directories are not packages."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_ppo_update_helpers", Path(__file__).with_name("test_ppo_update.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._grads_of_update, module._pad_more, module.read_metrics


_grads_of_update, _pad_more, read_metrics = _helpers()


def _n(params) -> int:
    return sum(p.numel() for p in params)


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce++"])
def test_critic_free_estimators_build_no_value_role(estimator, ppo_config):
    """No value LoRA, no value head, no optimizer state for a critic: the optimizer holds
    exactly the policy's parameters, and a GAE model of the same base holds more (the critic)."""
    cfg = ppo_config(advantage_estimator=estimator, num_generations=2)
    model, _, _ = _build_model(cfg, torch.device("cpu"))
    assert "value" not in model.peft.peft_config and "value" not in model.heads
    assert not [n for n, _ in model.named_parameters() if ".value." in n or n.startswith("heads.value")]
    with pytest.raises(ValueError, match="unknown role 'value'"):
        model.activate("value")
    opt = build_optimization(model, cfg, num_updates=1)
    assert _n(opt.params) == _n(model.trainable_parameters("policy")) > 0
    assert _n(p for g in opt.optimizer.param_groups for p in g["params"]) == _n(opt.params)

    gae_cfg = ppo_config()
    gae_model, _, _ = _build_model(gae_cfg, torch.device("cpu"))
    critic = _n(gae_model.trainable_parameters("value"))
    assert critic > 0
    assert _n(build_optimization(gae_model, gae_cfg, 1).params) == _n(opt.params) + critic
    # the whole model is smaller by the critic: value LoRA plus value head
    assert _n(gae_model.parameters()) - _n(model.parameters()) == critic


def _grpo_batch(ppo_config, make_rollout, **overrides):
    cfg = ppo_config(advantage_estimator="grpo", num_generations=2, num_ppo_epochs=1, num_mini_batches=1,
                     per_device_train_batch_size=8, max_grad_norm=0.0, **overrides)
    model, tok, _ = _build_model(cfg, torch.device("cpu"))
    with torch.no_grad():  # policy != sft: the KL loss term has a gradient too
        for n, p in model.peft.named_parameters():
            if ".policy." in n:
                p.add_(torch.randn_like(p) * 0.05)
    batch = make_rollout(model, tok, cfg)
    assert (batch.response_mask == 0).any(), "want rows of different lengths"
    groups = torch.arange(4).repeat_interleave(2)
    scores, kl, rewards = shaped_rewards(batch, cfg, 0.05)
    adv, returns = advantages_and_returns(batch, rewards, scores, kl, cfg, 0.05, groups)
    return model, tok, cfg, batch, adv, returns


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "token-sum-norm"])
def test_accumulation_is_exact_for_every_aggregation(aggregation, ppo_config, make_rollout):
    """One minibatch of 8 rows in one micro-batch, in 4 x 2, and with extra padding: the same
    gradient (1e-6) and loss, with GRPO advantages and the k3 KL loss term."""
    model, tok, cfg, batch, adv, returns = _grpo_batch(ppo_config, make_rollout, loss_aggregation=aggregation)
    whole, whole_stats = _grads_of_update(model, batch, adv, returns, cfg)
    micro, micro_stats = _grads_of_update(model, batch, adv, returns, replace(cfg, per_device_train_batch_size=2))
    padded, padded_stats = _grads_of_update(model, *_pad_more(batch, adv, returns, 3, 2, tok.pad_token_id), cfg)
    assert sum(float(g.abs().sum()) for g in whole) > 0
    for key in ("loss/policy", "loss/kl"):
        assert micro_stats[key] == pytest.approx(whole_stats[key], rel=1e-6, abs=1e-6)
    for a, b in zip(whole, micro):
        assert (a - b).abs().max() < 1e-6
    assert padded_stats["loss/policy"] == pytest.approx(whole_stats["loss/policy"], rel=1e-6, abs=1e-6)
    for a, c in zip(whole, padded):  # token-sum-norm's constant is ppo.response_length, not the padded width
        assert (a - c).abs().max() < 1e-6


def test_aggregations_give_different_gradients(ppo_config, make_rollout):
    """With responses of different lengths the three aggregations weigh tokens differently;
    a stage that ignored ``loss_aggregation`` would give one gradient for all three."""
    model, _, cfg, batch, adv, returns = _grpo_batch(ppo_config, make_rollout)
    grads = {a: _grads_of_update(model, batch, adv, returns, replace(cfg, loss_aggregation=a))[0]
             for a in ("token-mean", "seq-mean-token-mean", "token-sum-norm")}
    names = list(grads)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            diff = max(float((a - b).abs().max()) for a, b in zip(grads[names[i]], grads[names[j]]))
            assert diff > 1e-5, (names[i], names[j])


def test_grpo_run_uses_group_advantages_and_trains(ppo_config, ppo_assets, monkeypatch):
    """A short GRPO run: every update computes GRPO advantages over groups of k samples of one
    prompt (a silent fallback to RLOO, REINFORCE++ or GAE never calls them), the KL is a
    k3 loss term, gradients are non-zero, the policy moves, and no critic is published."""
    calls: list[tuple[torch.Tensor, bool]] = []
    real = F.grpo_advantages

    def spy(scores, group_ids, scale_by_std=True, eps=1e-6):
        calls.append((group_ids.clone(), scale_by_std))
        return real(scores, group_ids, scale_by_std, eps)

    monkeypatch.setattr(F, "grpo_advantages", spy)
    cfg = ppo_config(advantage_estimator="grpo", num_generations=4, total_episodes=24, rollout_batch_size=8,
                     response_length=6, grpo_scale_by_std=False, loss_aggregation="seq-mean-token-mean")
    result = run_ppo(cfg)
    assert result.finished and set(result.artifacts) == {"policy"}
    out = Path(cfg.output_dir)
    assert not (out / "value").exists()
    assert len(calls) == 3
    for groups, scale in calls:
        assert groups.tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and scale is False
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert all(math.isfinite(v) for v in m.values() if isinstance(v, (int, float)))
        assert m["grad_norm"] > 0
        assert "loss/kl" in m and not [k for k in m if k.startswith("value/") or k == "loss/value"]
    assert metrics[-1]["loss/kl"] > 0  # the policy has left the reference
    trained = load_file(str(out / "policy" / "adapter_model.safetensors"))
    start = load_file(str(Path(ppo_assets.sft_adapter) / "adapter_model.safetensors"))
    assert max(float((trained[k] - start[k]).abs().max()) for k in start) > 1e-4


def test_grpo_run_renders_in_the_report_without_a_value_section(ppo_config, tmp_path):
    """The dashboard's report of a GRPO run: its metrics render (policy, KL sections), the
    policy is labelled with its estimator, and there is no value section (no critic)."""
    from rlhf.dashboard.cli import write_report

    cfg = ppo_config(advantage_estimator="grpo", num_generations=2, total_episodes=8, rollout_batch_size=4,
                     response_length=6)
    run_ppo(cfg)
    run_dir = Path(cfg.output_dir).parent  # the stage alone: a one-stage pipeline record around it
    (run_dir / "pipeline.json").write_text('{"name": "grpo", "stages": {"ppo": {"status": "done"}}}')
    page = write_report(run_dir, tmp_path / "report.html").read_text()
    assert 'data-stage="ppo"' in page and 'data-section="policy"' in page
    assert "loss/kl" in page
    assert 'data-section="value"' not in page and "explained variance is not logged" not in page


@pytest.mark.parametrize("whiten", [None, True])
def test_rloo_keeps_each_groups_zero_sum_unless_whitening_is_asked_for(whiten, ppo_config, make_rollout):
    """RLOO's leave-one-out advantages sum to zero within each prompt's group; by default they
    reach the loss as they are (TRL's RLOO does not normalise). ppo.whiten_advantages: true
    whitens them over the batch's tokens, which moves each group's sum off zero."""
    cfg = ppo_config(advantage_estimator="rloo", num_generations=2, whiten_advantages=whiten)
    model, tok, _ = _build_model(cfg, torch.device("cpu"))
    batch = make_rollout(model, tok, cfg)
    groups = torch.arange(4).repeat_interleave(2)
    scores, kl, rewards = shaped_rewards(batch, cfg, 0.05)
    adv, _ = advantages_and_returns(batch, rewards, scores, kl, cfg, 0.05, groups)
    mask = batch.response_mask
    per_row = (adv * mask).sum(1) / mask.sum(1)  # one advantage per response, on every token
    group_sums = per_row.view(4, 2).sum(1)
    if whiten is None:
        assert torch.allclose(group_sums, torch.zeros(4), atol=1e-5) and per_row.abs().max() > 0
    else:
        assert group_sums.abs().max() > 1e-3
        assert float((adv * mask).sum() / mask.sum()) == pytest.approx(0.0, abs=1e-5)
