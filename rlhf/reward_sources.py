"""Reward sources of the PPO stage (``ppo.rewards``): what a response scores, beyond one reward model.

``ppo.rewards`` is a list of weighted sources; a response's score is ``sum(weight * value)``:

  * ``{rm: reward}``: the reward model, scored by the frozen reward role (today's single
    reward adapter; an empty ``ppo.rewards`` means exactly ``[{rm: reward}]``).
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
``reward/<name>/weighted_mean``). Nothing here imports torch: it maps text to floats.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["RewardSource", "RewardSourceError", "call_source", "load_function", "parse_reward_sources"]

# the value of ``rm:`` that means the PPO stage's reward adapter (the pipeline's reward stage)
STAGE_RM = "reward"

BatchFn = Callable[[list[str], list[str], list[dict]], list[float]]


class RewardSourceError(RuntimeError):
    """A reward source failed or answered with something that is not one float per row."""


@dataclass(frozen=True)
class RewardSource:
    """One entry of ``ppo.rewards``.

    Attributes:
        kind: ``rm``, ``fn`` or ``http``.
        target: the adapter reference (``rm``), the import path (``fn``) or the URL (``http``).
        weight: the factor of this source's value in the score.
        name: the label of its metrics (``rm``, the function's name, or ``http``).
        timeout: seconds per HTTP request.
        retries: further HTTP tries after a failed one.
    """

    kind: str
    target: str
    weight: float = 1.0
    name: str = ""
    timeout: float = 30.0
    retries: int = 2


_KINDS = ("rm", "fn", "http")
_OPTIONS = {"rm": {"weight", "name"}, "fn": {"weight", "name"}, "http": {"weight", "name", "timeout", "retries"}}


def parse_reward_sources(entries: list, key: str = "ppo.rewards") -> list[RewardSource]:
    """Check ``ppo.rewards`` and turn it into sources; an empty list is ``[{rm: reward}]``.

    Raises:
        rlhf.config.ConfigError: naming ``ppo.rewards[i]`` (and the field) of a bad entry.
    """
    from rlhf.config import ConfigError, check_range

    if not isinstance(entries, list):
        raise ConfigError(f"{key}: must be a list of sources ({{rm: ...}}, {{fn: ...}}, {{http: ...}})")
    out = []
    for i, entry in enumerate(entries):
        where = f"{key}[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be a mapping with one of {', '.join(_KINDS)}, got {entry!r}")
        kinds = [k for k in _KINDS if k in entry]
        if len(kinds) != 1:
            raise ConfigError(f"{where}: needs exactly one of rm, fn, http (got {sorted(entry)})")
        kind = kinds[0]
        unknown = set(entry) - {kind} - _OPTIONS[kind]
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} for a {kind} source "
                              f"(allowed: {', '.join(sorted(_OPTIONS[kind]))})")
        target = entry[kind]
        if not isinstance(target, str) or not target:
            raise ConfigError(f"{where}.{kind}: must be a non-empty string, got {target!r}")
        if kind == "http" and not target.startswith(("http://", "https://")):
            raise ConfigError(f"{where}.http: {target!r} is not an http:// or https:// URL")
        if kind == "fn" and target != "task" and ":" not in target:
            raise ConfigError(f"{where}.fn: {target!r} must look like 'pkg.mod:func', 'file.py:func' or 'task'")
        for name, cast, spec in (("weight", float, "any"), ("timeout", float, "> 0"), ("retries", int, ">= 0")):
            if name in entry:
                value = entry[name]
                if isinstance(value, bool) or not isinstance(value, (int, float)) or (cast is int and not isinstance(value, int)):
                    raise ConfigError(f"{where}.{name}: must be a{'n integer' if cast is int else ' number'}, got {value!r}")
                check_range(f"{where}.{name}", value, spec)
        label = entry.get("name") or {"rm": "rm", "http": "http"}.get(kind) or target.rpartition(":")[2]
        if not isinstance(label, str):
            raise ConfigError(f"{where}.name: must be a string, got {label!r}")
        out.append(RewardSource(kind, target, float(entry.get("weight", 1.0)), label,
                                float(entry.get("timeout", 30.0)), int(entry.get("retries", 2))))
    if not out:
        out = [RewardSource("rm", STAGE_RM, 1.0, "rm")]
    names = [s.name for s in out]
    for n in names:
        if names.count(n) > 1:
            raise ConfigError(f"{key}: two sources are named {n!r}; give them different 'name's (metrics are per name)")
    return out


def load_function(spec: str, key: str, base_dir: str | Path = ".") -> Callable:
    """The function ``spec`` names: ``pkg.mod:func`` (imported) or ``path/file.py:func``
    (relative to ``base_dir``; the pipeline makes recipe paths absolute first).

    Raises:
        rlhf.config.ConfigError: naming ``key`` when it does not import or is not callable.
    """
    import importlib
    import importlib.util

    from rlhf.config import ConfigError

    target, _, attr = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target) if Path(target).is_absolute() else Path(base_dir) / target
            if not path.is_file():
                raise ConfigError(f"{key}: file not found: {path}")
            mod_spec = importlib.util.spec_from_file_location(f"rlhf_user_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's import error, named with the key
        raise ConfigError(f"{key}: cannot import {target!r}: {type(e).__name__}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{key}: {target!r} has no function {attr!r}")
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
