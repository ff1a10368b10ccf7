"""The ingest loop: sources -> reader -> validation -> dedup -> split -> versioned store.

Accounting (every row ends in exactly one place, and ``show`` prints the check):

* ``rows_in = rows_quarantined + rows_with_pairs`` -- a row is rejected as a whole or yields pairs;
* ``pairs = accepted + duplicates + pairs_quarantined`` -- each yielded pair is kept, is an exact
  duplicate of an earlier kept pair, or is quarantined on its own (only multi-pair formats, e.g.
  one bad reply inside an OpenAssistant tree, produce pair-level quarantine);
* ``accepted = train + test``; ``quarantined = rows_quarantined + pairs_quarantined``.

For one-pair-per-row formats this is simply ``rows_in = accepted + duplicates + quarantined``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from hashlib import blake2b
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from reward_data import store
from reward_data.fastjson import dumps
from reward_data.options import IngestOptions
from reward_data.readers import READERS
from reward_data.readers.generic import FIELDS
from reward_data.schema import SCHEMA_VERSION, Pair, RowError, check_pair
from reward_data.sources import SourceFile, expand_sources, iter_rows
from reward_data.stats import LengthStats

DETECT_SAMPLE = 20
DETECT_SCAN_LIMIT = 1000
RAW_KEEP = 1000


class FormatError(ValueError):
    """The source format could not be determined (none or several readers match)."""


@dataclass
class VersionInfo:
    """A published dataset version.

    Attributes:
        name: dataset name.
        version: version number (1, 2, ...).
        path: the version directory ``<home>/data/<name>/<version>``.
        manifest: the parsed ``manifest.json``.
        content_hash: hash of the record files; equal for equal inputs and options.
    """

    name: str
    version: int
    path: Path
    manifest: dict
    content_hash: str

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


def get_path(row: dict, path: str) -> Any:
    """``row["a"]["b"]`` for ``"a.b"``; a literal key containing dots wins."""
    if path in row:
        return row[path]
    value: Any = row
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def apply_mapping(row: dict, mapping: dict[str, str]) -> dict:
    """Rename mapped source columns to the reader's field names (unmapped columns stay)."""
    out = dict(row)
    for key, column in mapping.items():
        out[key] = get_path(row, column)
    return out


def detect_format(src: SourceFile, opts: IngestOptions, mapping: dict | None) -> str | None:
    """Pick the reader whose ``detect`` holds for most sampled rows.

    Returns None when the file holds no parseable object at all (every row is then quarantined
    with its own parse error).

    Raises:
        FormatError: no reader or several readers match; the message lists which matched.
    """
    sample: list[dict] = []
    for scanned, (_, value, _) in enumerate(iter_rows(src, opts.max_row_bytes)):
        if isinstance(value, dict):
            sample.append(apply_mapping(value, mapping) if mapping else value)
        if len(sample) >= DETECT_SAMPLE or scanned >= DETECT_SCAN_LIMIT:
            break
    if not sample:
        return None
    scores = {name: sum(1 for r in sample if reader.detect(r)) for name, reader in READERS.items()}
    matched = [name for name, s in scores.items() if s * 2 >= len(sample) and s > 0]
    if len(matched) == 1:
        return matched[0]
    if matched:
        raise FormatError(
            f"{src.path}: format is ambiguous, it matches {', '.join(matched)}; pass --format with one of them"
        )
    partial = [f"{n} ({s}/{len(sample)} rows)" for n, s in scores.items() if s]
    columns = sorted({k for r in sample for k in r})[:30]
    raise FormatError(
        f"{src.path}: no known format matches (columns: {', '.join(columns)})"
        + (f"; partial matches: {', '.join(partial)}" if partial else "")
        + "; pass --format, or --format generic with --map prompt=COL --map chosen=COL --map rejected=COL"
    )


def _raw_text(raw: bytes | None, value: Any) -> str | None:
    if raw is not None:
        return raw[:RAW_KEEP].decode("utf-8", "replace").rstrip("\n")
    if value is None or isinstance(value, RowError):
        return None
    try:
        return json.dumps(value, ensure_ascii=False, default=str)[:RAW_KEEP]
    except (TypeError, ValueError):
        return repr(value)[:RAW_KEEP]


@contextlib.contextmanager
def _gc_paused():
    """Pause automatic cyclic GC during the row loop.

    The loop allocates millions of short-lived, acyclic dicts and lists; automatic GC passes
    over them cost ~15% of the time for nothing. The loop collects the young generations
    itself every 256k rows, so memory stays bounded should a reference cycle appear.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def ingest(
    sources: list[str | os.PathLike],
    name: str,
    *,
    format: str | None = None,
    mapping: dict[str, str] | None = None,
    test_fraction: float = 0.05,
    home=None,
    **reader_options,
) -> VersionInfo:
    """Ingest preference data into a new immutable version of dataset ``name``.

    Args:
        sources: files, directories, ``save_to_disk`` directories or hub ids.
        name: dataset name (letters, digits, ``._-``).
        format: a reader name (see ``reward_data.readers.READERS``); detected per file when None.
        mapping: canonical field -> source column (dotted paths allowed); implies ``generic``
            when ``format`` is None.
        test_fraction: share of prompts (by prompt hash) that go to the test split.
        home: rlhf home (default ``rlhf.paths.rlhf_home()``).
        **reader_options: fields of :class:`~reward_data.options.IngestOptions`.

    Returns:
        The published :class:`VersionInfo`.

    Raises:
        ValueError / FileNotFoundError / FormatError with the offending source, key or option.
    """
    store.check_name(name)
    if not 0.0 <= float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction={test_fraction}: must be in [0, 1)")
    if format is not None and format not in READERS:
        raise ValueError(f"unknown format {format!r}; known: {', '.join(READERS)}")
    mapping = dict(mapping or {})
    bad_keys = sorted(set(mapping) - set(FIELDS)) if (format in (None, "generic")) else []
    if bad_keys:
        raise ValueError(f"--map keys {', '.join(bad_keys)} unknown; the generic reader maps {', '.join(FIELDS)}")
    if format is None and mapping:
        format = "generic"
    if format == "generic" and not {"chosen", "rejected"} <= set(mapping):
        raise ValueError("format generic needs at least --map chosen=COL --map rejected=COL")
    opts = IngestOptions.from_kwargs(reader_options)
    files, skipped = expand_sources(list(sources), opts.hf_split)
    if not files:
        raise ValueError("no sources given")
    for path in skipped:
        print(f"reward_data: skipping non-data file {path}", file=sys.stderr)
    # Decide every file's format before writing anything, so a format error fails fast.
    formats = [format or detect_format(src, opts, mapping) for src in files]
    fingerprints = [src.fingerprint() for src in files]

    started = time.time()
    with store.VersionWriter(name, home) as writer:
        with _gc_paused():
            counts, per_source, reasons, lstats = _run(files, formats, mapping, opts, float(test_fraction), writer)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "name": name,
            "version": None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "content_hash": writer.content_hash(),
            "format": formats[0] if len(set(formats)) == 1 else "mixed",
            "options": {"format": format, "mapping": mapping, "test_fraction": float(test_fraction), **opts.to_dict()},
            "sources": [
                {"name": src.name, "path": src.path, "kind": src.kind, "format": fmt, **fp, **counts_i}
                for src, fmt, fp, counts_i in zip(files, formats, fingerprints, per_source)
            ],
            "skipped_files": skipped,
            "counts": counts,
            "quarantine_reasons": dict(sorted(reasons.items())),
            "stats": lstats.to_dict(counts["accepted"]),
            "ingest_seconds": round(time.time() - started, 3),
        }
        version, path = writer.publish(manifest)
    return VersionInfo(name, version, path, manifest, manifest["content_hash"])


def _run(files, formats, mapping, opts, test_fraction, writer):
    """Stream every source through its reader into the writer; returns the accounting."""
    encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    dumps_str = json.JSONEncoder(ensure_ascii=True).encode
    threshold = int(test_fraction * (1 << 64))
    seen: set[bytes] = set()
    lstats = LengthStats()
    reasons: Counter = Counter()
    totals = Counter()
    per_source = []
    prompt_start = len('{"prompt":')
    train_w, test_w = writer.files["train"].write, writer.files["test"].write
    quar_w, dup_w = writer.files["quarantine"].write, writer.files["duplicates"].write
    add_stats = lstats.add

    for src, fmt in zip(files, formats):
        reader = READERS[fmt].read if fmt else None
        c = Counter()
        file_json = dumps_str(src.name).encode()

        def quarantine(err: RowError, row: int, raw, value, level: str) -> None:
            entry = {
                "reason": err.reason,
                "detail": err.detail,
                "field": err.field,
                "source": {"file": src.name, "row": row},
                "item": getattr(err, "item", None),
                "raw": _raw_text(raw, value) if level == "row" else None,
            }
            quar_w((encode(entry) + "\n").encode("utf-8", "replace"))
            reasons[err.reason] += 1
            c[f"{level}s_quarantined"] += 1

        # Hot counters are plain locals (this loop runs once per row); the rest go through ``c``.
        rows_in = emitted_pairs = duplicates = n_train = n_test = rows_with_pairs = 0
        progress = tqdm(desc=src.name, unit="row", disable=None, file=sys.stderr, mininterval=1.0)
        for row, value, raw in iter_rows(src, opts.max_row_bytes):
            rows_in += 1
            if not rows_in & 0x3FFF:
                progress.update(0x4000)
                if not rows_in & 0x3FFFF:
                    gc.collect(1)
            if type(value) is not dict:
                if isinstance(value, RowError):
                    quarantine(value, row, raw, None, "row")
                else:
                    err = RowError("not_an_object", f"row is a {type(value).__name__}, not an object")
                    quarantine(err, row, raw, value, "row")
                continue
            try:
                if reader is None:
                    raise RowError("wrong_type", "no format was detected for this file")
                result = reader(apply_mapping(value, mapping) if mapping else value, opts)
            except RowError as err:
                quarantine(err, row, raw, value, "row")
                continue
            single = type(result) is Pair
            pairs = (result,) if single else result
            if not pairs:
                quarantine(RowError("no_pairs", "the row yields no pairs"), row, raw, value, "row")
                continue
            level = "row" if single else "pair"
            emitted = False
            for pair in pairs:
                if type(pair) is not Pair:
                    quarantine(pair, row, raw, value, level)
                    continue
                try:
                    check_pair(pair)
                    # One encoder call for the whole triple; this text (as bytes) is the
                    # content key that defines exact duplicates.
                    try:
                        content = dumps({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected})
                    except UnicodeEncodeError:
                        raise RowError("invalid_utf8", "text holds a lone surrogate (invalid UTF-8 escape)") from None
                except RowError as err:
                    err.item = pair.item
                    quarantine(err, row, raw, value, level)
                    continue
                emitted = True
                emitted_pairs += 1
                digest = blake2b(content, digest_size=16).digest()
                item = b"" if pair.item is None else b',"item":' + dumps_str(pair.item).encode()
                source = b'"source":{"file":' + file_json + b',"row":' + str(row).encode() + b"}" + item
                rid = digest.hex().encode()
                if digest in seen:
                    duplicates += 1
                    dup_w(b'{"id":"' + rid + b'",' + source + b"}\n")
                    continue
                seen.add(digest)
                margin = b"null" if pair.margin is None else repr(float(pair.margin)).encode()
                line = (
                    b'{"id":"' + rid + b'",' + content[1:-1] + b',"margin":' + margin
                    + (b',"tie":true,' if pair.tie else b",") + source + b"}\n"
                )
                # The prompt list ends where the top-level '],"chosen":[' starts: that sequence
                # cannot occur earlier, since a '"' inside a JSON string is always escaped.
                prompt_bytes = content[prompt_start:content.index(b'],"chosen":[') + 1]
                if int.from_bytes(blake2b(prompt_bytes, digest_size=8).digest(), "big") < threshold:
                    test_w(line)
                    n_test += 1
                else:
                    train_w(line)
                    n_train += 1
                add_stats(pair)
            if not single or emitted:
                rows_with_pairs += 1
        progress.update(rows_in & 0x3FFF)
        progress.close()
        entry = {
            "rows_in": rows_in,
            "rows_quarantined": c["rows_quarantined"],
            "rows_with_pairs": rows_with_pairs,
            # Pairs quarantined on their own count towards ``pairs`` too (see module docstring).
            "pairs": emitted_pairs + c["pairs_quarantined"],
            "accepted": n_train + n_test,
            "duplicates": duplicates,
            "pairs_quarantined": c["pairs_quarantined"],
            "train": n_train,
            "test": n_test,
        }
        entry["quarantined"] = entry["rows_quarantined"] + entry["pairs_quarantined"]
        per_source.append(entry)
        totals.update(entry)
    counts = {k: totals[k] for k in ("rows_in", "accepted", "duplicates", "quarantined", "train", "test",
                                      "rows_quarantined", "rows_with_pairs", "pairs", "pairs_quarantined")}
    return counts, per_source, reasons, lstats
