"""Canonical preference record, row validation and the quarantine reasons.

Every reader turns its input rows into :class:`Pair` objects whose ``prompt``, ``chosen`` and
``rejected`` fields are lists of ``{"role": ..., "content": ...}`` messages: TRL's conversational
preference format, so the reward stage feeds them to ``RewardTrainer`` without conversion.

A row that cannot become a pair raises :class:`RowError` with one of the reason codes in
:data:`REASONS`; the ingest loop writes it to ``quarantine.jsonl`` instead of dropping it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1

#: Reason code -> human description. Every quarantined row carries exactly one code.
REASONS: dict[str, str] = {
    "malformed_json": "the line or element is not valid JSON",
    "invalid_utf8": "the bytes are not valid UTF-8 (or the text holds a lone surrogate)",
    "row_too_large": "the raw row is larger than max_row_bytes",
    "not_an_object": "the row is not a JSON object / mapping",
    "missing_field": "a required field is absent or null",
    "wrong_type": "a field has the wrong type",
    "bad_value": "a field has a value outside its allowed set (e.g. a label that is not 0/1)",
    "empty_text": "a message or response is empty or whitespace only",
    "unknown_role": "a message role is not system/user/assistant/tool (or a known alias)",
    "bad_transcript": "a transcript string does not parse into alternating turns",
    "no_prompt": "chosen and rejected share no user turn to use as the prompt",
    "chosen_equals_rejected": "chosen and rejected are identical",
    "tie_dropped": "the row is a tie and ties=drop was requested",
    "no_pairs": "the row holds no comparable responses (e.g. no ranked siblings, all scores equal)",
}

#: Accepted role spellings -> canonical role. Anything else is quarantined as ``unknown_role``.
ROLE_ALIASES: dict[str, str] = {
    "system": "system",
    "user": "user",
    "human": "user",
    "prompter": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "tool": "tool",
}

_CANONICAL_ROLES = frozenset(("system", "user", "assistant", "tool"))

Message = dict[str, str]


class RowError(Exception):
    """A row (or one pair of a multi-pair row) that must be quarantined.

    Args:
        reason: a key of :data:`REASONS`.
        detail: human-readable explanation naming the offending field.
        field: the field at fault, if one.
    """

    def __init__(self, reason: str, detail: str, field: str | None = None):
        assert reason in REASONS, reason
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.field = field


@dataclass(slots=True)
class Pair:
    """One canonical preference pair before hashing.

    Attributes:
        prompt: conversation up to the compared turn; ends with a user message.
        chosen: the preferred continuation, starting with an assistant message.
        rejected: the dispreferred continuation, starting with an assistant message.
        margin: optional preference strength (score difference or ratio), ``None`` if unknown.
        tie: True when the source marks both responses as equally good (kept by ``ties=keep``).
        item: locator inside a multi-pair row (e.g. OASST message ids), ``None`` for 1:1 rows.
    """

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    margin: float | None = None
    tie: bool = False
    item: str | None = field(default=None)


def require(row: dict, key: str) -> Any:
    """Return ``row[key]``, raising ``missing_field`` when it is absent or null."""
    value = row.get(key)
    if value is None:
        raise RowError("missing_field", f"field {key!r} is missing", key)
    return value


def require_str(row: dict, key: str) -> str:
    """Return ``row[key]`` as a string, raising ``missing_field``/``wrong_type``."""
    value = require(row, key)
    if not isinstance(value, str):
        raise RowError("wrong_type", f"field {key!r} must be a string, got {type(value).__name__}", key)
    return value


def as_int(value: Any, key: str) -> int:
    """Coerce an index-like value (int, integral float, digit string from CSV) to int."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    raise RowError("wrong_type", f"field {key!r} must be an integer, got {value!r}", key)


def as_float(value: Any, key: str) -> float | None:
    """Coerce a numeric value (or numeric string from CSV) to float; empty/None -> None."""
    if type(value) is float and value - value == 0.0:  # fast path: finite float
        return value
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise RowError("wrong_type", f"field {key!r} must be a number, got a boolean", key)
    if isinstance(value, (int, float)):
        result = float(value)
    elif isinstance(value, str):
        try:
            result = float(value)
        except ValueError:
            raise RowError("wrong_type", f"field {key!r} must be a number, got {value!r}", key) from None
    else:
        raise RowError("wrong_type", f"field {key!r} must be a number, got {type(value).__name__}", key)
    if result != result or result in (float("inf"), float("-inf")):
        raise RowError("bad_value", f"field {key!r} must be finite, got {value!r}", key)
    return result


def text_message(role: str, content: Any, key: str) -> Message:
    """Build one message from a plain text field, rejecting non-strings and blank text."""
    if not isinstance(content, str):
        raise RowError("wrong_type", f"field {key!r} must be a string, got {type(content).__name__}", key)
    if not content.strip():
        raise RowError("empty_text", f"field {key!r} is empty or whitespace", key)
    return {"role": role, "content": content}


def normalize_messages(value: Any, key: str) -> list[Message]:
    """Validate a chat message list and return it with canonical roles and only role/content.

    Accepts ``{"role", "content"}`` dicts (TRL/OpenAI style) and ``{"from", "value"}`` dicts
    (ShareGPT style). Extra keys are dropped so that the stored record is exactly what
    ``RewardTrainer`` expects.
    """
    if type(value) is not list:
        raise RowError("wrong_type", f"field {key!r} must be a list of messages, got {type(value).__name__}", key)
    if not value:
        raise RowError("empty_text", f"field {key!r} is an empty message list", key)
    # Fast path for the common, already-canonical shape; anything unusual goes through the
    # checks below, which produce the precise error.
    out: list[Message] = []
    for msg in value:
        if type(msg) is not dict:
            break
        role = msg.get("role")
        content = msg.get("content")
        if role not in _CANONICAL_ROLES or type(content) is not str or not content or content.isspace():
            break
        # Already canonical: reuse the parsed dict instead of copying it.
        out.append(msg if len(msg) == 2 else {"role": role, "content": content})
    else:
        return out
    out = []
    for i, msg in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(msg, dict):
            raise RowError("wrong_type", f"{where} must be a message object, got {type(msg).__name__}", key)
        role = msg.get("role", msg.get("from"))
        content = msg.get("content", msg.get("value"))
        if role is None:
            raise RowError("missing_field", f"{where} has no 'role'", key)
        if content is None:
            raise RowError("missing_field", f"{where} has no 'content'", key)
        if not isinstance(role, str):
            raise RowError("wrong_type", f"{where}.role must be a string", key)
        canonical = ROLE_ALIASES.get(role.lower())
        if canonical is None:
            raise RowError("unknown_role", f"{where} has unknown role {role!r}", key)
        if not isinstance(content, str):
            raise RowError("wrong_type", f"{where}.content must be a string, got {type(content).__name__}", key)
        if not content.strip():
            raise RowError("empty_text", f"{where}.content is empty or whitespace", key)
        out.append({"role": canonical, "content": content})
    return out


def as_prompt(value: Any, key: str = "prompt") -> list[Message]:
    """A prompt given as a string (TRL standard format) or a message list (conversational)."""
    if isinstance(value, str):
        return [text_message("user", value, key)]
    return normalize_messages(value, key)


def as_response(value: Any, key: str) -> list[Message]:
    """A response given as a string or as a message list that starts with the assistant."""
    if isinstance(value, str):
        return [text_message("assistant", value, key)]
    msgs = normalize_messages(value, key)
    if msgs[0]["role"] != "assistant":
        raise RowError("bad_value", f"field {key!r} must start with an assistant message, got {msgs[0]['role']!r}", key)
    return msgs


def split_shared_prefix(chosen: list[Message], rejected: list[Message]) -> Pair:
    """Turn two full conversations into prompt + two continuations (the implicit-prompt format).

    The prompt is the longest shared message prefix, shortened until both continuations start
    with an assistant message, so the prompt always ends on the turn being answered.
    """
    if chosen == rejected:
        raise RowError("chosen_equals_rejected", "chosen and rejected conversations are identical")
    k = 0
    limit = min(len(chosen), len(rejected))
    while k < limit and chosen[k] == rejected[k]:
        k += 1
    # Back off to the last point where both sides continue with an assistant turn: a shared
    # assistant turn followed by differing user turns is not a comparison of responses.
    while k > 0 and not (
        k < len(chosen) and k < len(rejected) and chosen[k]["role"] == "assistant" and rejected[k]["role"] == "assistant"
    ):
        k -= 1
    if k == 0:
        raise RowError("no_prompt", "chosen and rejected share no prompt ending before an assistant turn")
    return Pair(prompt=chosen[:k], chosen=chosen[k:], rejected=rejected[k:])


def check_pair(pair: Pair) -> Pair:
    """Final structural checks shared by all readers."""
    if not pair.prompt:
        raise RowError("no_prompt", "the prompt is empty", "prompt")
    if pair.prompt[-1]["role"] == "assistant":
        raise RowError("bad_value", "the prompt must not end with an assistant message", "prompt")
    if pair.chosen == pair.rejected:
        raise RowError("chosen_equals_rejected", "chosen and rejected are identical", "chosen")
    return pair


def maybe_json_list(value: Any) -> Any:
    """Decode a string column that holds a JSON-encoded list; return other values unchanged."""
    if isinstance(value, str):
        s = value.lstrip()
        if s.startswith("["):
            try:
                decoded = json.loads(value)
            except ValueError:
                return value
            if isinstance(decoded, list):
                return decoded
    return value
