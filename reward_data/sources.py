"""Source discovery and streaming row iteration for every supported container.

A source argument is a file (``.jsonl``, ``.json``, ``.csv``, ``.parquet``, any of the text ones
optionally ``.gz``), a directory of such files (recursively, sorted), a ``datasets``
``save_to_disk`` directory, or a Hugging Face Hub dataset id.

:func:`iter_rows` yields ``(row, value, raw)`` where ``row`` is the 0-based position (line
number for JSON Lines, element index for JSON arrays, record index for CSV/Parquet/datasets),
``value`` is the parsed mapping or a :class:`RowError` (malformed JSON, invalid UTF-8, oversized
row) and ``raw`` is the raw line bytes for line formats (kept for the quarantine file), else None.
Everything streams: one line, one JSON element or one Parquet batch at a time.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reward_data.fastjson import fast_loads
from reward_data.schema import RowError

TEXT_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv"}
BINARY_KINDS = {".parquet": "parquet"}


@dataclass
class SourceFile:
    """One concrete input stream.

    Attributes:
        name: stable display name used in records (file name, or ``dir/relative/path``), independent
            of where the input lives so the same data ingested from elsewhere hashes the same.
        path: absolute path (or hub id) for the manifest.
        kind: jsonl | json | csv | parquet | hf_disk | hf_hub.
        gz: whether the file is gzip-compressed.
        split: split name for ``datasets`` sources.
    """

    name: str
    path: str
    kind: str
    gz: bool = False
    split: str | None = None
    extra: dict = field(default_factory=dict)

    def fingerprint(self) -> dict:
        """sha256 and size of the file as stored (compressed bytes for .gz); datasets fingerprint otherwise."""
        if self.kind in ("hf_disk", "hf_hub"):
            return {"sha256": None, "bytes": None, **self.extra}
        h = hashlib.sha256()
        size = 0
        with open(self.path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
        return {"sha256": h.hexdigest(), "bytes": size}


def _kind_of(path: Path) -> tuple[str, bool] | None:
    suffixes = [s.lower() for s in path.suffixes]
    gz = bool(suffixes) and suffixes[-1] == ".gz"
    if gz:
        suffixes = suffixes[:-1]
    if not suffixes:
        return None
    if suffixes[-1] in TEXT_KINDS:
        return TEXT_KINDS[suffixes[-1]], gz
    if suffixes[-1] in BINARY_KINDS and not gz:
        return BINARY_KINDS[suffixes[-1]], False
    return None


def _is_hf_disk(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())


def _hf_sources(spec: str, name: str, kind: str, split: str | None) -> list[SourceFile]:
    import datasets

    if kind == "hf_disk":
        obj = datasets.load_from_disk(spec)
    else:
        obj = datasets.load_dataset(spec, split=split, streaming=True)
    if isinstance(obj, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        splits = [split] if split else list(obj.keys())
        for s in splits:
            if s not in obj:
                raise ValueError(f"{spec}: no split {s!r}; available: {', '.join(obj.keys())}")
        return [
            SourceFile(f"{name}[{s}]", spec, kind, split=s, extra=_hf_extra(obj[s], s))
            for s in splits
        ]
    return [SourceFile(f"{name}[{split}]" if split else name, spec, kind, split=split, extra=_hf_extra(obj, split))]


def _hf_extra(ds: Any, split: str | None) -> dict:
    extra: dict = {"hf_split": split}
    fingerprint = getattr(ds, "_fingerprint", None)
    if fingerprint:
        extra["hf_fingerprint"] = fingerprint
    return extra


def expand_sources(specs: list[str | os.PathLike], hf_split: str | None = None) -> tuple[list[SourceFile], list[str]]:
    """Resolve source arguments into concrete streams.

    Returns:
        (sources, skipped): the streams in a deterministic order, and files inside source
        directories that are not data (e.g. README/SOURCE.md), reported in the manifest.

    Raises:
        FileNotFoundError / ValueError naming the offending argument.
    """
    out: list[SourceFile] = []
    skipped: list[str] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            if _is_hf_disk(path):
                out += _hf_sources(str(path.resolve()), path.resolve().name, "hf_disk", hf_split)
                continue
            found = False
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                rel = child.relative_to(path)
                if any(part.startswith(".") for part in rel.parts):
                    continue
                kind = _kind_of(child)
                if kind is None:
                    skipped.append(str(child.resolve()))
                    continue
                found = True
                out.append(SourceFile(f"{path.resolve().name}/{rel.as_posix()}", str(child.resolve()), kind[0], kind[1]))
            if not found:
                raise ValueError(f"{path}: directory holds no .jsonl/.json/.csv/.parquet(.gz) files")
        elif path.is_file():
            kind = _kind_of(path)
            if kind is None:
                raise ValueError(f"{path}: unsupported file type (expected .jsonl, .json, .csv, .parquet, optionally .gz)")
            out.append(SourceFile(path.name, str(path.resolve()), kind[0], kind[1]))
        elif path.exists():
            raise ValueError(f"{path}: not a regular file or directory")
        else:
            text = str(spec)
            looks_local = text.startswith((".", "/", "~")) or text.count("/") > 1 or _kind_of(Path(text)) is not None
            if looks_local:
                raise FileNotFoundError(f"{spec}: no such file or directory")
            out += _hf_sources(text, text, "hf_hub", hf_split)
    # Display names must be unique so record positions are unambiguous; fall back to full paths.
    names = [s.name for s in out]
    for s in out:
        if names.count(s.name) > 1:
            s.name = s.path if s.split is None else f"{s.path}[{s.split}]"
    return out, skipped


def _open_binary(src: SourceFile):
    return gzip.open(src.path, "rb") if src.gz else open(src.path, "rb")


def iter_rows(src: SourceFile, max_row_bytes: int) -> Iterator[tuple[int, Any, bytes | None]]:
    """Stream ``(row, value_or_error, raw)`` from one source (see module docstring)."""
    if src.kind == "jsonl":
        yield from _iter_jsonl(src, max_row_bytes)
    elif src.kind == "json":
        with _open_binary(src) as f:
            head = f.read(4096).lstrip()
        if head.startswith(b"\xef\xbb\xbf"):
            head = head[3:].lstrip()
        if head.startswith(b"["):
            yield from _iter_json_array(src, max_row_bytes)
        else:
            # Many ".json" files in the wild (summarize-from-feedback, SHP) are JSON Lines.
            yield from _iter_jsonl(src, max_row_bytes)
    elif src.kind == "csv":
        yield from _iter_csv(src, max_row_bytes)
    elif src.kind == "parquet":
        yield from _iter_parquet(src, max_row_bytes)
    else:
        yield from _iter_hf(src, max_row_bytes)


def _split_lines(f, max_row_bytes: int) -> Iterator[tuple[bytes, int]]:
    """Yield ``(line, oversize)`` from a binary stream, reading 1 MiB blocks.

    ``line`` has no trailing newline. A line longer than ``max_row_bytes`` is never held in
    memory whole: it is yielded once as ``(first 200 bytes, total size)``; otherwise ``oversize``
    is 0. Splitting whole blocks is several times cheaper than ``readline`` per line.
    """
    buf = b""
    skipping = 0  # > 0 while discarding the rest of an oversize line; counts its bytes
    head = b""
    while True:
        chunk = f.read(1 << 20)
        if skipping:
            end = chunk.find(b"\n")
            if end < 0 and chunk:
                skipping += len(chunk)
                continue
            skipping += end if end >= 0 else 0
            yield head, skipping
            skipping = 0
            if end < 0:
                return
            chunk = chunk[end + 1:]
        if not chunk:
            if buf:
                if len(buf) > max_row_bytes:
                    yield buf[:200], len(buf)
                else:
                    yield buf, 0
            return
        lines = (buf + chunk).split(b"\n")
        buf = lines.pop()
        for line in lines:
            if len(line) > max_row_bytes:
                yield line[:200], len(line)
            else:
                yield line, 0
        if len(buf) > max_row_bytes:
            head, skipping, buf = buf[:200], len(buf), b""


def _iter_jsonl(src: SourceFile, max_row_bytes: int) -> Iterator[tuple[int, Any, bytes | None]]:
    loads = json.loads
    with _open_binary(src) as f:
        for lineno, (line, oversize) in enumerate(_split_lines(f, max_row_bytes)):
            if oversize:
                yield lineno, RowError("row_too_large", f"line is {oversize} bytes, over max_row_bytes={max_row_bytes}"), line
                continue
            if fast_loads is not None:
                # Fast path; any failure (blank line, BOM, invalid UTF-8, NaN, surrogate escapes,
                # big ints, malformed JSON) falls through to the exact stdlib path below.
                try:
                    value = fast_loads(line)
                except ValueError:
                    pass
                else:
                    yield lineno, value, line
                    continue
            if lineno == 0 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                yield lineno, RowError("invalid_utf8", f"invalid UTF-8 at byte {err.start}"), line
                continue
            if not text.strip():
                continue  # blank lines are not rows
            try:
                value = loads(text)
            except ValueError as err:
                yield lineno, RowError("malformed_json", f"malformed JSON: {err}"), line
                continue
            yield lineno, value, line


def _iter_json_array(src: SourceFile, max_row_bytes: int) -> Iterator[tuple[int, Any, bytes | None]]:
    """Stream the elements of a top-level JSON array without loading the whole file."""
    decoder = json.JSONDecoder()
    with _open_binary(src) as fb:
        f = io.TextIOWrapper(fb, encoding="utf-8-sig", errors="surrogateescape")
        buf = f.read(1 << 16).lstrip()
        if not buf.startswith("["):
            raise ValueError(f"{src.path}: expected a JSON array")
        pos = 1
        index = 0
        eof = False
        while True:
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n,":
                    pos += 1
                if pos < len(buf) or eof:
                    break
                chunk = f.read(1 << 16)
                eof = not chunk
                buf, pos = buf[pos:] + chunk, 0
            if pos >= len(buf):
                raise ValueError(f"{src.path}: JSON array is not closed (truncated file?) after element {index}")
            if buf[pos] == "]":
                return
            try:
                value, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as err:
                if eof:
                    # A broken element cannot be skipped inside an array: there is no line to resync on.
                    raise ValueError(f"{src.path}: malformed JSON in array element {index}: {err}") from None
                if len(buf) - pos > max_row_bytes:
                    raise ValueError(
                        f"{src.path}: array element {index} is over max_row_bytes={max_row_bytes} or malformed: {err}"
                    ) from None
                chunk = f.read(1 << 16)
                eof = not chunk
                buf, pos = buf[pos:] + chunk, 0
                continue
            if end - pos > max_row_bytes:
                yield index, RowError("row_too_large", f"element is {end - pos} chars, over max_row_bytes={max_row_bytes}"), None
            elif _has_surrogates(value):
                yield index, RowError("invalid_utf8", "element holds invalid UTF-8 bytes"), None
            else:
                yield index, value, None
            index += 1
            pos = end
            if pos > (1 << 20):
                buf, pos = buf[pos:], 0


def _has_surrogates(value: Any) -> bool:
    """True when a decoded value holds surrogate-escaped bytes (invalid UTF-8) anywhere."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _approx_size(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_approx_size(k) + _approx_size(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(_approx_size(v) for v in value)
    return 8


def _iter_csv(src: SourceFile, max_row_bytes: int) -> Iterator[tuple[int, Any, bytes | None]]:
    csv.field_size_limit(max(max_row_bytes, 131072))
    with _open_binary(src) as fb:
        f = io.TextIOWrapper(fb, encoding="utf-8-sig", errors="surrogateescape", newline="")
        reader = csv.DictReader(f)
        for index, record in enumerate(reader):
            if None in record:
                yield index, RowError("wrong_type", f"record has {len(reader.fieldnames or []) + len(record[None])} fields, header has {len(reader.fieldnames or [])}"), None
                continue
            size = sum(len(v) for v in record.values() if isinstance(v, str))
            if size > max_row_bytes:
                yield index, RowError("row_too_large", f"record is {size} chars, over max_row_bytes={max_row_bytes}"), None
                continue
            try:
                "".join(v for v in record.values() if isinstance(v, str)).encode("utf-8")
            except UnicodeEncodeError:
                yield index, RowError("invalid_utf8", f"record (line {reader.line_num}) holds invalid UTF-8 bytes"), None
                continue
            yield index, record, None


def _iter_parquet(src: SourceFile, max_row_bytes: int) -> Iterator[tuple[int, Any, bytes | None]]:
    import pyarrow.parquet as pq

    index = 0
    pf = pq.ParquetFile(src.path)
    for batch in pf.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield index, _sized(record, max_row_bytes), None
            index += 1


def _iter_hf(src: SourceFile, max_row_bytes: int) -> Iterator[tuple[int, Any, bytes | None]]:
    import datasets

    if src.kind == "hf_disk":
        obj = datasets.load_from_disk(src.path)
    else:
        obj = datasets.load_dataset(src.path, split=src.split, streaming=True)
    if isinstance(obj, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        obj = obj[src.split]
    for index, record in enumerate(obj):
        yield index, _sized(record, max_row_bytes), None


def _sized(record: Any, max_row_bytes: int) -> Any:
    size = _approx_size(record)
    if size > max_row_bytes:
        return RowError("row_too_large", f"record is about {size} chars, over max_row_bytes={max_row_bytes}")
    return record
