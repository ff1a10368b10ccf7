"""The over-optimisation watchdog in the PPO stage: which judge it uses, and a run that trips
it (scripted evaluation numbers), stops early and publishes the judge's best policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rlhf.config import ConfigError
from rlhf.stages import ppo as stage
from rlhf.stages.ppo import run_ppo, watchdog_judge


def gold(prompt: str, completion: str) -> float:
    return float(len(completion))


def test_the_judge_is_the_held_out_objective(ppo_config, tmp_path):
    assert watchdog_judge(ppo_config(), gold) == "gold"
    assert watchdog_judge(ppo_config(), None) is None  # no judge: auto is off
    assert watchdog_judge(ppo_config(watchdog="off"), gold) is None
    # the objective is a training reward: not held out, so no judge
    trains = ppo_config(advantage_estimator="grpo", num_generations=2, rewards=[{"fn": "task"}])
    assert watchdog_judge(trains, gold) is None
    with pytest.raises(ConfigError, match="ppo.watchdog: on, but there is no held-out judge"):
        watchdog_judge(ppo_config(watchdog="on"), None)
    (tmp_path / "judge.py").write_text("def j(prompts, completions, metadata):\n    return [1.0] * len(prompts)\n")
    fn = watchdog_judge(ppo_config(watchdog_judge=f"{tmp_path}/judge.py:j"), None)
    assert fn(["a"], ["b"], [{}]) == [1.0]


def test_watchdog_stops_and_publishes_the_judges_best_policy(ppo_config, monkeypatch, capsys):
    """Evaluations at updates 0-5 (scripted): the judge peaks at update 1, then the reward
    rises while the judge falls at updates 2 and 3 -> with patience 2 the run stops after
    update 3, and the published policy is the checkpoint of update 1."""
    script = {0: (0.0, 0.5), 1: (1.0, 0.6), 2: (2.0, 0.4), 3: (3.0, 0.3), 4: (4.0, 0.2), 5: (5.0, 0.1), 6: (1.0, 0.6)}
    seen_steps: list[int] = []
    real = stage.evaluate_and_log

    def scripted(s, cfg, tracker, gold_fn, step, limit=None, reference_file=None, judge=None):
        ev = real(s, cfg, tracker, gold_fn, step, limit=limit, reference_file=reference_file, judge=judge)
        assert judge == "gold" and "watchdog/reward" in ev and "watchdog/judge" in ev
        seen_steps.append(step)
        reward, judged = script[step]
        return {**ev, "watchdog/reward": reward, "watchdog/judge": judged}

    monkeypatch.setattr(stage, "evaluate_and_log", scripted)
    cfg = ppo_config(total_episodes=48, rollout_batch_size=8, eval_steps=1, save_steps=1, save_total_limit=0,
                     watchdog_patience=2, eval_max_prompts=4, eval_min_prompts=4)
    result = run_ppo(cfg, gold_fn=gold)
    out = Path(cfg.output_dir)
    assert result.finished and set(result.artifacts) == {"policy", "value"}
    # evaluations 0..3, then the final evaluation of the restored policy (labelled with the last step)
    assert seen_steps == [0, 1, 2, 3, 6]
    assert not (out / "checkpoints" / "update-4").exists()  # stopped after update 3
    m = json.loads((out / "metrics.json").read_text())
    assert (m["watchdog/tripped"], m["watchdog/tripped_step"], m["watchdog/best_step"]) == (1.0, 3.0, 1.0)
    published = load_file(str(out / "policy" / "adapter_model.safetensors"))
    best = load_file(str(out / "checkpoints" / "update-1" / "policy" / "adapter_model.safetensors"))
    last = load_file(str(out / "checkpoints" / "update-3" / "policy" / "adapter_model.safetensors"))
    assert all((published[k] == best[k]).all() for k in best)
    assert any((published[k] != last[k]).any() for k in last)
    assert "[ppo] watchdog:" in capsys.readouterr().out


def test_watchdog_that_never_trips_changes_nothing(ppo_config, monkeypatch):
    cfg = ppo_config(total_episodes=16, rollout_batch_size=8, eval_steps=1, eval_max_prompts=4, eval_min_prompts=4)
    result = run_ppo(cfg, gold_fn=gold)
    m = json.loads((Path(cfg.output_dir) / "metrics.json").read_text())
    assert m["watchdog/tripped"] == 0.0 and m["watchdog/evaluations"] == 3.0  # steps 0, 1 and the final
    assert "final/watchdog/judge" in m and "final/eval/gold_mean" in m
    assert result.finished
