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
import dataclasses
import difflib
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
from reward_data.readers import READERS, scored
from reward_data.readers.generic import FIELDS
from reward_data.schema import (SCHEMA_VERSION, Pair, RowError, Unpaired, check_pair, check_unpaired, get_path,
                                is_message_list)
from reward_data.sources import SourceFile, expand_sources, iter_rows
from reward_data.stats import LengthStats

DETECT_SAMPLE = 20
DETECT_SCAN_LIMIT = 1000
RAW_KEEP = 1000


class FormatError(ValueError):
    """The source format could not be determined (none or several readers match)."""


class IngestRefused(ValueError):
    """The ingest ran but looks misconfigured (nothing accepted, or most rows fail for one
    field-level reason); nothing was published. ``allow_partial`` overrides."""


#: Keys ``--map`` may set, per format (None: the format is detected, or implied generic).
MAP_KEYS = {"generic": FIELDS, "scored": ("prompt", "response", "transcript", "system")}
#: Quarantine reasons that follow from an option the user chose, not from a misread column.
_INTENDED = {"tie_dropped"}
#: Columns that usually say which response won; ``--map chosen=/rejected=`` next to one is refused.
LABEL_COLUMNS = ("winner", "label", "labels", "preference", "preferred", "choice", "chosen_id", "better_response_id",
                 "safer_response_id", "winner_model_a", "ranking", "rank")


def kind_of(fmt: str | None) -> str:
    """The record kind a format stores: ``"unpaired"`` (labelled completions) or ``"pairs"``."""
    return getattr(READERS[fmt], "KIND", "pairs") if fmt else "pairs"


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
    reused: bool = False  # True when identical content was already the latest version (nothing new was written)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


def apply_mapping(row: dict, mapping: dict[str, str]) -> dict:
    """Rename mapped source columns to the reader's field names (unmapped columns stay)."""
    out = dict(row)
    for key, column in mapping.items():
        out[key] = get_path(row, column)
    return out


def sample_rows(src: SourceFile, opts: IngestOptions) -> list[dict]:
    """Up to DETECT_SAMPLE parsed objects from the start of a source (unmapped)."""
    sample: list[dict] = []
    for scanned, (_, value, _, _) in enumerate(iter_rows(src, opts.max_row_bytes)):
        if isinstance(value, dict):
            sample.append(value)
        if len(sample) >= DETECT_SAMPLE or scanned >= DETECT_SCAN_LIMIT:
            break
    return sample


def closest(name: str, columns) -> list[str]:
    """Column names that look like ``name`` (for typo hints)."""
    by_lower = {c.lower(): c for c in columns}
    return [by_lower[m] for m in difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.6)]


def _columns_hint(columns, wanted) -> str:
    cols = sorted(columns)
    text = f"columns seen: {', '.join(cols[:40]) or 'none'}"
    hints = [f"{w!r} -> {', '.join(repr(c) for c in closest(w, cols))}" for w in wanted if w and closest(w, cols)]
    return text + (f"; closest matches: {'; '.join(hints)}" if hints else "")


def check_columns(src: SourceFile, sample: list[dict], mapping: dict, opts: IngestOptions) -> None:
    """Fail fast when a mapped column or ``label_field`` is absent from every sampled row.

    Raises:
        ValueError: naming the option, the file, the columns seen and the closest matches.
    """
    if not sample:
        return
    columns = {k for r in sample for k in r}
    for key, column in mapping.items():
        top = column if column in columns else column.split(".")[0]
        if top not in columns:
            raise ValueError(f"{src.path}: --map {key}={column}: no such column ({_columns_hint(columns, [top])})")
    label = opts.label_field
    if label and label not in columns and not any(get_path(r, label) is not None for r in sample):
        raise ValueError(f"{src.path}: --label-field {label}: no such column ({_columns_hint(columns, [label])})")


def check_label_column(src: SourceFile, sample: list[dict], mapping: dict, opts: IngestOptions) -> None:
    """Refuse ``--map chosen=A --map rejected=B`` on a source that also has a label-like column
    the mapping ignores (Chatbot Arena's ``winner``): stored as is, about half the pairs would be
    swapped and every tie would become a preference. ``ignore_label_column`` overrides.
    """
    if opts.ignore_label_column or not sample or not {"chosen", "rejected"} <= set(mapping):
        return
    columns = {k for r in sample for k in r}
    used = {c.split(".")[0] for c in mapping.values()}
    labels = [c for c in LABEL_COLUMNS if c in columns and c not in used]
    if labels:
        raise ValueError(
            f"{src.path}: --map chosen={mapping['chosen']} --map rejected={mapping['rejected']} ignores the label "
            f"column {labels[0]!r}, which usually says which side won (ignoring it swaps pairs and stores ties as "
            f"preferences); use a reader that reads it (--format arena for conversation_a/conversation_b/winner, "
            f"--format two_response --label-field {labels[0]}), or pass --ignore-label-column if chosen is always "
            "the preferred side")


def json_columns(sample: list[dict], mapping: dict) -> tuple[str, ...]:
    """The generic reader's fields whose sampled values are all JSON-encoded message lists.

    Decided per column, never per value: a text column where one answer happens to be the text
    ``[{"role": "assistant", "content": "hi"}]`` stays text, a column of encoded conversations is
    decoded on every row.
    """
    rows = [apply_mapping(r, mapping) for r in sample] if mapping else sample
    out = []
    for key in FIELDS:
        values = [r.get(key) for r in rows if r.get(key) is not None]
        if values and all(isinstance(v, str) and v.lstrip().startswith("[") for v in values):
            decoded = []
            for v in values:
                try:
                    decoded.append(json.loads(v))
                except (ValueError, RecursionError):
                    break
            else:
                if all(is_message_list(d) for d in decoded):
                    out.append(key)
    return tuple(out)


def detect_format(src: SourceFile, opts: IngestOptions, mapping: dict | None, sample: list[dict] | None = None) -> str | None:
    """Pick the reader whose ``detect`` holds for most sampled rows.

    Returns None when the file holds no parseable object at all (every row is then quarantined
    with its own parse error).

    Raises:
        FormatError: no reader or several readers match; the message lists which matched.
    """
    if sample is None:
        sample = sample_rows(src, opts)
    if not sample:
        return None
    if mapping:
        sample = [apply_mapping(r, mapping) for r in sample]
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
    hint = layout_hint(sample)
    raise FormatError(
        f"{src.path}: no known format matches (columns: {', '.join(columns)})"
        + (f"; partial matches: {', '.join(partial)}" if partial else "")
        + (f"; {hint}" if hint else "")
        + "; pass --format, or --format generic with --map prompt=COL --map chosen=COL --map rejected=COL"
    )


def layout_hint(sample: list[dict]) -> str | None:
    """What to pass for a known layout that no reader detects on its own (None if none fits)."""
    first = sample[0]
    if "response_j" in first and "response_k" in first:
        prompt = next((k for k in ("question", "prompt") if k in first), "COL")
        return ("this looks like stack-exchange-paired, where response_j is the better-voted answer: "
                f"--map prompt={prompt} --map chosen=response_j --map rejected=response_k")
    if isinstance(first.get("chosen"), str) and isinstance(first.get("rejected"), str):
        return ("chosen/rejected are plain text and no prompt column is present (TRL's standard implicit-prompt "
                "layout): the prompt cannot be told from the answer; map a prompt column, or use --format hh for "
                "'\\n\\nHuman: ... \\n\\nAssistant: ...' transcripts")
    return None


def _raw_text(raw: bytes | None, value: Any) -> str | None:
    if raw is not None:
        return raw[:RAW_KEEP].decode("utf-8", "replace").rstrip("\n")
    if value is None or isinstance(value, RowError):
        return None
    try:
        return json.dumps(value, ensure_ascii=False, default=str)[:RAW_KEEP]
    except (TypeError, ValueError, RecursionError):
        return repr(value)[:RAW_KEEP] if not isinstance(value, (dict, list)) else f"<{type(value).__name__}, too deep to show>"


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
    allowed = MAP_KEYS.get(format or "generic")
    bad_keys = sorted(set(mapping) - set(allowed)) if allowed else []
    if bad_keys:
        others = "; with --format scored: " + ", ".join(MAP_KEYS["scored"]) if format is None else ""
        raise ValueError(f"--map keys {', '.join(bad_keys)} unknown; the {format or 'generic'} reader maps "
                         f"{', '.join(allowed)}{others}")
    if format is None and mapping:
        format = "generic"
    if format == "generic" and not {"chosen", "rejected"} <= set(mapping):
        raise ValueError("format generic needs at least --map chosen=COL --map rejected=COL")
    opts = IngestOptions.from_kwargs(reader_options)
    files, skipped = expand_sources(list(sources), opts.hf_split, opts.hf_config, opts.hf_data_dir)
    if not files:
        raise ValueError("no sources given")
    for path in skipped:
        print(f"reward_data: skipping non-data file {path}", file=sys.stderr)
    # Decide every file's format, and check the columns the options name, before writing
    # anything, so a format error or a typo fails fast.
    samples = [sample_rows(src, opts) for src in files]
    for src, sample in zip(files, samples):
        check_columns(src, sample, mapping, opts)
        check_label_column(src, sample, mapping, opts)
    formats = [format or detect_format(src, opts, mapping, sample) for src, sample in zip(files, samples)]
    kinds = {kind_of(f) for f in formats if f}
    if len(kinds) > 1:
        raise ValueError("sources mix preference pairs and unpaired labelled completions ("
                         + ", ".join(f"{src.name}: {f}" for src, f in zip(files, formats)) + "); ingest them as two datasets")
    kind = kinds.pop() if kinds else "pairs"
    resolved = []
    source_opts = []
    for src, fmt, sample in zip(files, formats, samples):
        res = {"format": fmt}
        src_opts = opts
        if fmt == "generic" and opts.json_fields is None:
            # Which columns hold encoded message lists is decided once per file, from its sample.
            src_opts = dataclasses.replace(opts, json_fields=json_columns(sample, mapping))
            res["json_fields"] = list(src_opts.json_fields)
        elif fmt == "two_response" and opts.json_fields is None and sample:
            from reward_data.readers.two_response import turn_list_columns

            src_opts = dataclasses.replace(opts, json_fields=turn_list_columns(
                [apply_mapping(r, mapping) for r in sample] if mapping else sample))
            if src_opts.json_fields:  # recorded when the file's columns are turn lists (text is the rule)
                res["json_fields"] = list(src_opts.json_fields)
        source_opts.append(src_opts)
        hook = getattr(READERS[fmt], "resolved", None) if fmt else None
        if hook is not None and sample:
            try:
                res.update(hook(apply_mapping(sample[0], mapping) if mapping else sample[0], opts))
            except ValueError as err:
                raise ValueError(f"{src.path}: {err}") from None
        resolved.append(res)
    fingerprints = [src.fingerprint() for src in files]

    started = time.time()
    with store.VersionWriter(name, home) as writer:
        with _gc_paused():
            counts, per_source, reasons, lstats, diag = _run(files, formats, mapping, source_opts, float(test_fraction),
                                                             writer)
        if not opts.allow_partial:
            problem = misconfiguration(counts, diag, mapping)
            if problem:
                raise IngestRefused(problem)
        latest = store.versions(name, home)
        if latest:
            # Identical records as the latest version: reuse it instead of piling up copies.
            previous = load_version_dir(store.data_root(home) / name / str(latest[-1]))
            if previous.content_hash == writer.content_hash():
                previous.reused = True
                return previous
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "name": name,
            "version": None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "content_hash": writer.content_hash(),
            "kind": kind,
            "format": formats[0] if len(set(formats)) == 1 else "mixed",
            "options": {"format": format, "mapping": mapping, "test_fraction": float(test_fraction), **opts.to_dict()},
            # What the defaults (format, label column, score key, ...) resolved to, per source.
            "resolved_options": _merge_resolved(files, resolved),
            "sources": [
                {"name": src.name, "path": src.path, "kind": src.kind, "format": fmt, "resolved": res, **fp, **counts_i}
                for src, fmt, res, fp, counts_i in zip(files, formats, resolved, fingerprints, per_source)
            ],
            "skipped_files": skipped,
            "counts": counts,
            "quarantine_reasons": dict(sorted(reasons.items())),
            "stats": lstats.to_dict(counts["accepted"]),
            "ingest_seconds": round(time.time() - started, 3),
        }
        version, path = writer.publish(manifest)
    return VersionInfo(name, version, path, manifest, manifest["content_hash"])


def load_version_dir(path: Path) -> VersionInfo:
    """The :class:`VersionInfo` of a published version directory."""
    manifest = store.read_manifest(path)
    return VersionInfo(manifest["name"], manifest["version"], path, manifest, manifest["content_hash"])


def _merge_resolved(files, resolved: list[dict]) -> dict:
    """One dict when every source resolved alike, else source name -> its resolution."""
    if all(r == resolved[0] for r in resolved):
        return dict(resolved[0])
    return {src.name: r for src, r in zip(files, resolved)}


def misconfiguration(counts: dict, diag: dict, mapping: dict) -> str | None:
    """Why this ingest looks misconfigured, or None.

    Refused: nothing accepted (and nothing a duplicate of an accepted pair), or more than half of
    the rows quarantined for one field-level reason other than one the options asked for
    (``tie_dropped``). A typo in ``--map``, a wrong ``--label-field`` or a wrong ``--format`` all
    end here, with the columns seen and the closest matches to the failing field.
    """
    rows = counts["rows_in"]
    field_reasons: Counter = diag["field_reasons"]
    top = next(((k, n) for k, n in field_reasons.most_common() if k[0] not in _INTENDED), None)
    if counts["accepted"] + counts["duplicates"] == 0:
        problem = f"nothing was accepted from {rows} rows"
    elif top is not None and top[0][1] is not None and top[1] * 2 > rows:
        problem = f"{top[1]} of {rows} rows fail with {top[0][0]} on field {top[0][1]!r}"
    else:
        return None
    parts = [problem]
    if top is not None:
        (reason, fld), n = top
        parts.append(f"most common reason: {reason} ({n} rows), e.g. {diag['examples'][(reason, fld)]}")
    wanted = []
    if top is not None and top[0][1]:
        fld = str(top[0][1]).split("[")[0].split(".")[0]
        wanted = [mapping.get(fld, fld)]
    wanted += [c for c in mapping.values() if c not in wanted]
    if diag["columns"]:
        parts.append(_columns_hint(diag["columns"], wanted))
    parts.append("nothing was published; check --format/--map/--label-field, or pass --allow-partial to publish anyway")
    return "; ".join(parts)


def _run(files, formats, mapping, source_opts, test_fraction, writer):
    """Stream every source through its reader (with that source's options) into the writer;
    returns the accounting."""
    encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    dumps_str = json.JSONEncoder(ensure_ascii=True).encode
    threshold = int(test_fraction * (1 << 64))
    seen: set[bytes] = set()
    lstats = LengthStats()
    reasons: Counter = Counter()
    diag = {"field_reasons": Counter(), "examples": {}, "columns": set()}
    strict_empty = source_opts[0].strict_empty
    totals = Counter()
    per_source = []
    prompt_start = len('{"prompt":')
    train_w, test_w = writer.files["train"].write, writer.files["test"].write
    quar_w, dup_w = writer.files["quarantine"].write, writer.files["duplicates"].write
    add_stats = lstats.add

    for src, fmt, opts in zip(files, formats, source_opts):
        reader = READERS[fmt].read if fmt else None
        grouped = fmt == "scored"
        unpaired_start = len('{"prompt":')
        c = Counter()
        file_json = dumps_str(src.name).encode()
        rows = iter_rows(src, opts.max_row_bytes)
        row_mapping = mapping
        if fmt == "scored":
            # Rows become prompt groups before the reader sees them; mapping is applied per record.
            rows = scored.group_rows(rows, opts, (lambda v: apply_mapping(v, mapping)) if mapping else None, c)
            row_mapping = None

        def quarantine(err: RowError, row: int, line: int, raw, value, level: str) -> None:
            if level == "row" and type(value) is dict and scored.GROUP in value:
                # A rejected prompt group: one entry per member record, each at its own line.
                for member in value[scored.GROUP]:
                    quarantine(err, member[0], member[1], None, {"prompt": member[2], "response": member[3]}, "row")
                return
            entry = {
                "reason": err.reason,
                "detail": err.detail,
                "field": err.field,
                # ``row`` is the position stored records cite; ``line`` is 1-based, for an editor.
                "source": {"file": src.name, "row": row, "line": line},
                "item": getattr(err, "item", None),
                "raw": _raw_text(raw, value) if level == "row" else None,
            }
            quar_w((encode(entry) + "\n").encode("utf-8", "replace"))
            reasons[err.reason] += 1
            c[f"{level}s_quarantined"] += 1
            key = (err.reason, err.field)
            diag["field_reasons"][key] += 1
            if key not in diag["examples"]:
                diag["examples"][key] = f"{src.name}:{line}: {err.detail}"
            if type(value) is dict and len(diag["columns"]) < 200:
                diag["columns"].update(map(str, value))

        u = Counter()  # the unpaired path's counters, folded into the locals after the loop

        def store_unpaired(rec: Unpaired, row: int, line: int, raw, value, level: str) -> bool:
            """Validate, dedup, split and write one labelled completion; False when quarantined."""
            try:
                check_unpaired(rec)
                try:
                    content = dumps({"prompt": rec.prompt, "completion": rec.completion, "label": rec.label})
                except UnicodeEncodeError:
                    raise RowError("invalid_utf8", "text holds a lone surrogate (invalid UTF-8 escape)") from None
            except RowError as err:
                err.item = rec.item
                quarantine(err, row, line, raw, value, level)
                return False
            u["emitted"] += 1
            digest = blake2b(content, digest_size=16).digest()
            item = b"" if rec.item is None else b',"item":' + dumps_str(rec.item).encode()
            source = b'"source":{"file":' + file_json + b',"row":' + str(row).encode() + b"}" + item
            rid = digest.hex().encode()
            if digest in seen:
                u["duplicates"] += 1
                dup_w(b'{"id":"' + rid + b'",' + source + b"}\n")
                return True
            seen.add(digest)
            record = b'{"id":"' + rid + b'",' + content[1:-1] + b"," + source + b"}\n"
            prompt_bytes = content[unpaired_start:content.index(b'],"completion":[') + 1]
            if int.from_bytes(blake2b(prompt_bytes, digest_size=8).digest(), "big") < threshold:
                test_w(record)
                u["test"] += 1
            else:
                train_w(record)
                u["train"] += 1
            lstats.add_unpaired(rec)
            return True

        # Hot counters are plain locals (this loop runs once per row); the rest go through ``c``.
        rows_in = emitted_pairs = duplicates = n_train = n_test = rows_with_pairs = 0
        extra_records = groups = 0  # scored: records beyond the first of each group, and the groups
        progress = tqdm(desc=src.name, unit="row", disable=None, file=sys.stderr, mininterval=1.0)
        for row, value, raw, line in rows:
            rows_in += 1
            weight = 1
            if grouped and type(value) is dict:
                # A prompt group counts as the source records it holds, so counts match the file.
                weight = len(value[scored.GROUP])
                extra_records += weight - 1
                groups += 1
            if not rows_in & 0x3FFF:
                progress.update(0x4000)
                if not rows_in & 0x3FFFF:
                    gc.collect(1)
            if type(value) is not dict:
                if isinstance(value, RowError):
                    quarantine(value, row, line, raw, None, "row")
                else:
                    err = RowError("not_an_object", f"row is a {type(value).__name__}, not an object")
                    quarantine(err, row, line, raw, value, "row")
                continue
            try:
                if reader is None:
                    raise RowError("wrong_type", "no format was detected for this file")
                result = reader(apply_mapping(value, row_mapping) if row_mapping else value, opts)
            except RowError as err:
                quarantine(err, row, line, raw, value, "row")
                continue
            single = type(result) is Pair or type(result) is Unpaired
            pairs = (result,) if single else result
            if not pairs:
                quarantine(RowError("no_pairs", "the row yields no pairs"), row, line, raw, value, "row")
                continue
            level = "row" if single else "pair"
            emitted = False
            for pair in pairs:
                if type(pair) is Unpaired:
                    if store_unpaired(pair, row, line, raw, value, level):
                        emitted = True
                    continue
                if type(pair) is not Pair:
                    quarantine(pair, row, line, raw, value, level)
                    continue
                try:
                    empty_rejected = check_pair(pair, strict_empty)
                    # One encoder call for the whole triple; this text (as bytes) is the
                    # content key that defines exact duplicates.
                    try:
                        content = dumps({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected})
                    except UnicodeEncodeError:
                        raise RowError("invalid_utf8", "text holds a lone surrogate (invalid UTF-8 escape)") from None
                except RowError as err:
                    err.item = pair.item
                    quarantine(err, row, line, raw, value, level)
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
                record = (
                    b'{"id":"' + rid + b'",' + content[1:-1] + b',"margin":' + margin
                    + (b',"tie":true,' if pair.tie else b",") + source + b"}\n"
                )
                # The prompt list ends where the top-level '],"chosen":[' starts: that sequence
                # cannot occur earlier, since a '"' inside a JSON string is always escaped.
                prompt_bytes = content[prompt_start:content.index(b'],"chosen":[') + 1]
                if int.from_bytes(blake2b(prompt_bytes, digest_size=8).digest(), "big") < threshold:
                    test_w(record)
                    n_test += 1
                else:
                    train_w(record)
                    n_train += 1
                add_stats(pair, empty_rejected)
            if not single or emitted:
                rows_with_pairs += weight
        progress.update(rows_in & 0x3FFF)
        progress.close()
        emitted_pairs += u["emitted"]
        duplicates += u["duplicates"]
        n_train += u["train"]
        n_test += u["test"]
        entry = {
            "rows_in": rows_in + extra_records,
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
        if fmt == "scored":
            entry["records_in"] = c["records_in"]  # source records (= rows_in)
            entry["groups"] = groups  # the prompt groups they formed
        per_source.append(entry)
        totals.update(entry)
    counts = {k: totals[k] for k in ("rows_in", "accepted", "duplicates", "quarantined", "train", "test",
                                      "rows_quarantined", "rows_with_pairs", "pairs", "pairs_quarantined")}
    return counts, per_source, reasons, lstats, diag
