"""Versioned, immutable dataset store under ``<home>/data/<NAME>/<VERSION>/``.

A version is built in ``<home>/data/<NAME>/.tmp-<pid>-<random>/`` and published with one
``os.rename`` to the next free version number, so readers never see half a version and a killed
ingest leaves only a temporary directory (removed by the next ingest once its process is gone).
Two concurrent ingests of the same name race on the rename: ``rename`` onto an existing
(non-empty) version directory fails, and the loser retries with the next number. A full disk
(ENOSPC / EDQUOT / EFBIG) raises :class:`DiskFullError` naming the file being written, after the
temporary directory is removed, so earlier versions and later ingests are unaffected.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path

from reward_data.paths import default_home, fsync_dir, pid_alive

# \Z, not $: "$" also matches before a trailing newline, which would let "name\n" through.
NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
OUTPUT_FILES = ("train.jsonl", "test.jsonl", "quarantine.jsonl", "duplicates.jsonl")


def data_root(home=None) -> Path:
    return default_home(home) / "data"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(f"dataset name {name!r}: use letters, digits, '.', '_' or '-' (not starting with '.' or '-')")
    return name


def versions(name: str, home=None) -> list[int]:
    """Published version numbers of ``name``, ascending (empty when the dataset does not exist)."""
    root = data_root(home) / name
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "manifest.json").is_file())


def list_names(home=None) -> list[str]:
    root = data_root(home)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and versions(p.name, home))


def resolve(ref: str | os.PathLike, home=None) -> Path:
    """Return the version directory for ``NAME``, ``NAME:latest`` or ``NAME:VERSION``.

    A path to an existing version directory (one holding ``manifest.json``) is returned as is.

    Raises:
        KeyError: the dataset or version does not exist (the message lists what does).
    """
    if isinstance(ref, Path) or (isinstance(ref, str) and os.sep in ref and ":" not in Path(ref).name):
        path = Path(ref)
        if (path / "manifest.json").is_file():
            return path
        raise KeyError(f"{ref}: not a dataset version directory (no manifest.json)")
    ref = str(ref)
    name, _, version = ref.partition(":")
    check_name(name)
    available = versions(name, home)
    if not available:
        known = ", ".join(list_names(home)) or "none"
        raise KeyError(f"dataset {name!r} not found in {data_root(home)} (known: {known})")
    if version in ("", "latest"):
        return data_root(home) / name / str(available[-1])
    if not version.isdigit() or int(version) not in available:
        raise KeyError(f"dataset {name!r} has no version {version!r} (available: {', '.join(map(str, available))})")
    return data_root(home) / name / str(int(version))


def read_manifest(version_dir: Path) -> dict:
    with open(version_dir / "manifest.json", encoding="utf-8") as f:
        return json.load(f)


def clean_stale_tmp(name_dir: Path) -> None:
    """Remove temporary version directories left by ingests whose process no longer exists."""
    if not name_dir.is_dir():
        return
    for p in name_dir.iterdir():
        m = re.match(r"^\.tmp-(\d+)-", p.name)
        if m and not pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskFullError(OSError):
    """Writing the store failed for lack of space; the message names the path that filled up."""


def _named(err: OSError, path: Path) -> OSError:
    """``err`` with the path it happened on (buffered writes raise without a file name)."""
    if err.errno in DISK_FULL:
        return DiskFullError(err.errno, f"{err.strerror or 'no space left'} while writing {path}; "
                             "nothing was published and the temporary version was removed", str(path))
    if err.filename is None:
        return OSError(err.errno, f"{err.strerror or err} while writing {path}", str(path))
    return err


class OutputFile:
    """A binary JSON-lines output that tracks its sha256 and line count as it is written."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "wb", buffering=1 << 20)
        self.sha = hashlib.sha256()
        self.records = 0

    def write(self, line: bytes) -> None:
        try:
            self._f.write(line)
        except OSError as err:
            raise _named(err, self.path) from None
        self.sha.update(line)
        self.records += 1

    def close(self) -> None:
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
        except OSError as err:
            raise _named(err, self.path) from None

    def discard(self) -> None:
        """Close without raising: the buffered tail may not fit on a full disk, and the file is
        about to be deleted anyway (a raise here would skip removing the temporary directory)."""
        try:
            self._f.close()
        except OSError:
            pass


class VersionWriter:
    """Builds one version in a temporary directory and publishes it atomically.

    Use as a context manager; leaving the block with an exception removes the temporary directory.
    """

    def __init__(self, name: str, home=None):
        self.name = check_name(name)
        self.name_dir = data_root(home) / name
        self.name_dir.mkdir(parents=True, exist_ok=True)
        clean_stale_tmp(self.name_dir)
        self.tmp = self.name_dir / f".tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            self.tmp.mkdir()
        except FileNotFoundError:  # a failed ingest of the same name removed the empty folder just now
            self.name_dir.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir()
        self.published: Path | None = None
        self.files: dict[str, OutputFile] = {}
        try:
            for fn in OUTPUT_FILES:
                self.files[fn.split(".")[0]] = OutputFile(self.tmp / fn)
        except OSError as err:
            self.__exit__(None, None, None)
            raise _named(err, self.tmp / fn) from None

    def __enter__(self) -> VersionWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for f in self.files.values():
            if not f._f.closed:
                f.discard()
        if self.published is None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            try:
                self.name_dir.rmdir()  # a failed first ingest leaves no empty dataset folder behind
            except OSError:
                pass  # it holds versions (or another ingest's temporary directory)

    def content_hash(self) -> str:
        """Hash of all record files: equal for equal inputs and options, whatever the time or path."""
        h = hashlib.sha256()
        for key, f in self.files.items():
            h.update(f"{key}:{f.sha.hexdigest()}:{f.records}\n".encode())
        return h.hexdigest()

    def publish(self, manifest: dict) -> tuple[int, Path]:
        """Write the manifest, make files read-only and rename into the next free version number.

        Args:
            manifest: everything but ``version``, which is filled here.
        """
        for f in self.files.values():
            f.close()
        manifest["files"] = {
            f.path.name: {"sha256": f.sha.hexdigest(), "records": f.records} for f in self.files.values()
        }
        number = 0
        for _ in range(1000):
            existing = versions(self.name, self.name_dir.parent.parent)
            # Never retry a number that just failed, even if the listing has not caught up.
            number = max((existing[-1] if existing else 0) + 1, number + 1)
            manifest["version"] = number
            tmp_manifest = self.tmp / "manifest.json.part"
            try:
                with open(tmp_manifest, "w", encoding="utf-8") as f:
                    json.dump(manifest, f, indent=2, ensure_ascii=False)
                    f.write("\n")
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as err:
                raise _named(err, tmp_manifest) from None
            os.replace(tmp_manifest, self.tmp / "manifest.json")
            for p in self.tmp.iterdir():
                p.chmod(0o444)
            target = self.name_dir / str(number)
            try:
                os.rename(self.tmp, target)
            except OSError as err:
                if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    # Another ingest published this number first: restore write access and retry.
                    (self.tmp / "manifest.json").chmod(0o644)
                    continue
                raise
            fsync_dir(self.name_dir)
            self.published = target
            return number, target
        raise RuntimeError(f"could not publish a version of {self.name!r} after 1000 attempts")
