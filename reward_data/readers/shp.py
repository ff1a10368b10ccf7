"""Stanford SHP-style pairs: ``history`` / ``human_ref_A`` / ``human_ref_B`` / ``labels``.

``labels`` follows SHP: 1 means A is preferred, 0 means B. ``history`` is a single user message,
unless it is a transcript of ``HUMAN: ...`` / ``ASSISTANT: ...`` turns (as in SteamSHP's rewrite
of HH data), which is split into a multi-turn prompt. The margin is SHP's score ratio
(``score_ratio``, else ``max(score_A, score_B) / min(...)``) where scores exist.
"""

from __future__ import annotations

import re

from reward_data.options import IngestOptions
from reward_data.schema import Message, Pair, RowError, as_float, as_int, require, require_str, text_message

NAME = "shp"
EXAMPLE = {"history": "Name a prime.", "human_ref_A": "7", "human_ref_B": "8", "labels": 1}

_TURN = re.compile(r"(?:^|\n\n)(HUMAN|ASSISTANT): ?")
_ROLE = {"HUMAN": "user", "ASSISTANT": "assistant"}


def detect(row: dict) -> bool:
    return "history" in row and "human_ref_A" in row and "human_ref_B" in row


def parse_history(text: str) -> list[Message]:
    """Split a ``HUMAN:``/``ASSISTANT:`` transcript; anything else is one user message."""
    if not text.startswith("HUMAN:"):
        return [text_message("user", text, "history")]
    parts = _TURN.split(text)
    messages = []
    for i in range(1, len(parts), 2):
        content = parts[i + 1].strip()
        if not content:
            raise RowError("empty_text", f"field 'history' turn {i // 2} ({parts[i]}) is empty", "history")
        messages.append({"role": _ROLE[parts[i]], "content": content})
    return messages


def _margin(row: dict) -> float | None:
    ratio = as_float(row.get("score_ratio"), "score_ratio")
    if ratio is not None:
        return ratio
    a = as_float(row.get("score_A"), "score_A")
    b = as_float(row.get("score_B"), "score_B")
    if a is None or b is None or min(a, b) <= 0:
        return None
    return max(a, b) / min(a, b)


def read(row: dict, opts: IngestOptions) -> Pair:
    prompt = parse_history(require_str(row, "history"))
    a = text_message("assistant", require(row, "human_ref_A"), "human_ref_A", allow_empty=True)
    b = text_message("assistant", require(row, "human_ref_B"), "human_ref_B", allow_empty=True)
    label = as_int(require(row, "labels"), "labels")
    if label not in (0, 1):
        raise RowError("bad_value", f"field 'labels' must be 0 or 1, got {label}", "labels")
    chosen, rejected = (a, b) if label == 1 else (b, a)
    return Pair(prompt, [chosen], [rejected], _margin(row))
