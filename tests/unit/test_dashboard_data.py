"""rlhf.dashboard.data.policy_summary: the policy table of the dashboard and the report, read by
the summary convention of rlhf.summary (hand-written run directories, no training)."""

from __future__ import annotations

import json
from pathlib import Path

from rlhf.dashboard.data import load_run, policy_summary


def _run(root: Path, stage: str, curve: dict[int, dict], final: dict) -> Path:
    """A run with one policy stage: its metrics.jsonl rows (step -> numbers) and final metrics."""
    run_dir = root / "run"
    (run_dir / stage).mkdir(parents=True)
    (run_dir / stage / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": step, "time": 1.0, **row}) + "\n" for step, row in curve.items()))
    state = {"name": "run", "stages": {stage: {"status": "completed", "metrics": final, "outputs": {}}}}
    (run_dir / "pipeline.json").write_text(json.dumps(state))
    return run_dir


def test_the_sft_row_shows_no_win_rate(tmp_path):
    """PPO evaluates SFT at step 0 without win rates (no policy to compare yet) and logs them
    from its first periodic evaluation on: the SFT row used to pick that first logged value,
    a PPO number, as the SFT policy's win rate over itself."""
    curve = {0: {"eval/gold_mean": 0.1, "eval/gold_se": 0.01},
             16: {"eval/gold_mean": 0.2, "eval/gold_se": 0.01, "eval/win_rate_mean": 0.7, "eval/win_rate_se": 0.02},
             32: {"eval/gold_mean": 0.3, "eval/gold_se": 0.01, "eval/win_rate_mean": 0.8, "eval/win_rate_se": 0.02}}
    final = {"initial/eval/gold_mean": 0.1, "initial/eval/gold_se": 0.01, "final/eval/gold_mean": 0.3,
             "final/eval/gold_se": 0.01, "final/eval/win_rate_mean": 0.8, "final/eval/win_rate_se": 0.02}
    sft, ppo = policy_summary(load_run(_run(tmp_path, "ppo", curve, final), with_lineage=False))["policies"]
    assert (sft["label"], ppo["label"]) == ("SFT policy", "PPO policy")
    assert sft["values"] == {"gold": (0.1, 0.01)}
    assert ppo["values"] == {"gold": (0.3, 0.01), "win_rate": (0.8, 0.02)}


def test_a_dpo_stage_reporting_by_the_convention_has_its_row(tmp_path):
    """DPO logs the SFT policy's evaluation at step 0 and its own at its last step (eval/*) and
    reports them as initial/eval/* and final/eval/*: the table shows both policies."""
    curve = {0: {"eval/score_mean": -0.1, "eval/score_se": 0.02},
             40: {"eval/score_mean": 0.2, "eval/score_se": 0.03, "eval/win_rate_mean": 0.6, "eval/win_rate_se": 0.05}}
    final = {"initial/eval/score_mean": -0.1, "initial/eval/score_se": 0.02, "final/eval/score_mean": 0.2,
             "final/eval/score_se": 0.03, "final/eval/win_rate_mean": 0.6, "final/eval/win_rate_se": 0.05}
    table = policy_summary(load_run(_run(tmp_path, "dpo", curve, final), with_lineage=False))
    assert [(r["label"], r["values"]) for r in table["policies"]] == [
        ("SFT policy", {"score": (-0.1, 0.02)}), ("DPO policy", {"score": (0.2, 0.03), "win_rate": (0.6, 0.05)})]
    assert table["columns"] == ["score", "win_rate"]
