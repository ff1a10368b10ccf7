"""Tasks: the data a pipeline trains on and the gold reward it is judged by, in one place.

A task supplies SFT demonstrations, preference pairs, training and evaluation prompts, and
a gold ``evaluate(prompt, completion)``. The training library never looks inside a task: the
pipeline writes the task's rows to files (:func:`write_task_files`) that the stages read like
any other data, passes ``task.evaluate`` to PPO's evaluation (never to training), and
measures the reward model against the gold preference (:func:`gold_rm_accuracy`).

The embedded tasks (``task.name: synthetic`` or ``format``) are
:class:`rlhf.tasks.synthetic.SyntheticTask`; your own task is any class with the methods of
:class:`Task` (only ``prompts`` and ``evaluate`` are required), named in the recipe by import
path (``task.module: my_pkg.my_task:MyTask`` or ``path/to/my_task.py:MyTask``) and built by
:func:`load_task` with ``task.options`` as keyword arguments. Nothing imports a user's
module unless a recipe names it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Protocol

from rlhf.atomic import write_lines

__all__ = ["TASK_FILES", "Task", "check_task_module", "gold_rm_accuracy", "load_task", "provided_files",
           "write_task_files"]

# The files a task becomes (name -> what it holds); the stages read them like user data.
TASK_FILES = ("sft", "pairs", "ppo_prompts", "eval_prompts")


class Task(Protocol):
    """What the pipeline needs from a task. Messages are ``{"role", "content"}`` dicts; a
    plain string prompt or response is accepted too (it becomes one user or assistant turn).

    Required: ``prompts`` and ``evaluate``. Optional (leave the method out): ``sft_examples``
    and ``preference_pairs`` (otherwise the recipe's ``sft.dataset`` / ``reward.dataset``
    supply them) and ``response_pairs`` (the reward model's accuracy against the gold one).
    """

    name: str

    def prompts(self, split: str) -> list[dict]:
        """``{"prompt": [messages]}`` rows of the ``"train"`` (PPO) or ``"eval"`` split; an
        empty eval split means a held-out slice of the training prompts is evaluated."""

    def evaluate(self, prompt: str, completion: str) -> float:
        """The gold reward of ``completion`` (text) to the last user turn ``prompt`` (text)."""

    def sft_examples(self) -> list[dict]:
        """(optional) ``{"prompt": [messages], "completion": [messages]}`` rows (TRL's
        conversational prompt-completion format)."""

    def preference_pairs(self) -> list[dict]:
        """(optional) ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}`` rows."""

    def response_pairs(self) -> Iterator[tuple[str, str, str]]:
        """(optional) Endless ``(prompt, response_a, response_b)`` texts, held out from the
        training data, on which the reward model's preference is compared with the gold one."""


# which optional method fills which file, and the recipe key the file replaces
_FILE_SOURCE = {"sft": ("sft_examples", "sft.dataset"), "pairs": ("preference_pairs", "reward.dataset"),
                "ppo_prompts": ("prompts", "ppo.prompts"), "eval_prompts": ("prompts", "ppo.eval_prompts")}


def provided_files(task: Task) -> dict[str, str]:
    """``{file name: recipe key}`` of the files ``task`` provides (see :data:`TASK_FILES`);
    the eval prompts count only when the task has some."""
    out = {}
    for name, (method, key) in _FILE_SOURCE.items():
        if callable(getattr(task, method, None)) and (name != "eval_prompts" or task.prompts("eval")):
            out[name] = key
    return out


def load_task(cfg, base_dir: str | Path = ".") -> Task | None:
    """The task a recipe's ``task:`` section names, or None when it names none.

    Args:
        cfg: the section (:class:`rlhf.tasks.synthetic.SyntheticTaskConfig`).
        base_dir: where a relative ``module`` file path is looked up (the recipe's folder).

    Raises:
        rlhf.config.ConfigError: naming ``task.module`` when it does not import, lacks the
            attribute, or builds something without ``prompts`` and ``evaluate``.
    """
    from rlhf.config import ConfigError, import_named

    if not cfg.module:
        if not cfg.enabled:
            return None
        from rlhf.tasks.synthetic import SyntheticTask

        return SyntheticTask(cfg)
    check_task_module(cfg, base_dir)
    attr = cfg.module.rpartition(":")[2]
    cls = import_named(cfg.module, "task.module", base_dir)
    try:
        task = cls(**cfg.options)
    except TypeError as e:
        raise ConfigError(f"task.module: {cfg.module} rejected task.options {cfg.options}: {e}") from None
    missing = [m for m in ("prompts", "evaluate") if not callable(getattr(task, m, None))]
    if missing:
        raise ConfigError(f"task.module: {cfg.module} has no {' or '.join(missing)} method (see rlhf.tasks.Task)")
    if not getattr(task, "name", None):
        task.name = attr
    return task


def check_task_module(cfg, base_dir: str | Path = ".") -> None:
    """Check what can be checked of ``task.module`` without running its code (``rlhf run
    --validate-only`` and ``rlhf config show`` import nothing): its form, and that the file,
    or the top-level package of an import path, exists.

    Raises:
        rlhf.config.ConfigError: naming ``task.module``.
    """
    import importlib.util

    from rlhf.config import ConfigError

    target, sep, attr = cfg.module.rpartition(":")
    if not sep or not target or not attr:
        raise ConfigError(f"task.module: {cfg.module!r} must look like 'my_pkg.my_task:MyTask' or 'path/to/file.py:MyTask'")
    if target.endswith(".py"):
        path = Path(target) if Path(target).is_absolute() else Path(base_dir) / target
        if not path.is_file():
            raise ConfigError(f"task.module: file not found: {path}")
    elif importlib.util.find_spec(target.split(".")[0]) is None:  # a top-level lookup runs no code
        raise ConfigError(f"task.module: cannot import {target!r}: no module named {target.split('.')[0]!r}")


def task_file_name(name: str, run_name: str = "") -> str:
    """The file name of task file ``name``; the pairs file is ``<run_name>-pairs.jsonl``, since
    the data store names what it ingests after the file: a recipe's pairs are then stored under
    its name (``tiny-dpo-pairs:1``), not as one ``pairs`` shared by every recipe."""
    return f"{run_name}-{name}.jsonl" if run_name and name == "pairs" else f"{name}.jsonl"


def write_task_files(task: Task, out_dir: str | Path, run_name: str = "") -> dict[str, str]:
    """Write ``task``'s rows as JSONL files under ``out_dir`` (each renamed into place, named by
    :func:`task_file_name`) and return ``{name: path}`` for the names in :data:`TASK_FILES` the
    task provides (:func:`provided_files`). String prompts and responses become one-turn message lists.

    Raises:
        ValueError: naming the task, file and row of a row without the fields it needs.
    """
    from rlhf.data import as_messages

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fields = {"sft": (("prompt", "user"), ("completion", "assistant")),
              "pairs": (("prompt", "user"), ("chosen", "assistant"), ("rejected", "assistant")),
              "ppo_prompts": (("prompt", "user"),), "eval_prompts": (("prompt", "user"),)}
    calls = {"sft": lambda: task.sft_examples(), "pairs": lambda: task.preference_pairs(),
             "ppo_prompts": lambda: task.prompts("train"), "eval_prompts": lambda: task.prompts("eval")}
    rows: dict[str, Iterable[dict]] = {}
    for name in provided_files(task):
        got = []
        for i, row in enumerate(calls[name]() or []):
            if not isinstance(row, dict):
                raise ValueError(f"task {task.name}: {name} row {i}: expected a mapping, got {type(row).__name__}")
            got.append({**row, **{k: as_messages(row.get(k), role, f"task {task.name}: {name} row {i}", k)
                                  for k, role in fields[name]}})
        rows[name] = got
    if not rows.get("ppo_prompts"):
        raise ValueError(f"task {task.name}: prompts('train') returned no prompts")
    paths = {}
    for name in rows:
        path = out / task_file_name(name, run_name)
        write_lines(path, [json.dumps(row) for row in rows[name]])
        paths[name] = str(path)
    return paths


def gold_rm_accuracy(task: Task, base_path: str, dtype: str, reward_adapter: str | list[str], n_pairs: int = 512,
                     chat_template: str = "") -> float:
    """Reward-model accuracy against the noiseless gold preference on ``n_pairs`` held-out
    pairs of ``task`` (pairs the gold reward scores equally are skipped).

    Args:
        base_path: resolved base model directory or hub id.
        dtype: weights dtype name (``ModelConfig.dtype``).
        reward_adapter: reward adapter directory (with its score head), or the directories of
            an ensemble's members, scored by their mean score.
        chat_template: ``ModelConfig.chat_template`` of the run.
    """
    pairs = []
    for prompt, a, b in task.response_pairs():
        ga, gb = task.evaluate(prompt, a), task.evaluate(prompt, b)
        if ga != gb:
            pairs.append((prompt, a, b, ga > gb))
        if len(pairs) == n_pairs:
            break
    members = [reward_adapter] if isinstance(reward_adapter, str) else list(reward_adapter)
    scorers = [_reward_scorer(base_path, dtype, m, chat_template) for m in members]

    def score(texts: list[tuple[str, str]]) -> list[float]:  # the members' mean score
        each = [f(texts) for f in scorers]
        return [sum(col) / len(col) for col in zip(*each)]

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


def _reward_scorer(base_path: str, dtype: str, reward_adapter: str,
                   chat_template: str = "") -> Callable[[list[tuple[str, str]]], list[float]]:
    """``score([(prompt, response), ...])``: the reward model's score of each conversation."""
    import torch

    from rlhf.adapters import RoleModel
    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.ppo.rollout import Sampled
    from rlhf.generation import left_pad
    from rlhf.scoring import last_token_scores

    tok = load_tokenizer(base_path, chat_template=chat_template, adapter_dir=reward_adapter)
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
