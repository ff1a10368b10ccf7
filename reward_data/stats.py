"""Bounded-memory statistics for ``rlhf data show``.

Lengths are kept as exact histograms (``Counter`` of length -> count): memory grows with the
number of distinct lengths, not the number of rows, and percentiles stay exact.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

PERCENTILES = (5, 50, 90, 99)


def summarize(hist: Counter) -> dict:
    """min / p5 / p50 / p90 / p99 / max / mean of a length histogram (nearest-rank percentiles)."""
    total = sum(hist.values())
    if not total:
        return {"count": 0}
    keys = sorted(hist)
    out: dict = {"count": total, "min": keys[0]}
    targets = [(p, max(1, -(-p * total // 100))) for p in PERCENTILES]  # nearest rank = ceil(p/100 * n)
    seen = 0
    ti = 0
    for k in keys:
        seen += hist[k]
        while ti < len(targets) and seen >= targets[ti][1]:
            out[f"p{targets[ti][0]}"] = k
            ti += 1
    out["max"] = keys[-1]
    out["mean"] = round(sum(k * c for k, c in hist.items()) / total, 2)
    return out


class LengthStats:
    """Accumulates prompt/chosen/rejected character lengths, prompt turn counts and ties."""

    def __init__(self) -> None:
        self.prompt = Counter()
        self.chosen = Counter()
        self.rejected = Counter()
        self.turns = Counter()
        self.ties = 0
        self.with_margin = 0

    def add(self, pair) -> None:
        """Count one accepted :class:`~reward_data.schema.Pair`."""
        n = 0
        for m in pair.prompt:
            n += len(m["content"])
        self.prompt[n] += 1
        n = 0
        for m in pair.chosen:
            n += len(m["content"])
        self.chosen[n] += 1
        n = 0
        for m in pair.rejected:
            n += len(m["content"])
        self.rejected[n] += 1
        self.turns[len(pair.prompt)] += 1
        if pair.tie:
            self.ties += 1
        if pair.margin is not None:
            self.with_margin += 1

    def to_dict(self, accepted: int) -> dict:
        return {
            "prompt_chars": summarize(self.prompt),
            "chosen_chars": summarize(self.chosen),
            "rejected_chars": summarize(self.rejected),
            "prompt_turns": {str(k): v for k, v in sorted(self.turns.items())},
            "ties": self.ties,
            "tie_rate": round(self.ties / accepted, 6) if accepted else 0.0,
            "with_margin": self.with_margin,
        }


def token_stats(records: Iterable[dict], tokenizer, batch_size: int = 256) -> dict:
    """Prompt / chosen / rejected token-length percentiles for stored records.

    Args:
        records: canonical records (``read_split`` output).
        tokenizer: a ``transformers`` tokenizer; message contents are tokenised without special
            tokens and summed per side, so the numbers do not depend on a chat template.
    """
    hists = {"prompt_tokens": Counter(), "chosen_tokens": Counter(), "rejected_tokens": Counter()}
    batch: list[dict] = []

    def flush() -> None:
        for side in ("prompt", "chosen", "rejected"):
            texts, owners = [], []
            for i, rec in enumerate(batch):
                for m in rec[side]:
                    texts.append(m["content"])
                    owners.append(i)
            ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
            sums = [0] * len(batch)
            for owner, tok in zip(owners, ids):
                sums[owner] += len(tok)
            for s in sums:
                hists[f"{side}_tokens"][s] += 1
        batch.clear()

    for rec in records:
        batch.append(rec)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    return {k: summarize(v) for k, v in hists.items()}
