"""Ranked answers (Nectar style): a prompt and ``answers`` = list of ``{answer, model, rank}``.

``rank`` 1 is the best answer (lower is better, unless ``lower_is_better=False``). The answers
are binarised like rated completions (``binarize``, ``min_margin``; the rank gap is the margin;
equal ranks form no pair). A prompt that is an HH-style transcript (``"\\n\\nHuman: ...
\\n\\nAssistant:"``, Nectar's layout) is split into turns and its trailing empty ``Assistant:``
cue dropped; other strings are one user message unless a ``transcript_template`` is given.
"""

from __future__ import annotations

from reward_data.options import IngestOptions
from reward_data.readers.hh import parse_transcript as parse_hh
from reward_data.readers.rated import pairs_from_candidates
from reward_data.schema import RowError, as_float, prompt_of, require, with_system

NAME = "ranked"
EXAMPLE = {"prompt": "\n\nHuman: Name a prime.\n\nAssistant:",
           "answers": [{"answer": "7", "model": "m1", "rank": 1}, {"answer": "8", "model": "m2", "rank": 2}]}

_ANSWER_KEYS = ("answers", "ranked_answers")
_TEXT_KEYS = ("answer", "response", "text", "content", "completion")


def _answers_key(row: dict) -> str | None:
    return next((k for k in _ANSWER_KEYS if type(row.get(k)) is list), None)


def detect(row: dict) -> bool:
    key = _answers_key(row)
    return (key is not None and "prompt" in row and bool(row[key])
            and all(type(a) is dict and "rank" in a for a in row[key]))


def resolved(row: dict, opts: IngestOptions) -> dict:
    return {"rank_field": "rank", "order": "higher is better" if opts.lower_is_better is False else "lower is better"}


def read(row: dict, opts: IngestOptions):
    value = require(row, "prompt")
    if isinstance(value, str) and opts.transcript_template is None and "\n\nHuman:" in value:
        msgs = parse_hh(value, "prompt")
        if msgs[-1]["role"] == "assistant" and not msgs[-1]["content"]:
            msgs.pop()  # the generation cue "\n\nAssistant:" the answers continue from
        prompt = msgs
    else:
        prompt = prompt_of(value, "prompt", opts.transcript_template)
    prompt = with_system(prompt, row.get("system"))
    key = _answers_key(row)
    if key is None:
        raise RowError("missing_field", f"row has no answer list ({', '.join(_ANSWER_KEYS)})", "answers")
    sign = 1.0 if opts.lower_is_better is False else -1.0
    cands = []
    for i, a in enumerate(row[key]):
        if type(a) is not dict:
            raise RowError("wrong_type", f"{key}[{i}] must be an object", key)
        text_key = next((k for k in _TEXT_KEYS if k in a), None)
        if text_key is None:
            raise RowError("missing_field", f"{key}[{i}] has none of {', '.join(_TEXT_KEYS)}", key)
        rank = as_float(a.get("rank"), f"{key}[{i}].rank")
        if rank is not None:
            cands.append((sign * rank, a[text_key], f"{key}[{i}]"))
    return pairs_from_candidates(prompt, cands, opts, what="answers")
