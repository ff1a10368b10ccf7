"""Source discovery and streaming row iteration for every supported container.

A source argument is a file (``.jsonl``, ``.json``, ``.csv``, ``.parquet``, any of the text ones
optionally ``.gz``), a directory of such files (recursively, sorted), a ``datasets``
``save_to_disk`` directory, or a Hugging Face Hub dataset id.

:func:`iter_rows` yields ``(row, value, raw, line)`` where ``row`` is the 0-based position (line
index for JSON Lines, element index for JSON arrays, record index for CSV/Parquet/datasets) that
stored records cite, ``value`` is the parsed mapping or a :class:`RowError` (malformed JSON,
invalid UTF-8, oversized or too deep row, truncated file, short CSV row), ``raw`` is the raw line
bytes for line formats (kept for the quarantine file), else None, and ``line`` is the 1-based
line a user can open in an editor (the first line of a multi-line CSV record or JSON element;
the 1-based record number for Parquet and ``datasets``). Damage never raises a traceback: a
cut or broken stream becomes a ``truncated`` row naming its line.
Everything streams: one line, one JSON element or one Parquet batch at a time.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reward_data.fastjson import dumps, fast_loads
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


def _hf_extra(ds: Any, split: str | None) -> dict:
    extra: dict = {"hf_split": split}
    fingerprint = getattr(ds, "_fingerprint", None)
    if fingerprint:
        extra["hf_fingerprint"] = fingerprint
    return extra


def _declares_configs(path: Path) -> bool:
    """A hub-layout dataset folder: its README.md front matter declares ``configs:``."""
    readme = path / "README.md"
    if not readme.is_file():
        return False
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return False
    front = text[3:].split("\n---", 1)[0]
    return any(line.startswith("configs:") for line in front.splitlines())


def _hf_sources(spec: str, name: str, kind: str, split: str | None, config: str | None = None,
                data_dir: str | None = None) -> list[SourceFile]:
    import datasets

    if kind == "hf_disk":
        obj = datasets.load_from_disk(spec)
    else:
        # Streaming: rows are read lazily, like every other source, and nothing is cached whole.
        obj = datasets.load_dataset(spec, name=config, data_dir=data_dir, split=split, streaming=True)
    selection = {"hf_config": config, "hf_data_dir": data_dir} if kind == "hf_hub" else {}
    label = name + (f":{config}" if config else "") + (f"/{data_dir}" if data_dir else "")
    if isinstance(obj, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        splits = [split] if split else list(obj.keys())
        for s in splits:
            if s not in obj:
                raise ValueError(f"{spec}: no split {s!r}; available: {', '.join(obj.keys())}")
        return [
            SourceFile(f"{label}[{s}]", spec, kind, split=s, extra={**_hf_extra(obj[s], s), **selection})
            for s in splits
        ]
    return [SourceFile(f"{label}[{split}]" if split else label, spec, kind, split=split,
                       extra={**_hf_extra(obj, split), **selection})]


def expand_sources(specs: list[str | os.PathLike], hf_split: str | None = None, hf_config: str | None = None,
                   hf_data_dir: str | None = None) -> tuple[list[SourceFile], list[str]]:
    """Resolve source arguments into concrete streams.

    A hub id (``ORG/NAME``) is read with ``datasets.load_dataset`` (config ``hf_config``,
    ``data_dir`` ``hf_data_dir``, split ``hf_split`` or every split); so is a local folder laid out
    like a hub dataset repository when a config or data_dir is given or its README declares
    ``configs:``. Other folders are scanned for data files.

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
            if hf_config or hf_data_dir or _declares_configs(path):
                out += _hf_sources(str(path.resolve()), path.resolve().name, "hf_hub", hf_split, hf_config, hf_data_dir)
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
            out += _hf_sources(text, text, "hf_hub", hf_split, hf_config, hf_data_dir)
    # Display names must be unique so record positions are unambiguous; fall back to full paths.
    names = [s.name for s in out]
    for s in out:
        if names.count(s.name) > 1:
            s.name = s.path if s.split is None else f"{s.path}[{s.split}]"
    return out, skipped


def _open_binary(src: SourceFile):
    return gzip.open(src.path, "rb") if src.gz else open(src.path, "rb")


def iter_rows(src: SourceFile, max_row_bytes: int) -> Iterator[tuple[int, Any, bytes | None, int]]:
    """Stream ``(row, value_or_error, raw, line)`` from one source (see module docstring)."""
    if src.kind == "jsonl":
        yield from _iter_jsonl(src, max_row_bytes)
    elif src.kind == "json":
        with _open_binary(src) as f:
            try:
                head = f.read(4096).lstrip()
            except _STREAM_DAMAGE as err:
                raise ValueError(f"{src.path}: line 1: {_damage_text(err)}") from None
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


# Errors that mean a compressed stream is cut short or damaged (gzip.BadGzipFile is an OSError).
_STREAM_DAMAGE = (EOFError, zlib.error, gzip.BadGzipFile)


def _damage_text(err: BaseException) -> str:
    if isinstance(err, EOFError):
        return "the compressed stream ends early (truncated file)"
    return f"the compressed stream is damaged ({err})"


def _split_lines(f, max_row_bytes: int) -> Iterator[tuple[bytes, int, str | None]]:
    """Yield ``(line, oversize, tail)`` from a binary stream, reading 1 MiB blocks.

    ``line`` has no trailing newline. A line longer than ``max_row_bytes`` is never held in
    memory whole: it is yielded once as ``(first 200 bytes, total size)``; otherwise ``oversize``
    is 0. ``tail`` is None for every line that ended with a newline; for the last line it is ``""``
    when the file simply lacks a final newline, or a message when the (compressed) stream broke
    off there, ``line`` then being the partial text before the break (possibly empty).
    Splitting whole blocks is several times cheaper than ``readline`` per line.
    """
    buf = b""
    skipping = 0  # > 0 while discarding the rest of an oversize line; counts its bytes
    head = b""
    damage = None
    # read1 on a gzip stream returns what one step decompressed, so the lines before a
    # truncation are delivered before the EOFError (read(1 MiB) would lose them).
    read = f.read1 if isinstance(f, gzip.GzipFile) else f.read
    while True:
        try:
            chunk = read(1 << 20)
        except _STREAM_DAMAGE as err:
            chunk, damage = b"", _damage_text(err)
        if skipping:
            end = chunk.find(b"\n")
            if end < 0 and chunk:
                skipping += len(chunk)
                continue
            skipping += end if end >= 0 else 0
            yield head, skipping, None if end >= 0 else (damage or "")
            skipping = 0
            if end < 0:
                if damage:
                    yield b"", 0, damage
                return
            chunk = chunk[end + 1:]
        if not chunk:
            if buf:
                if len(buf) > max_row_bytes:
                    yield buf[:200], len(buf), damage or ""
                else:
                    yield buf, 0, damage or ""
            elif damage:
                yield b"", 0, damage
            return
        lines = (buf + chunk).split(b"\n")
        buf = lines.pop()
        for line in lines:
            if len(line) > max_row_bytes:
                yield line[:200], len(line), None
            else:
                yield line, 0, None
        if len(buf) > max_row_bytes:
            head, skipping, buf = buf[:200], len(buf), b""


def _iter_jsonl(src: SourceFile, max_row_bytes: int) -> Iterator[tuple[int, Any, bytes | None, int]]:
    loads = json.loads
    with _open_binary(src) as f:
        for lineno, (line, oversize, tail) in enumerate(_split_lines(f, max_row_bytes)):
            if tail:
                # The stream broke off inside (or right after) this line: never store a cut text.
                yield lineno, RowError("truncated", f"line {lineno + 1}: {tail}"), line, lineno + 1
                continue
            if oversize:
                yield (lineno, RowError("row_too_large", f"line is {oversize} bytes, over max_row_bytes={max_row_bytes}"),
                       line, lineno + 1)
                continue
            if lineno == 0 and line.startswith((b"\xff\xfe", b"\xfe\xff")):
                # every line would fail on its own (UTF-16's newline is two bytes): name the cause once
                raise ValueError(f"{src.name}: starts with a UTF-16 byte-order mark: it is UTF-16 (or UTF-32) text, "
                                 "not UTF-8; convert it first, e.g. iconv -f UTF-16 -t UTF-8")
            if fast_loads is not None:
                # Fast path; any failure (blank line, BOM, invalid UTF-8, NaN, surrogate escapes,
                # big ints, deep nesting, malformed JSON) falls through to the exact stdlib path below.
                try:
                    value = fast_loads(line)
                except ValueError:
                    pass
                else:
                    yield lineno, _without_duplicate_keys(value, line), line, lineno + 1
                    continue
            if lineno == 0 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                yield lineno, RowError("invalid_utf8", f"invalid UTF-8 at byte {err.start}"), line, lineno + 1
                continue
            if not text.strip():
                continue  # blank lines are not rows
            try:
                value = loads(text)
            except RecursionError:
                yield lineno, RowError("too_deep", "JSON nesting is too deep to parse"), line, lineno + 1
                continue
            except ValueError as err:
                if tail == "":
                    # The last line has no newline and does not parse: the file was cut inside it.
                    err = RowError("truncated", f"line {lineno + 1}: the last line has no newline and is not "
                                   f"complete JSON (truncated file?): {err}")
                    yield lineno, err, line, lineno + 1
                else:
                    yield lineno, RowError("malformed_json", f"malformed JSON: {err}"), line, lineno + 1
                continue
            yield lineno, _without_duplicate_keys(value, line), line, lineno + 1


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    keys = set()
    for key, _ in pairs:
        if key in keys:
            raise _DuplicateKey(key)
        keys.add(key)
    return dict(pairs)




def _colons_without_duplicates(value: Any) -> int | None:
    """How many colons compact JSON of ``value`` holds: one per key of its objects plus those
    inside strings; None when ``value`` cannot be written (lone surrogates)."""
    try:
        return dumps(value).count(b":")
    except (UnicodeEncodeError, TypeError, ValueError):
        return None


def _without_duplicate_keys(value: Any, raw: bytes | str) -> Any:
    """``value``, or a RowError naming a key that one of its objects holds twice in ``raw``
    (the parsers keep the last value silently: ``{"chosen": A, "chosen": B}`` would train on B).

    Cheap when there is none: every key is followed by a colon, and the strings' colons are the
    same in the text and in a compact copy of its parsed value (which lost the repeated keys and
    their values), so a text with no more colons than that copy repeats no key; otherwise (or
    when the text escapes a character as ``\\u003X``, a colon perhaps) it is parsed again keeping
    every key (one byte count and one C-level copy per row, instead of a Python walk)."""
    if isinstance(value, RowError):
        return value
    data = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw
    if b"\\u003" not in data:  # a colon escaped as \u003a would hide from the count
        written = _colons_without_duplicates(value)
        if written is not None and data.count(b":") <= written:
            return value
    try:
        json.loads(data.decode("utf-8-sig", "surrogateescape"), object_pairs_hook=_refuse_duplicates)
    except _DuplicateKey as dup:
        return RowError("duplicate_key", f"key {dup.key[:80]!r} appears twice in one object (JSON keeps only the "
                        "last value)", field=dup.key[:80])
    except (ValueError, RecursionError):
        pass  # the first parse decided what this row is
    return value


def _scan_end(buf: str, pos: int) -> int:
    """End index of the JSON array/object starting at ``buf[pos]`` (-1 if not within ``buf``).

    Iterative bracket matching, used only to step over an element too deep for the recursive
    decoder, so it can be quarantined and the array read on.
    """
    depth = 0
    i = pos
    n = len(buf)
    in_str = False
    while i < n:
        ch = buf[i]
        if in_str:
            if ch == "\\":
                i += 1
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return -1


def _iter_json_array(src: SourceFile, max_row_bytes: int) -> Iterator[tuple[int, Any, bytes | None, int]]:
    """Stream the elements of a top-level JSON array without loading the whole file."""
    decoder = json.JSONDecoder()
    with _open_binary(src) as fb:
        f = io.TextIOWrapper(fb, encoding="utf-8-sig", errors="surrogateescape")

        damage: list[str] = []

        def read() -> str:
            # Small pieces, so the text before a break in a compressed stream is still returned;
            # the break is raised on the next call, naming the line where the text stops.
            parts: list[str] = []
            size = 0
            while size < (1 << 16) and not damage:
                try:
                    piece = f.read(8192)
                except _STREAM_DAMAGE as err:
                    damage.append(_damage_text(err))
                    break
                if not piece:
                    break
                parts.append(piece)
                size += len(piece)
            if not parts and damage:
                at = line + buf.count("\n", counted)
                raise ValueError(f"{src.path}: line {at}: {damage[0]} inside array element {index}")
            return "".join(parts)

        line = 1  # 1-based line of buf[counted]
        counted = 0
        buf = ""
        index = 0
        buf = read()
        stripped = buf.lstrip()
        line += buf.count("\n", 0, len(buf) - len(stripped))
        buf = stripped
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
                chunk = read()
                eof = not chunk
                line += buf.count("\n", counted, pos)
                buf, pos, counted = buf[pos:] + chunk, 0, 0
            if pos >= len(buf):
                raise ValueError(f"{src.path}: JSON array is not closed (truncated file?) after element {index} "
                                 f"(line {line + buf.count(chr(10), counted, pos)})")
            if buf[pos] == "]":
                return
            line += buf.count("\n", counted, pos)
            counted = pos
            try:
                value, end = decoder.raw_decode(buf, pos)
            except RecursionError:
                end = _scan_end(buf, pos)
                if end < 0 and not eof and len(buf) - pos <= max_row_bytes:
                    chunk = read()
                    eof = not chunk
                    buf, pos, counted = buf[pos:] + chunk, 0, 0
                    continue
                if end < 0:
                    raise ValueError(f"{src.path}: array element {index} (line {line}) is nested too deep and does "
                                     "not end") from None
                value = RowError("too_deep", f"element nesting is too deep to parse (line {line})")
            except json.JSONDecodeError as err:
                if eof:
                    # A broken element cannot be skipped inside an array: there is no line to resync on.
                    at = line + buf.count("\n", pos, err.pos)
                    raise ValueError(f"{src.path}: line {at}: malformed JSON in array element {index}: {err.msg} "
                                     "(truncated file?)") from None
                if len(buf) - pos > max_row_bytes:
                    raise ValueError(
                        f"{src.path}: array element {index} (line {line}) is over max_row_bytes={max_row_bytes} "
                        f"or malformed: {err}"
                    ) from None
                chunk = read()
                eof = not chunk
                buf, pos, counted = buf[pos:] + chunk, 0, 0
                continue
            if isinstance(value, RowError):
                yield index, value, None, line
            elif end - pos > max_row_bytes:
                yield index, RowError("row_too_large", f"element is {end - pos} chars, over max_row_bytes={max_row_bytes}"), None, line
            else:
                yield index, _without_duplicate_keys(_checked(value), buf[pos:end]), None, line
            index += 1
            pos = end
            if pos > (1 << 20):
                line += buf.count("\n", counted, pos)
                buf, pos, counted = buf[pos:], 0, 0


def _checked(value: Any) -> Any:
    """``value``, or a RowError when it holds surrogate-escaped bytes (invalid UTF-8) or nests too deep."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return RowError("invalid_utf8", "element holds invalid UTF-8 bytes")
    except RecursionError:
        return RowError("too_deep", "element nesting is too deep")
    return value


def _approx_size(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_approx_size(k) + _approx_size(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(_approx_size(v) for v in value)
    return 8


class _LineFeed:
    """The physical lines of a text stream, for ``csv.reader``, counting lines and quote characters.

    The counts give each CSV record its 1-based first line, tell whether a record stopped inside
    an open quoted cell (odd number of quotes), and let the reader skip to the end of a record
    the csv module gave up on (oversized field).
    """

    def __init__(self, f):
        self.f = f
        self.line = 0
        self.quotes = 0
        self.ended = False
        self.damage: str | None = None

    def __iter__(self):
        return self

    def __next__(self) -> str:
        try:
            text = self.f.readline()
        except _STREAM_DAMAGE as err:
            self.damage, text = _damage_text(err), ""
        if not text:
            self.ended = True
            raise StopIteration
        self.line += 1
        self.quotes += text.count('"')
        return text


def _iter_csv(src: SourceFile, max_row_bytes: int) -> Iterator[tuple[int, Any, bytes | None, int]]:
    """CSV records with their first line; damage becomes quarantine entries (see _csv_pass)."""
    csv.field_size_limit(max(max_row_bytes, 131072))
    state = {"index": 0, "header": None}
    resume = 0
    while resume is not None:
        resume = yield from _csv_pass(src, max_row_bytes, resume, state)


def _csv_pass(src: SourceFile, max_row_bytes: int, skip: int, state: dict):
    """Read records from physical line ``skip + 1`` on (after the header when ``skip == 0``).

    Returns the line to resume after when a quoted cell opened on a record's first line never
    closes: that record is quarantined as ``truncated`` and reading restarts on the next line,
    so one stray quote costs one row, not the rest of the file (a file really cut inside a
    multi-line cell yields its remaining partial lines as short rows). None when done.
    """
    with _open_binary(src) as fb:
        feed = _LineFeed(io.TextIOWrapper(fb, encoding="utf-8-sig", errors="surrogateescape", newline=""))
        reader = csv.reader(feed)
        if skip == 0:
            try:
                header = next(reader, None)
            except csv.Error as err:
                raise ValueError(f"{src.path}: line 1: unreadable CSV header: {err}") from None
            if header is None:
                if feed.damage:
                    raise ValueError(f"{src.path}: line 1: {feed.damage}")
                return None
            state["header"] = header
        else:
            while feed.line < skip and next(feed, None) is not None:
                pass
        header = state["header"]
        n_header = len(header)
        while True:
            index = state["index"]
            start = feed.line + 1
            feed.quotes = 0
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                # Skip the rest of the record: while the quotes seen are odd, a quoted cell is still open.
                while feed.quotes % 2 and next(feed, None) is not None:
                    pass
                reason = "row_too_large" if "field larger" in str(err) else "malformed_csv"
                yield index, RowError(reason, f"line {start}: {err}"), None, start
                state["index"] += 1
                continue
            if not fields:
                continue  # blank line
            state["index"] += 1
            if feed.ended and (feed.damage or feed.quotes % 2):
                # csv (non-strict) returns a record cut at end of input as if it were complete.
                if feed.damage:
                    yield index, RowError("truncated", f"line {start}: {feed.damage}"), None, start
                    return None
                yield index, RowError("truncated", f"line {start}: a quoted cell opened here never closes (a stray "
                                      "quote, or the file is cut); reading resumes on the next line"), None, start
                return start if feed.line > start else None
            if len(fields) != n_header:
                short = len(fields) < n_header
                yield index, RowError(
                    "short_row" if short else "long_row",
                    f"line {start}: record has {len(fields)} fields, the header has {n_header}"
                    + (" (cut line or missing delimiter?)" if short else ""),
                ), None, start
                continue
            size = sum(map(len, fields))
            if size > max_row_bytes:
                yield index, RowError("row_too_large", f"line {start}: record is {size} chars, over max_row_bytes={max_row_bytes}"), None, start
                continue
            try:
                "".join(fields).encode("utf-8")
            except UnicodeEncodeError:
                yield index, RowError("invalid_utf8", f"line {start}: record holds invalid UTF-8 bytes"), None, start
                continue
            yield index, dict(zip(header, fields)), None, start
        if feed.damage:
            yield state["index"], RowError("truncated", f"line {feed.line + 1}: {feed.damage}"), None, feed.line + 1
            state["index"] += 1
    return None


def _iter_parquet(src: SourceFile, max_row_bytes: int) -> Iterator[tuple[int, Any, bytes | None, int]]:
    import pyarrow.parquet as pq

    index = 0
    pf = pq.ParquetFile(src.path)
    for batch in pf.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield index, _sized(record, max_row_bytes), None, index + 1
            index += 1


def _iter_hf(src: SourceFile, max_row_bytes: int) -> Iterator[tuple[int, Any, bytes | None, int]]:
    import datasets

    if src.kind == "hf_disk":
        obj = datasets.load_from_disk(src.path)
    else:
        obj = datasets.load_dataset(src.path, name=src.extra.get("hf_config"), data_dir=src.extra.get("hf_data_dir"),
                                    split=src.split, streaming=True)
    if isinstance(obj, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        obj = obj[src.split]
    for index, record in enumerate(obj):
        yield index, _sized(record, max_row_bytes), None, index + 1


def _sized(record: Any, max_row_bytes: int) -> Any:
    try:
        size = _approx_size(record)
    except RecursionError:
        return RowError("too_deep", "record nesting is too deep")
    if size > max_row_bytes:
        return RowError("row_too_large", f"record is about {size} chars, over max_row_bytes={max_row_bytes}")
    return record
