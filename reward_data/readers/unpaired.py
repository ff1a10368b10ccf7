"""Unpaired feedback (KTO's layout, thumbs-up/down logs): one completion and a desirable label.

Layouts: TRL's unpaired preference format ``prompt`` / ``completion`` / ``label`` (strings or
message lists), or ``messages`` + ``label`` where the trailing assistant turn(s) are the
completion. ``label`` is a boolean, 0/1, or one of ``true/false``, ``up/down``,
``thumbs_up/thumbs_down``, ``good/bad``, ``positive/negative`` (case-insensitive); anything
else is quarantined as ``bad_value``. A ``system`` column goes first in the prompt.

Rows become :class:`~reward_data.schema.Unpaired` records, stored as their own kind (a version
holds pairs or unpaired completions, never both): ``{"id", "prompt", "completion", "label",
"source"}``. Exact duplicates are the same prompt, completion and label.
"""

from __future__ import annotations

from reward_data.options import IngestOptions
from reward_data.schema import (RowError, Unpaired, as_prompt, as_response, normalize_messages, prompt_of, require,
                                with_system)

NAME = "unpaired"
KIND = "unpaired"  # stores Unpaired records, not pairs (see reward_data.ingestion.kind_of)
EXAMPLE = {"prompt": [{"role": "user", "content": "Name a prime."}],
           "completion": [{"role": "assistant", "content": "7"}], "label": True}

_TRUE = {"true", "1", "up", "thumbs_up", "good", "positive", "desirable", "yes"}
_FALSE = {"false", "0", "down", "thumbs_down", "bad", "negative", "undesirable", "no"}


def detect(row: dict) -> bool:
    if "label" not in row or "chosen" in row or "rejected" in row:
        return False
    return ("prompt" in row and "completion" in row) or type(row.get("messages")) is list


def label_of(value) -> bool:
    """The desirable flag of a label value (see module docstring); RowError otherwise."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise RowError("bad_value", f"field 'label' must be a boolean (or 0/1, up/down, ...), got {value!r}", "label")


def read(row: dict, opts: IngestOptions) -> Unpaired:
    label = label_of(require(row, "label"))
    if "completion" in row or "messages" not in row:
        prompt = prompt_of(require(row, "prompt"), "prompt", opts.transcript_template)
        completion = as_response(require(row, "completion"), "completion")
    else:
        msgs = normalize_messages(require(row, "messages"), "messages", allow_empty=True)
        k = len(msgs)
        while k > 0 and msgs[k - 1]["role"] == "assistant":
            k -= 1
        if k == len(msgs):
            raise RowError("bad_value", "field 'messages' does not end with an assistant turn to judge", "messages")
        prompt, completion = as_prompt(msgs[:k], "messages") if k else [], msgs[k:]
    return Unpaired(with_system(prompt, row.get("system")), completion, label)
