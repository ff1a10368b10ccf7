"""A run directory's life: one process at a time, honest statuses, logs that never repeat.

* :class:`RunLock` holds an OS file lock (``fcntl.flock`` on ``<run_dir>/.lock``) for the
  whole of ``rlhf run``; the kernel drops it when the process ends, however it ends, so a
  SIGKILLed run never leaves a stale lock, and a second run into the same directory fails
  at once instead of doubling metrics and last-writer-wins ``pipeline.json``.
* Whoever holds the lock knows that a stage still marked ``running`` belongs to a process
  that is gone: :data:`KILLED_REASON` marks it ``killed`` (the pipeline does this on start).
* :func:`trim_logs` drops the metric and sample rows a stage logged after the checkpoint
  it resumes from, so the resumed stage logs those steps once, not twice.
* :func:`prepare_checkpoints` makes ``--resume`` continue only what the same config wrote:
  a stage that starts afresh moves the old ``checkpoints/`` aside (to
  ``checkpoints.previous``) and stamps the new one with its config fingerprint; every
  checkpoint carries the stamp too; a resume whose checkpoint carries another fingerprint
  (or none) is refused with one line.
* :class:`Terminated`: SIGTERM (SLURM's ``scancel``, ``docker stop``) ends a run like Ctrl-C.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import sys
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


@contextlib.contextmanager
def locked(run_dir: str | os.PathLike):
    """Hold ``run_dir``'s :class:`RunLock` for the body, on every process of a launched job.

    Rank 0 takes the lock (the kernel drops it when the process dies, however it dies);
    every rank learns whether it got it, so no rank waits forever in a barrier.

    Raises:
        RunDirLocked: another process holds the lock.
    """
    from rlhf import distributed as dist

    lock, error = RunLock(run_dir), None
    if dist.is_main():
        try:
            lock.acquire()
        except RunDirLocked as e:
            error = str(e)
    error = dist.broadcast_object(error)
    if error is not None:
        raise RunDirLocked(error)
    try:
        yield lock
    finally:
        lock.release()


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM; handled like Ctrl-C (the stage is marked interrupted,
    the lock released), and the command exits 143 (128 + SIGTERM)."""


def _raise_terminated(signum, frame):
    raise Terminated("SIGTERM")


def handle_sigterm() -> None:
    """Turn SIGTERM into :class:`Terminated` in this process (main thread only)."""
    signal.signal(signal.SIGTERM, _raise_terminated)


# ----------------------------------------------------------------------------------------
# checkpoints that belong to one config

FINGERPRINT_FILE = "rlhf_fingerprint.json"  # in checkpoints/ and in every checkpoint under it
PREVIOUS = "checkpoints.previous"  # where a fresh start moves the checkpoints of the one before


def fingerprint(obj) -> str:
    """A short hash of a JSON-like value (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_hash(path: str) -> str:
    """SHA-256 of a file's bytes; ``ref:<path>`` for anything that is not a file (a hub id,
    a store reference, a directory)."""
    p = Path(path)
    if not p.is_file():
        return f"ref:{path}"
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def config_fingerprint(config: dict) -> str:
    """The fingerprint of a stage run alone: its config without ``output_dir``, and the
    bytes of every file a config value names (datasets, prompts). ``rlhf run`` uses the
    pipeline's own fingerprints instead, which also cover the stages a stage consumes."""
    values = {k: v for k, v in config.items() if k != "output_dir"}
    files = {k: file_hash(v) for k, v in values.items() if isinstance(v, str) and v and Path(v).is_file()}
    return fingerprint([values, files])


def newest_checkpoint(output_dir: str | os.PathLike) -> tuple[int, Path] | None:
    """``(step, directory)`` of the newest complete checkpoint under ``output_dir/checkpoints``.

    Both layouts count: transformers' ``checkpoint-N`` (complete once ``trainer_state.json``
    is written) and our PPO ``update-N`` (complete once ``COMPLETE`` is written). N is the
    step the stage's ``metrics.jsonl`` rows carry for the last update the checkpoint holds.
    """
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    found = []
    for d in root.iterdir():
        prefix, _, number = d.name.rpartition("-")
        marker = {"checkpoint": "trainer_state.json", "update": "COMPLETE"}.get(prefix)
        if marker and number.isdigit() and (d / marker).exists():
            found.append((int(number), d))
    return max(found, default=None)


def checkpoint_record(directory: str | os.PathLike) -> dict:
    """What :func:`stamp_checkpoint` wrote into a checkpoint (``{}`` when nothing readable)."""
    try:
        record = json.loads((Path(directory) / FINGERPRINT_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _stamp(directory: Path) -> str | None:
    fp = checkpoint_record(directory).get("fingerprint")
    return fp if isinstance(fp, str) else None


def _line_count(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def stamp_checkpoint(checkpoint: str | os.PathLike, counters: dict | None = None) -> None:
    """Write into one checkpoint under ``<stage dir>/checkpoints/``: the folder's config
    fingerprint; how many rows each step log of the stage held when it was saved (a resume
    keeps exactly those: :func:`trim_logs`); and ``counters``, running totals the trainer does
    not save itself (TRL's token count), for the resumed stage to continue from."""
    checkpoint = Path(checkpoint)
    stage_dir = checkpoint.parent.parent
    record: dict = {"log_rows": {name: _line_count(stage_dir / name) for name in LOGS_WITH_STEPS
                                 if (stage_dir / name).is_file()}}
    fp = _stamp(checkpoint.parent)
    if fp is not None:
        record["fingerprint"] = fp
    if counters:
        record["counters"] = counters
    (checkpoint / FINGERPRINT_FILE).write_text(json.dumps(record))


def prepare_checkpoints(output_dir: str | os.PathLike, fp: str, resume: bool) -> bool:
    """Make ``output_dir/checkpoints`` hold only checkpoints of config fingerprint ``fp``;
    returns whether there is one to resume from. Call it holding the directory's lock.

    With ``resume`` and a complete checkpoint, that checkpoint must carry ``fp`` (its own
    stamp, or the folder's for one killed between its files): otherwise ConfigError. Else
    (a fresh start, or nothing to resume) anything in ``checkpoints/`` moves to
    ``checkpoints.previous`` (replacing an older one) and the new folder is stamped ``fp``.
    """
    out = Path(output_dir)
    root = out / "checkpoints"
    found = newest_checkpoint(out) if resume else None
    if found is not None:
        step, d = found
        have = _stamp(d) or _stamp(root)
        if have == fp:
            return True
        why = f"fingerprint {have}" if have else "no config fingerprint (written before rlhf stamped them)"
        raise ConfigError(f"--resume: checkpoint {d} was written under another config ({why}, this config is {fp}); "
                          f"rerun with the config that wrote it, or without --resume to start afresh (the old "
                          f"checkpoints then move to {out / PREVIOUS})")
    if root.exists() and any(p.name != FINGERPRINT_FILE for p in root.iterdir()):
        previous = out / PREVIOUS
        if previous.exists():
            shutil.rmtree(previous)
        shutil.move(root, previous)  # a rename: the same filesystem
        print(f"[{out.name}] starting afresh: earlier checkpoints moved to {previous}", file=sys.stderr)
    root.mkdir(parents=True, exist_ok=True)
    write_text(root / FINGERPRINT_FILE, json.dumps({"fingerprint": fp}))
    return False


def trim_logs(output_dir: str | os.PathLike, resume: bool) -> int:
    """Drop from a stage's step logs the rows it will log again; returns rows dropped.

    A resumed stage repeats everything after its newest checkpoint: the rows past the count
    the checkpoint recorded go (those of its step logged after it was saved, such as a final
    evaluation, too), and any with a later step. A stage that starts from scratch
    (``resume`` False) drops every row with a step. Rows are rewritten atomically (temp file +
    rename); unparsable lines are kept.
    """
    found = newest_checkpoint(output_dir) if resume else None
    keep_through = found[0] if found else None
    counts = checkpoint_record(found[1]).get("log_rows", {}) if found else {}
    dropped = 0
    for name in LOGS_WITH_STEPS:
        path = Path(output_dir) / name
        if not path.is_file():
            continue
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        count = counts.get(name) if isinstance(counts, dict) else None
        kept = lines[:count] if isinstance(count, int) and 0 <= count <= len(lines) else lines
        kept = [line for line in kept if not _logged_after(line, keep_through)]
        if len(kept) < len(lines):
            dropped += len(lines) - len(kept)
            write_text(path, "".join(kept))
    return dropped


def _logged_after(line: str, keep_through: int | None) -> bool:
    """Whether a step-log row has a step past ``keep_through`` (any step when None)."""
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return False
    return isinstance(step, (int, float)) and (keep_through is None or step > keep_through)
