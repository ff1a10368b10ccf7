"""Filesystem helpers of the data store; ``reward_data`` imports nothing from ``rlhf``.

``rlhf`` re-uses :func:`pid_alive` and :func:`fsync_dir` from here (``rlhf.paths``), never the
reverse, so the data library can be installed and used on its own.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_home(home: str | os.PathLike | None = None) -> Path:
    """The home directory that holds ``data/``: the argument, else ``$RLHF_HOME``, else ``~/.rlhf``.

    The same order as ``rlhf.paths.rlhf_home``, so the CLI and the library agree on one store.
    """
    if home is not None:
        return Path(home).expanduser()
    env = os.environ.get("RLHF_HOME")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".rlhf"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (used to tell stale temporary directories of dead
    writers from those of running ones)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_dir(path) -> None:
    """Flush a directory's entries: a rename is durable only once its directory is synced.
    Filesystems that cannot fsync a directory are skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
