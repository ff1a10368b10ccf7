"""Ingest options shared by the readers (everything besides sources, name, format and mapping)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

TIES = ("drop", "keep")
BINARIZE = ("best_worst", "best_random", "all_pairs")


@dataclass
class IngestOptions:
    """Reader and limit options; ``reward_data.ingest(**reader_options)`` fills this."""

    ties: str = field(
        default="drop",
        metadata={"help": "Labelled ties (two-response formats): 'drop' quarantines them with reason tie_dropped, "
                  "'keep' stores them with \"tie\": true (chosen/rejected order is then arbitrary)."},
    )
    label_field: str | None = field(
        default=None,
        metadata={"help": "Two-response formats: the column holding the preferred index or winner, e.g. "
                  "better_response_id or safer_response_id for PKU-SafeRLHF. Default: the first present of "
                  "better_response_id, chosen_id, preferred, label, choice, winner, preference."},
    )
    binarize: str = field(
        default="best_worst",
        metadata={"help": "Rated completions: 'best_worst' (highest vs lowest score), 'best_random' (highest vs a "
                  "seeded random lower-scored one) or 'all_pairs' (every pair whose score gap exceeds min_margin)."},
    )
    min_margin: float = field(
        default=0.0,
        metadata={"help": "Rated completions: a pair is formed only when the score gap is strictly above this."},
    )
    score_field: str | None = field(
        default=None,
        metadata={"help": "Rated completions: the per-completion score key. Default: the first present of "
                  "overall_score, score, rating, reward."},
    )
    seed: int = field(default=0, metadata={"help": "Seed for best_random binarisation (per-row, deterministic)."})
    max_row_bytes: int = field(
        default=4 * 1024 * 1024,
        metadata={"help": "Rows larger than this (raw bytes for line formats, text size otherwise) are quarantined "
                  "as row_too_large; also bounds the memory one row may take."},
    )
    hf_split: str | None = field(
        default=None,
        metadata={"help": "For `datasets` sources: the split to read. Default: every split of a DatasetDict."},
    )

    def __post_init__(self) -> None:
        if self.ties not in TIES:
            raise ValueError(f"option ties={self.ties!r}: must be one of {', '.join(TIES)}")
        if self.binarize not in BINARIZE:
            raise ValueError(f"option binarize={self.binarize!r}: must be one of {', '.join(BINARIZE)}")
        self.min_margin = float(self.min_margin)
        if self.min_margin < 0:
            raise ValueError(f"option min_margin={self.min_margin}: must be >= 0")
        self.seed = int(self.seed)
        self.max_row_bytes = int(self.max_row_bytes)
        if self.max_row_bytes < 64:
            raise ValueError(f"option max_row_bytes={self.max_row_bytes}: must be >= 64")

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> IngestOptions:
        """Build from keyword arguments, naming any unknown key in the error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown ingest option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return asdict(self)
