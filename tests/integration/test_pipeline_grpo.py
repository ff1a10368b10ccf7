"""pipelines/tiny-grpo.yaml: the tiny default with GRPO in the RL stage."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.config import PPOConfig, from_dict, load_yaml

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "pipelines" / "tiny-grpo.yaml"


def test_tiny_grpo_recipe_resolves_to_critic_free_grpo():
    cfg = from_dict(PPOConfig, load_yaml(RECIPE)["ppo"], prefix="ppo")
    assert cfg.advantage_estimator == "grpo" and cfg.num_generations == 4
    assert (cfg.kl_in_reward, cfg.kl_estimator) == (False, "k3")
    tiny = load_yaml(ROOT / "pipelines" / "tiny.yaml")
    grpo = load_yaml(RECIPE)
    # the same task, SFT and reward model: only the RL stage differs
    assert {k: v for k, v in grpo.items() if k not in ("name", "ppo")} == {
        k: v for k, v in tiny.items() if k not in ("name", "ppo")}


@pytest.mark.slow
def test_tiny_grpo_full(tmp_path):
    """GRPO beats SFT on gold reward by at least 3 standard errors, without a critic."""
    from rlhf.pipeline import Pipeline, plan

    p = plan(RECIPE, tmp_path / "tiny-grpo")
    s = Pipeline(p).run()
    assert s["gold_improvement_in_se"] >= 3.0, s
    assert not (tmp_path / "tiny-grpo" / "ppo" / "value").exists()
