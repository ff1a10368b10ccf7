"""Chatbot Arena conversations: ``conversation_a`` / ``conversation_b`` message lists and ``winner``.

The layout of lmsys/chatbot_arena_conversations (``question_id``, ``model_a``, ``model_b``,
``winner``, ``conversation_a``, ``conversation_b``, ``turn``, ...): both conversations hold the
same user turns and each model's answers. The shared prefix (ending before the first differing
assistant turn) is the prompt, as for implicit pairs. ``winner`` is ``model_a``, ``model_b``,
``tie`` or ``tie (bothbad)``; a tie is dropped (``tie_dropped``) or kept with ``tie=True`` by
the ``ties`` option, and any other value is quarantined as ``bad_value``.
"""

from __future__ import annotations

from reward_data.options import IngestOptions
from reward_data.schema import Pair, RowError, normalize_messages, require, split_shared_prefix, with_system

NAME = "arena"
EXAMPLE = {"question_id": "q1", "model_a": "m1", "model_b": "m2", "winner": "model_b",
           "conversation_a": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
           "conversation_b": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi! How can I help?"}]}

_WINNERS = {"model_a": 0, "model_b": 1, "tie": None, "tie (bothbad)": None}


def detect(row: dict) -> bool:
    return "conversation_a" in row and "conversation_b" in row and "winner" in row


def read(row: dict, opts: IngestOptions) -> Pair:
    winner = require(row, "winner")
    if not isinstance(winner, str) or winner.strip().lower() not in _WINNERS:
        raise RowError("bad_value", f"field 'winner' must be one of {', '.join(_WINNERS)}, got {winner!r}", "winner")
    side = _WINNERS[winner.strip().lower()]
    if side is None and opts.ties == "drop":
        raise RowError("tie_dropped", f"winner is {winner!r} (ties=drop)", "winner")
    a = normalize_messages(require(row, "conversation_a"), "conversation_a", allow_empty=True)
    b = normalize_messages(require(row, "conversation_b"), "conversation_b", allow_empty=True)
    pair = split_shared_prefix(*((b, a) if side == 1 else (a, b)))
    pair.prompt = with_system(pair.prompt, row.get("system"))
    pair.tie = side is None
    return pair
