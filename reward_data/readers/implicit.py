"""Implicit-prompt pairs: ``chosen`` / ``rejected`` full conversations and no prompt column.

The longest shared message prefix (ending before an assistant turn) becomes the prompt; see
:func:`reward_data.schema.split_shared_prefix`. A ``system`` column goes first in the prompt.
Skywork-Reward-Preference and TRL's implicit-prompt sets have this layout; so does
``trl-lib/ultrafeedback_binarized``, whose ``score_chosen``/``score_rejected`` give the margin
and mark ties as in the explicit reader.
"""

from __future__ import annotations

from reward_data.options import IngestOptions
from reward_data.readers.explicit import with_margin
from reward_data.schema import Pair, normalize_messages, require, split_shared_prefix, with_system

NAME = "implicit"
EXAMPLE = {"chosen": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"}], "rejected": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "8"}]}


def detect(row: dict) -> bool:
    return "prompt" not in row and "conversations" not in row and isinstance(row.get("chosen"), list) and isinstance(row.get("rejected"), list)


def read(row: dict, opts: IngestOptions) -> Pair:
    # Blank turns pass here; check_pair judges them once the prompt/response split is known.
    chosen = normalize_messages(require(row, "chosen"), "chosen", allow_empty=True)
    rejected = normalize_messages(require(row, "rejected"), "rejected", allow_empty=True)
    pair = split_shared_prefix(chosen, rejected)
    pair.prompt = with_system(pair.prompt, row.get("system"))
    return with_margin(pair, row, opts)
