"""ppo.rewards in the PPO stage: the score is the weighted sum of the sources (a recipe
function, the reward model), each source's raw and weighted means are logged, and a run with
only a function reward loads no reward model at all."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rlhf.stages import ppo as stage
from rlhf.stages.ppo import run_ppo

REWARD_FILE = """
def length(prompts, completions, metadata):
    assert len(prompts) == len(completions) == len(metadata)
    assert all(isinstance(m["messages"], list) and m["messages"][-1]["content"] == p for p, m in zip(prompts, metadata))
    return [float(len(c)) for c in completions]
"""


def _read_metrics(out: Path) -> list[dict]:
    import json

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "reward/score_mean" in r]


def test_score_is_the_weighted_sum_of_the_sources(ppo_config, tmp_path):
    (tmp_path / "rewards.py").write_text(REWARD_FILE)
    cfg = ppo_config(advantage_estimator="grpo", num_generations=2,
                     rewards=[{"fn": f"{tmp_path}/rewards.py:length", "weight": 0.5}, {"rm": "reward", "weight": 2.0}])
    s = stage.setup(cfg)
    sampled, _ = stage.sample(s, cfg, 0)
    plain = stage.score_rollout(s.model, sampled, cfg, chunk=4)
    batch, values = stage.score_with_sources(s, cfg, plain, stage.prompt_indices(s, cfg, 0))
    lengths = torch.tensor([float(len(t)) for t in stage.decode_responses(s.tok, plain)])
    assert torch.allclose(values["length"], lengths) and torch.equal(values["rm"], plain.scores)
    assert torch.allclose(batch.scores, 0.5 * lengths + 2.0 * plain.scores)
    stats = stage.source_statistics(s, values)
    assert stats["reward/length/raw_mean"] == pytest.approx(float(lengths.mean()))
    assert stats["reward/length/weighted_mean"] == pytest.approx(0.5 * float(lengths.mean()))
    assert stats["reward/rm/weighted_mean"] == pytest.approx(2.0 * float(plain.scores.mean()))


def test_function_reward_alone_needs_no_reward_model(ppo_config, tmp_path, monkeypatch):
    """GRPO on a function reward with ppo.reward_adapter empty: no reward role is built, the
    run trains and logs the source's values; the same config with the RM source is refused."""
    (tmp_path / "rewards.py").write_text(REWARD_FILE)
    built = []
    real = stage._build_model

    def build(cfg, device):
        model, tok, base = real(cfg, device)
        built.append(model)
        return model, tok, base

    monkeypatch.setattr(stage, "_build_model", build)
    cfg = ppo_config(advantage_estimator="grpo", num_generations=2, reward_adapter="", total_episodes=16,
                     rewards=[{"fn": f"{tmp_path}/rewards.py:length"}])
    result = run_ppo(cfg)
    assert result.finished and set(result.artifacts) == {"policy"}
    assert not built[0].has_reward and "reward" not in built[0].roles
    metrics = _read_metrics(Path(cfg.output_dir))
    assert len(metrics) == 2
    for m in metrics:
        assert m["reward/length/raw_mean"] == m["reward/length/weighted_mean"] == pytest.approx(m["reward/score_mean"])
        assert all(math.isfinite(v) for v in m.values() if isinstance(v, (int, float)))
    with pytest.raises(Exception, match="ppo.reward_adapter: required"):
        run_ppo(ppo_config(advantage_estimator="grpo", num_generations=2, reward_adapter="",
                           rewards=[{"rm": "reward"}], output_dir=str(tmp_path / "other")))


def test_a_failing_source_stops_the_run_with_its_name(ppo_config, tmp_path):
    (tmp_path / "rewards.py").write_text("def short(prompts, completions, metadata):\n    return [0.0]\n")
    cfg = ppo_config(advantage_estimator="grpo", num_generations=2,
                     rewards=[{"fn": f"{tmp_path}/rewards.py:short"}])
    with pytest.raises(RuntimeError, match=r"reward source fn .*rewards.py:short: expected a list of 8 floats"):
        run_ppo(cfg)


def test_functions_get_the_prompt_rows_other_columns(ppo_config, tmp_path):
    """A verifiable reward reads the answer key from the prompt row: every column but the
    prompt reaches the function's metadata, for the row's own prompt."""
    import json

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say {i}", "answer": i}) + "\n" for i in range(40)))
    (tmp_path / "rewards.py").write_text(
        "def answer(prompts, completions, metadata):\n"
        "    assert all(p == f\"say {m['answer']}\" for p, m in zip(prompts, metadata))\n"
        "    return [float(m['answer']) for m in metadata]\n")
    cfg = ppo_config(advantage_estimator="grpo", num_generations=2, prompts=str(prompts), reward_adapter="",
                     rewards=[{"fn": f"{tmp_path}/rewards.py:answer"}])
    s = stage.setup(cfg)
    sampled, _ = stage.sample(s, cfg, 0)
    rows = stage.prompt_indices(s, cfg, 0)
    batch, values = stage.score_with_sources(s, cfg, stage.score_rollout(s.model, sampled, cfg, chunk=4), rows)
    want = [float(s.prompt_metadata[i]["answer"]) for i in rows]
    assert values["answer"].tolist() == batch.scores.tolist() == want
    assert len(set(want)) == 4  # four prompts, two samples each
