"""The watchdog on the tiny default with a weak reward model (reward learning rate 5e-3, gate
off): the published policy is not worse than SFT by more than one standard error of the gold
reward, and the summary says what the watchdog did."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_watchdog_is_on_by_default_with_a_task(tmp_path):
    from rlhf.pipeline import plan
    from rlhf.stages.ppo import watchdog_judge

    p = plan(ROOT / "pipelines" / "tiny.yaml", tmp_path / "tiny", check_inputs=False)
    assert p.ppo.watchdog == "auto" and watchdog_judge(p.ppo, p.task().evaluate) == "gold"


@pytest.mark.slow
def test_weak_reward_model_watchdog(tmp_path):
    import math

    from rlhf.pipeline import Pipeline, plan

    p = plan(ROOT / "pipelines" / "tiny.yaml", tmp_path / "tiny-weak",
             ["reward.train.learning_rate=5.0e-3", "reward_gate.enabled=false"])
    s = Pipeline(p).run()
    print({k: s.get(k) for k in ("rm_accuracy", "rm_accuracy_gold", "gold_reward_sft", "gold_reward_ppo",
                                  "gold_improvement_in_se", "kl_ppo_sft", "watchdog_tripped", "watchdog_best_step")})
    assert "watchdog_tripped" in s and "watchdog_evaluations" in s, s
    se = math.hypot(s["gold_reward_sft_se"], s["gold_reward_ppo_se"])
    assert s["gold_reward_ppo"] >= s["gold_reward_sft"] - se, s
