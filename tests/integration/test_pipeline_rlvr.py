"""pipelines/tiny-rlvr.yaml: SFT then GRPO on the task's objective as a function reward,
with no reward stage."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.config import ConfigError
from rlhf.pipeline import plan

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "pipelines" / "tiny-rlvr.yaml"


def test_tiny_rlvr_plans_without_a_reward_stage(tmp_path):
    p = plan(RECIPE, tmp_path / "tiny-rlvr", check_inputs=False)
    assert p.stages == ("sft", "ppo")
    assert p.ppo.reward_adapter == "" and p.ppo.rewards == [{"fn": "task"}]
    assert p.ppo.advantage_estimator == "grpo" and p.ppo.dynamic_sampling and p.ppo.clip_high == 0.28


def test_sft_ppo_with_the_reward_model_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="reward must be listed before ppo"):
        plan(RECIPE, tmp_path / "r", ["ppo.rewards=[{rm: reward}]"], check_inputs=False)
    with pytest.raises(ConfigError, match="gae needs a reward model source"):
        plan(RECIPE, tmp_path / "r", ["ppo.advantage_estimator=gae"], check_inputs=False)


def test_function_file_is_recipe_relative(tmp_path):
    recipe = tmp_path / "r.yaml"
    (tmp_path / "my_reward.py").write_text("def f(p, c, m):\n    return [0.0] * len(p)\n")
    recipe.write_text(RECIPE.read_text().replace("- {fn: task}", "- {fn: my_reward.py:f, weight: 2}"))
    p = plan(recipe, tmp_path / "run", check_inputs=False)
    assert p.ppo.rewards == [{"fn": f"{(tmp_path / 'my_reward.py').resolve()}:f", "weight": 2}]


@pytest.mark.slow
def test_tiny_rlvr_full(tmp_path):
    """GRPO on the task's objective beats SFT on the gold reward by at least 3 standard errors,
    without a reward model."""
    from rlhf.pipeline import Pipeline

    p = plan(RECIPE, tmp_path / "tiny-rlvr")
    s = Pipeline(p).run()
    assert s["gold_improvement_in_se"] >= 3.0, s
    assert not (tmp_path / "tiny-rlvr" / "reward").exists()
