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
    "truncated": "the file ends inside this row (cut CSV quoted cell, cut last line, truncated .gz stream)",
    "short_row": "a CSV record has fewer fields than the header",
    "long_row": "a CSV record has more fields than the header",
    "malformed_csv": "the csv module cannot parse the record",
    "too_deep": "the row nests lists/objects too deeply to parse",
    "non_text_content": "a message holds non-text content parts (image, audio, file, ...)",
    "duplicate_key": "an object holds one key twice (JSON parsers keep only the last value)",
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
    "developer": "system",  # the OpenAI chat API's newer name for the system role
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


@dataclass(slots=True)
class Unpaired:
    """One labelled completion (KTO's unpaired format, thumbs-up/down logs) before hashing.

    Attributes:
        prompt: conversation up to the completion; ends with a user message.
        completion: the judged continuation, starting with an assistant message.
        label: True when the completion is desirable (thumbs up), False when not.
        item: locator inside a multi-record row, ``None`` for 1:1 rows.
    """

    prompt: list[Message]
    completion: list[Message]
    label: bool
    item: str | None = field(default=None)


def get_path(row: dict, path: str) -> Any:
    """``row["a"]["b"]`` for ``"a.b"`` (a list position as ``"a.0"``); a literal key containing
    dots wins. None when the path does not exist."""
    if path in row:
        return row[path]
    value: Any = row
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


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


def text_message(role: str, content: Any, key: str, allow_empty: bool = False) -> Message:
    """Build one message from a plain text field, rejecting non-strings and (unless
    ``allow_empty``: responses, judged later by :func:`check_pair`) blank text."""
    if not isinstance(content, str):
        raise RowError("wrong_type", f"field {key!r} must be a string, got {type(content).__name__}", key)
    if not allow_empty and not content.strip():
        raise RowError("empty_text", f"field {key!r} is empty or whitespace", key)
    return {"role": role, "content": content}


def normalize_messages(value: Any, key: str, allow_empty: bool = False) -> list[Message]:
    """Validate a chat message list and return it with canonical roles and only role/content.

    Accepts ``{"role", "content"}`` dicts (TRL/OpenAI style) and ``{"from", "value"}`` dicts
    (ShareGPT style). Extra keys are dropped so that the stored record is exactly what
    ``RewardTrainer`` expects. Blank contents are refused unless ``allow_empty`` (responses:
    :func:`check_pair` decides, so an empty *rejected* answer can be kept).
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
        # Always a new dict, role first: many parquet and hub datasets hold messages as
        # {"content", "role"} structs, and the stored bytes (the record id, the duplicate
        # key) must not depend on the key order of the source.
        out.append({"role": role, "content": content})
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
        if type(content) is list:
            content = content_parts_text(content, where, key)
        if not isinstance(content, str):
            raise RowError("wrong_type", f"{where}.content must be a string, got {type(content).__name__}", key)
        if not allow_empty and not content.strip():
            raise RowError("empty_text", f"{where}.content is empty or whitespace", key)
        out.append({"role": canonical, "content": content})
    return out


def content_parts_text(parts: list, where: str, key: str) -> str:
    """The text of a typed content-part list (OpenAI / LLaMA-Factory multimodal layout).

    ``[{"type": "text", "text": "a"}, {"type": "text", "value": "b"}]`` -> ``"a\nb"``: text parts
    are joined with a newline (the parts of one message are separate paragraphs). A non-text part
    (image, audio, file) is quarantined as ``non_text_content``: a text-only model would train on
    the message with the image silently missing.
    """
    texts = []
    for i, part in enumerate(parts):
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise RowError("wrong_type", f"{where}.content[{i}] must be a content part object, got "
                           f"{type(part).__name__}", key)
        kind = part.get("type", "text")
        if kind not in ("text", "input_text", "output_text"):
            raise RowError("non_text_content", f"{where}.content[{i}] is a {kind!r} part; only text parts can be "
                           "stored", key)
        text = part.get("text", part.get("value"))
        if not isinstance(text, str):
            raise RowError("wrong_type" if text is not None else "missing_field",
                           f"{where}.content[{i}] has no string 'text' or 'value'", key)
        texts.append(text)
    return "\n".join(texts)


def as_prompt(value: Any, key: str = "prompt") -> list[Message]:
    """A prompt given as a string (TRL standard format) or a message list (conversational)."""
    if isinstance(value, str):
        return [text_message("user", value, key)]
    return normalize_messages(value, key)


def prompt_of(value: Any, key: str, template: dict[str, str] | None) -> list[Message]:
    """:func:`as_prompt`, but a string is split by the transcript ``template`` when one is given."""
    if template is not None and isinstance(value, str):
        msgs = parse_transcript(value, template, key)
        if len(msgs) > 1 and msgs[-1]["role"] == "assistant" and not msgs[-1]["content"]:
            # A trailing empty assistant marker is the generation cue (HH/Nectar prompts end in
            # "\n\nAssistant:"), not an empty turn.
            msgs.pop()
        for i, m in enumerate(msgs):
            if not m["content"]:
                raise RowError("empty_text", f"{key} turn {i} ({m['role']}) is empty", key)
        return msgs
    return as_prompt(value, key)


def with_system(prompt: list[Message], system: Any, key: str = "system") -> list[Message]:
    """Put a system prompt first in the conversation (unless the prompt already opens with one).

    A null or blank ``system`` leaves the prompt unchanged: many exports leave the column empty on
    most rows, and that is not an error.
    """
    if system is None or (isinstance(system, str) and not system.strip()):
        return prompt
    if not isinstance(system, str):
        raise RowError("wrong_type", f"field {key!r} must be a string, got {type(system).__name__}", key)
    if prompt and prompt[0]["role"] == "system":
        return prompt
    return [{"role": "system", "content": system}, *prompt]


def as_response(value: Any, key: str) -> list[Message]:
    """A response given as a string or as a message list that starts with the assistant.

    Blank text is allowed here; :func:`check_pair` quarantines an empty *chosen* response.
    """
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if type(value) is dict:  # one message object (ShareGPT DPO: {"from": "gpt", "value": ...})
        value = [value]
    msgs = normalize_messages(value, key, allow_empty=True)
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


def _blank(messages: list[Message]) -> int:
    """How many messages have empty or whitespace-only content."""
    n = 0
    for m in messages:
        c = m["content"]
        if not c or c.isspace():
            n += 1
    return n


def check_pair(pair: Pair, strict_empty: bool = False) -> bool:
    """Final structural checks shared by all readers.

    Returns:
        True when the rejected response is empty (kept: "an answer beats no answer" is a
        preference a reward model can learn), False otherwise.

    Raises:
        RowError: empty prompt, prompt ending on the assistant, blank chosen text, a blank
            rejected response under ``strict_empty`` (or a partly blank one), identical sides.
    """
    if not pair.prompt:
        raise RowError("no_prompt", "the prompt is empty", "prompt")
    if pair.prompt[-1]["role"] == "assistant":
        raise RowError("bad_value", "the prompt must not end with an assistant message", "prompt")
    if _blank(pair.prompt):
        raise RowError("empty_text", "a prompt message is empty or whitespace", "prompt")
    if _blank(pair.chosen):
        raise RowError("empty_text", "field 'chosen' is empty or whitespace", "chosen")
    blank = _blank(pair.rejected)
    if blank and (strict_empty or blank < len(pair.rejected)):
        raise RowError("empty_text", "field 'rejected' is empty or whitespace" + (" (strict_empty)" if strict_empty else ""),
                       "rejected")
    if pair.chosen == pair.rejected:
        raise RowError("chosen_equals_rejected", "chosen and rejected are identical", "chosen")
    return blank > 0


def is_message_list(value: Any) -> bool:
    """A non-empty list whose items are all message objects (``role``/``content`` or ``from``/``value``)."""
    return (
        type(value) is list and bool(value)
        and all(type(m) is dict and ("role" in m or "from" in m) for m in value)
    )


def maybe_json_list(value: Any, declared: bool = False) -> Any:
    """Decode a string column that holds a JSON-encoded message list; other values are unchanged.

    Text stays text: a string is decoded only when it parses to a list of message objects
    (detected), or to any list when the column is ``declared`` a JSON field (``json_fields``).
    An answer that happens to be a JSON array of numbers or strings is therefore kept verbatim.
    """
    if isinstance(value, str):
        s = value.lstrip()
        if s.startswith("["):
            try:
                decoded = json.loads(value)
            except (ValueError, RecursionError):
                return value
            if isinstance(decoded, list) and (declared or is_message_list(decoded)):
                return decoded
    return value


def parse_transcript(text: str, template: dict[str, str], key: str) -> list[Message]:
    """Split a templated transcript (role markers inside one text) into messages.

    Args:
        text: e.g. ``"<extra_id_0>System\n...\n<extra_id_1>User\n...\n<extra_id_1>Assistant\n..."``.
        template: ``{"system"|"user"|"assistant": marker, "end": optional turn terminator}``;
            see :data:`reward_data.options.TRANSCRIPT_PRESETS`.
        key: field name for error messages.

    Raises:
        RowError: ``bad_transcript`` when no marker occurs or text precedes the first one.
    """
    markers = sorted(((m, role) for role, m in template.items() if role != "end" and m), key=lambda x: -len(x[0]))
    end = template.get("end") or None
    pieces: list[tuple[str, int, int]] = []  # (role, marker start, content start)
    pos = 0
    while True:
        best = None
        for marker, role in markers:
            i = text.find(marker, pos)
            if i >= 0 and (best is None or i < best[1]):
                best = (role, i, i + len(marker))
        if best is None:
            break
        pieces.append(best)
        pos = best[2]
    if not pieces:
        raise RowError("bad_transcript", f"field {key!r} holds none of the transcript markers", key)
    head = text[:pieces[0][1]]
    if end:
        head = head.replace(end, "")
    if head.strip():
        raise RowError("bad_transcript", f"field {key!r} has text before the first role marker", key)
    out = []
    for n, (role, _, start) in enumerate(pieces):
        stop = pieces[n + 1][1] if n + 1 < len(pieces) else len(text)
        content = text[start:stop]
        if end:
            content = content.split(end, 1)[0]
        content = content.strip()
        if role == "system" and not content:
            continue  # templates often carry an empty system block; it is no message
        out.append({"role": role, "content": content})
    return out


def check_unpaired(rec: Unpaired) -> None:
    """:func:`check_pair` for one labelled completion: a prompt ending on a user turn, a
    non-blank completion that starts with the assistant.

    Raises:
        RowError: naming the field at fault.
    """
    if not rec.prompt:
        raise RowError("no_prompt", "the prompt is empty", "prompt")
    if rec.prompt[-1]["role"] == "assistant":
        raise RowError("bad_value", "the prompt must not end with an assistant message", "prompt")
    if _blank(rec.prompt):
        raise RowError("empty_text", "a prompt message is empty or whitespace", "prompt")
    if _blank(rec.completion):
        raise RowError("empty_text", "field 'completion' is empty or whitespace", "completion")
    if rec.completion[0]["role"] != "assistant":
        raise RowError("bad_value", "the completion must start with an assistant message", "completion")
