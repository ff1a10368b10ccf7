"""Tasks: the data a pipeline trains on and the gold reward it is judged by, in one place.

A task supplies SFT demonstrations, preference pairs, training and evaluation prompts, and
a gold ``evaluate(prompt, completion)``. The training library never looks inside a task: the
pipeline writes the task's rows to files (:func:`write_task_files`) that the stages read like
any other data, passes ``task.evaluate`` to PPO's evaluation (never to training), and
measures the reward model against the gold preference (:func:`gold_rm_accuracy`).

The embedded task is :class:`rlhf.tasks.synthetic.SyntheticTask`; another task implements
the :class:`Task` protocol.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Protocol

__all__ = ["TASK_FILES", "Task", "gold_rm_accuracy", "write_task_files"]

# The files a task becomes (name -> what it holds); the stages read them like user data.
TASK_FILES = ("sft", "pairs", "ppo_prompts", "eval_prompts")


class Task(Protocol):
    """What the pipeline needs from a task. Messages are ``{"role", "content"}`` dicts."""

    name: str

    def sft_examples(self) -> list[dict]:
        """``{"prompt": [messages], "completion": [messages]}`` rows (TRL's conversational
        prompt-completion format)."""

    def preference_pairs(self) -> list[dict]:
        """``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}`` rows."""

    def prompts(self, split: str) -> list[dict]:
        """``{"prompt": [messages]}`` rows of the ``"train"`` (PPO) or ``"eval"`` split."""

    def evaluate(self, prompt: str, completion: str) -> float:
        """The gold reward of ``completion`` (text) to the last user turn ``prompt`` (text)."""

    def response_pairs(self) -> Iterator[tuple[str, str, str]]:
        """Endless ``(prompt, response_a, response_b)`` texts, held out from the training
        data, on which the reward model's preference is compared with the gold one."""


def write_task_files(task: Task, out_dir: str | Path) -> dict[str, str]:
    """Write ``task``'s rows as JSONL files under ``out_dir`` (each renamed into place) and
    return ``{name: path}`` for the names in :data:`TASK_FILES`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, Iterable[dict]] = {
        "sft": task.sft_examples(),
        "pairs": task.preference_pairs(),
        "ppo_prompts": task.prompts("train"),
        "eval_prompts": task.prompts("eval"),
    }
    paths = {}
    for name in TASK_FILES:
        path = out / f"{name}.jsonl"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows[name]:
                f.write(json.dumps(row) + "\n")
        tmp.replace(path)
        paths[name] = str(path)
    return paths


def gold_rm_accuracy(task: Task, base_path: str, dtype: str, reward_adapter: str, n_pairs: int = 512) -> float:
    """Reward-model accuracy against the noiseless gold preference on ``n_pairs`` held-out
    pairs of ``task`` (pairs the gold reward scores equally are skipped).

    Args:
        base_path: resolved base model directory or hub id.
        dtype: weights dtype name (``ModelConfig.dtype``).
        reward_adapter: reward adapter directory (with its score head).
    """
    pairs = []
    for prompt, a, b in task.response_pairs():
        ga, gb = task.evaluate(prompt, a), task.evaluate(prompt, b)
        if ga != gb:
            pairs.append((prompt, a, b, ga > gb))
        if len(pairs) == n_pairs:
            break
    score = _reward_scorer(base_path, dtype, reward_adapter)
    correct = 0
    for chunk in _chunks(pairs, 128):
        sa = score([(q, a) for q, a, _, _ in chunk])
        sb = score([(q, b) for q, _, b, _ in chunk])
        correct += sum(int((x > y) == a_better) for (_, _, _, a_better), x, y in zip(chunk, sa, sb))
    return correct / len(pairs)


def _chunks(items: list, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def _reward_scorer(base_path: str, dtype: str, reward_adapter: str) -> Callable[[list[tuple[str, str]]], list[float]]:
    """``score([(prompt, response), ...])``: the reward model's score of each conversation."""
    import torch

    from rlhf.adapters import RoleModel
    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.ppo.rollout import Sampled
    from rlhf.stages.ppo import last_token_scores, left_pad

    tok = load_tokenizer(base_path)
    model = RoleModel(load_causal_lm(base_path, tok, dtype=dtype), None, reward_adapter)
    model.eval()

    @torch.no_grad()
    def score(texts: list[tuple[str, str]]) -> list[float]:
        seqs = []
        for prompt, resp in texts:
            chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": resp}]
            seqs.append(tok(tok.apply_chat_template(chat, tokenize=False), add_special_tokens=False).input_ids)
        ids, mask = left_pad(seqs, tok.pad_token_id, "cpu")
        # the whole conversation as the "response": the score lands on its last real token
        batch = Sampled(ids[:, :0], mask[:, :0], ids, mask.float(), torch.ones(len(seqs), dtype=torch.bool))
        return last_token_scores(model, "reward", batch).tolist()

    return score
