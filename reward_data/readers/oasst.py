"""OpenAssistant message trees (``ExportMessageTree`` rows or bare root messages).

Assistant replies to the same prompter message that carry a ``rank`` (0 = best) are compared
pairwise at every depth: for siblings ranked ``r_i < r_j`` the pair (i preferred over j) gets the
conversation from the root down to their parent as its prompt. Deleted messages (and their
subtrees) and unranked replies take part in no pair; prompter siblings are ranked too in oasst
but are not responses, so they form no pairs. One tree row therefore yields many pairs; a tree
that yields none is quarantined as ``no_pairs``.
"""

from __future__ import annotations

from reward_data.options import IngestOptions
from reward_data.schema import Pair, RowError, normalize_messages

NAME = "oasst"
EXAMPLE = {"message_tree_id": "t", "prompt": {"message_id": "p", "role": "prompter", "text": "Name a prime.", "replies": [{"message_id": "a", "role": "assistant", "text": "7", "rank": 0, "replies": []}, {"message_id": "b", "role": "assistant", "text": "8", "rank": 1, "replies": []}]}}


def _root(row: dict) -> dict | None:
    if isinstance(row.get("prompt"), dict) and "message_tree_id" in row:
        return row["prompt"]
    if "message_id" in row and "replies" in row and "role" in row:
        return row
    return None


def detect(row: dict) -> bool:
    return _root(row) is not None


def _message(node: dict) -> dict:
    return {"role": node.get("role"), "content": node.get("text")}


def read(row: dict, opts: IngestOptions) -> list[Pair | RowError]:
    root = _root(row)
    if root is None:
        raise RowError("missing_field", "row has neither a 'prompt' tree nor a root message", "prompt")
    out: list[Pair | RowError] = []
    # Iterative DFS; each stack entry is (node, conversation up to and including node).
    stack = [(root, [_message(root)])]
    while stack:
        node, path = stack.pop()
        replies = node.get("replies") or []
        if not isinstance(replies, list):
            raise RowError("wrong_type", f"message {node.get('message_id')}: 'replies' must be a list", "replies")
        live = [r for r in replies if isinstance(r, dict) and not r.get("deleted")]
        if node.get("role") == "prompter":
            ranked = sorted((r for r in live if isinstance(r.get("rank"), int)), key=lambda r: r["rank"])
            for i, better in enumerate(ranked):
                for worse in ranked[i + 1:]:
                    if better["rank"] == worse["rank"]:
                        continue
                    item = f"{better.get('message_id')}>{worse.get('message_id')}"
                    try:
                        prompt = normalize_messages(path, "prompt")
                        chosen = normalize_messages([_message(better)], "chosen", allow_empty=True)
                        rejected = normalize_messages([_message(worse)], "rejected", allow_empty=True)
                        if chosen[0]["role"] != "assistant" or rejected[0]["role"] != "assistant":
                            raise RowError("bad_value", "ranked replies to a prompter must be assistant messages", "role")
                        out.append(Pair(prompt, chosen, rejected, item=item))
                    except RowError as err:
                        err.item = item
                        # Drop the traceback: it references this frame, whose `out` holds err (a cycle).
                        out.append(err.with_traceback(None))
        for reply in reversed(live):
            stack.append((reply, path + [_message(reply)]))
    if not out:
        raise RowError("no_pairs", "the tree holds no ranked assistant siblings", "replies")
    return out
