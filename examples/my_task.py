"""An example of your own task: prompts, data and an objective in one small class.

Run it on the tiny built-in model (a few minutes on a CPU):

    rlhf run examples/my_task.yaml

The objective here is "no word twice, and mention the topic": 1 point per distinct word
minus 1 per repeated one, divided by the length, plus 0.5 for the topic. The tiny base only
knows the words of the embedded synthetic language, so the example reuses its prompt and
response samplers (its demonstrations are the best of 4 drafts under the objective); with a
real base model you would read your own prompts and data.

A task needs ``prompts(split)`` and ``evaluate(prompt, completion)``; ``sft_examples`` and
``preference_pairs`` are optional (without them, set ``sft.dataset`` / ``reward.dataset``
in the recipe). Rows may use plain strings or ``{"role", "content"}`` message lists.
"""

from __future__ import annotations

import math
import random

from rlhf.tasks.synthetic import sample_pair_response, sample_prompt, sample_response, topic_of


class DistinctWordsTask:
    """Reward responses that repeat no word and name the prompt's topic."""

    name = "distinct-words"

    def __init__(self, seed: int = 0, num_sft: int = 2000, num_pairs: int = 6000, num_prompts: int = 2048,
                 label_temperature: float = 0.25):
        rng = random.Random(seed)
        # Demonstrations written to this task's brief: the best of 4 drafts under the
        # objective (rejection sampling), so the SFT stage already learns the task, not
        # just the language.
        self._sft = []
        for _ in range(num_sft):
            p = sample_prompt(rng)
            drafts = [sample_response(rng, p) for _ in range(4)]
            self._sft.append({"prompt": p, "completion": max(drafts, key=lambda d: self.evaluate(p, d))})
        self._pairs = []
        for _ in range(num_pairs):
            p = sample_prompt(rng)
            a, b = sample_pair_response(rng, p), sample_pair_response(rng, p)
            # noisy preference labels from the objective, like human raters
            if rng.random() >= 1 / (1 + math.exp(-(self.evaluate(p, a) - self.evaluate(p, b)) / label_temperature)):
                a, b = b, a
            if a != b:
                self._pairs.append({"prompt": p, "chosen": a, "rejected": b})
        self._prompts = [{"prompt": sample_prompt(rng)} for _ in range(num_prompts)]

    def prompts(self, split: str) -> list[dict]:
        # no "eval" prompts: the pipeline holds out a slice of the training prompts
        return self._prompts if split == "train" else []

    def sft_examples(self) -> list[dict]:
        return self._sft

    def preference_pairs(self) -> list[dict]:
        return self._pairs

    def evaluate(self, prompt: str, completion: str) -> float:
        words = completion.split()
        if not words:
            return -1.0
        repeated = len(words) - len(set(words))
        score = (len(set(words)) - repeated) / len(words)
        return score + (0.5 if topic_of(prompt) in words else 0.0)
