"""The verifiable-reward objectives wired into the PPO stage: overlong shaping, truncated
responses masked out of the loss, dynamic sampling's refill, and a short run with every
option on (decoupled clip, GSPO ratio, whole-group minibatches)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rlhf import ppo as F
from rlhf.stages import ppo as stage
from rlhf.stages.ppo import _build_model, _ppo_update, final_scores, run_ppo


def _helpers():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_ppo_update_helpers", Path(__file__).with_name("test_ppo_update.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.read_metrics


read_metrics = _helpers()


def _policy_grads(model, batch, adv, cfg, loss_mask=None):
    params = model.trainable_parameters("policy")
    opt = torch.optim.Adam(params, lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    seen: list[list[torch.Tensor]] = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append([p.grad.detach().clone() for p in params]))
    stats = _ppo_update(model, opt, sched, batch, adv, adv, cfg, 0.05, update=0, loss_mask=loss_mask)
    return seen[0], stats


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_masked_truncated_rows_give_the_gradient_of_the_other_rows(aggregation, ppo_config, make_rollout):
    """With rows 1, 3, 6 marked as cut off, the masked update's gradient is exactly the
    gradient of an update on the five other rows alone (both normalisations count only them)."""
    cfg = ppo_config(advantage_estimator="grpo", num_generations=2, num_ppo_epochs=1, num_mini_batches=1,
                     per_device_train_batch_size=2, max_grad_norm=0.0, mask_truncated_completions=True, loss_aggregation=aggregation)
    model, tok, _ = _build_model(cfg, torch.device("cpu"))
    with torch.no_grad():
        for n, p in model.peft.named_parameters():
            if ".policy." in n:
                p.add_(torch.randn_like(p) * 0.05)
    batch = make_rollout(model, tok, cfg)
    has_stop = torch.tensor([True, False, True, False, True, True, False, True])
    batch = replace(batch, has_stop=has_stop)
    adv = torch.linspace(-1.0, 1.0, 8)[:, None] * batch.response_mask
    masked, stats = _policy_grads(model, batch, adv, cfg, F.truncated_loss_mask(batch.response_mask, has_stop))
    keep = has_stop.nonzero().flatten()
    subset, _ = _policy_grads(model, batch.index(keep), adv[keep], replace(cfg, per_device_train_batch_size=1))
    full, _ = _policy_grads(model, batch, adv, cfg)
    assert sum(float(g.abs().sum()) for g in masked) > 0
    for a, b in zip(masked, subset):
        assert (a - b).abs().max() < 1e-6
    assert max(float((a - b).abs().max()) for a, b in zip(masked, full)) > 1e-5  # the mask did something
    assert all(math.isfinite(v) for v in stats.values())


def test_overlong_buffer_lowers_the_scores_of_long_responses(ppo_config, make_rollout, role_model):
    model, tok, cfg = role_model
    batch = make_rollout(model, tok, cfg)
    lengths = batch.response_mask.sum(1)
    assert lengths.max() > cfg.response_length - 6, "want a response inside the ramp"
    plain = final_scores(batch, cfg)
    shaped = final_scores(batch, replace(cfg, overlong_buffer=6, overlong_penalty=0.5))
    want = plain - 0.5 * ((lengths - (cfg.response_length - 6)) / 6).clamp(0, 1)
    assert torch.allclose(shaped, want)
    assert (shaped < plain).any()


def test_dynamic_sampling_refills_with_informative_groups(ppo_config, monkeypatch):
    """Draw 0: groups 0 and 2 score alike and are dropped; draw 1 supplies two more groups.
    With one round allowed, the dropped groups fill the batch instead (counted as filler)."""
    cfg = ppo_config(advantage_estimator="grpo", num_generations=2, dynamic_sampling=True)
    s = stage.setup(cfg)
    draws: list[int] = []
    real_sample = stage.sample

    def sample(s_, cfg_, update, draw=0):
        draws.append(draw)
        return real_sample(s_, cfg_, update, draw)

    def scores(batch, cfg_):  # draw 0: [1, 1, 0, 1, 2, 2, 0, 1]; later draws: all informative
        if len(draws) == 1:
            return torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0, 0.0, 1.0])
        return torch.arange(8, dtype=torch.float32)

    monkeypatch.setattr(stage, "sample", sample)
    monkeypatch.setattr(stage, "final_scores", scores)
    first, groups = stage.sample(s, cfg, 0)
    batch = stage.score_rollout(s.model, first, cfg, chunk=4)
    out, out_groups, stats = stage.dynamic_sampling(s, cfg, 0, batch, groups)
    assert draws == [0, 1]
    assert stats == {"dynamic_sampling/rounds": 2.0, "dynamic_sampling/dropped_groups": 2.0,
                     "dynamic_sampling/filler_groups": 0.0, "dynamic_sampling/informative_groups": 6.0}
    assert out_groups.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # groups 1 and 3 of the first draw, then groups 0 and 1 of the second
    assert torch.equal(out.response_ids[:2], batch.response_ids[2:4])
    assert torch.equal(out.response_ids[2:4], batch.response_ids[6:8])
    assert not torch.equal(out.response_ids[4:], batch.response_ids[4:])  # fresh samples

    draws.clear()
    draws.append(0)
    out, _, stats = stage.dynamic_sampling(s, replace(cfg, dynamic_sampling_max_rounds=1), 0, batch, groups)
    assert draws == [0] and stats["dynamic_sampling/filler_groups"] == 2.0
    order = [2, 3, 6, 7, 0, 1, 4, 5]  # informative groups first, then the dropped ones
    assert torch.equal(out.response_ids, batch.response_ids[order])
    assert torch.equal(out.scores, batch.scores[order])


def test_short_run_with_every_verifiable_option(ppo_config, monkeypatch):
    """GRPO with clip-higher, the GSPO ratio, overlong shaping, truncated rows masked, dynamic
    sampling and whole-group minibatches: the options reach the loss and the minibatch plan,
    the run logs finite metrics, including the dynamic-sampling counts."""
    seen: dict[str, set] = {"clip_high": set(), "ratio_level": set(), "group_size": set()}
    real_loss, real_plan = F.policy_loss, F.ppo_minibatch_indices

    def loss(*a, clip_high=None, ratio_level="token", **kw):
        seen["clip_high"].add(clip_high)
        seen["ratio_level"].add(ratio_level)
        return real_loss(*a, clip_high=clip_high, ratio_level=ratio_level, **kw)

    def plan(*a, group_size=1, **kw):
        seen["group_size"].add(group_size)
        parts = real_plan(*a, group_size=group_size, **kw)
        for p in parts:  # whole groups of 4 adjacent rows
            assert sorted((p // 4).tolist()) == [g for g in sorted(set((p // 4).tolist())) for _ in range(4)]
        return parts

    monkeypatch.setattr(F, "policy_loss", loss)
    monkeypatch.setattr(F, "ppo_minibatch_indices", plan)
    cfg = ppo_config(advantage_estimator="grpo", num_generations=4, total_episodes=16, rollout_batch_size=8,
                     response_length=6, clip_low=0.2, clip_high=0.28, importance_ratio="sequence",
                     loss_aggregation="seq-mean-token-mean", overlong_buffer=2, mask_truncated_completions=True,
                     dynamic_sampling=True, minibatch_whole_groups=True)
    result = run_ppo(cfg)
    assert result.finished
    assert seen == {"clip_high": {0.28}, "ratio_level": {"sequence"}, "group_size": {4}}
    metrics = read_metrics(Path(cfg.output_dir))
    assert len(metrics) == 2
    for m in metrics:
        assert all(math.isfinite(v) for v in m.values() if isinstance(v, (int, float)))
        assert m["dynamic_sampling/rounds"] >= 1
        assert m["dynamic_sampling/informative_groups"] + m["dynamic_sampling/dropped_groups"] >= 2
