"""Where rlhf keeps its state: one home for the registry and the preference-data store."""

from __future__ import annotations

import os
from pathlib import Path


def rlhf_home(home: str | os.PathLike | None = None) -> Path:
    """Return the rlhf home directory.

    Order: the explicit argument, then ``$RLHF_HOME``, then ``~/.rlhf``.
    The registry lives in ``<home>/registry`` and the preference-data store in ``<home>/data``.
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
