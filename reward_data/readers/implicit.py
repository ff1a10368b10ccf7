"""Implicit-prompt pairs: ``chosen`` / ``rejected`` full conversations and no prompt column.

The longest shared message prefix (ending before an assistant turn) becomes the prompt; see
:func:`reward_data.schema.split_shared_prefix`.
"""

from __future__ import annotations

from reward_data.options import IngestOptions
from reward_data.schema import Pair, as_float, normalize_messages, require, split_shared_prefix

NAME = "implicit"


def detect(row: dict) -> bool:
    return "prompt" not in row and isinstance(row.get("chosen"), list) and isinstance(row.get("rejected"), list)


def read(row: dict, opts: IngestOptions) -> Pair:
    chosen = normalize_messages(require(row, "chosen"), "chosen")
    rejected = normalize_messages(require(row, "rejected"), "rejected")
    pair = split_shared_prefix(chosen, rejected)
    pair.margin = as_float(row.get("margin"), "margin")
    return pair
