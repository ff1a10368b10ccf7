"""Per-response scored data (HelpSteer style): one response per row with attribute scores.

Rows that share a prompt form a group; the group's responses are ranked by one attribute or a
weighted sum (``score="helpfulness*0.6+correctness*0.4"``) and binarised like rated completions
(``binarize``: best vs worst, best vs a seeded random lower one, or all pairs whose score gap is
above ``min_margin``); the score gap is the pair's margin. Equal scores are ties, stored with
``tie=True`` under ``ties=keep`` and quarantined as ``tie_dropped`` otherwise.

A row holds ``prompt`` (or ``question``/``instruction``) and ``response`` (or ``completion``/
``output``/``answer``), or one templated transcript (``text``/``transcript``/``conversation``,
split by ``transcript_template``) whose last assistant turn is the response. A score term may
name one position of a list column (NeMo-Aligner regression labels): ``label[4]``, or, with
``label_names`` naming the positions, ``label[helpfulness]`` or plain ``helpfulness``. A string
prompt is split by the template too, so multi-turn prompts stored as one text keep their turns; a
``system`` column goes first.

Grouping (see :func:`group_rows`): adjacent rows with the same key (``group_mode=consecutive``,
streaming) or all rows of a file with the same key (``global``); the key is ``group_by`` or the
parsed prompt. The ingest loop counts one group as one row; a record that cannot join a group
(no prompt, a non-numeric score) is quarantined on its own.
"""

from __future__ import annotations

import difflib
import random
import re
from collections.abc import Iterator
from typing import Any

from reward_data.options import STEERLM_ATTRIBUTES, IngestOptions, label_positions, parse_score
from reward_data.schema import Pair, RowError, as_float, parse_transcript, prompt_of, with_system

NAME = "scored"
EXAMPLE = {"prompt": "Name a prime.", "response": "7", "helpfulness": 4}
EXAMPLE_FLAGS = "--score helpfulness (one row per response; rows with one prompt form a group)"

_PROMPT_KEYS = ("prompt", "question", "instruction")
_RESPONSE_KEYS = ("response", "completion", "output", "answer")
_TRANSCRIPT_KEYS = ("transcript", "text", "conversation")
#: Attribute columns that mark a row as scored (for detection only; any numeric column can be used).
ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity", "harmlessness", "honesty",
              "score", "rating", "reward", "overall_score")
_DEFAULT_SCORE = ("score", "rating", "reward", "overall_score")
GROUP = "__scored_group__"

_INDEXED = re.compile(r"\A(.+)\[([0-9]+)\]\Z")
#: NeMo-Aligner's regression labels mark an attribute the row was not labelled for with -100.
NEMO_UNLABELLED = -100.0


def attribute(row: dict, name: str) -> Any:
    """The value of score term ``name``: a column, or ``col[i]``, position i of a list column
    (NeMo regression labels). None when absent."""
    if name in row:
        return row[name]
    m = _INDEXED.match(name)
    if m is None:
        return None
    values = row.get(m.group(1))
    i = int(m.group(2))
    return values[i] if type(values) is list and i < len(values) else None


def _has_attribute(row: dict, name: str) -> bool:
    m = _INDEXED.match(name)
    if name in row or m is None:
        return name in row
    values = row.get(m.group(1))
    return type(values) is list and int(m.group(2)) < len(values)


def detect(row: dict) -> bool:
    if any(k in row for k in _TRANSCRIPT_KEYS) and type(row.get("label")) is list and "chosen" not in row:
        return True  # NeMo-Aligner regression layout: a templated text and a label vector
    has_text = (any(k in row for k in _PROMPT_KEYS) and any(k in row for k in _RESPONSE_KEYS)) or any(
        k in row for k in _TRANSCRIPT_KEYS)
    return (has_text and "chosen" not in row and "completions" not in row and "responses" not in row
            and any(k in row for k in ATTRIBUTES))


_NAMED = re.compile(r"\A(.+)\[([A-Za-z_]\w*)\]\Z")


def _by_position(name: str, row: dict, opts: IngestOptions) -> str:
    """Score term ``name`` with a named position (``label_names``) spelt as its index:
    ``label[helpfulness]``, or a bare ``helpfulness`` that is not a column, -> ``label[4]``."""
    if opts.label_names is None:
        if _NAMED.match(name):
            raise ValueError(f"format scored: score term {name!r} names a position; say which name each position "
                             "has with --label-names (e.g. 'steerlm' or 'label=helpfulness,correctness,...')")
        return name
    column, names = label_positions(opts.label_names)
    m = _NAMED.match(name)
    if m is None and (name in row or name not in names):
        return name
    if m is not None and m.group(1) != column:
        raise ValueError(f"format scored: score term {name!r}: --label-names names the positions of {column!r}, "
                         f"not {m.group(1)!r}")
    wanted = m.group(2) if m else name
    if wanted not in names:
        raise ValueError(f"format scored: score term {name!r}: {wanted!r} is not among --label-names "
                         f"({', '.join(names)})")
    return f"{column}[{names.index(wanted)}]"


def _score_terms(row: dict, opts: IngestOptions) -> list[tuple[str, float]]:
    if opts.score is not None:
        return [(_by_position(name, row, opts), w) for name, w in parse_score(opts.score)]
    key = next((k for k in _DEFAULT_SCORE if k in row), None)
    if key is None and type(row.get("label")) is list:
        n = len(row["label"])
        raise ValueError(f"format scored: 'label' is a list of {n} attribute values; name one by position, e.g. "
                         "--score 'label[4]', or a weighted sum such as 'label[0]*0.5+label[1]*0.5'; or name the "
                         "positions with --label-names "
                         + ("steerlm (NeMo-Aligner's 9 attributes) and --score helpfulness" if n == len(STEERLM_ATTRIBUTES)
                            else "'label=name0,name1,...' and --score NAME"))
    if key is None:
        seen = [k for k in row if k in ATTRIBUTES] or sorted(row)[:20]
        raise ValueError(f"format scored needs --score ATTR or a weighted sum such as "
                         f"'helpfulness*0.6+correctness*0.4' (attribute columns seen: {', '.join(seen)})")
    return [(key, 1.0)]


def resolved(row: dict, opts: IngestOptions) -> dict:
    """The score expression and grouping this file is read with; fails fast when no score is known."""
    terms = _score_terms(row, opts)
    if opts.label_names is not None:
        column, names = label_positions(opts.label_names)
        values = row.get(column)
        if type(values) is not list or len(values) != len(names):
            got = f"{len(values)} values" if type(values) is list else f"not a list ({type(values).__name__})"
            raise ValueError(f"format scored: --label-names names {len(names)} positions of {column!r}, but its "
                             f"first row holds {got}")
    missing = [name for name, _ in terms if not _has_attribute(row, name)]
    if missing:
        hints = [f"{m!r} -> {', '.join(map(repr, difflib.get_close_matches(m, list(row), n=2)))}"
                 for m in missing if difflib.get_close_matches(m, list(row), n=1)]
        raise ValueError(f"format scored: score attribute(s) {', '.join(missing)} not among the columns "
                         f"({', '.join(sorted(row)[:30])})" + (f"; closest matches: {'; '.join(hints)}" if hints else ""))
    return {
        "score": "+".join(f"{name}*{w:g}" for name, w in terms),
        **({"label_names": f"{column}={','.join(names)}"} if opts.label_names else {}),
        "group_by": opts.group_by or "prompt",
        "group_mode": opts.group_mode,
    }


def parse_record(row: dict, opts: IngestOptions, terms: list[tuple[str, float]]) -> tuple[list, str, float]:
    """(prompt messages, response text, combined score) of one row; RowError if unusable."""
    template = opts.transcript_template
    prompt_key = next((k for k in _PROMPT_KEYS if row.get(k) is not None), None)
    response_key = next((k for k in _RESPONSE_KEYS if row.get(k) is not None), None)
    if prompt_key is not None and response_key is not None:
        prompt = prompt_of(row[prompt_key], prompt_key, template)
        response = row[response_key]
        if not isinstance(response, str):
            raise RowError("wrong_type", f"field {response_key!r} must be a string, got {type(response).__name__}",
                           response_key)
    else:
        key = next((k for k in _TRANSCRIPT_KEYS if row.get(k) is not None), None)
        if key is None:
            raise RowError("missing_field", f"row has neither prompt+response ({', '.join(_PROMPT_KEYS)} / "
                           f"{', '.join(_RESPONSE_KEYS)}) nor a transcript ({', '.join(_TRANSCRIPT_KEYS)})", "prompt")
        if template is None:
            raise RowError("bad_transcript", f"field {key!r} is a transcript; pass --transcript-template", key)
        if not isinstance(row[key], str):
            raise RowError("wrong_type", f"field {key!r} must be a string", key)
        msgs = parse_transcript(row[key], template, key)
        if len(msgs) < 2 or msgs[-1]["role"] != "assistant":
            raise RowError("bad_transcript", f"field {key!r} does not end with an assistant turn", key)
        prompt, response = msgs[:-1], msgs[-1]["content"]
        for i, m in enumerate(prompt):
            if not m["content"]:
                raise RowError("empty_text", f"{key} turn {i} ({m['role']}) is empty", key)
    prompt = with_system(prompt, row.get("system"))
    score = 0.0
    for name, weight in terms:
        value = as_float(attribute(row, name), name)
        if value == NEMO_UNLABELLED and "[" in name:
            raise RowError("missing_field", f"score attribute {name!r} is -100 (not labelled)", name)
        if value is None:
            raise RowError("missing_field", f"score attribute {name!r} is missing or empty", name)
        score += weight * value
    return prompt, response, score


def group_rows(rows: Iterator[tuple[int, Any, bytes | None, int]], opts: IngestOptions, mapping_fn,
               counter: dict) -> Iterator[tuple[int, Any, bytes | None, int]]:
    """Turn a source's ``(row, value, raw, line)`` stream into one entry per prompt group.

    Errors and unusable records pass through one by one (the loop quarantines them); a group is
    yielded at its first record's position as ``{GROUP: [(row, line, prompt, response, score)]}``.
    ``counter["records_in"]`` counts the source records.
    """
    terms = None
    groups: dict[Any, list] = {}
    current_key: Any = object()
    current: list = []
    for row, value, raw, line in rows:
        counter["records_in"] += 1
        if type(value) is not dict:
            yield row, value, raw, line
            continue
        if mapping_fn is not None:
            value = mapping_fn(value)
        try:
            if terms is None:
                try:
                    terms = _score_terms(value, opts)
                except ValueError as err:
                    raise RowError("missing_field", str(err), "score") from None
            prompt, response, score = parse_record(value, opts, terms)
        except RowError as err:
            yield row, err, raw, line
            continue
        key = value.get(opts.group_by) if opts.group_by else tuple((m["role"], m["content"]) for m in prompt)
        if not isinstance(key, (str, int, float, tuple)):
            key = repr(key)
        entry = (row, line, prompt, response, score)
        if opts.group_mode == "global":
            groups.setdefault(key, []).append(entry)
            continue
        if key != current_key:
            if current:
                yield current[0][0], {GROUP: current}, None, current[0][1]
            current_key, current = key, []
        current.append(entry)
    if current:
        yield current[0][0], {GROUP: current}, None, current[0][1]
    for members in groups.values():
        yield members[0][0], {GROUP: members}, None, members[0][1]


def read(row: dict, opts: IngestOptions) -> list[Pair | RowError]:
    members = row.get(GROUP)
    if not isinstance(members, list):
        raise RowError("missing_field", "the scored format reads prompt groups (internal: no group)", "prompt")
    if len(members) < 2:
        raise RowError("no_pairs", "only one response for this prompt", "response")
    prompt = members[0][2]
    # Stable sort, best first: equal scores keep their input order, so output is deterministic.
    order = sorted(range(len(members)), key=lambda i: -members[i][4])
    score = [m[4] for m in members]
    best = order[0]
    idx: list[tuple[int, int]] = []
    if opts.binarize == "all_pairs":
        idx = [(i, j) for n, i in enumerate(order) for j in order[n + 1:]
               if score[i] - score[j] > opts.min_margin or score[i] == score[j]]
    else:
        lower = [j for j in order[1:] if score[best] - score[j] > opts.min_margin]
        if lower:
            if opts.binarize == "best_worst":
                idx = [(best, lower[-1])]
            else:
                rng = random.Random(f"{opts.seed}:{prompt[-1]['content']}")
                idx = [(best, lower[rng.randrange(len(lower))])]
        elif all(score[j] == score[best] for j in order):
            idx = [(best, order[-1])]  # every response scored the same: a tie
    if not idx:
        raise RowError("no_pairs", f"no two responses with a score gap above {opts.min_margin}", "response")
    if len(idx) == 1 and score[idx[0][0]] == score[idx[0][1]] and opts.ties == "drop":
        raise RowError("tie_dropped", f"all {len(members)} responses score the same ({score[best]:g}) (ties=drop)", "score")
    out: list[Pair | RowError] = []
    for i, j in idx:
        (_, li, _, ri, si), (_, lj, _, rj, sj) = members[i], members[j]
        item = f"line {li}>line {lj}"
        if si == sj:
            if opts.ties == "drop":
                err = RowError("tie_dropped", f"lines {li} and {lj} score the same ({si:g}) (ties=drop)", "score")
                err.item = item
                out.append(err)
                continue
            out.append(Pair(prompt, [{"role": "assistant", "content": ri}], [{"role": "assistant", "content": rj}],
                            margin=0.0, tie=True, item=item))
            continue
        out.append(Pair(prompt, [{"role": "assistant", "content": ri}], [{"role": "assistant", "content": rj}],
                        margin=si - sj, item=item))
    return out
