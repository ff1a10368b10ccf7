"""Ingest options shared by the readers (everything besides sources, name, format and mapping)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields

TIES = ("drop", "keep")
#: The attribute order of NeMo-Aligner's regression reward-model labels (SteerLM: the four
#: OpenAssistant attributes, then HelpSteer's five; HelpSteer2 rows hold -100 in the first four).
#: https://github.com/NVIDIA/NeMo-Aligner/blob/main/examples/nlp/data/steerlm/common.py
STEERLM_ATTRIBUTES = ("quality", "toxicity", "humor", "creativity", "helpfulness", "correctness", "coherence",
                      "complexity", "verbosity")
LABEL_NAME_PRESETS = {"steerlm": STEERLM_ATTRIBUTES}
BINARIZE = ("best_worst", "best_random", "all_pairs")
GROUP_MODES = ("consecutive", "global")

#: Named role-marker templates for ``transcript_template`` (``end`` closes a turn, if the format has one).
TRANSCRIPT_PRESETS: dict[str, dict[str, str]] = {
    # NeMo / HelpSteer: "<extra_id_0>System\n...\n<extra_id_1>User\n...\n<extra_id_1>Assistant\n..."
    # (regression-label files end the text with "<extra_id_2>", where the reward head reads)
    "nemo": {"system": "<extra_id_0>System\n", "user": "<extra_id_1>User\n", "assistant": "<extra_id_1>Assistant\n",
             "end": "<extra_id_2>"},
    "chatml": {"system": "<|im_start|>system\n", "user": "<|im_start|>user\n",
               "assistant": "<|im_start|>assistant\n", "end": "<|im_end|>"},
    "zephyr": {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n", "end": "</s>"},
    "llama3": {"system": "<|start_header_id|>system<|end_header_id|>\n\n",
               "user": "<|start_header_id|>user<|end_header_id|>\n\n",
               "assistant": "<|start_header_id|>assistant<|end_header_id|>\n\n", "end": "<|eot_id|>"},
    "hh": {"user": "\n\nHuman:", "assistant": "\n\nAssistant:"},
}


def parse_template(spec: str | dict | None) -> dict[str, str] | None:
    """A preset name, a JSON object ``{"user": MARKER, "assistant": MARKER, "system"?, "end"?}``,
    or ``user=MARKER;assistant=MARKER[;system=MARKER][;end=MARKER]`` (``\n`` spelled as backslash-n)."""
    if spec is None or isinstance(spec, dict):
        template = spec
    elif spec in TRANSCRIPT_PRESETS:
        template = TRANSCRIPT_PRESETS[spec]
    elif spec.lstrip().startswith("{"):
        try:
            template = json.loads(spec)
        except ValueError as err:
            raise ValueError(f"option transcript_template: not valid JSON: {err}") from None
    else:
        template = {}
        for part in spec.split(";"):
            role, sep, marker = part.partition("=")
            if not sep:
                raise ValueError(f"option transcript_template={spec!r}: expected a preset "
                                 f"({', '.join(TRANSCRIPT_PRESETS)}), JSON, or role=MARKER;role=MARKER")
            template[role.strip()] = marker.replace("\\n", "\n")
    if template is None:
        return None
    unknown = sorted(set(template) - {"system", "user", "assistant", "end"})
    if unknown or not isinstance(template.get("user"), str) or not isinstance(template.get("assistant"), str):
        raise ValueError(f"option transcript_template: needs string 'user' and 'assistant' markers "
                         f"(optional 'system', 'end'){'; unknown: ' + ', '.join(unknown) if unknown else ''}")
    return dict(template)


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
        metadata={"help": "Rated completions: the per-completion score key, a dotted path into nested objects "
                  "allowed (e.g. annotations.helpfulness.Rating for raw UltraFeedback). Default: the first present "
                  "of overall_score, score, rating, reward."},
    )
    lower_is_better: bool | None = field(
        default=None,
        metadata={"help": "Rated and ranked data: True when a smaller score is better, False when a larger one is. "
                  "Default: True for rank-like keys (rank, ranking, position, place; rank 1 = best), else False."},
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
    hf_config: str | None = field(
        default=None,
        metadata={"help": "For hub datasets (ORG/NAME or a local folder in hub layout): the subset/config name."},
    )
    hf_data_dir: str | None = field(
        default=None,
        metadata={"help": "For hub datasets: the data_dir inside the repository to read (e.g. harmless-base)."},
    )
    strict_empty: bool = field(
        default=False,
        metadata={"help": "Quarantine empty rejected responses too. By default an empty rejected response is kept "
                  "and counted (an answer beats no answer); an empty chosen response is always quarantined."},
    )
    json_fields: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "Columns that hold JSON-encoded message/turn lists. Default: detect per value (a string "
                  "is decoded only when it parses to a list of message objects); an empty list: decode nothing. "
                  "Every other column mapped to text stays text."},
    )
    allow_partial: bool = field(
        default=False,
        metadata={"help": "Publish even when nothing is accepted or when more than half of the rows fail for the "
                  "same field-level reason (by default such an ingest is refused as a likely misconfiguration)."},
    )
    score: str | None = field(
        default=None,
        metadata={"help": "Scored format: the attribute that ranks responses, or a weighted sum such as "
                  "'helpfulness*0.6+correctness*0.4'; a list column by position, e.g. 'label[4]' (NeMo "
                  "regression labels; -100 means not labelled), or by name with --label-names. Default: a single "
                  "'score'/'rating'/'reward' column. Rated completions: a weighted sum of per-completion keys "
                  "(dotted paths), e.g. 'annotations.helpfulness.Rating*0.5+annotations.honesty.Rating*0.5'."},
    )
    label_names: str | None = field(
        default=None,
        metadata={"help": "Scored format: names for the positions of a list column, so --score can name them: "
                  "'COL=name0,name1,...' (COL defaults to label), or the preset 'steerlm' (NeMo-Aligner's regression "
                  f"labels: {','.join(STEERLM_ATTRIBUTES)}). Then --score 'helpfulness' or 'label[helpfulness]' "
                  "reads that position, like 'label[4]'."},
    )
    ignore_label_column: bool = field(
        default=False,
        metadata={"help": "With --map chosen=/rejected=: proceed although the source has a label-like column "
                  "(winner, label, preference, choice, ...) that the mapping ignores. By default such an ingest is "
                  "refused: the label usually says which side won, and ignoring it swaps pairs and stores ties."},
    )
    group_by: str | None = field(
        default=None,
        metadata={"help": "Scored format: the column whose equal values form one prompt group. Default: the "
                  "prompt (or the transcript up to its last assistant turn)."},
    )
    group_mode: str = field(
        default="consecutive",
        metadata={"help": "Scored format: 'consecutive' groups adjacent rows only (streaming); 'global' groups "
                  "all rows of a file with the same key (memory grows with the file)."},
    )
    transcript_template: str | dict | None = field(
        default=None,
        metadata={"help": "Role markers that split one templated text into system/user/assistant messages: a "
                  f"preset ({', '.join(TRANSCRIPT_PRESETS)}), a JSON object or 'user=M;assistant=M[;system=M][;end=M]'. "
                  "Applied to string prompts (and scored-format transcripts)."},
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
        if self.lower_is_better is not None and not isinstance(self.lower_is_better, bool):
            raise ValueError(f"option lower_is_better={self.lower_is_better!r}: must be true, false or null")
        self.max_row_bytes = int(self.max_row_bytes)
        if self.max_row_bytes < 64:
            raise ValueError(f"option max_row_bytes={self.max_row_bytes}: must be >= 64")
        if self.group_mode not in GROUP_MODES:
            raise ValueError(f"option group_mode={self.group_mode!r}: must be one of {', '.join(GROUP_MODES)}")
        if self.json_fields is not None:
            if isinstance(self.json_fields, str):
                self.json_fields = tuple(f.strip() for f in self.json_fields.split(",") if f.strip())
            self.json_fields = tuple(self.json_fields)
        self.transcript_template = parse_template(self.transcript_template)
        if self.score is not None:
            parse_score(self.score)  # fail fast, naming the option
        if self.label_names is not None:
            label_positions(self.label_names)  # likewise

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


# The score option: a weighted sum of rating attributes, parsed here (never evaluated) so the
# option fails fast and the scored reader reads the same terms.
_NUM = r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_NAME = r"[A-Za-z_][\w.]*(?:\[\w+\])?"
_TERM = re.compile(rf"\s*([+-]?)\s*(?:({_NAME})\s*(?:\*\s*({_NUM}))?|({_NUM})\s*\*\s*({_NAME}))\s*")


def parse_score(spec: str) -> list[tuple[str, float]]:
    """``"helpfulness*0.6+correctness*0.4"`` -> ``[("helpfulness", 0.6), ("correctness", 0.4)]``.

    Terms are ``attr``, ``attr*w`` or ``w*attr`` joined by ``+``/``-``; nothing is evaluated.

    Raises:
        ValueError: naming the option and the part that does not parse.
    """
    terms: list[tuple[str, float]] = []
    pos = 0
    while pos < len(spec):
        m = _TERM.match(spec, pos)
        if not m or m.end() == pos or (terms and not m.group(1)):
            raise ValueError(f"option score={spec!r}: cannot parse at {spec[pos:]!r}; expected e.g. "
                             "'helpfulness' or 'helpfulness*0.6+correctness*0.4'")
        sign, name, weight, weight2, name2 = m.groups()
        try:
            w = float(weight if weight is not None else weight2 if weight2 is not None else 1.0)
        except ValueError:
            raise ValueError(f"option score={spec!r}: {weight or weight2!r} is not a number") from None
        terms.append((name or name2, -w if sign == "-" else w))
        pos = m.end()
    if not terms:
        raise ValueError(f"option score={spec!r}: empty")
    return terms


def label_positions(spec: str) -> tuple[str, tuple[str, ...]]:
    """``"steerlm"`` / ``"COL=a,b,c"`` / ``"a,b,c"`` -> (list column, name of each position).

    Raises:
        ValueError: naming the option, for an empty, repeated or non-identifier name.
    """
    column, sep, names = spec.partition("=")
    if not sep:
        column, names = "label", spec
    column = column.strip()
    preset = LABEL_NAME_PRESETS.get(names.strip())
    parsed = preset or tuple(n.strip() for n in names.split(","))
    bad = [n for n in parsed if not re.fullmatch(r"[A-Za-z_]\w*", n)]
    if not column or bad or len(set(parsed)) != len(parsed):
        raise ValueError(f"option label_names={spec!r}: expected 'COL=name0,name1,...' with distinct identifier "
                         f"names, or a preset ({', '.join(LABEL_NAME_PRESETS)})"
                         + (f"; bad name(s): {', '.join(map(repr, bad))}" if bad else ""))
    return column, parsed
