"""The tiny recipe's PPO on the vllm engine reaches the gold gain of the hf engine (slow: the
whole recipe, SFT -> reward model -> PPO twice; tens of minutes on a busy 2-core CPU).

vLLM's CPU attention needs heads of 32 dimensions or more, so the base is ``builtin:tiny``
built the same way (same vocabulary, pretraining and seed) with 2 heads of 32 instead of 4 of
16. ``pipelines/tiny.yaml`` runs once with ``ppo.generation: hf``; then only its PPO stage
runs again with ``vllm`` (the pipeline reuses the SFT and reward adapters, whose fingerprints
are unchanged), same seed. Intermediate evaluations and checkpoints are off (PPO still
evaluates the SFT policy first and the trained policy last, on the recipe's 512 held-out
prompts, sampling with the run's engine).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

RECIPE = Path(__file__).resolve().parents[3] / "pipelines" / "tiny.yaml"


def _gain(summary: dict) -> tuple[float, float]:
    """Gold reward of PPO minus SFT, and its standard error (the two evaluations' s.e. combined)."""
    return (summary["gold_reward_ppo"] - summary["gold_reward_sft"],
            math.hypot(summary["gold_reward_ppo_se"], summary["gold_reward_sft_se"]))


def test_tiny_ppo_on_vllm_reaches_the_gold_gain_of_hf(tmp_path, monkeypatch):
    from rlhf.pipeline import Pipeline, plan
    from rlhf.tasks.synthetic import build_tiny_base

    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "home"))
    base = build_tiny_base(tmp_path / "base", seed=0, num_attention_heads=2, num_key_value_heads=2)
    common = [f"model.name_or_path={base}", "num_threads=1", "ppo.eval_every=0", "ppo.save_every=0"]
    gains, stages = {}, {}
    for engine in ("hf", "vllm"):
        pipe = Pipeline(plan(RECIPE, tmp_path / "run", [*common, f"ppo.generation={engine}"]))
        summary = pipe.run()
        gains[engine] = _gain(summary)
        stages[engine] = {s: (pipe.state["stages"][s]["fingerprint"], pipe.state["stages"][s]["finished"]) for s in ("sft", "reward")}
        print(f"[gold gain] {engine}: SFT {summary['gold_reward_sft']:.3f} ± {summary['gold_reward_sft_se']:.3f}, "
              f"PPO {summary['gold_reward_ppo']:.3f} ± {summary['gold_reward_ppo_se']:.3f}, "
              f"gain {gains[engine][0]:+.3f} ± {gains[engine][1]:.3f}, KL {summary['kl_ppo_sft']:.3f}")
    assert stages["hf"] == stages["vllm"]  # one SFT and one reward model for both (not run again)
    (hf, hf_se), (vl, vl_se) = gains["hf"], gains["vllm"]
    assert hf > 2 * hf_se and vl > 2 * vl_se, gains  # both improve
    combined = math.hypot(hf_se, vl_se)
    print(f"[gold gain] vllm - hf = {vl - hf:+.3f}, combined s.e. {combined:.3f} ({(vl - hf) / combined:+.2f} s.e.)")
    assert abs(vl - hf) <= 2 * combined, gains  # the same gain within noise (a 95% band)
