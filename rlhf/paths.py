"""Where rlhf keeps its state: one home for the registry and the preference-data store."""

from __future__ import annotations

import os

# The data library owns these helpers (it must not import rlhf); re-exported for rlhf's callers.
# ``rlhf_home``: the explicit argument, then ``$RLHF_HOME``, then ``~/.rlhf``; the registry lives
# in ``<home>/registry`` and the preference-data store in ``<home>/data``.
from reward_data.paths import default_home as rlhf_home  # noqa: F401
from reward_data.paths import fsync_dir, pid_alive  # noqa: F401


def current_umask() -> int:
    """The process umask, read from /proc where it can be (``os.umask`` sets it to read it,
    which races with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask




def add_home_option(parser) -> None:
    """The ``--home DIR`` option every command takes (see :func:`use_home`)."""
    parser.add_argument("--home", metavar="DIR",
                        help="rlhf home: the registry and the data store (default: $RLHF_HOME, then ~/.rlhf)")


def use_home(home: str | None) -> None:
    """Make ``--home DIR`` the home of this process and of every process it starts.

    Setting ``$RLHF_HOME`` (rather than passing the path down) reaches every reader of the
    home at once: the registry, the data store, and the ranks ``accelerate launch`` starts.
    """
    if home:
        os.environ["RLHF_HOME"] = os.path.abspath(os.path.expanduser(home))
