"""Two-digit addition in words, checked by a program: the real-model recipe's task
(``pipelines/smol-arith.yaml``, SmolLM2-135M-Instruct).

Prompt: "What is 47 plus 38? Reply with the number only." The gold reward of a completion is
1 when its first integer other than the two operands is the sum (so "47 + 38 = 85" counts:
instruct models restate the question), plus 0.5 when the completion is a number alone (the
format the prompt asks for, right or wrong), so 1.5 at best. The format counts on its own
because SmolLM2-135M-Instruct adds two two-digit numbers right about one time in ten (2 of 24
held-out prompts, greedy): a gold reward that credited nothing but right sums would give a
run sized for a CPU almost nothing to learn from, while following "Reply with the number
only" is the part of the instruction a small model can learn. The SFT demonstrations come from a mediocre
writer: the right sum in a sentence ("The answer is 85.") most of the time, a sum off by a
few the rest, so the SFT policy is measurably imperfect on both counts; the preference pairs
prefer a right sum to a wrong one and the bare number to the sentence. The gold reward is
used for evaluation only.

``answer_format: equation`` asks for "47 + 38 = 85" instead, and the 0.5 credits that form.
The smol recipes use it: with the number alone, SmolLM2's reward model rewarded bare numbers
whatever their sum and PPO traded the sums away (right sums 52% -> 8%); the equation puts the
operands just before the sum, where the model adds better (README "Real models").
"""

from __future__ import annotations

import random
import re

#: the answer formats: the prompt's instruction, and the answer written in that format
_FORMATS = {
    "number": ("Reply with the number only.", "{n}"),
    "equation": ("Reply with the equation only.", "{a} + {b} = {n}"),
}
_PROMPT = "What is {a} plus {b}? {instruction}"
_PARSE = re.compile(r"What is (\d+) plus (\d+)\?")
_NUMBER = re.compile(r"-?\d+")


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


class ArithmeticTask:
    """Two-digit addition (see the module docstring).

    Args:
        seed: seeds every list below; evaluation prompts never appear in training.
        num_sft, num_pairs, num_prompts, num_eval: sizes of the SFT demonstrations, the
            preference pairs, the PPO prompts and the held-out evaluation prompts.
        sft_error_rate: fraction of demonstrations with a wrong sum.
        sft_sentence_rate: fraction of demonstrations answering in a sentence.
        answer_format: what the prompt asks for and the gold reward's 0.5 credits: ``number``
            (the number alone, "85") or ``equation`` (the question restated with its answer,
            "47 + 38 = 85": the operands written just before the sum, as instruct models like
            to write it).
    """

    name = "arithmetic"

    def __init__(self, seed: int = 0, num_sft: int = 512, num_pairs: int = 1024, num_prompts: int = 512,
                 num_eval: int = 256, sft_error_rate: float = 0.3, sft_sentence_rate: float = 0.7,
                 answer_format: str = "number"):
        if answer_format not in _FORMATS:
            raise ValueError(f"task.options.answer_format: {answer_format!r} is not one of {', '.join(_FORMATS)}")
        self.answer_format = answer_format
        rng = random.Random(seed)
        pool = [(a, b) for a in range(10, 100) for b in range(10, 100)]
        rng.shuffle(pool)
        self._eval, rest = pool[:num_eval], pool[num_eval:]
        self._rng_seed = seed
        self._train = rest
        self.num_sft, self.num_pairs, self.num_prompts = num_sft, num_pairs, num_prompts
        self.sft_error_rate, self.sft_sentence_rate = sft_error_rate, sft_sentence_rate

    def _prompt(self, a: int, b: int) -> str:
        return _PROMPT.format(a=a, b=b, instruction=_FORMATS[self.answer_format][0])

    def _answer(self, a: int, b: int, n: int) -> str:
        return _FORMATS[self.answer_format][1].format(a=a, b=b, n=n)

    def _sample(self, offset: int, n: int) -> list[tuple[int, int]]:
        return [self._train[(offset + i) % len(self._train)] for i in range(n)]

    @staticmethod
    def _wrong(rng: random.Random, total: int) -> int:
        return total + rng.choice([-10, -2, -1, 1, 2, 10])

    def prompts(self, split: str) -> list[dict]:
        pairs = self._eval if split == "eval" else self._sample(0, self.num_prompts)
        return [{"prompt": _user(self._prompt(a, b))} for a, b in pairs]

    def sft_examples(self) -> list[dict]:
        rng = random.Random(self._rng_seed + 1)
        rows = []
        for a, b in self._sample(self.num_prompts, self.num_sft):
            n = a + b if rng.random() >= self.sft_error_rate else self._wrong(rng, a + b)
            text = f"The answer is {n}." if rng.random() < self.sft_sentence_rate else self._answer(a, b, n)
            rows.append({"prompt": _user(self._prompt(a, b)), "completion": _assistant(text)})
        return rows

    def preference_pairs(self) -> list[dict]:
        rng = random.Random(self._rng_seed + 2)
        rows = []
        for a, b in self._sample(self.num_prompts + self.num_sft, self.num_pairs):
            total = a + b
            if rng.random() < 0.5:  # a right sum over a wrong one, in either format
                fmt = (lambda n: self._answer(a, b, n)) if rng.random() < 0.5 else (lambda n: f"The answer is {n}.")
                chosen, rejected = fmt(total), fmt(self._wrong(rng, total))
            else:  # the asked-for format over the sentence, both right
                chosen, rejected = self._answer(a, b, total), f"The answer is {total}."
            rows.append({"prompt": _user(self._prompt(a, b)), "chosen": _assistant(chosen),
                         "rejected": _assistant(rejected)})
        return rows

    def evaluate(self, prompt: str, completion: str) -> float:
        m = _PARSE.search(prompt)
        if m is None:
            raise ValueError(f"not a prompt of this task: {prompt[:80]!r}")
        a, b = int(m.group(1)), int(m.group(2))
        # the answer is the first integer that is not an operand: an instruct model often
        # restates the question ("47 + 38 = 85"); the sum of two two-digit numbers is never
        # one of them
        numbers = [int(n) for n in _NUMBER.findall(completion) if int(n) not in (a, b)]
        correct = bool(numbers) and numbers[0] == a + b
        if self.answer_format == "number":
            shaped = re.fullmatch(r"\s*-?\d+\.?\s*", completion)
        else:  # the question's operands in its order, then one number
            shaped = re.fullmatch(rf"\s*{a}\s*\+\s*{b}\s*=\s*-?\d+\.?\s*", completion)
        return float(correct) + 0.5 * float(shaped is not None)
