"""DPO in a recipe: SFT -> DPO, or DPO beside the reward model after one SFT; the summary
compares it with SFT, the registry records its lineage, reruns skip it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.config import ConfigError
from rlhf.pipeline import Pipeline, plan

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "pipelines" / "tiny-dpo.yaml"
SMALL = [
    "task.num_sft=256", "task.num_pairs=512", "task.num_ppo_prompts=64", "task.num_eval_prompts=32",
    "sft.train.num_train_epochs=1", "sft.train.save_steps=4", "sft.train.logging_steps=2",
    "reward.train.num_train_epochs=1", "reward.train.logging_steps=4", "reward.train.save_steps=8",
    "dpo.train.num_train_epochs=1", "dpo.train.logging_steps=4", "dpo.train.save_steps=8", "ppo.response_length=12",
]


@pytest.fixture(scope="module")
def home(module_home):
    return module_home


@pytest.fixture(autouse=True)
def _module_home(home, monkeypatch):
    monkeypatch.setenv("RLHF_HOME", str(home))


@pytest.fixture(scope="module")
def run(run_recipe):
    """SFT, reward model and DPO: DPO is scored by the reward model too (RM score, win rate)."""
    return run_recipe(RECIPE, SMALL + ["stages=[sft,reward,dpo]"], "tiny-dpo")


def _state(run_dir: Path) -> dict:
    return json.loads((run_dir / "pipeline.json").read_text())


def test_summary_compares_dpo_with_sft(run):
    p, s = run
    assert set(_state(p.run_dir)["stages"]) == {"sft", "reward", "dpo"}
    for key in ("gold_reward_sft", "gold_reward_sft_se", "gold_reward_dpo", "gold_reward_dpo_se", "kl_dpo_sft",
                "kl_dpo_sft_se", "reward_score_sft", "reward_score_dpo", "win_rate_dpo_sft", "win_rate_dpo_sft_se",
                "gold_win_rate_dpo_sft", "gold_improvement_dpo_in_se", "dpo_eval_loss"):
        assert isinstance(s[key], float), key
    assert s["gold_reward_ppo"] is None  # no PPO stage ran
    assert s["kl_dpo_sft"] != 0.0 and 0.0 <= s["win_rate_dpo_sft"] <= 1.0
    assert s["gold_improvement_dpo"] == pytest.approx(s["gold_reward_dpo"] - s["gold_reward_sft"])
    metrics = _state(p.run_dir)["stages"]["dpo"]["metrics"]
    assert s["gold_reward_sft"] == metrics["initial/eval/gold_mean"] and s["kl_dpo_sft"] == metrics["final/eval/kl_mean"]
    assert metrics["initial/eval/kl_mean"] == 0.0  # the SFT policy's own KL to SFT
    assert json.loads((p.run_dir / "summary.json").read_text()) == s


def test_the_dashboard_shows_the_dpo_policy(run):
    """DPO reports by the summary convention, so the dashboard's and the report's policy table
    has its row (it read eval/* while DPO logged dpo/eval/*, and showed no DPO row)."""
    from rlhf.dashboard.data import load_run, policy_summary

    p, s = run
    rows = {r["label"]: r for r in policy_summary(load_run(p.run_dir, with_lineage=False))["policies"]}
    assert set(rows) == {"SFT policy", "DPO policy"}
    assert rows["DPO policy"]["values"]["gold"][0] == s["gold_reward_dpo"]
    assert rows["DPO policy"]["values"]["win_rate"] == (s["win_rate_dpo_sft"], s["win_rate_dpo_sft_se"])
    assert rows["SFT policy"]["values"]["gold"][0] == s["gold_reward_sft"]
    assert not any("win_rate" in name for name in rows["SFT policy"]["values"])


def test_dpo_adapter_registered_with_lineage(run):
    from rlhf.registry import Registry

    p, _ = run
    st = _state(p.run_dir)["stages"]
    reg = Registry.open()
    ref = st["dpo"]["outputs"]["adapter"]
    entry = reg.resolve(ref)
    assert entry.kind == "adapter" and entry.role == "policy" and entry.metadata["method"] == "dpo"
    assert ref.split(":")[0] == "tiny-dpo-dpo"  # apart from a PPO policy of the same run ("tiny-dpo-policy")
    lineage = json.dumps(reg.lineage(ref))
    for parent in (st["sft"]["outputs"]["adapter"], st["dpo"]["outputs"]["dataset"], st["dpo"]["run"],
                   _state(p.run_dir)["base_ref"]):
        assert parent in lineage, parent
    assert st["dpo"]["outputs"]["dataset"] == st["reward"]["outputs"]["dataset"]  # one ingested version, shared
    run_entry = reg.resolve(st["dpo"]["run"])
    assert run_entry.metadata["stage"] == "dpo"
    assert "beta" in json.dumps(run_entry.metadata)  # the resolved config travels with the run
    assert not reg.verify()


def test_rerun_skips_and_from_dpo_reruns_dpo_only(run, capsys):
    p, _ = run
    overrides = SMALL + ["stages=[sft,reward,dpo]"]
    before = _state(p.run_dir)["stages"]
    Pipeline(plan(RECIPE, p.run_dir, overrides)).run()
    assert capsys.readouterr().out.count("unchanged since its last run, skipped") == 3
    Pipeline(plan(RECIPE, p.run_dir, overrides + ["dpo.beta=0.2"])).run()
    out = capsys.readouterr().out
    assert "sft: unchanged" in out and "reward: unchanged" in out and "dpo: running" in out
    after = _state(p.run_dir)["stages"]
    assert after["sft"]["finished"] == before["sft"]["finished"]
    assert after["dpo"]["outputs"]["adapter"] != before["dpo"]["outputs"]["adapter"]  # a new registry version
    # --from dpo: DPO reruns although nothing changed, the stages before it are kept
    Pipeline(plan(RECIPE, p.run_dir, overrides + ["dpo.beta=0.2"])).run(from_stage="dpo")
    out = capsys.readouterr().out
    assert out.count("unchanged since its last run, skipped") == 2 and "dpo: running" in out
    assert _state(p.run_dir)["stages"]["dpo"]["outputs"]["adapter"] != after["dpo"]["outputs"]["adapter"]
    with pytest.raises(ConfigError, match="--from: 'ppo' is not a stage of this recipe"):
        Pipeline(plan(RECIPE, p.run_dir, overrides)).run(from_stage="ppo")


@pytest.mark.slow
def test_tiny_dpo_improves_gold_reward(tmp_path):
    """The tiny-dpo recipe (SFT -> DPO, no reward model): DPO beats SFT on the gold reward
    by at least 3 standard errors of the difference."""
    p = plan(RECIPE, tmp_path / "tiny-dpo")
    s = Pipeline(p).run()
    assert s["gold_improvement_dpo_in_se"] >= 3.0, s
    assert s["gold_win_rate_dpo_sft"] > 0.5, s
