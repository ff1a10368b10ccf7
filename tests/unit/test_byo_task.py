"""Bringing your own task: the task interface, recipe wiring, chat templates, evaluation
splits, win rates and the reward gate (no model training here)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import yaml

from rlhf.config import ConfigError, PipelineConfig, PPOConfig, from_dict
from rlhf.tasks import load_task, provided_files, write_task_files
from rlhf.tasks.synthetic import (
    FORMAT_LENGTH_PENALTY,
    FORMAT_OPENING_BONUS,
    SyntheticTask,
    SyntheticTaskConfig,
    format_gold_reward,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "my_task.py"

PROMPTS_ONLY = '''
class PromptsOnly:
    def __init__(self, n=3):
        self.n = n
    def prompts(self, split):
        return [{"prompt": f"tell me about cats {i}"} for i in range(self.n)] if split == "train" else []
    def evaluate(self, prompt, completion):
        return float(len(completion.split()))
'''


def test_format_task_gold_reward_hand_worked():
    # opens with the topic (+1), 5 words (no penalty)
    assert format_gold_reward("tell me about cats", "cats warm kind the calm") == pytest.approx(FORMAT_OPENING_BONUS)
    # topic not first, 7 words: 2 away from 5
    assert format_gold_reward("tell me about cats", "warm cats a b c d e") == pytest.approx(-2 * FORMAT_LENGTH_PENALTY)
    assert format_gold_reward("tell me about cats", "") == pytest.approx(-5 * FORMAT_LENGTH_PENALTY)
    task = SyntheticTask(SyntheticTaskConfig(name="format", num_sft=4, num_pairs=400, num_ppo_prompts=2, num_eval_prompts=2))
    assert task.name == "format" and task.evaluate("describe rain", "rain a b c d") == pytest.approx(1.0)
    pairs = task.preference_pairs()
    # its labels follow its own gold reward, not the synthetic one
    agree = sum(format_gold_reward(p["prompt"][0]["content"], p["chosen"][0]["content"])
                > format_gold_reward(p["prompt"][0]["content"], p["rejected"][0]["content"]) for p in pairs) / len(pairs)
    assert agree > 0.6


def test_example_task_demonstrations_show_its_own_task():
    example = load_task(from_dict(PipelineConfig, {"task": {"module": f"{EXAMPLE}:DistinctWordsTask",
                                                            "options": {"num_sft": 300, "num_pairs": 1}}}).task)
    default = SyntheticTask(SyntheticTaskConfig(num_sft=300, num_pairs=1, num_ppo_prompts=1, num_eval_prompts=1))

    def text(m):
        return m if isinstance(m, str) else m[-1]["content"]

    def mean_objective(rows):
        return sum(example.evaluate(text(r["prompt"]), text(r["completion"])) for r in rows) / len(rows)

    ours, theirs = example.sft_examples(), default.sft_examples()
    assert [text(r["completion"]) for r in ours] != [text(r["completion"]) for r in theirs]
    # best-of-4 drafts under the objective: clearly better than the default writer's
    assert mean_objective(ours) > mean_objective(theirs) + 0.1


def test_user_task_by_file_and_by_import_path(tmp_path, monkeypatch):
    task = load_task(from_dict(PipelineConfig, {"task": {"module": f"{EXAMPLE}:DistinctWordsTask",
                                                         "options": {"num_sft": 5, "num_pairs": 6, "num_prompts": 7}}}).task)
    assert task.name == "distinct-words" and len(task.prompts("train")) == 7
    assert task.evaluate("tell me about cats", "cats warm kind") > task.evaluate("tell me about cats", "warm warm warm")
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_pkg" / "tasks.py").write_text(PROMPTS_ONLY)
    monkeypatch.syspath_prepend(str(tmp_path))
    t = load_task(SyntheticTaskConfig(module="my_pkg.tasks:PromptsOnly", options={"n": 4}))
    assert len(t.prompts("train")) == 4 and t.name == "PromptsOnly"
    assert provided_files(t) == {"ppo_prompts": "ppo.prompts"}  # no SFT, pairs or eval prompts
    # files: string prompts become one user turn, the format every stage reads
    paths = write_task_files(t, tmp_path / "files")
    row = json.loads(Path(paths["ppo_prompts"]).read_text().splitlines()[0])
    assert row["prompt"] == [{"role": "user", "content": "tell me about cats 0"}]
    for bad, match in (("my_pkg.tasks", "must look like"), ("my_pkg.tasks:Nope", "no attribute 'Nope'"),
                       ("no_such_pkg.x:Y", "cannot import"), ("missing.py:Y", "file not found")):
        with pytest.raises(ConfigError, match=match):
            load_task(SyntheticTaskConfig(module=bad))
    (tmp_path / "my_pkg" / "half.py").write_text("class Half:\n    def prompts(self, split):\n        return []\n")
    with pytest.raises(ConfigError, match="no evaluate method"):
        load_task(SyntheticTaskConfig(module="my_pkg.half:Half"))
    assert load_task(SyntheticTaskConfig()) is None  # nothing named, nothing imported


def _recipe(tmp_path: Path, body: dict, name: str = "r.yaml") -> Path:
    d = tmp_path / "recipes"
    d.mkdir(exist_ok=True)
    (d / name).write_text(yaml.safe_dump(body))
    return d / name


def test_task_and_user_datasets_for_the_same_input_is_a_config_error(tmp_path):
    from rlhf.pipeline import plan

    data = tmp_path / "recipes" / "sft.jsonl"
    data.parent.mkdir()
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    r = _recipe(tmp_path, {"task": {"enabled": True, "num_sft": 4, "num_pairs": 4, "num_ppo_prompts": 4,
                                    "num_eval_prompts": 2}, "sft": {"dataset": "sft.jsonl"}})
    with pytest.raises(ConfigError, match="sft.dataset: the task .synthetic. supplies it"):
        plan(r, tmp_path / "run")


def test_prompts_only_task_with_user_data_and_recipe_relative_paths(tmp_path, monkeypatch):
    from rlhf.pipeline import plan

    d = tmp_path / "recipes"
    d.mkdir()
    (d / "tasks.py").write_text(PROMPTS_ONLY)
    (d / "data").mkdir()
    (d / "data" / "sft.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    (d / "data" / "pairs.jsonl").write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    (d / "t.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    r = _recipe(tmp_path, {"model": {"chat_template": "t.jinja"}, "task": {"module": "tasks.py:PromptsOnly"},
                           "sft": {"dataset": "data/sft.jsonl"}, "reward": {"dataset": "./data/pairs.jsonl"}})
    monkeypatch.chdir(tmp_path)  # not the recipe's folder
    p = plan(r, tmp_path / "run")
    assert p.sft.dataset == str((d / "data" / "sft.jsonl").resolve())
    assert p.reward.dataset == str((d / "data" / "pairs.jsonl").resolve())
    assert p.sft.model.chat_template == str((d / "t.jinja").resolve())
    assert p.ppo.prompts == str(tmp_path / "run" / "task" / "ppo_prompts.jsonl") and p.ppo.eval_prompts == ""
    assert p.task().name == "PromptsOnly"
    # a missing relative file is named relative to the recipe, not the current directory
    r2 = _recipe(tmp_path, {"task": {"module": "tasks.py:PromptsOnly"}, "sft": {"dataset": "nope.jsonl"},
                            "reward": {"dataset": "data/pairs.jsonl"}}, "r2.yaml")
    with pytest.raises(ConfigError, match=str(d / "nope.jsonl")):
        plan(r2, tmp_path / "run2")


def test_config_errors_suggest_the_closest_key():
    with pytest.raises(ConfigError, match="did you mean reward_gate.min_accuracy"):
        from_dict(PipelineConfig, {"reward_gate": {"min_acuracy": 0.6}})
    with pytest.raises(ConfigError, match="did you mean model.chat_template"):
        from_dict(PipelineConfig, {"model": {"chat_templat": "chatml"}})
    with pytest.raises(ConfigError, match="did you mean task"):
        from_dict(PipelineConfig, {"tsak": {}})


def _template_free_tokenizer(tmp_path: Path) -> Path:
    from rlhf.tasks.synthetic import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "tok")
    cfg = tmp_path / "tok" / "tokenizer_config.json"
    data = json.loads(cfg.read_text())
    data.pop("chat_template", None)
    cfg.write_text(json.dumps(data))
    (tmp_path / "tok" / "chat_template.jinja").unlink(missing_ok=True)
    return tmp_path / "tok"


def test_chat_templates_builtin_jinja_file_and_base_models(tmp_path):
    from rlhf.models import CHAT_TEMPLATES, load_tokenizer

    path = str(_template_free_tokenizer(tmp_path))
    msgs = [{"role": "user", "content": "tell me about cats"}]
    with pytest.warns(UserWarning, match="no chat template"):
        base = load_tokenizer(path)  # a base model without a template works
    assert base.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        "user: tell me about cats<eos>\nassistant: "
    chatml = load_tokenizer(path, chat_template="chatml")
    assert chatml.chat_template == CHAT_TEMPLATES["chatml"]
    assert chatml.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        "<|im_start|>user\ntell me about cats<|im_end|>\n<|im_start|>assistant\n"
    jinja = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    assert load_tokenizer(path, chat_template=jinja).apply_chat_template(msgs, tokenize=False) == "[tell me about cats]"
    (tmp_path / "t.jinja").write_text(jinja)
    assert load_tokenizer(path, chat_template=str(tmp_path / "t.jinja")).chat_template == jinja
    with pytest.raises(ConfigError, match="did you mean chatml"):
        load_tokenizer(path, chat_template="chatm")
    with pytest.raises(ConfigError, match="file not found"):
        load_tokenizer(path, chat_template=str(tmp_path / "missing.jinja"))


def test_one_formatting_path_for_sft_and_ppo(tmp_path):
    """Plain-string SFT rows get the chat template like conversational rows and PPO prompts."""
    from rlhf.config import SFTConfig
    from rlhf.models import load_tokenizer
    from rlhf.generation import encode_prompts
    from rlhf.stages.sft import _examples

    plain, conv = tmp_path / "plain.jsonl", tmp_path / "conv.jsonl"
    plain.write_text(json.dumps({"prompt": "tell me about cats", "completion": "warm cats"}) + "\n")
    conv.write_text(json.dumps({"prompt": [{"role": "user", "content": "tell me about cats"}],
                                "completion": [{"role": "assistant", "content": "warm cats"}]}) + "\n")
    a, b = _examples(SFTConfig(dataset=str(plain))), _examples(SFTConfig(dataset=str(conv)))
    assert a == b
    tok = load_tokenizer(str(_template_free_tokenizer(tmp_path)), chat_template="plain")
    sft_prompt = tok(tok.apply_chat_template(a[0]["prompt"], tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False).input_ids
    assert encode_prompts(tok, [a[0]["prompt"]], 64)[0] == sft_prompt
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": 3, "completion": "x"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl row 0: field 'prompt'"):
        _examples(SFTConfig(dataset=str(bad)))


def test_held_out_ppo_prompts():
    from rlhf.evaluation import split_eval_prompts

    prompts = [f"p{i}" for i in range(1000)]
    train, ev = split_eval_prompts(prompts, [], PPOConfig(eval_fraction=0.05))
    assert len(ev) == 50 and not set(ev) & set(train) and len(train) == 950
    assert split_eval_prompts(prompts, [], PPOConfig(eval_fraction=0.05)) == (train, ev)  # seeded
    with pytest.warns(UserWarning, match="holding out 32"):
        train, ev = split_eval_prompts(prompts[:100], [], PPOConfig(eval_fraction=0.05, eval_min_prompts=32))
    assert len(ev) == 32 and len(train) == 68
    with pytest.warns(UserWarning):
        train, ev = split_eval_prompts(prompts[:10], [], PPOConfig())
    assert len(ev) == 5 and len(train) == 5  # never more than half
    assert split_eval_prompts(prompts, ["e"], PPOConfig()) == (prompts, ["e"])


def test_win_rates_hand_worked():
    from rlhf.evaluation import mean_se, win_rates

    rows = [{"score": 2.0, "gold": 1.0}, {"score": 1.0, "gold": 1.0}, {"score": 0.0, "gold": None}]
    ref = [{"score": 1.0, "gold": 0.0}, {"score": 1.0, "gold": 2.0}, {"score": 3.0, "gold": 1.0}]
    assert win_rates(rows, ref, "score") == [1.0, 0.5, 0.0]
    assert win_rates(rows, ref, "gold") == [1.0, 0.0]  # the prompt without a gold value is skipped
    m, se = mean_se([1.0, 0.5, 0.0])
    assert m == pytest.approx(0.5) and se == pytest.approx(0.5 / 3 ** 0.5)


def test_reward_test_split_gets_a_minimum():
    from rlhf.stages.reward import ensure_test_split

    rows = [{"prompt": [{"role": "user", "content": f"q{i % 20}"}], "chosen": "a", "rejected": "b", "i": i}
            for i in range(100)]
    with pytest.warns(UserWarning, match="holding out"):
        train, test = ensure_test_split(rows, [], 16, "pairs:1")
    assert len(test) >= 16 and len(train) + len(test) == 100
    prompts = lambda rs: {r["prompt"][0]["content"] for r in rs}  # noqa: E731
    assert not prompts(train) & prompts(test)  # whole prompts move
    assert ensure_test_split(rows, [], 16, "pairs:1") == (train, test)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ensure_test_split(rows[:50], rows[50:], 16, "x") == (rows[:50], rows[50:])


def _gate_pipeline(tmp_path, metrics: dict, **gate):
    from rlhf.pipeline import Pipeline, plan

    r = _recipe(tmp_path, {"task": {"enabled": True, "num_sft": 4, "num_pairs": 4, "num_ppo_prompts": 4,
                                    "num_eval_prompts": 2}, "reward_gate": gate})
    pipe = Pipeline(plan(r, tmp_path / "run"))
    pipe.state["stages"]["reward"] = {"status": "completed", "metrics": metrics}
    return pipe


def _held_out(correct: int, n: int, margin: float = 0.1) -> dict:
    return {"heldout_correct": correct, "heldout_pairs": n, "heldout_accuracy": correct / n, "heldout_margin": margin}


def test_reward_gate_stops_a_model_at_chance(tmp_path, monkeypatch):
    from rlhf.pipeline import RewardGateFailed

    monkeypatch.setattr("rlhf.pipeline.Pipeline.summary", lambda self, task, evaluate=True: {"stub": True})
    # 153 of 300 (0.510): Wilson 95% lower bound 0.463 (derived as in tests/unit/test_summary.py)
    with pytest.raises(RewardGateFailed, match=r"accuracy 0.510 \(153 of 300 pairs\), 95% lower bound 0.463 "
                                               r"< reward_gate.min_accuracy 0.5\).*Try:"):
        _gate_pipeline(tmp_path, _held_out(153, 300, 0.02))._check_reward_gate("ppo")
    state = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert state["stages"]["ppo"]["status"] == "blocked"
    with pytest.raises(RewardGateFailed, match="margin -0.100 < reward_gate.min_margin"):
        _gate_pipeline(tmp_path, _held_out(210, 300, -0.1))._check_reward_gate("ppo")
    with pytest.raises(RewardGateFailed, match="no held-out accuracy"):
        _gate_pipeline(tmp_path, {})._check_reward_gate("ppo")
    # TRL's accuracy on the pairs that fit is not what the gate reads
    with pytest.raises(RewardGateFailed, match="no held-out accuracy"):
        _gate_pipeline(tmp_path, {"eval_accuracy": 0.9, "eval_margin": 1.0, "test_pairs": 300})._check_reward_gate("ppo")
    _gate_pipeline(tmp_path, _held_out(210, 300, 0.5))._check_reward_gate("ppo")
    _gate_pipeline(tmp_path, _held_out(150, 300), enabled=False)._check_reward_gate("ppo")
    # the point value passes at confidence 0.5 (z = 0): 0.52 >= 0.5
    _gate_pipeline(tmp_path, _held_out(156, 300), min_accuracy=0.5, confidence=0.5)._check_reward_gate("ppo")


def test_reward_gate_uses_the_lower_bound_and_a_least_pair_count(tmp_path, monkeypatch, capsys):
    """The issue's case: 17 of 28 pairs (0.607) passed a point-value gate at 0.55. Its Wilson
    95% lower bound is 0.452 (p = 17/28, z = 1.645: (0.6071 + 0.0483 - 0.1593) / 1.0966), and 28
    pairs are fewer than the default 50: it fails on both. 222 of 300 (0.74) passes: 0.696."""
    from rlhf.pipeline import RewardGateFailed

    monkeypatch.setattr("rlhf.pipeline.Pipeline.summary", lambda self, task, evaluate=True: {"stub": True})
    with pytest.raises(RewardGateFailed) as failed:
        _gate_pipeline(tmp_path, _held_out(17, 28))._check_reward_gate("ppo")
    said = str(failed.value)
    assert "accuracy 0.607 (17 of 28 pairs), 95% lower bound 0.452 < reward_gate.min_accuracy 0.5;" in said
    assert "28 held-out pairs < reward_gate.min_pairs 50" in said
    # the count alone: a bound that passes on too few pairs (20 of 20: 0.881) still stops
    with pytest.raises(RewardGateFailed, match="20 held-out pairs < reward_gate.min_pairs 50") as failed:
        _gate_pipeline(tmp_path, _held_out(20, 20))._check_reward_gate("ppo")
    assert "lower bound 0.881" in str(failed.value) and "min_accuracy" not in str(failed.value).split("Try:")[0]
    capsys.readouterr()
    _gate_pipeline(tmp_path, _held_out(222, 300))._check_reward_gate("ppo")
    assert ("reward gate passed: held-out accuracy 0.740 (222 of 300 pairs), 95% lower bound 0.696"
            in capsys.readouterr().out)
    # 0.58 on 64 pairs (37 of 64), which the old point-value gate passed: bound 0.475, below chance
    with pytest.raises(RewardGateFailed, match=r"95% lower bound 0.475 < reward_gate.min_accuracy 0.5\)"):
        _gate_pipeline(tmp_path, _held_out(37, 64))._check_reward_gate("ppo")
    # a looser level lets 17 of 28 through the bound (0.544 at 0.75) when asked to
    _gate_pipeline(tmp_path, _held_out(17, 28), confidence=0.75, min_accuracy=0.5, min_pairs=20)._check_reward_gate("ppo")


def test_summary_gives_the_held_out_accuracy_its_bound_and_count(tmp_path):
    import io

    from rlhf.pipeline import print_summary

    pipe = _gate_pipeline(tmp_path, dict(_held_out(222, 300, 0.4), heldout_truncated=7, eval_accuracy=0.9))
    s = pipe.summary(None)
    assert s["rm_accuracy"] == 0.74 and s["rm_heldout_pairs"] == 300 and s["rm_heldout_truncated"] == 7
    assert s["rm_accuracy_lower"] == pytest.approx(0.696331, abs=2e-6) and s["rm_accuracy_confidence"] == 0.95
    assert s["rm_margin"] == 0.4
    out = io.StringIO()
    print_summary(s, tmp_path / "run", file=out)
    assert "lower confidence bound" in out.getvalue() and "0.6963 at 95%, n = 300" in out.getvalue()


def test_hh_recipe_ingests_the_subset_its_header_names():
    """The qwen recipe's header command reads helpful-base only, into the name the stages use."""
    import shlex

    from reward_data.cli import build_parser
    from rlhf.pipeline import plan

    recipe = ROOT / "pipelines" / "qwen2.5-0.5b-hh.yaml"
    header = recipe.read_text().split("\nname:")[0]
    assert "(helpful-base)" in header
    line = next(x for x in header.splitlines() if "rlhf data ingest" in x)
    args = build_parser().parse_args(shlex.split(line.split("rlhf data ", 1)[1]))
    assert args.hf_data_dir == "helpful-base" and args.sources == ["Anthropic/hh-rlhf"]
    p = plan(recipe, check_inputs=False)
    assert {p.sft.dataset, p.reward.dataset, p.ppo.prompts, p.ppo.eval_prompts} == {args.name}
    assert p.ppo.eval_max_prompts < p.ppo.rollout_batch_size * p.ppo.eval_steps
