"""Preference-data ingestion: many source formats -> one canonical, versioned store.

``rlhf data ingest`` (:func:`ingest`) reads JSONL / JSON / JSONL.gz / CSV / Parquet files,
directories of them, or ``datasets`` datasets (hub ids or hub-layout folders, with config,
data_dir and split selection), converts every row with the reader for its format
(``reward_data/readers/``), validates it, drops exact duplicates (counted) and quarantines
everything it cannot use with a reason, then publishes an immutable version. An ingest that
looks misconfigured (nothing accepted, or most rows failing for one field-level reason) is
refused and publishes nothing unless ``allow_partial``. Content identical to the name's latest
version (same content hash) publishes nothing new: that version is returned, ``reused=True``.

The package stands alone: it imports nothing from ``rlhf`` (``rlhf`` imports it).

Store layout: ``<home>/data/<NAME>/<VERSION>/`` (VERSION = 1, 2, ...) holding

* ``train.jsonl`` / ``test.jsonl`` -- canonical records, one JSON object per line::

    {"id": "<32 hex: blake2b-128 of prompt/chosen/rejected>",
     "prompt":   [{"role": "user", "content": "..."}, ...],    # ends with a user turn
     "chosen":   [{"role": "assistant", "content": "..."}, ...],
     "rejected": [{"role": "assistant", "content": "..."}, ...],
     "margin": 1.5 | null,
     "tie": true,                                               # only on kept ties
     "source": {"file": "<display name>", "row": 12},
     "item": "..."}                                             # only for multi-pair rows

  The split is by prompt hash, so a prompt never appears on both sides. An ``unpaired``
  dataset (``manifest["kind"] == "unpaired"``: KTO-style labelled completions) stores
  ``{"id", "prompt", "completion", "label": true|false, "source", "item"?}`` instead; its
  ``pairs`` counts then count labelled completions.
* ``quarantine.jsonl`` -- ``{"reason", "detail", "field", "source": {"file", "row", "line"}, "item", "raw"}``
  per rejected row (or pair); ``line`` is the 1-based line to open in an editor (``row`` the
  0-based position records cite); reasons are listed in :data:`reward_data.schema.REASONS`.
* ``duplicates.jsonl`` -- ``{"id", "source"}`` per exact duplicate (the kept copy has that id).
* ``manifest.json`` -- keys (stable; the model registry reads them):

  - ``schema_version`` (int), ``name`` (str), ``version`` (int), ``created`` (UTC ISO-8601),
  - ``kind``: ``"pairs"`` or ``"unpaired"`` (absent in versions written before it: pairs),
  - ``content_hash`` (sha256 over the record files; identical for identical input + options),
  - ``format`` (reader name, or ``"mixed"``),
  - ``options`` (``format``, ``mapping``, ``test_fraction`` and every ``IngestOptions`` field, as given),
  - ``resolved_options``: what the defaults resolved to (``format``, and e.g. ``label_field``,
    ``score_field``, ``score``), one dict, or source name -> dict when sources differ,
  - ``sources``: list of ``{name, path, kind, format, resolved, sha256, bytes, rows_in, accepted,
    duplicates, quarantined, rows_quarantined, rows_with_pairs, pairs, pairs_quarantined,
    train, test}`` (``sha256``/``bytes`` are null for ``datasets`` sources, which carry
    ``hf_split``/``hf_fingerprint`` and, for hub ones, ``hf_config``/``hf_data_dir`` instead;
    scored sources add ``records_in`` (= ``rows_in``, source records) and ``groups``, the prompt
    groups they formed),
  - ``skipped_files``: non-data files found in source directories,
  - ``counts``: ``rows_in, accepted, duplicates, quarantined, train, test, rows_quarantined,
    rows_with_pairs, pairs, pairs_quarantined`` (see :mod:`reward_data.ingestion` for how they reconcile),
  - ``quarantine_reasons``: reason -> count,
  - ``stats``: ``prompt_chars``/``chosen_chars``/``rejected_chars`` percentiles, ``prompt_turns``
    histogram, ``ties``, ``tie_rate``, ``with_margin``, ``with_system`` (prompts opening with a
    system message), ``empty_rejected``, ``surface`` (leading-space counts, common prefixes,
    how often chosen is longer: the inputs of ``rlhf data show``'s shortcut warnings),
  - ``files``: output file name -> ``{sha256, records}``, ``ingest_seconds``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from reward_data.ingestion import FormatError, IngestRefused, VersionInfo, ingest
from reward_data.readers import READERS
from reward_data.schema import REASONS, SCHEMA_VERSION
from reward_data.store import list_names, read_manifest, versions
from reward_data.store import resolve as _resolve

SPLITS = ("train", "test", "quarantine", "duplicates")


def resolve(ref: str, home=None) -> Path:
    """Version directory for ``"NAME"``, ``"NAME:latest"`` or ``"NAME:VERSION"`` (KeyError if absent)."""
    return _resolve(ref, home)


def read_split(ref_or_path: str | Path, split: str, home=None) -> Iterator[dict]:
    """Stream the records of one split (``train``, ``test``; also ``quarantine``/``duplicates``).

    Args:
        ref_or_path: a dataset reference (``NAME[:VERSION]``) or a version directory.
        split: which file to read.
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: must be one of {', '.join(SPLITS)}")
    path = _resolve(ref_or_path, home)
    with open(path / f"{split}.jsonl", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def load_version(ref_or_path: str | Path, home=None) -> VersionInfo:
    """The :class:`VersionInfo` of a stored version."""
    path = _resolve(ref_or_path, home)
    manifest = read_manifest(path)
    return VersionInfo(manifest["name"], manifest["version"], path, manifest, manifest["content_hash"])


__all__ = [
    "FormatError", "IngestRefused", "READERS", "REASONS", "SCHEMA_VERSION", "VersionInfo", "ingest", "list_names",
    "load_version", "read_manifest", "read_split", "resolve", "versions",
]
