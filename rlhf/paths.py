"""Where rlhf keeps its state: one home for the registry and the preference-data store."""

from __future__ import annotations

import os
from pathlib import Path

# The data library owns these two helpers (it must not import rlhf); re-exported for rlhf's callers.
from reward_data.paths import fsync_dir, pid_alive  # noqa: F401


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
