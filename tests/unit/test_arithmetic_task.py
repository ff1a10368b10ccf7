"""The real-model recipe's task: the gold reward checks the sum and the format; the SFT data
is imperfect on both; evaluation prompts never appear in training."""

from __future__ import annotations

from rlhf.tasks.arithmetic import ArithmeticTask


def test_gold_reward_checks_the_sum_and_the_format():
    t = ArithmeticTask()
    p = "What is 47 plus 38? Reply with the number only."
    assert t.evaluate(p, "85") == 1.5 and t.evaluate(p, " 85. ") == 1.5
    assert t.evaluate(p, "The answer is 85.") == 1.0
    assert t.evaluate(p, "The answer is 84, not 85.") == 0.0 and t.evaluate(p, "") == 0.0
    assert t.evaluate(p, "84") == 0.5  # the format the prompt asks for, with a wrong sum
    # a restated question is not the answer: the first integer other than the operands is
    assert t.evaluate(p, "47 + 38 = 85") == 1.0 and t.evaluate(p, "38 plus 47 is 85.") == 1.0
    assert t.evaluate(p, "47 + 38 = 84") == 0.0 and t.evaluate(p, "47") == 0.5


def test_sft_data_is_imperfect_and_eval_prompts_are_held_out():
    t = ArithmeticTask(num_sft=400)
    scores = [t.evaluate(r["prompt"][0]["content"], r["completion"][0]["content"]) for r in t.sft_examples()]
    mean = sum(scores) / len(scores)
    assert 0.6 < mean < 1.2  # room to improve towards 1.5
    evals = {r["prompt"][0]["content"] for r in t.prompts("eval")}
    train = {r["prompt"][0]["content"] for r in t.prompts("train")}
    train |= {r["prompt"][0]["content"] for r in t.sft_examples()}
    train |= {r["prompt"][0]["content"] for r in t.preference_pairs()}
    assert len(evals) == 256 and not evals & train
    for r in t.preference_pairs()[:50]:
        p = r["prompt"][0]["content"]
        assert t.evaluate(p, r["chosen"][0]["content"]) > t.evaluate(p, r["rejected"][0]["content"])


def test_the_equation_format_credits_the_restated_question_with_any_answer():
    t = ArithmeticTask(answer_format="equation")
    p = "What is 47 plus 38? Reply with the equation only."
    assert t.prompts("eval")[0]["prompt"][0]["content"].endswith("Reply with the equation only.")
    assert t.evaluate(p, "47 + 38 = 85") == 1.5 and t.evaluate(p, " 47+38=85. ") == 1.5
    assert t.evaluate(p, "47 + 38 = 84") == 0.5  # the format, a wrong sum
    assert t.evaluate(p, "85") == 1.0 and t.evaluate(p, "The answer is 85.") == 1.0  # right, not the format
    assert t.evaluate(p, "38 + 47 = 85") == 1.0  # the operands out of the question's order
    assert t.evaluate(p, "47 + 38 = 85, so 85") == 1.0 and t.evaluate(p, "") == 0.0
    for r in t.sft_examples()[:40]:
        assert r["completion"][0]["content"].startswith(("The answer is", r["prompt"][0]["content"][8:10]))
    for r in t.preference_pairs()[:50]:
        q = r["prompt"][0]["content"]
        assert t.evaluate(q, r["chosen"][0]["content"]) > t.evaluate(q, r["rejected"][0]["content"])


def test_the_default_format_is_unchanged_and_an_unknown_one_is_refused():
    import pytest

    a, b = ArithmeticTask(), ArithmeticTask(answer_format="number")
    assert a.sft_examples() == b.sft_examples() and a.preference_pairs() == b.preference_pairs()
    assert a.prompts("eval")[0]["prompt"][0]["content"].endswith("Reply with the number only.")
    with pytest.raises(ValueError, match="answer_format"):
        ArithmeticTask(answer_format="words")
