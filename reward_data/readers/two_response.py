"""Two responses and a label: ``response_0``/``response_1`` or ``response_a``/``response_b``.

The label is an index column (PKU-SafeRLHF ``better_response_id`` or ``safer_response_id``,
chosen with ``label_field``), a winner column (``"model_a"``, ``"b"``, ``"tie"``, ...), or one-hot
``winner_model_a`` / ``winner_model_b`` / ``winner_tie`` columns (LMSYS arena style). Arena-style
JSON-encoded turn lists (``'["q1", "q2"]'``) in prompt and responses become multi-turn
conversations whose shared prefix is the prompt. Whether they do is decided per file, not per
row (:func:`turn_list_columns`: all three columns decode to turn lists on every sampled row,
or the columns are listed in ``json_fields``): an answer that is itself the text of a JSON
array, in a file of plain-text answers, stays text. A ``system`` column goes first. Ties are dropped (quarantined as
``tie_dropped``) or kept with ``tie=True`` by the ``ties`` option.
"""

from __future__ import annotations

import json

from reward_data.options import IngestOptions
from reward_data.schema import (Pair, RowError, as_int, as_prompt, as_response, prompt_of, require, split_shared_prefix,
                                 with_system)

NAME = "two_response"
EXAMPLE = {"prompt": "Name a prime.", "response_0": "7", "response_1": "8", "better_response_id": 0}

_PROMPT_KEYS = ("prompt", "instruction", "question")
_INDEX_LABELS = ("better_response_id", "chosen_id", "preferred", "label", "choice", "winner", "preference")
_A = {"0", "a", "model_a", "response_a", "response_0"}
_B = {"1", "b", "model_b", "response_b", "response_1"}
_TIE = {"tie", "tie (bothbad)", "both", "equal", "-1", "2"}


def _keys(row: dict) -> tuple[str, str] | None:
    if "response_0" in row and "response_1" in row:
        return "response_0", "response_1"
    if "response_a" in row and "response_b" in row:
        return "response_a", "response_b"
    return None


def detect(row: dict) -> bool:
    return _keys(row) is not None and any(k in row for k in _PROMPT_KEYS)


def _winner(row: dict, opts: IngestOptions) -> int | None:
    """0 or 1 for the preferred response, None for a tie."""
    if opts.label_field is None and "winner_model_a" in row and "winner_model_b" in row:
        flags = [as_int(row.get(k) or 0, k) for k in ("winner_model_a", "winner_model_b", "winner_tie")]
        if sum(flags) != 1:
            raise RowError("bad_value", f"one-hot winner columns must hold exactly one 1, got {flags}", "winner_model_a")
        return None if flags[2] else flags.index(1)
    key = opts.label_field or next((k for k in _INDEX_LABELS if k in row), None)
    if key is None:
        raise RowError("missing_field", f"no label column; expected one of {', '.join(_INDEX_LABELS)}", "label")
    value = require(row, key)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RowError("wrong_type", f"field {key!r} must be an index or a winner name, got {value!r}", key)
    text = str(as_int(value, key)) if isinstance(value, (int, float)) else value.strip().lower()
    if text in _A:
        return 0
    if text in _B:
        return 1
    if text in _TIE:
        return None
    raise RowError("bad_value", f"field {key!r} has unrecognised label {value!r}", key)


def _turns(value):
    """Decode an arena-style JSON list of strings; None when ``value`` is not one."""
    if isinstance(value, list):
        return value
    if isinstance(value, str) and value.startswith("["):
        try:
            decoded = json.loads(value)
        except (ValueError, RecursionError):
            return None
        if isinstance(decoded, list) and decoded and all(isinstance(t, str) or t is None for t in decoded):
            return decoded
    return None


def turn_list_columns(sample: list[dict]) -> tuple[str, ...]:
    """The prompt and response columns that hold arena-style JSON turn lists, decided per file
    from its sampled rows, never per value: all three columns (prompt and both responses) must
    decode to turn lists on every sampled row; otherwise none is decoded, so a plain-text answer
    that happens to look like a JSON array stays text on every row."""
    rows = [r for r in sample if _keys(r) is not None]
    if not rows:
        return ()
    key_a, key_b = _keys(rows[0])
    prompt_key = next((k for k in _PROMPT_KEYS if k in rows[0]), "prompt")
    columns = (prompt_key, key_a, key_b)
    if all(isinstance(r.get(c), str) and _turns(r[c]) is not None for r in rows for c in columns):
        return columns
    return ()


def resolved(row: dict, opts: IngestOptions) -> dict:
    """The label column this file is read with (what ``label_field=None`` resolves to)."""
    if opts.label_field is None and "winner_model_a" in row and "winner_model_b" in row:
        return {"label_field": "winner_model_a/winner_model_b/winner_tie (one-hot)"}
    return {"label_field": opts.label_field or next((k for k in _INDEX_LABELS if k in row), None)}


def read(row: dict, opts: IngestOptions) -> Pair:
    key_a, key_b = _keys(row) or ("response_0", "response_1")
    prompt_key = next((k for k in _PROMPT_KEYS if k in row), "prompt")
    winner = _winner(row, opts)
    if winner is None and opts.ties == "drop":
        raise RowError("tie_dropped", "the label marks a tie (ties=drop)", opts.label_field or "label")
    prompt, a, b = require(row, prompt_key), require(row, key_a), require(row, key_b)
    declared = opts.json_fields
    if declared is None:
        # Arena layout only when all three are turn lists of one length; otherwise they are text.
        turns = [_turns(prompt), _turns(a), _turns(b)]
        if all(t is not None for t in turns) and len({len(t) for t in turns}) == 1:
            prompt, a, b = turns
    else:
        prompt, a, b = [(_turns(v) or v) if k in declared else v
                        for k, v in ((prompt_key, prompt), (key_a, a), (key_b, b))]
    system = row.get("system")
    if isinstance(prompt, list) and all(isinstance(t, str) or t is None for t in prompt) and prompt:
        # Multi-turn arena row: rebuild each side's conversation, then split off the shared prefix.
        if not (isinstance(a, list) and isinstance(b, list) and len(a) == len(b) == len(prompt)):
            raise RowError("wrong_type", f"{prompt_key!r}, {key_a!r} and {key_b!r} must be turn lists of equal length", key_a)
        convs = []
        for side, key in ((a, key_a), (b, key_b)):
            conv = []
            for i, (q, r) in enumerate(zip(prompt, side)):
                conv += as_prompt(q, f"{prompt_key}[{i}]") + as_response(r, f"{key}[{i}]")
            convs.append(conv)
        pair = split_shared_prefix(*convs)
        pair.prompt = with_system(pair.prompt, system)
    else:
        prompt = with_system(prompt_of(prompt, prompt_key, opts.transcript_template), system)
        pair = Pair(prompt, as_response(a, key_a), as_response(b, key_b))
    if winner is None:
        pair.tie = True
    elif winner == 1:
        pair.chosen, pair.rejected = pair.rejected, pair.chosen
    return pair
