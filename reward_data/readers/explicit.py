"""Explicit pairs: ``prompt`` / ``chosen`` / ``rejected`` (TRL's standard and conversational formats).

Strings become one user (prompt) or assistant (response) message (split by role markers when a
``transcript_template`` is given); message lists are validated and kept. A ``system`` column, when
present and not blank, becomes the first message of the prompt. An optional ``margin`` column is carried over; when it is absent but both
``score_chosen`` and ``score_rejected`` exist (binarised UltraFeedback), their difference is used.
"""

from __future__ import annotations

from reward_data.options import IngestOptions
from reward_data.schema import Pair, as_float, as_response, prompt_of, require, with_system

NAME = "explicit"


def detect(row: dict) -> bool:
    return "prompt" in row and "chosen" in row and "rejected" in row


def read(row: dict, opts: IngestOptions) -> Pair:
    prompt = prompt_of(require(row, "prompt"), "prompt", opts.transcript_template)
    system = row.get("system")
    if system is not None:
        prompt = with_system(prompt, system)
    chosen = as_response(require(row, "chosen"), "chosen")
    rejected = as_response(require(row, "rejected"), "rejected")
    margin = row.get("margin")
    margin = None if margin is None else as_float(margin, "margin")
    if margin is None and row.get("score_chosen") is not None and row.get("score_rejected") is not None:
        margin = as_float(row["score_chosen"], "score_chosen") - as_float(row["score_rejected"], "score_rejected")
    return Pair(prompt, chosen, rejected, margin)
