"""The synthetic task behind the Task interface: data, gold reward, files, config."""

from __future__ import annotations

import json

import pytest

from rlhf.config import ConfigError, PipelineConfig, from_dict
from rlhf.tasks import TASK_FILES, write_task_files
from rlhf.tasks.synthetic import (
    MIN_WORDS,
    SHORT_PENALTY,
    TOPIC_BONUS,
    SyntheticTask,
    SyntheticTaskConfig,
    gold_reward,
)

SMALL = SyntheticTaskConfig(num_sft=20, num_pairs=30, num_ppo_prompts=10, num_eval_prompts=5)


def test_gold_reward_hand_worked():
    # mean word value (warm +1, filler 0, harsh -1) + topic bonus - short penalty
    assert gold_reward("tell me about cats", "warm cats kind") == pytest.approx((1 + 0 + 1) / 3 + TOPIC_BONUS)
    assert gold_reward("tell me about cats", "dull the") == pytest.approx(-1 / 2 - SHORT_PENALTY)
    assert gold_reward("tell me about cats", "") == -SHORT_PENALTY
    assert MIN_WORDS == 3


def test_rows_are_deterministic_and_follow_the_formats():
    a, b = SyntheticTask(SMALL), SyntheticTask(SMALL)
    assert a.sft_examples() == b.sft_examples() and a.preference_pairs() == b.preference_pairs()
    other = SyntheticTask(SyntheticTaskConfig(seed=1, num_sft=20, num_pairs=30, num_ppo_prompts=10, num_eval_prompts=5))
    assert other.sft_examples() != a.sft_examples()
    assert len(a.sft_examples()) == 20 and len(a.preference_pairs()) == 30
    assert len(a.prompts("train")) == 10 and len(a.prompts("eval")) == 5
    row = a.preference_pairs()[0]
    assert row["prompt"][0]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
    assert row["chosen"] != row["rejected"]
    with pytest.raises(ValueError, match="split"):
        a.prompts("test")


def test_labels_follow_the_gold_reward_with_noise():
    """Most chosen responses have the higher gold reward, not all (Bradley-Terry noise)."""
    pairs = SyntheticTask(SyntheticTaskConfig(num_pairs=2000)).preference_pairs()
    agree = sum(p["gold_chosen"] > p["gold_rejected"] for p in pairs) / len(pairs)
    assert 0.6 < agree < 0.95
    sharp = SyntheticTask(SyntheticTaskConfig(num_pairs=2000, label_temperature=0.01)).preference_pairs()
    # near-noiseless labels: every pair with a gold difference is ordered by it
    decided = [p for p in sharp if p["gold_chosen"] != p["gold_rejected"]]
    assert sum(p["gold_chosen"] > p["gold_rejected"] for p in decided) / len(decided) > 0.99 > agree


def test_evaluate_is_the_gold_reward_and_held_out_pairs_are_seeded():
    task = SyntheticTask(SMALL)
    assert task.evaluate("describe rain please", "calm rain soft") == gold_reward("describe rain please", "calm rain soft")
    first = [next(task.response_pairs()) for _ in range(2)]
    assert first[0] == first[1]  # every stream starts from the same seed
    prompts = {r["prompt"][0]["content"] for r in task.prompts("train")}
    assert all(isinstance(x, str) for x in first[0]) and prompts


def test_write_task_files(tmp_path):
    task = SyntheticTask(SMALL)
    paths = write_task_files(task, tmp_path / "task")
    assert sorted(paths) == sorted(TASK_FILES)
    rows = {k: [json.loads(x) for x in open(p, encoding="utf-8")] for k, p in paths.items()}
    assert rows["sft"] == task.sft_examples() and rows["pairs"] == task.preference_pairs()
    assert rows["ppo_prompts"] == task.prompts("train") and rows["eval_prompts"] == task.prompts("eval")
    assert not list((tmp_path / "task").glob("*.tmp"))


def test_one_config_class_for_the_recipe_section():
    pipe = from_dict(PipelineConfig, {"task": {"enabled": True, "num_pairs": 7}})
    assert isinstance(pipe.task, SyntheticTaskConfig) and pipe.task.num_pairs == 7
    with pytest.raises(ConfigError, match="task.num_sft"):
        from_dict(PipelineConfig, {"task": {"num_sft": -1}})
    with pytest.raises(ConfigError, match="unknown key task.num_prompts"):
        from_dict(PipelineConfig, {"task": {"num_prompts": 3}})


def test_nothing_outside_the_task_uses_its_vocabulary():
    """The words of the synthetic language appear only in rlhf/tasks/synthetic.py."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    names = ("VOCABULARY", "WORD_VALUE", "CONTENT_WORDS", "TOPICS")
    offenders = [str(p.relative_to(root)) for d in ("rlhf", "reward_data") for p in (root / d).rglob("*.py")
                 if p.name != "synthetic.py" and any(n in p.read_text() for n in names)]
    assert offenders == []


def test_a_recipes_pairs_are_stored_under_its_name(tmp_path):
    """Issue 27 point 8: the task files a recipe writes carry its name, so the pairs it ingests
    become ``<recipe>-pairs:N`` in the data store rather than every recipe's ``pairs:N``."""
    from pathlib import Path

    from rlhf.pipeline import plan
    from rlhf.resolve import resolve_preferences

    root = Path(__file__).resolve().parents[2]
    p = plan(root / "pipelines" / "tiny-dpo.yaml", tmp_path / "run", check_inputs=False)
    assert Path(p.dpo.dataset).name == "tiny-dpo-pairs.jsonl"
    src = Path(p.dpo.dataset)
    src.parent.mkdir(parents=True)
    src.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    assert resolve_preferences("dpo.dataset", str(src), None, 0.0) == "tiny-dpo-pairs:1"


def test_weak_task_labels_follow_the_filler_habit_not_the_gold_reward():
    """The weak task keeps the synthetic task's data and gold reward and changes only labels:
    on spurious_fraction of the pairs the response with more filler words wins. Its labels then
    agree with the gold preference far less, and favour filler far more, than the synthetic
    task's. The SFT rows, drawn first from the shared stream, are the synthetic task's."""
    from rlhf.tasks.synthetic import filler_count

    def stats(**kw):
        pairs = SyntheticTask(SyntheticTaskConfig(num_pairs=3000, **kw)).preference_pairs()
        decided = [p for p in pairs if p["gold_chosen"] != p["gold_rejected"]]
        gold = sum(p["gold_chosen"] > p["gold_rejected"] for p in decided) / len(decided)
        filler = sum(filler_count(p["chosen"][0]["content"]) > filler_count(p["rejected"][0]["content"])
                     for p in pairs) / len(pairs)
        return gold, filler, pairs

    gold_s, filler_s, synthetic = stats(name="synthetic")
    gold_w, filler_w, weak = stats(name="weak")
    assert gold_s > 0.78 and gold_w < 0.68  # measured: 0.81 and 0.63
    assert filler_w > filler_s + 0.2  # measured: 0.63 and 0.36
    task = SyntheticTask(SyntheticTaskConfig(name="weak"))
    assert task.evaluate("describe cats", "very quite then") == gold_reward("describe cats", "very quite then") == 0.0
    assert task.sft_examples() == SyntheticTask(SyntheticTaskConfig()).sft_examples()
    assert len(weak) == len(synthetic) == 3000
    with pytest.raises(ConfigError, match="task.spurious_fraction"):
        from_dict(PipelineConfig, {"task": {"spurious_fraction": 1.5}})
