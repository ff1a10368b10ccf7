"""Reward sources of the PPO stage (``ppo.rewards``): what a response scores, beyond one reward model.

``ppo.rewards`` is a list of weighted sources; a response's score is ``sum(weight * value)``:

  * ``{rm: reward}``: the reward model, scored by the frozen reward role (an empty
    ``ppo.rewards`` means exactly ``[{rm: reward}]``): every member of the reward stage's
    ensemble (``reward.ensemble``; one member is the single reward adapter of old).
    ``{rm: <adapter directory or registry reference>}`` adds another reward adapter. All rm
    members form ONE source, an ensemble scored ``mean - ppo.ensemble_k * std`` over the
    members (:func:`rlhf.ppo.ensemble_score`), every member a LoRA role on the one base,
    scored together in one mixed-adapter batch on CUDA, or one forward each
    (``ppo.mixed_adapter_scoring``; :func:`rlhf.scoring.frozen_role_scores`).
  * ``{fn: "pkg.mod:func"}`` or ``{fn: "file.py:func"}`` (a file relative to the recipe): a
    Python function called once per batch as ``func(prompts, completions, metadata)`` with
    three lists of equal length (the last user turn of each prompt, the decoded completion,
    a dict per row: the prompt row's other columns, e.g. a reference answer, plus
    ``messages``, the whole prompt, and ``truncated``, whether the response hit the length
    limit without a stop token), returning one float per row.
    ``{fn: task}`` is the pipeline task's ``evaluate(prompt, completion)``, called per row.
  * ``{http: "https://host/path"}``: a remote scorer. One POST per batch with the JSON body
    ``{"prompts": [...], "completions": [...], "metadata": [...]}``; the reply is
    ``{"rewards": [float, ...]}`` (or the bare list). ``timeout`` seconds per request,
    ``retries`` more tries after a failure (connection error, timeout, HTTP 5xx or 429),
    then one error naming the URL and the status.

A source's raw values and weighted values are logged apart (``reward/<name>/raw_mean`` and
``reward/<name>/weighted_mean``); an ensemble of N >= 2 also logs each member's raw value
(``reward/rm/member<j>_raw_mean``) and the members' mean and standard deviation per response
(``reward/rm/ensemble_mean``, ``reward/rm/ensemble_std``, averaged over responses).
Nothing here imports torch at module level: it maps text to floats.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf.config import ConfigError, STAGE_RM, RewardSource, parse_reward_sources  # noqa: F401 - the spec lives with the config

if TYPE_CHECKING:
    import torch

    from rlhf.config import PPOConfig
    from rlhf.ppo.rollout import ScoredRollout
    from rlhf.ppo.state import PPOSetup

__all__ = ["RewardSource", "RewardSourceError", "call_source", "load_function", "parse_reward_sources"]

BatchFn = Callable[[list[str], list[str], list[dict]], list[float]]


class RewardSourceError(RuntimeError):
    """A reward source failed or answered with something that is not one float per row."""




def load_function(spec: str, key: str, base_dir: str | Path = ".") -> Callable:
    """The function ``spec`` names: ``pkg.mod:func`` (imported) or ``path/file.py:func``
    (relative to ``base_dir``; the pipeline makes recipe paths absolute first).

    Raises:
        rlhf.config.ConfigError: naming ``key`` when it does not import or is not callable.
    """
    from rlhf.config import import_named

    fn = import_named(spec, key, base_dir, what="function")
    if not callable(fn):
        raise ConfigError(f"{key}: {spec.rpartition(':')[0]!r} has no function {spec.rpartition(':')[2]!r}")
    return fn


def per_row(evaluate: Callable[[str, str], float]) -> BatchFn:
    """A batch function from a per-row ``evaluate(prompt, completion)`` (a task's)."""
    def batch(prompts: list[str], completions: list[str], metadata: list[dict]) -> list[float]:
        return [evaluate(p, c) for p, c in zip(prompts, completions)]

    return batch


def call_source(source: RewardSource, fn: BatchFn | None, prompts: list[str], completions: list[str],
                metadata: list[dict]) -> list[float]:
    """The raw values (one float per row) of a ``fn`` or ``http`` source on one batch.

    Raises:
        RewardSourceError: the source failed, or did not answer one finite float per row.
    """
    if source.kind == "http":
        values = _post(source, {"prompts": prompts, "completions": completions, "metadata": metadata})
        where = f"reward source {source.target}"
    else:
        where = f"reward source fn {source.target}"
        try:
            values = fn(prompts, completions, metadata)
        except Exception as e:  # noqa: BLE001 - the user's error, with the source named
            raise RewardSourceError(f"{where}: raised {type(e).__name__}: {e}") from e
    return _floats(values, len(prompts), where)


def _floats(values: Any, n: int, where: str) -> list[float]:
    if not isinstance(values, (list, tuple)) and hasattr(values, "tolist"):
        values = values.tolist()  # a numpy array or tensor
    if not isinstance(values, (list, tuple)) or len(values) != n:
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
        raise RewardSourceError(f"{where}: expected a list of {n} floats (one per completion), got {got}")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise RewardSourceError(f"{where}: value {i} is {v!r}, not a finite number")
        out.append(float(v))
    return out


def _post(source: RewardSource, body: dict) -> list:
    """POST ``body`` as JSON to ``source.target`` with retries; the reply's rewards."""
    import urllib.error
    import urllib.request

    data = json.dumps(body, default=str).encode()  # row metadata may hold dates and the like
    last = ""
    for attempt in range(source.retries + 1):
        if attempt:
            time.sleep(min(0.25 * 2 ** (attempt - 1), 4.0))
        request = urllib.request.Request(source.target, data=data, method="POST",
                                         headers={"Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=source.timeout) as reply:
                raw = reply.read()
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code} {e.reason}"
            if e.code >= 500 or e.code == 429:
                continue
            break  # a client error will not change on a retry
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            last = f"no answer ({type(reason).__name__}: {reason})"
            continue
        try:
            reply_json = json.loads(raw)
        except ValueError:
            raise RewardSourceError(f"reward source {source.target}: the reply is not JSON: {raw[:80]!r}") from None
        return reply_json.get("rewards") if isinstance(reply_json, dict) else reply_json
    tries = attempt + 1
    raise RewardSourceError(f"reward source {source.target}: {last} after {tries} tr{'y' if tries == 1 else 'ies'}")


# The PPO stage's use of the sources (rlhf/stages/ppo.py)

def uses_reward_model(cfg: PPOConfig) -> bool:
    """Whether ``ppo.rewards`` scores with the reward model (the reward role is loaded)."""
    return any(src.kind == "rm" for src in parse_reward_sources(cfg.rewards))


def stage_members(adapter_dir: str) -> list[str]:
    """The adapter directories of the reward stage's ensemble whose member 0 is
    ``adapter_dir``: itself, then the members its ``rlhf_adapter.json`` lists (``ensemble``,
    written by the reward stage beside member 0; found beside it, or by their registry
    reference when ``adapter_dir`` is a registry copy). Just ``[adapter_dir]`` for a reward
    model that is no ensemble.

    Raises:
        ConfigError: a listed member is neither beside ``adapter_dir`` nor in the registry.
    """
    from rlhf.adapters import METADATA_FILE
    from rlhf.resolve import resolve_adapter

    meta = Path(adapter_dir) / METADATA_FILE
    listed = json.loads(meta.read_text()).get("ensemble", []) if meta.is_file() else []
    out = [str(adapter_dir)]
    for m in listed[1:]:
        beside = Path(adapter_dir).parent / m["dir"]
        if beside.is_dir():
            out.append(str(beside))
        elif m.get("ref"):
            out.append(resolve_adapter(f"ppo.reward_adapter (ensemble member {m['member']})", m["ref"]))
        else:
            raise ConfigError(f"ppo.reward_adapter: {adapter_dir} is member 0 of an ensemble whose member "
                              f"{m['member']} ({m['dir']}) is not beside it; name the members as rm sources")
    return out


def reward_members(cfg: PPOConfig) -> list[str]:
    """The reward adapters PPO loads, in member order: for each rm source, the reward stage's
    ensemble (``{rm: reward}``: ``ppo.reward_adapter`` and its :func:`stage_members`) or the
    named adapter. Without an rm source, ``ppo.reward_adapter`` alone when set (scored in the
    evaluation only), else none.

    Raises:
        ConfigError: naming the source whose adapter does not resolve.
    """
    from rlhf.resolve import resolve_adapter

    rms = [(i, src) for i, src in enumerate(parse_reward_sources(cfg.rewards)) if src.kind == "rm"]
    if not rms:
        return [cfg.reward_adapter] if cfg.reward_adapter else []
    out = []
    for i, src in rms:
        if src.target == STAGE_RM:
            out += stage_members(resolve_adapter("ppo.reward_adapter", cfg.reward_adapter))
        else:
            out.append(resolve_adapter(f"ppo.rewards[{i}].rm", src.target))
    return out


def reward_sources(cfg: PPOConfig, task_evaluate: Callable[[str, str], float] | None = None,
                   ensemble: bool = False) -> list:
    """``(source, batch function)`` pairs of ``ppo.rewards`` (the function is None for rm and
    http sources); the rm sources, members of one ensemble, are one pair (the first rm
    source's); [] when one reward model alone scores (an empty ``ppo.rewards`` without an
    ``ensemble`` of several members).

    Raises:
        ConfigError: ``{fn: task}`` without a task, or a function that does not import.
    """
    if not cfg.rewards and not ensemble:
        return []
    out = []
    for i, src in enumerate(parse_reward_sources(cfg.rewards)):
        if src.kind == "rm" and any(s.kind == "rm" for s, _ in out):
            continue  # a further member of the ensemble source
        fn = None
        if src.kind == "fn" and src.target == "task":
            if task_evaluate is None:
                raise ConfigError(f"ppo.rewards[{i}].fn: 'task' names the task's evaluate, but this run has no task")
            fn = per_row(task_evaluate)
        elif src.kind == "fn":
            fn = load_function(src.target, f"ppo.rewards[{i}].fn")
        out.append((src, fn))
    return out


def score_with_sources(s: PPOSetup, cfg: PPOConfig, batch: ScoredRollout,
                       rows: list[int]) -> tuple[ScoredRollout, dict[str, torch.Tensor]]:
    """``batch`` with its scores (B,) replaced by ``sum(weight * value)`` over the reward
    sources, and each source's raw values (B,) by name. ``rows`` holds the training prompt
    of each row. Unchanged (and no values) when the reward model alone scores."""
    from dataclasses import replace

    import torch

    from rlhf.generation import decode_responses

    if not s.sources:
        return batch, {}
    prompts = [s.prompts[i] for i in rows]
    texts, completions = [p[-1]["content"] for p in prompts], decode_responses(s.tok, batch)
    metadata = [{**s.prompt_metadata[i], "messages": s.prompts[i], "truncated": not bool(stop)}
                for i, stop in zip(rows, batch.has_stop.tolist())]
    values: dict[str, torch.Tensor] = {}
    total = torch.zeros_like(batch.scores)
    for src, fn in s.sources:
        if src.kind == "rm":
            raw = batch.scores  # the ensemble's score (mean - k * std) when there are several members
            if batch.member_scores is not None:
                values[f"{src.name}/members"] = batch.member_scores
        else:
            raw = torch.tensor(call_source(src, fn, texts, completions, metadata), dtype=batch.scores.dtype,
                               device=batch.scores.device)
        values[src.name] = raw
        total = total + src.weight * raw
    return replace(batch, scores=total), values


def source_statistics(s: PPOSetup, values: dict[str, torch.Tensor]) -> dict:
    """``reward/<name>/raw_mean`` and ``reward/<name>/weighted_mean`` of each reward source,
    and of an ensemble (``<name>/members``, (B, N)) each member's raw mean and the members'
    per-response mean and standard deviation, over every row scored this update (every process)."""
    from rlhf import distributed as dist

    out = {}
    weights = {src.name: src.weight for src, _ in s.sources}
    for name, raw in values.items():
        if name.endswith("/members"):
            members, source = dist.gather_rows(raw), name.removesuffix("/members")
            for j, mean in enumerate(members.mean(0).tolist()):
                out[f"reward/{source}/member{j}_raw_mean"] = mean
            out[f"reward/{source}/ensemble_mean"] = float(members.mean(1).mean())
            out[f"reward/{source}/ensemble_std"] = float(members.std(1, unbiased=False).mean())
            continue
        mean = float(dist.gather_rows(raw).mean())
        out[f"reward/{name}/raw_mean"] = mean
        out[f"reward/{name}/weighted_mean"] = weights[name] * mean
    return out
