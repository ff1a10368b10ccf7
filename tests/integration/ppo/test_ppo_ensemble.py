"""A reward-model ensemble in the PPO stage: several rm sources (or the reward stage's
members) are frozen LoRA roles on the one base, scored with the sft reference in one
mixed-adapter batch (on CUDA by default) or apart; the score is mean - ppo.ensemble_k * std of the members, and each
member's raw value and the ensemble's mean and std are logged."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from rlhf.scoring import frozen_role_scores, last_token_scores
from rlhf.stages import ppo as stage
from test_ppo_scoring import scoring_forward_rows


def _perturbed_copy(src, out, seed: int) -> str:
    """A reward adapter (LoRA + head) that differs from ``src`` by seeded noise."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    gen = torch.Generator().manual_seed(seed)
    for name, scale in (("adapter_model.safetensors", 0.05), ("head.safetensors", 0.5)):
        tensors = load_file(str(out / name))
        save_file({k: v + torch.randn(v.shape, generator=gen) * scale for k, v in tensors.items()}, str(out / name))
    return str(out)


@pytest.fixture
def members(ppo_assets, tmp_path):
    """Two more reward adapters on the shared base, each different from the first."""
    return [_perturbed_copy(ppo_assets.reward_adapter, tmp_path / f"rm-{seed}", seed) for seed in (31, 47)]


def test_members_score_together_in_one_mixed_batch(ppo_config, make_rollout, members):
    cfg = ppo_config(rewards=[{"rm": "reward"}, {"rm": members[0]}, {"rm": members[1]}], ensemble_k=0.5)
    model, tok, _ = stage._build_model(cfg, torch.device("cpu"))
    assert model.reward_roles == ("reward", "reward-1", "reward-2")
    assert not any(p.requires_grad for n, p in model.peft.named_parameters() if ".reward-" in n)
    batch = make_rollout(model, tok, cfg, n=6)
    model.eval()
    with torch.no_grad():
        ref_mixed, mixed = frozen_role_scores(model, batch, cfg.temperature, mixed=True)
        ref_apart, apart = frozen_role_scores(model, batch, cfg.temperature, mixed=False)
        alone = torch.stack([last_token_scores(model, r, batch) for r in model.reward_roles], dim=1)
    assert mixed.shape == (6, 3)
    assert (mixed - apart).abs().max() < 1e-5 and (mixed - alone).abs().max() < 1e-5
    m = batch.response_mask.bool()
    assert (ref_mixed - ref_apart)[m].abs().max() < 1e-5
    # sharp: each column is its own member (different adapters and heads give different scores)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert (mixed[:, a] - mixed[:, b]).abs().min() > 1e-4
    # the stored score is mean - k * std over the members (population std)
    assert (batch.member_scores - mixed).abs().max() < 1e-5
    stored = batch.member_scores
    assert torch.allclose(batch.scores, stored.mean(1) - 0.5 * stored.std(1, unbiased=False), atol=1e-6, rtol=0)
    # mixed (the CUDA default): one forward per chunk of 2 for sft + 3 members, 2 * (1 + 3) rows
    rows = scoring_forward_rows(model, batch, dataclasses.replace(cfg, mixed_adapter_scoring="on"), chunk=2)
    assert rows.count(8) == 3 and sum(rows) == 3 * (2 + 2 + 8)  # policy, value, sft + members
    # apart (the CPU default): policy, sft, the 3 members and value, 2 rows each per chunk
    rows = scoring_forward_rows(model, batch, cfg, chunk=2)
    assert rows == [2] * 3 * 6


def test_the_reward_stages_members_are_the_default_rm_source(ppo_config, ppo_assets, members, tmp_path):
    """``{rm: reward}`` (and an empty ppo.rewards) loads every member that the reward stage
    listed beside its adapter; the run logs each member's raw value and the ensemble's
    mean and std, and its score is the ensemble's."""
    stage_dir = tmp_path / "reward"
    shutil.copytree(ppo_assets.reward_adapter, stage_dir / "adapter")
    for j, m in enumerate(members, start=1):
        shutil.copytree(m, stage_dir / f"adapter-{j}")
    listed = [{"member": j, "dir": "adapter" if j == 0 else f"adapter-{j}", "ref": None} for j in range(3)]
    (stage_dir / "adapter" / "rlhf_adapter.json").write_text(json.dumps({"role": "reward", "ensemble": listed}))
    cfg = ppo_config(reward_adapter=str(stage_dir / "adapter"), ensemble_k=1.0)
    result = stage.run_ppo(cfg)
    m = result.metrics
    raw = [m[f"train/reward/rm/member{j}_raw_mean"] for j in range(3)]
    assert len(set(raw)) == 3
    assert m["train/reward/rm/ensemble_mean"] == pytest.approx(sum(raw) / 3, abs=1e-5)
    assert m["train/reward/rm/ensemble_std"] > 0
    assert m["train/reward/rm/raw_mean"] < m["train/reward/rm/ensemble_mean"]  # k = 1 takes the std off
    # a member missing from beside member 0 is a clear error
    shutil.rmtree(stage_dir / "adapter-2")
    with pytest.raises(Exception, match=r"member 2 \(adapter-2\) is not beside it"):
        stage.setup(cfg)
