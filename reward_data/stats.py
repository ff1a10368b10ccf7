"""Bounded-memory statistics for ``rlhf data show``.

Lengths are kept as exact histograms (``Counter`` of length -> count): memory grows with the
number of distinct lengths, not the number of rows, and percentiles stay exact.
"""

from __future__ import annotations

import os
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


PREFIX_KEEP = 40


class LengthStats:
    """Accumulates prompt/chosen/rejected character lengths, prompt turn counts, ties, system
    prompts, empty rejected responses and the surface features behind :func:`shortcut_warnings`."""

    def __init__(self) -> None:
        self.prompt = Counter()
        self.chosen = Counter()
        self.rejected = Counter()
        self.turns = Counter()
        self.ties = 0
        self.with_margin = 0
        self.with_system = 0
        self.empty_rejected = 0
        # Surface features a reward model could key on instead of the preference.
        self.chosen_lead_space = 0
        self.rejected_lead_space = 0
        self.chosen_longer = 0
        self.chosen_prefix: str | None = None  # common prefix of every first chosen message
        self.rejected_prefix: str | None = None
        # Unpaired (labelled completion) datasets only.
        self.completion = Counter()
        self.desirable = 0
        self.undesirable = 0

    def add_unpaired(self, rec) -> None:
        """Count one accepted :class:`~reward_data.schema.Unpaired` completion."""
        n = 0
        for m in rec.prompt:
            n += len(m["content"])
        self.prompt[n] += 1
        self.turns[len(rec.prompt)] += 1
        if rec.prompt[0]["role"] == "system":
            self.with_system += 1
        self.completion[sum(len(m["content"]) for m in rec.completion)] += 1
        if rec.label:
            self.desirable += 1
        else:
            self.undesirable += 1

    def add(self, pair, empty_rejected: bool = False) -> None:
        """Count one accepted :class:`~reward_data.schema.Pair`."""
        n = 0
        for m in pair.prompt:
            n += len(m["content"])
        self.prompt[n] += 1
        n = 0
        for m in pair.chosen:
            n += len(m["content"])
        self.chosen[n] += 1
        k = 0
        for m in pair.rejected:
            k += len(m["content"])
        self.rejected[k] += 1
        if n > k:
            self.chosen_longer += 1
        self.turns[len(pair.prompt)] += 1
        if pair.prompt[0]["role"] == "system":
            self.with_system += 1
        if pair.tie:
            self.ties += 1
        if pair.margin is not None:
            self.with_margin += 1
        if empty_rejected:
            self.empty_rejected += 1
        c = pair.chosen[0]["content"]
        r = pair.rejected[0]["content"]
        if c[:1].isspace():
            self.chosen_lead_space += 1
        if r[:1].isspace():
            self.rejected_lead_space += 1
        # Running common prefixes: once empty, startswith("") keeps this at one cheap call.
        p = self.chosen_prefix
        if p is None:
            self.chosen_prefix = c[:PREFIX_KEEP]
        elif not c.startswith(p):
            self.chosen_prefix = os.path.commonprefix((p, c))
        p = self.rejected_prefix
        if p is None:
            self.rejected_prefix = r[:PREFIX_KEEP]
        elif not r.startswith(p):
            self.rejected_prefix = os.path.commonprefix((p, r))

    def to_dict(self, accepted: int) -> dict:
        if self.completion:
            return {
                "prompt_chars": summarize(self.prompt),
                "completion_chars": summarize(self.completion),
                "prompt_turns": {str(k): v for k, v in sorted(self.turns.items())},
                "desirable": self.desirable,
                "undesirable": self.undesirable,
                "with_system": self.with_system,
            }
        return {
            "prompt_chars": summarize(self.prompt),
            "chosen_chars": summarize(self.chosen),
            "rejected_chars": summarize(self.rejected),
            "prompt_turns": {str(k): v for k, v in sorted(self.turns.items())},
            "ties": self.ties,
            "tie_rate": round(self.ties / accepted, 6) if accepted else 0.0,
            "with_margin": self.with_margin,
            "with_system": self.with_system,
            "empty_rejected": self.empty_rejected,
            "surface": {
                "chosen_lead_space": self.chosen_lead_space,
                "rejected_lead_space": self.rejected_lead_space,
                "chosen_longer": self.chosen_longer,
                "chosen_prefix": self.chosen_prefix or "",
                "rejected_prefix": self.rejected_prefix or "",
            },
        }


def shortcut_warnings(stats: dict, accepted: int) -> list[str]:
    """Trivial differences between chosen and rejected that a reward model could learn instead of
    the preference (a leading space on one side, a constant prefix, a length ratio far from 1).

    Args:
        stats: the manifest's ``stats`` (versions written before these features were recorded
            give no warnings).
        accepted: accepted pairs.
    """
    s = stats.get("surface")
    if not s or accepted < 10:
        return []
    out = []
    for side, other in (("rejected", "chosen"), ("chosen", "rejected")):
        a, b = s[f"{side}_lead_space"] / accepted, s[f"{other}_lead_space"] / accepted
        if a >= 0.9 and b <= 0.1:
            out.append(f"{a:.0%} of {side} responses start with whitespace but only {b:.0%} of {other} ones")
        prefix = s[f"{side}_prefix"]
        if prefix.strip() and prefix != s[f"{other}_prefix"]:
            out.append(f"every {side} response starts with {prefix!r} and {other} ones do not")
    mean_c = stats["chosen_chars"].get("mean") or 0
    mean_r = stats["rejected_chars"].get("mean") or 0
    if mean_c and mean_r and not 0.5 <= mean_c / mean_r <= 2.0:
        out.append(f"chosen responses average {mean_c:g} chars, rejected {mean_r:g} (ratio {mean_c / mean_r:.2f})")
    longer = s["chosen_longer"] / accepted
    if longer >= 0.95 or longer <= 0.05:
        out.append(f"the chosen response is the longer one in {longer:.0%} of pairs")
    return out


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
