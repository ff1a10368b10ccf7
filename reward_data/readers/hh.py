"""Anthropic HH-RLHF transcripts: ``chosen`` / ``rejected`` strings of ``\\n\\nHuman: ... \\n\\nAssistant: ...``.

Each transcript is split into user/assistant messages (multi-turn kept), then the shared prefix
becomes the prompt exactly as for implicit pairs (an empty assistant turn is left for
``check_pair`` to judge, so an empty rejected answer can be kept). Turn text is stripped of the surrounding
whitespace that the delimiter convention adds.
"""

from __future__ import annotations

import re

from reward_data.options import IngestOptions
from reward_data.schema import Message, Pair, RowError, require_str, split_shared_prefix

NAME = "hh"
EXAMPLE = {"chosen": "\n\nHuman: Name a prime.\n\nAssistant: 7", "rejected": "\n\nHuman: Name a prime.\n\nAssistant: 8"}

_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLE = {"Human": "user", "Assistant": "assistant"}


def detect(row: dict) -> bool:
    chosen = row.get("chosen")
    return (
        "prompt" not in row
        and isinstance(chosen, str)
        and isinstance(row.get("rejected"), str)
        and ("\n\nHuman:" in chosen or chosen.startswith("Human:"))
    )


def parse_transcript(text: str, key: str) -> list[Message]:
    """Split one HH transcript into messages.

    Args:
        text: the transcript, starting with ``"\\n\\nHuman:"`` (a missing leading newline pair is tolerated).
        key: field name for error messages.
    """
    if text.startswith("Human:"):
        text = "\n\n" + text
    parts = _TURN.split(text)
    # parts = [preamble, role1, text1, role2, text2, ...]
    if parts[0].strip():
        raise RowError("bad_transcript", f"field {key!r} has text before the first 'Human:' turn", key)
    if len(parts) < 3:
        raise RowError("bad_transcript", f"field {key!r} holds no 'Human:'/'Assistant:' turns", key)
    messages = []
    for i in range(1, len(parts), 2):
        content = parts[i + 1].strip()
        if not content and parts[i] == "Human":
            raise RowError("empty_text", f"field {key!r} turn {i // 2} ({parts[i]}) is empty", key)
        messages.append({"role": _ROLE[parts[i]], "content": content})
    if messages[0]["role"] != "user":
        raise RowError("bad_transcript", f"field {key!r} does not start with a Human turn", key)
    return messages


def read(row: dict, opts: IngestOptions) -> Pair:
    chosen = parse_transcript(require_str(row, "chosen"), "chosen")
    rejected = parse_transcript(require_str(row, "rejected"), "rejected")
    return split_shared_prefix(chosen, rejected)
