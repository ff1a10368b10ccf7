"""The dashboard over what the real code writes: the tracker's files and a real tiny PPO run.
"""

from __future__ import annotations

import json

import pytest

from rlhf.dashboard.cli import main as dashboard_main
from rlhf.dashboard.data import load_run

from fake_runs import _chart_specs, _chart_divs


def test_dashboard_reads_what_the_tracker_writes(tmp_path):
    from rlhf.tracking import Tracker

    run_dir = tmp_path / "runs" / "tracked"
    run_dir.mkdir(parents=True)
    (run_dir / "pipeline.json").write_text(json.dumps({"name": "tracked", "stages": {"ppo": {"status": "running"}}}))
    tracker = Tracker(run_dir, "ppo", config={"rollout_batch_size": 4}, group="tracked")
    for step in range(4):
        tracker.log({"reward/score_mean": step / 2, "kl/mean": float("nan") if step == 2 else 0.1 * step}, step=step)
    tracker.log_samples(3, [{"prompt": "q", "completion": "a", "score": 0.5, "gold": 1.0, "length": 7}])
    tracker.finish()
    (run_dir / "ppo" / "config.yaml").write_text("rollout_batch_size: 4\n")
    (stage,) = load_run(run_dir).stages
    assert stage.series["reward/score_mean"] == {"step": [0, 1, 2, 3], "value": [0.0, 0.5, 1.0, 1.5]}
    assert stage.series["kl/mean"]["value"] == [0.0, 0.1, None, pytest.approx(0.3)]  # NaN is a gap, not an error
    assert stage.samples == [{"step": 3, "prompt": "q", "completion": "a", "score": 0.5, "gold": 1.0, "length": 7.0}]
    assert stage.info["world_size"] == 1
    page = tmp_path / "r.html"
    assert dashboard_main(["report", str(run_dir), "--out", str(page)]) == 0
    text = page.read_text()
    assert '<meta http-equiv="refresh"' not in text  # the shared file never reloads
    (hist,) = [s for s in _chart_specs(text) if "hist-length" in s["id"]]
    assert hist["figure"]["data"][0]["x"] == [7.0] and "tokens" in hist["figure"]["layout"]["title"]["text"]


def test_a_real_ppo_run_fills_every_section(ppo_config, ppo_assets, tmp_path):
    """The PPO stage's own logging (not a fake): what it logs lands where the page promises."""
    from rlhf.dashboard.data import policy_summary
    from rlhf.dashboard.metrics import plan_stage
    from rlhf.stages.ppo import run_ppo

    run_dir = tmp_path / "runs" / "real"
    cfg = ppo_config(output_dir=str(run_dir / "ppo"), eval_prompts=str(ppo_assets.eval_prompts), total_episodes=12,
                     rollout_batch_size=4, eval_steps=1, num_samples_logged=4, kl_controller="fixed")
    calls = iter(range(10_000))  # a gold reward that rises with every call, so it is never constant
    # the stage logs under its output_dir (run_dir/ppo), as inside a pipeline run
    metrics = run_ppo(cfg, group="real", gold_fn=lambda prompt, response: float(next(calls))).metrics
    (run_dir / "pipeline.json").write_text(json.dumps(
        {"name": "real", "stages": {"ppo": {"status": "completed", "metrics": metrics}}}))
    run = load_run(run_dir)
    (stage,) = run.stages
    plan = plan_stage(stage.series)
    assert {"reward", "kl", "policy", "value", "lengths", "optimization", "throughput", "evaluation"} <= set(plan.charts)
    assert plan.constants["kl"]["kl/coef"]["value"] == cfg.kl_coef  # fixed controller: a number
    assert "optimizer_steps" in plan.constants["optimization"]
    evals = {chart.key: chart.se_key for chart in plan.charts["evaluation"]}
    assert evals["eval/gold_mean"] == "eval/gold_se"
    # A tiny policy may answer the fixed-seed evaluation identically each time: an unchanged
    # mean is a number with its standard error, a changing one a chart with its band.
    for name in ("score", "kl", "length", "entropy"):
        key = f"eval/{name}_mean"
        constant = plan.constants.get("evaluation", {}).get(key)
        assert evals.get(key) == f"eval/{name}_se" or (constant and constant["se"] is not None), key
    assert not any(chart.key.endswith("_se") for charts in plan.charts.values() for chart in charts)
    summary = policy_summary(run)
    sft, ppo = summary["policies"]
    for name in ("gold", "score", "kl", "length"):
        assert sft["values"][name] == (metrics[f"initial/eval/{name}_mean"], metrics[f"initial/eval/{name}_se"])
        assert ppo["values"][name] == (metrics[f"final/eval/{name}_mean"], metrics[f"final/eval/{name}_se"])
    out = tmp_path / "real.html"
    assert dashboard_main(["report", str(run_dir), "--out", str(out)]) == 0
    page = out.read_text()
    specs = {s["id"]: s for s in _chart_specs(page)}
    placed = _chart_divs(page)
    (score_hist,) = [specs[c] for c, (_, _, k) in placed.items() if k == "ppo-hist-score"]
    logged = [row for row in stage.samples]
    assert [t["x"] for t in score_hist["figure"]["data"]] == [
        [r["score"] for r in logged if r["step"] == step] for step in (0, 1, 2, 3)]
    (kl,) = [specs[c] for c, (_, _, k) in placed.items() if k == "ppo-kl/mean"]
    assert [e for e in kl["extra"] if e["role"] == "line"][0]["x_alt"] == [4 * s for s in (1, 2, 3)]
