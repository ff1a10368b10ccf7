"""A run directory's life: one process at a time, honest statuses, logs that never repeat.

* :class:`RunLock` holds an OS file lock (``fcntl.flock`` on ``<run_dir>/.lock``) for the
  whole of ``rlhf run``; the kernel drops it when the process ends, however it ends, so a
  SIGKILLed run never leaves a stale lock, and a second run into the same directory fails
  at once instead of doubling metrics and last-writer-wins ``pipeline.json``.
* Whoever holds the lock knows that a stage still marked ``running`` belongs to a process
  that is gone: :data:`KILLED_REASON` marks it ``killed`` (the pipeline does this on start).
* :func:`trim_logs` drops the metric and sample rows a stage logged after the checkpoint
  it resumes from, so the resumed stage logs those steps once, not twice.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from pathlib import Path

from rlhf.atomic import write_text
from rlhf.config import ConfigError

LOCK_FILE = ".lock"
LOGS_WITH_STEPS = ("metrics.jsonl", "samples.jsonl")
KILLED_REASON = "its process ended without finishing the stage (killed or crashed)"


class RunDirLocked(ConfigError):
    """Another process is running in this run directory."""


class RunLock:
    """An exclusive, non-blocking lock on a run directory, held until :meth:`release`.

    The lock file keeps the holder's ``pid host`` so the error can name it; the file is
    never deleted (deleting it would let two processes lock two different inodes).
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        """Take the lock, or raise :class:`RunDirLocked` naming the process that holds it."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunDirLocked(
                f"run directory {self.run_dir} is in use by another rlhf run ({holder}); wait for it to "
                "finish or pick another --output-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def resume_step(output_dir: str | os.PathLike) -> int | None:
    """The step of the newest complete checkpoint under ``output_dir/checkpoints``, or None.

    Both layouts count: transformers' ``checkpoint-N`` (complete once ``trainer_state.json``
    is written) and our PPO ``update-N`` (complete once ``COMPLETE`` is written). N is the
    step the stage's ``metrics.jsonl`` rows carry for the last update the checkpoint holds.
    """
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    steps = []
    for d in root.iterdir():
        prefix, _, number = d.name.rpartition("-")
        marker = {"checkpoint": "trainer_state.json", "update": "COMPLETE"}.get(prefix)
        if marker and number.isdigit() and (d / marker).exists():
            steps.append(int(number))
    return max(steps, default=None)


def trim_logs(output_dir: str | os.PathLike, keep_through: int | None) -> int:
    """Drop rows with ``step > keep_through`` from a stage's step logs; returns rows dropped.

    ``keep_through=None`` (a stage that starts from scratch) drops every row with a step.
    Rows are rewritten atomically (temp file + rename); unparsable lines are kept.
    """
    dropped = 0
    for name in LOGS_WITH_STEPS:
        path = Path(output_dir) / name
        if not path.is_file():
            continue
        kept, before = [], dropped
        for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
            try:
                step = json.loads(line).get("step")
            except (ValueError, AttributeError):
                step = None
            if isinstance(step, (int, float)) and (keep_through is None or step > keep_through):
                dropped += 1
                continue
            kept.append(line)
        if dropped > before:
            write_text(path, "".join(kept))
    return dropped
