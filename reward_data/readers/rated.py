"""Rated completions (UltraFeedback style): several scored completions per prompt, binarised.

Layouts: ``completions`` = list of ``{response|text|content|completion, <score>}`` objects, or
parallel ``responses`` + ``scores``/``ratings``/``rewards`` lists. A score inside a nested object
is named by its dotted path (raw UltraFeedback's per-aspect ratings:
``score_field="annotations.helpfulness.Rating"``), and ``score`` combines several
(``"annotations.helpfulness.Rating*0.5+annotations.honesty.Rating*0.5"``; a completion with any
term unrated takes part in no pair). A ``system`` column goes first. The prompt is ``instruction``,
``prompt`` or ``question``. Completions without a numeric score (UltraFeedback's ``"N/A"``) take
part in no pair. A score key named like a rank (``rank``: 1 = best) is lower-is-better unless
``lower_is_better`` says otherwise. ``binarize`` picks best vs worst, best vs a seeded random lower one, or all
pairs; a pair needs a score gap strictly above ``min_margin`` and the gap is its margin.
"""

from __future__ import annotations

import difflib
import random

from reward_data.options import IngestOptions, parse_score
from reward_data.schema import Pair, RowError, as_response, get_path, prompt_of, with_system

NAME = "rated"
EXAMPLE = {"instruction": "Name a prime.", "completions": [{"response": "7", "overall_score": 9}, {"response": "8", "overall_score": 2}]}

_PROMPT_KEYS = ("instruction", "prompt", "question")
_TEXT_KEYS = ("response", "text", "content", "completion")
_SCORE_KEYS = ("overall_score", "score", "rating", "reward")
_LIST_SCORE_KEYS = ("scores", "ratings", "rewards")
#: Score keys where a smaller value is better (rank 1 = best), unless ``lower_is_better`` says otherwise.
RANK_NAMES = ("rank", "ranking", "position", "place")


def detect(row: dict) -> bool:
    has_prompt = any(k in row for k in _PROMPT_KEYS)
    return has_prompt and (isinstance(row.get("completions"), list) or ("responses" in row and any(k in row for k in _LIST_SCORE_KEYS)))


def _score(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if value == value else None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _candidates(row: dict, opts: IngestOptions) -> list[tuple[float, object, str]]:
    """(score, response value, field locator) for every completion with a numeric score."""
    out = []
    if isinstance(row.get("completions"), list):
        terms = parse_score(opts.score) if opts.score is not None else None
        for i, c in enumerate(row["completions"]):
            if not isinstance(c, dict):
                raise RowError("wrong_type", f"completions[{i}] must be an object", "completions")
            text_key = next((k for k in _TEXT_KEYS if k in c), None)
            if text_key is None:
                raise RowError("missing_field", f"completions[{i}] has none of {', '.join(_TEXT_KEYS)}", "completions")
            if terms:
                score_key = None
                values = [_score(get_path(c, name)) for name, _ in terms]
                score = None if None in values else sum(w * v for (_, w), v in zip(terms, values))
            else:
                score_key = opts.score_field or next((k for k in _SCORE_KEYS if k in c), None)
                score = _score(get_path(c, score_key)) if score_key else None
            if score is not None and lower_is_better(score_key, opts):
                score = -score
            if score is not None:
                out.append((score, c[text_key], f"completions[{i}].{text_key}"))
        return out
    responses = row.get("responses")
    score_key = opts.score_field or next(k for k in _LIST_SCORE_KEYS if k in row)
    scores = row.get(score_key)
    if not isinstance(responses, list) or not isinstance(scores, list) or len(responses) != len(scores):
        raise RowError("wrong_type", f"'responses' and {score_key!r} must be lists of equal length", "responses")
    flip = lower_is_better(score_key, opts)
    for i, (r, s) in enumerate(zip(responses, scores)):
        score = _score(s)
        if score is not None and flip:
            score = -score
        if score is not None:
            out.append((score, r, f"responses[{i}]"))
    return out


def lower_is_better(key: str | None, opts: IngestOptions) -> bool:
    """Whether a smaller value of score key ``key`` is better: ``opts.lower_is_better`` when set,
    else True for rank-like names (``rank``, ``ranking``, ``position``, ``place``; rank 1 = best)."""
    if opts.lower_is_better is not None:
        return opts.lower_is_better
    return key is not None and key.split(".")[-1].lower() in RANK_NAMES


def _key_paths(obj: dict, prefix: str = "") -> list[str]:
    """Every key of ``obj`` with the dotted paths inside nested objects (``annotations.honesty.Rating``)."""
    out = []
    for k, v in obj.items():
        out.append(prefix + k)
        if isinstance(v, dict):
            out += _key_paths(v, f"{prefix}{k}.")
    return out


def resolved(row: dict, opts: IngestOptions) -> dict:
    """The score key (or ``score`` expression) this file is read with (what ``score_field=None``
    resolves to); a ``score_field`` or score term that no completion holds fails here, naming it
    and the keys seen (dotted paths into nested objects included)."""
    if opts.score is not None and opts.score_field is not None:
        raise ValueError("give --score-field KEY or --score EXPR, not both")
    if isinstance(row.get("completions"), list):
        first = next((c for c in row["completions"] if isinstance(c, dict)), {})
        key = opts.score_field or next((k for k in _SCORE_KEYS if k in first), None)
        keys = _key_paths(first)
    else:
        if opts.score is not None:
            raise ValueError("--score reads attributes of completion objects; this file has parallel 'responses' "
                             "and score lists: use --score-field LIST")
        key = opts.score_field or next((k for k in _LIST_SCORE_KEYS if k in row), None)
        keys = list(row)
    wanted = [name for name, _ in parse_score(opts.score)] if opts.score is not None else [opts.score_field]
    for name in wanted:
        if name is not None and name not in keys:
            near = difflib.get_close_matches(name, keys, n=3)
            flag = "--score-field" if opts.score is None else "--score term"
            raise ValueError(f"{flag} {name}: no such key in the completions (keys seen: "
                             f"{', '.join(keys[:40]) or 'none'})" + (f"; closest: {', '.join(near)}" if near else ""))
    if opts.score is not None:
        return {"score": opts.score, "order": "lower is better" if opts.lower_is_better else "higher is better"}
    return {"score_field": key, "order": "lower is better" if lower_is_better(key, opts) else "higher is better"}


def pairs_from_candidates(prompt: list, cands: list[tuple[float, object, str]], opts: IngestOptions,
                          what: str = "completions") -> list[Pair | RowError]:
    """Binarise scored candidates ``(score, response value, locator)``, higher score = better.

    ``binarize`` picks best vs worst, best vs a seeded random lower one, or all pairs; a pair needs
    a score gap strictly above ``min_margin`` and the gap is its margin. Shared by rated
    completions and ranked answers (whose ranks arrive negated).
    """
    # Stable sort, best first: equal scores keep their input order, so output is deterministic.
    order = sorted(range(len(cands)), key=lambda i: -cands[i][0])
    pairs_idx: list[tuple[int, int]] = []
    if len(order) >= 2:
        best = order[0]
        lower = [j for j in order if cands[best][0] - cands[j][0] > opts.min_margin]
        if opts.binarize == "best_worst" and lower:
            pairs_idx = [(best, lower[-1])]
        elif opts.binarize == "best_random" and lower:
            rng = random.Random(f"{opts.seed}:{prompt[-1]['content']}")
            pairs_idx = [(best, lower[rng.randrange(len(lower))])]
        elif opts.binarize == "all_pairs":
            pairs_idx = [
                (i, j) for n, i in enumerate(order) for j in order[n + 1:] if cands[i][0] - cands[j][0] > opts.min_margin
            ]
    if not pairs_idx:
        raise RowError("no_pairs", f"fewer than two {what} with a score gap above {opts.min_margin}", what)
    out: list[Pair | RowError] = []
    for i, j in pairs_idx:
        (si, ri, ki), (sj, rj, kj) = cands[i], cands[j]
        item = f"{ki}>{kj}"
        try:
            out.append(Pair(prompt, as_response(ri, ki), as_response(rj, kj), margin=si - sj, item=item))
        except RowError as err:
            err.item = item
            # Drop the traceback: it references this frame, whose `out` holds err (a cycle).
            out.append(err.with_traceback(None))
    return out


def read(row: dict, opts: IngestOptions) -> list[Pair | RowError]:
    prompt_key = next((k for k in _PROMPT_KEYS if k in row), None)
    if prompt_key is None or row[prompt_key] is None:
        raise RowError("missing_field", f"row has none of {', '.join(_PROMPT_KEYS)}", "prompt")
    prompt = with_system(prompt_of(row[prompt_key], prompt_key, opts.transcript_template), row.get("system"))
    cands = _candidates(row, opts)
    return pairs_from_candidates(prompt, cands, opts)
