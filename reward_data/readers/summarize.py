"""OpenAI summarize-from-feedback comparisons: ``info`` / ``summaries`` / ``choice``.

Handles both the TL;DR (Reddit: ``subreddit``/``title``/``post``) and the CNN/DM (``site``/``title``/
``article``) variants of ``info``. The prompt is one user message in the layout the paper's
policies were sampled with, ending in ``TL;DR:``; each summary becomes one assistant message
(stripped: the stored text starts with the space that followed ``TL;DR:``).
"""

from __future__ import annotations

from reward_data.options import IngestOptions
from reward_data.schema import Pair, RowError, as_int, require, text_message

NAME = "summarize"
EXAMPLE = {"info": {"post": "...", "title": "..."}, "summaries": [{"text": " a"}, {"text": " b"}], "choice": 0}


def detect(row: dict) -> bool:
    return "info" in row and "summaries" in row and "choice" in row


def build_prompt(info: dict) -> str:
    """Render the post or article as the summarisation prompt text."""
    for key in ("post", "article"):
        if key in info and not isinstance(info[key], str):
            raise RowError("wrong_type", f"field 'info.{key}' must be a string", f"info.{key}")
    title = info.get("title")
    if title is not None and not isinstance(title, str):
        raise RowError("wrong_type", "field 'info.title' must be a string", "info.title")
    if isinstance(info.get("post"), str):
        if not info["post"].strip():
            raise RowError("empty_text", "field 'info.post' is empty", "info.post")
        lines = []
        if info.get("subreddit"):
            lines.append(f"SUBREDDIT: r/{info['subreddit']}")
        if title:
            lines.append(f"TITLE: {title}")
        lines.append(f"POST: {info['post'].strip()}")
    elif isinstance(info.get("article"), str):
        if not info["article"].strip():
            raise RowError("empty_text", "field 'info.article' is empty", "info.article")
        lines = [f"TITLE: {title}"] if title else []
        lines.append(f"ARTICLE: {info['article'].strip()}")
    else:
        raise RowError("missing_field", "field 'info' has neither 'post' nor 'article'", "info")
    lines.append("TL;DR:")
    return "\n".join(lines)


def read(row: dict, opts: IngestOptions) -> Pair:
    info = require(row, "info")
    if not isinstance(info, dict):
        raise RowError("wrong_type", "field 'info' must be an object", "info")
    summaries = require(row, "summaries")
    if not isinstance(summaries, list) or len(summaries) != 2:
        raise RowError("wrong_type", "field 'summaries' must be a list of exactly 2 objects", "summaries")
    texts = []
    for i, s in enumerate(summaries):
        if not isinstance(s, dict):
            raise RowError("wrong_type", f"summaries[{i}] must be an object", "summaries")
        text = s.get("text")
        if text is None:
            raise RowError("missing_field", f"summaries[{i}] has no 'text'", "summaries")
        texts.append(text_message("assistant", text, f"summaries[{i}].text", allow_empty=True))
        texts[-1]["content"] = texts[-1]["content"].strip()
    choice = as_int(require(row, "choice"), "choice")
    if choice not in (0, 1):
        raise RowError("bad_value", f"field 'choice' must be 0 or 1, got {choice}", "choice")
    prompt = [{"role": "user", "content": build_prompt(info)}]
    return Pair(prompt, [texts[choice]], [texts[1 - choice]])
