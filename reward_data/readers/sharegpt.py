"""ShareGPT preference rows (LLaMA-Factory's DPO layout): ``conversations`` + ``chosen`` / ``rejected``.

``conversations`` is the prompt as ``{"from": "human"|"gpt"|"system", "value": ...}`` turns (or
role/content messages); ``chosen`` and ``rejected`` are one message object each (or a message
list). A ``system`` column goes first in the prompt.
"""

from __future__ import annotations

from reward_data.options import IngestOptions
from reward_data.schema import Pair, as_response, normalize_messages, require, with_system

NAME = "sharegpt"
EXAMPLE = {"conversations": [{"from": "human", "value": "Name a prime."}],
           "chosen": {"from": "gpt", "value": "7"}, "rejected": {"from": "gpt", "value": "8"}}


def detect(row: dict) -> bool:
    return (type(row.get("conversations")) is list and "chosen" in row and "rejected" in row
            and "prompt" not in row)


def read(row: dict, opts: IngestOptions) -> Pair:
    prompt = with_system(normalize_messages(require(row, "conversations"), "conversations"), row.get("system"))
    return Pair(prompt, as_response(require(row, "chosen"), "chosen"), as_response(require(row, "rejected"), "rejected"))
