"""OpenAI preference fine-tuning JSONL: ``input.messages`` + ``preferred_output`` / ``non_preferred_output``.

The layout of OpenAI's DPO fine-tuning files: ``{"input": {"messages": [...], "tools": [...]},
"preferred_output": [{"role": "assistant", "content": ...}], "non_preferred_output": [...]}``.
System (and ``developer``) messages stay first in the prompt; typed content parts
(``[{"type": "text", "text": ...}]``) are joined, non-text parts quarantined. Tools are not kept.
"""

from __future__ import annotations

from reward_data.options import IngestOptions
from reward_data.schema import Pair, RowError, as_response, normalize_messages, require

NAME = "openai"
EXAMPLE = {"input": {"messages": [{"role": "user", "content": "Name a prime."}]},
           "preferred_output": [{"role": "assistant", "content": "7"}],
           "non_preferred_output": [{"role": "assistant", "content": "8"}]}


def detect(row: dict) -> bool:
    return "preferred_output" in row and "non_preferred_output" in row and "input" in row


def read(row: dict, opts: IngestOptions) -> Pair:
    inp = require(row, "input")
    if type(inp) is not dict:
        raise RowError("wrong_type", f"field 'input' must be an object, got {type(inp).__name__}", "input")
    prompt = normalize_messages(require(inp, "messages"), "input.messages")
    return Pair(prompt, as_response(require(row, "preferred_output"), "preferred_output"),
                as_response(require(row, "non_preferred_output"), "non_preferred_output"))
