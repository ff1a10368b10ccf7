"""Explicit pairs: ``prompt`` / ``chosen`` / ``rejected`` (TRL's standard and conversational formats).

Strings become one user (prompt) or assistant (response) message (split by role markers when a
``transcript_template`` is given); message lists are validated and kept. A ``system`` column, when
present and not blank, becomes the first message of the prompt. An optional ``margin`` column is
carried over.

Binarized sets with scores (UltraFeedback-binarized: a prompt string, ``chosen``/``rejected`` as
full conversations that repeat the prompt, ``score_chosen``/``score_rejected``) are read without
flags: a response list that opens with the prompt's turns is cut after them (or, when it does not
repeat the prompt exactly, the two conversations are split at their shared prefix), the score gap
is the margin (also for the implicit-prompt layout without a prompt column, see
:func:`with_margin`), and equal scores are a tie (``ties``: dropped as ``tie_dropped`` or kept with
``tie=True``).
"""

from __future__ import annotations

from reward_data.options import IngestOptions
from reward_data.schema import (Pair, RowError, as_float, as_response, normalize_messages, prompt_of, require,
                                split_shared_prefix, with_system)

NAME = "explicit"
EXAMPLE = {"prompt": "Name a prime.", "chosen": "7", "rejected": "8"}


def detect(row: dict) -> bool:
    return "prompt" in row and "chosen" in row and "rejected" in row


def _full_conversations(prompt: list, chosen, rejected) -> Pair | None:
    """The pair when ``chosen``/``rejected`` are whole conversations (first turn not the
    assistant's) rather than responses; None when they are responses."""
    first = (chosen[0] if type(chosen) is list and chosen else None)
    if type(first) is not dict or first.get("role", first.get("from")) in ("assistant", "gpt", "bot", "model"):
        return None
    c = normalize_messages(chosen, "chosen", allow_empty=True)
    r = normalize_messages(rejected, "rejected", allow_empty=True)
    body = [m for m in prompt if m["role"] != "system"]
    n = len(body)
    if c[:n] == body and r[:n] == body and len(c) > n and len(r) > n:
        return Pair(prompt, c[n:], r[n:])
    pair = split_shared_prefix(c, r)
    pair.prompt = with_system(pair.prompt, prompt[0]["content"] if prompt and prompt[0]["role"] == "system" else None)
    return pair


def read(row: dict, opts: IngestOptions) -> Pair:
    prompt = prompt_of(require(row, "prompt"), "prompt", opts.transcript_template)
    system = row.get("system")
    if system is not None:
        prompt = with_system(prompt, system)
    raw_c, raw_r = require(row, "chosen"), require(row, "rejected")
    pair = _full_conversations(prompt, raw_c, raw_r)
    if pair is None:
        pair = Pair(prompt, as_response(raw_c, "chosen"), as_response(raw_r, "rejected"))
    return with_margin(pair, row, opts)


def with_margin(pair: Pair, row: dict, opts: IngestOptions) -> Pair:
    """Set the pair's margin from a ``margin`` column, else from ``score_chosen``/``score_rejected``
    (UltraFeedback-binarized, with or without a prompt column): the score gap is the margin, equal
    scores are a tie (``ties``), a chosen side scored below the rejected one is quarantined."""
    margin = row.get("margin")
    pair.margin = None if margin is None else as_float(margin, "margin")
    if pair.margin is None and row.get("score_chosen") is not None and row.get("score_rejected") is not None:
        sc, sr = as_float(row["score_chosen"], "score_chosen"), as_float(row["score_rejected"], "score_rejected")
        if sc is not None and sr is not None:
            if sc < sr:
                raise RowError("bad_value", f"score_chosen {sc:g} is below score_rejected {sr:g}", "score_chosen")
            if sc == sr:
                if opts.ties == "drop":
                    raise RowError("tie_dropped", f"score_chosen = score_rejected = {sc:g} (ties=drop)", "score_chosen")
                pair.tie = True
            pair.margin = sc - sr
    return pair
