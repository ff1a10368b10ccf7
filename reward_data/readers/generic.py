"""Generic reader driven by a column mapping (``--map prompt=question --map chosen=good ...``).

The mapping (applied by the ingest loop for every format) renames source columns, with dotted
paths for nested fields, to ``prompt``/``chosen``/``rejected``/``margin``/``system``. Columns
mapped to text stay text: a string is decoded as JSON only when it holds a message list, or when
its column is listed in ``json_fields``. The row is then read as explicit pairs when a prompt is
mapped, or as implicit pairs (shared prefix = prompt) when not; a system column goes first.
"""

from __future__ import annotations

from reward_data.options import IngestOptions
from reward_data.readers import explicit, implicit
from reward_data.schema import Pair, RowError, maybe_json_list

NAME = "generic"
EXAMPLE = {"question": "Name a prime.", "good": "7", "bad": "8"}
EXAMPLE_FLAGS = "--map prompt=question --map chosen=good --map rejected=bad"
FIELDS = ("prompt", "chosen", "rejected", "margin", "system")


def detect(row: dict) -> bool:
    # Never auto-detected: it is chosen by --format generic or implied by --map.
    return False


def read(row: dict, opts: IngestOptions) -> Pair:
    declared = opts.json_fields
    if declared is None:
        row = {k: maybe_json_list(row.get(k)) for k in FIELDS}
    else:
        row = {k: maybe_json_list(row.get(k), True) if k in declared else row.get(k) for k in FIELDS}
    if row["prompt"] is not None:
        return explicit.read(row, opts)
    del row["prompt"]
    for key in ("chosen", "rejected"):
        if row[key] is not None and not isinstance(row[key], list):
            raise RowError("wrong_type", f"field {key!r} must be a message list when no prompt is mapped "
                           "(map a prompt column with --map prompt=COL)", key)
    return implicit.read(row, opts)
