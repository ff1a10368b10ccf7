"""reward.ensemble: N reward models on different seeds and bootstrap resamples, registered
with their lineage, each member's and the ensemble's held-out accuracy in the summary, and
PPO scoring with every member by default."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
# the shared test base (tests/integration/conftest.py), not the builtin tiny base built afresh
SMALL = ["task.num_sft=64", "task.num_pairs=192", "task.num_ppo_prompts=40", "task.num_eval_prompts=8",
         "sft.train.max_steps=2", "reward.train.max_steps=4", "reward.train.per_device_train_batch_size=16",
         "ppo.total_episodes=32", "ppo.rollout_batch_size=32", "ppo.response_length=8"]


def test_ensemble_members_lineage_accuracy_and_ppo(tmp_path, ppo_assets):
    from rlhf.pipeline import Pipeline, plan
    from rlhf.registry import Registry

    run = tmp_path / "ens"
    overrides = SMALL + ["reward.ensemble=3", f"model.name_or_path={ppo_assets.base}"]
    s = Pipeline(plan(ROOT / "pipelines" / "quick.yaml", run, overrides)).run()
    rm = run / "reward"
    dirs = [rm / "adapter", rm / "adapter-1", rm / "adapter-2"]
    # members differ: their own seed and resample
    heads = [load_file(str(d / "head.safetensors"))["weight"] for d in dirs]
    assert all(not torch.equal(heads[a], heads[b]) for a, b in ((0, 1), (0, 2), (1, 2)))
    meta = [json.loads((d / "rlhf_adapter.json").read_text()) for d in dirs]
    assert [(m["member"], m["seed"]) for m in meta] == [(0, 0), (1, 1), (2, 2)]
    assert len({m["resample_seed"] for m in meta}) == 3
    assert [e["dir"] for e in meta[0]["ensemble"]] == ["adapter", "adapter-1", "adapter-2"]
    # registered as three adapters with that lineage, each a child of the dataset it resampled
    reg = Registry.open()
    for j, name in enumerate(["quick-reward", "quick-reward-1", "quick-reward-2"]):
        entry = reg.resolve(name)
        assert entry.metadata["member"] == j and entry.metadata["resample_seed"] == meta[j]["resample_seed"]
        assert any("pairs" in p for p in entry.parents), entry.parents
    assert meta[0]["ensemble"][1]["ref"] == reg.resolve("quick-reward-1").ref
    # the PPO policy descends from every member it was scored by
    members = {reg.resolve(n).ref for n in ("quick-reward", "quick-reward-1", "quick-reward-2")}
    assert members <= set(reg.resolve("quick-policy").parents), reg.resolve("quick-policy").parents
    # each member's and the ensemble's held-out accuracy
    m = json.loads((rm / "metrics.json").read_text())
    accs = [m[f"member{j}_accuracy"] for j in range(3)]
    assert all(0 <= a <= 1 for a in accs) and 0 <= m["ensemble_accuracy"] <= 1 and m["ensemble_members"] == 3
    assert [s[f"rm_member{j}_accuracy"] for j in range(3)] == accs and s["rm_ensemble_accuracy"] == m["ensemble_accuracy"]
    # the gate and the summary read the ensemble's mean score, the reward PPO optimises; member
    # 0's own numbers stay beside the others'
    assert abs(m["heldout_accuracy"] - m["ensemble_accuracy"]) <= 1 / m["heldout_pairs"]
    assert s["rm_accuracy"] == m["heldout_accuracy"] and "member0_heldout_accuracy" in m
    # and the accuracy against the gold preference is the ensemble's too (its members' mean score)
    assert 0 <= s["rm_accuracy_gold"] <= 1
    # PPO scored with all three members (one rm source, by default)
    ppo = json.loads((run / "ppo" / "metrics.json").read_text())
    assert all(f"train/reward/rm/member{j}_raw_mean" in ppo for j in range(3)), sorted(ppo)
    assert ppo["train/reward/rm/ensemble_std"] > 0
    # the members' disagreement on the evaluation's responses, SFT -> PPO
    assert ppo["initial/eval/disagreement_mean"] > 0 and ppo["final/eval/disagreement_mean"] > 0
    assert s["rm_disagreement_sft"] == ppo["initial/eval/disagreement_mean"]


def test_one_member_is_the_single_reward_model(tmp_path, ppo_assets):
    from rlhf.pipeline import Pipeline, plan

    run = tmp_path / "one"
    overrides = SMALL + ["stages=[sft,reward]", "reward.ensemble=1", f"model.name_or_path={ppo_assets.base}"]
    s = Pipeline(plan(ROOT / "pipelines" / "quick.yaml", run, overrides)).run()
    assert sorted(p.name for p in (run / "reward").iterdir() if p.name.startswith("adapter")) == ["adapter"]
    meta = json.loads((run / "reward" / "adapter" / "rlhf_adapter.json").read_text())
    assert "member" not in meta and "ensemble" not in meta
    assert not any(k.startswith(("rm_member", "rm_ensemble")) for k in s)
