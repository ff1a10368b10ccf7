"""The one way rlhf writes a file or publishes a directory: to a temporary name beside it,
then renamed into place, so a reader sees the old version or the new one, never half of one.

Every writer of the package uses these (pipeline state, summaries, configs, task files,
reports, generated completions, tracker info, registry records, checkpoints).
``reward_data`` stands alone and keeps its own, equivalent, store writer.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from collections.abc import Callable
from typing import Any

from rlhf.paths import current_umask, fsync_dir


def _tmp_name(path: Path) -> Path:
    # unique per process and call: two writers of one file never share a temporary name
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def _write(path: str | os.PathLike, fill: Callable[[Path], Any], *, fsync: bool, mode: int | None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        fill(tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"no space left on the device of {path.parent} while writing {path}") from None
        raise
    if fsync:
        fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically; a failed write leaves ``path`` as it was and no temp file.

    Args:
        fsync: Flush the file and its directory to disk before returning (registry records).
        mode: Permission bits for the new file (default: what the umask gives).

    Raises:
        OSError: a full disk is reported naming ``path``.
    """
    _write(path, lambda tmp: tmp.write_bytes(data), fsync=fsync, mode=mode)


def write_text(path: str | os.PathLike, text: str, *, fsync: bool = False, mode: int | None = None) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`write_bytes`."""
    _write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), fsync=fsync, mode=mode)


def write_json(path: str | os.PathLike, data: Any, *, fsync: bool = False) -> None:
    """Write ``data`` as indented, key-sorted JSON atomically; see :func:`write_bytes`."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str), fsync=fsync)


def write_lines(path: str | os.PathLike, lines: list[str]) -> None:
    """Write one line per string (a JSONL file) atomically; see :func:`write_bytes`."""
    write_text(path, "".join(line + "\n" for line in lines))


def publish_dir(tmp: Path, final: Path) -> None:
    """Move a fully written directory ``tmp`` into place at ``final`` (replacing an old one).

    The old directory is first renamed aside, so ``final`` is never a mix of the two.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def write_dir(final: Path, fill: Callable[[Path], Any]) -> Path:
    """Build the directory ``final`` atomically: ``fill(tmp)`` writes a temporary directory
    beside it (``.tmp-<name>-*``), which then replaces ``final`` (see :func:`publish_dir`).

    The directory gets the modes the user's umask gives (mkdtemp makes it private). When
    ``fill`` or the rename fails, nothing temporary is left and an earlier ``final`` is intact.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        fill(tmp)
        os.chmod(tmp, 0o777 & ~current_umask())
        publish_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
