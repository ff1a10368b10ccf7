"""File-level helpers of the artifact store: hashing, hashed copies, temp directories.

An artifact directory is built under ``<artifacts>/.tmp/`` and hashed while it is copied;
the registry then renames it into ``<artifacts>/<kind>/<name>/<version>`` and commits the
database row. Nothing here touches the database.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import struct
import time
import uuid
from pathlib import Path

from tqdm.auto import tqdm

from rlhf.atomic import write_bytes
from rlhf.paths import current_umask, fsync_dir, pid_alive  # noqa: F401 - fsync_dir: registry.py calls store.fsync_dir

CHUNK = 1 << 20

# Formats that unpickle on load. The registry refuses to store them: artifacts are
# safetensors + JSON only, so loading an entry can never execute code.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz"})

TMP_DIRNAME = ".tmp"
TRASH_DIRNAME = ".trash"

# Test hooks. The crash-safety tests need to kill a registering process at exact points
# and to slow a copy down enough to kill it half-way; these variables are read only here.
_KILL_AT_ENV = "RLHF_REGISTRY_TEST_KILL_AT"
_COPY_DELAY_ENV = "RLHF_REGISTRY_TEST_COPY_DELAY"


def crash_point(point: str) -> None:
    """SIGKILL this process when ``$RLHF_REGISTRY_TEST_KILL_AT`` names ``point`` (tests only)."""
    if os.environ.get(_KILL_AT_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def _copy_delay() -> float:
    raw = os.environ.get(_COPY_DELAY_ENV)
    return float(raw) if raw else 0.0


def iter_files(root: Path, contained: bool = False) -> list[str]:
    """Relative POSIX paths of the regular files under ``root``, sorted.

    Hidden files and directories (``.git``, ``.cache``, in-progress ``.tmp`` names) are
    skipped: they are tool state, not model content. File symlinks are followed (a Hugging
    Face cache snapshot is made of them); directory symlinks are not, to avoid loops.

    Args:
        contained: refuse a file symlink whose target lies outside ``root`` (an adapter or
            dataset folder: the store must not take in, say, a link to ``/etc/shadow``).

    Raises:
        ValueError: with ``contained``, naming the first link that leaves ``root``.
    """
    out = []
    real_root = Path(os.path.realpath(root))
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in filenames:
            if fn.startswith("."):
                continue
            full = Path(dirpath) / fn
            if contained and full.is_symlink():
                target = Path(os.path.realpath(full))
                if not target.is_relative_to(real_root):
                    raise ValueError(f"{full}: a symlink to {target}, outside {root}; the registry stores only "
                                     "files inside the folder (copy the file in instead)")
            if full.is_file():
                out.append(full.relative_to(root).as_posix())
    return sorted(out)


def total_size(root: Path, rels: list[str]) -> int:
    return sum((root / r).stat().st_size for r in rels)


def _progress(total: int, desc: str):
    # disable=None: quiet when stderr is not a terminal (logs, CI, tests).
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=None, leave=False)


def sha256_file(path: Path, bar=None) -> tuple[str, int]:
    """Return ``(sha256 hex, size in bytes)`` of one file, reading it in 1 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
            if bar is not None:
                bar.update(len(chunk))
    return h.hexdigest(), size


def hash_tree(root: Path, desc: str = "hashing") -> dict[str, tuple[str, int]]:
    """Hash every file under ``root``: ``{relpath: (sha256, size)}``."""
    rels = iter_files(root)
    out = {}
    with _progress(total_size(root, rels), desc) as bar:
        for rel in rels:
            out[rel] = sha256_file(root / rel, bar)
    return out


def content_hash(files: dict[str, str]) -> str:
    """One sha256 over a directory's ``{relpath: sha256}``: equal iff names and bytes are equal."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\0{files[rel]}\n".encode())
    return h.hexdigest()


def copy_file_hashed(src: Path, dst: Path, bar=None) -> tuple[str, int]:
    """Copy ``src`` to ``dst`` and return the sha256 and size of the bytes written.

    Hashing what is written (rather than re-reading the source) records the hash of the
    stored copy even if the source changes during the copy.
    """
    h = hashlib.sha256()
    size = 0
    delay = _copy_delay()
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(src, "rb") as fi, open(dst, "wb") as fo:
            # never more readable than the source (a private file stays private in a shared
            # store), nor than the umask allows
            os.fchmod(fo.fileno(), stat.S_IMODE(os.fstat(fi.fileno()).st_mode) & 0o666 & ~current_umask())
            while chunk := fi.read(CHUNK):
                fo.write(chunk)
                h.update(chunk)
                size += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
                if delay:
                    time.sleep(delay)
            fo.flush()
            os.fsync(fo.fileno())
    except OSError as e:
        raise _named(e, dst) from None
    return h.hexdigest(), size


def _named(err: OSError, path: Path) -> OSError:
    """The same OSError, naming ``path`` when the failing call did not (write, fsync, close)."""
    if err.filename is not None:
        return err
    return type(err)(err.errno, err.strerror or str(err), str(path))


def copy_tree_hashed(src: Path, dst: Path, rels: list[str], desc: str = "copying") -> dict[str, tuple[str, int]]:
    """Copy the listed files from ``src`` into ``dst``; return ``{relpath: (sha256, size)}``."""
    out = {}
    with _progress(total_size(src, rels), desc) as bar:
        for rel in rels:
            out[rel] = copy_file_hashed(src / rel, dst / rel, bar)
    return out


def _json_bytes(data: dict) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def write_json_file(path: Path, data: dict) -> tuple[str, int]:
    """Write ``data`` as JSON, fsync it, and return its sha256 and size."""
    raw = _json_bytes(data)
    try:
        with open(path, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise _named(e, path) from None
    return hashlib.sha256(raw).hexdigest(), len(raw)


def read_json(path: Path) -> dict:
    """Read a JSON object, with an error that names the file on bad input."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def safetensors_header(path: Path) -> dict:
    """Tensor names, dtypes and shapes of a safetensors file, read from its JSON header.

    The format is an 8-byte little-endian header length followed by a JSON header, so this
    needs neither torch nor numpy and never touches the tensor bytes. The header must be a
    mapping of tensors whose ``data_offsets`` lie inside the file (a truncated or forged
    file is refused here, not when a stage loads it).

    Raises:
        ValueError: naming ``path`` when the file is not a well-formed safetensors file.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw_len)
        if n > 100 * CHUNK or n > size - 8:
            raise ValueError(f"{path}: not a safetensors file (header length {n} is implausible)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a safetensors file (bad header: {str(e)[:200]})") from None
        except RecursionError:
            raise ValueError(f"{path}: not a safetensors file (its header nests too deeply)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (the header is not a mapping)")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, info in header.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_size):
            raise ValueError(f"{path}: not a safetensors file (tensor {str(name)[:80]!r} has data_offsets "
                             f"{str(offsets)[:80]} outside the {data_size} data bytes)")
    return header


def make_tmp_dir(artifacts: Path) -> Path:
    """A fresh staging directory whose name tells which host and process own it."""
    tmp_root = artifacts / TMP_DIRNAME
    tmp_root.mkdir(parents=True, exist_ok=True)
    d = tmp_root / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    d.mkdir()
    return d


def stale_tmp_dirs(artifacts: Path) -> list[Path]:
    """Staging directories left by dead processes on this host (e.g. after SIGKILL)."""
    tmp_root = artifacts / TMP_DIRNAME
    if not tmp_root.is_dir():
        return []
    host = socket.gethostname()
    stale = []
    for d in tmp_root.iterdir():
        h, _, rest = d.name.rpartition("-")[0].rpartition("-")
        # name is <host>-<pid>-<uuid>; host names may themselves contain dashes
        try:
            pid = int(rest)
        except ValueError:
            continue
        if h == host and not pid_alive(pid):
            stale.append(d)
    return stale


def discard_dir(artifacts: Path, path: Path) -> None:
    """Remove a directory by first renaming it into the trash, so a half-deleted tree is
    never found at its old place."""
    if not path.exists():
        return
    try:
        trash = artifacts / TRASH_DIRNAME
        trash.mkdir(parents=True, exist_ok=True)
        target = trash / f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        os.replace(path, target)
    except OSError:
        # On a full disk even the trash directory may not be creatable. Cleanup must not
        # replace the error being handled, nor leave the directory behind: delete in place.
        target = path
    shutil.rmtree(target, ignore_errors=True)


# ---------------------------------------------------------------- the store's own metadata
#
# The artifact store keeps, beside the artifacts, one JSON record per registry entry
# (everything its database rows hold: metadata, file hashes, parents, aliases, run status)
# and one per removed version. They are rewritten inside the write transaction that
# changes the entry, so a lost or damaged database can be re-created from them
# (``rlhf registry rebuild``), and the registry can tell "this database lost its entries"
# from "this is a new registry".

RECORDS_DIRNAME = ".records"
STORE_ID_FILE = ".registry-store.json"


def record_path(artifacts: Path, name: str, version: int) -> Path:
    return artifacts / RECORDS_DIRNAME / name / f"{version}.json"


def write_record(artifacts: Path, record: dict) -> None:
    """Write ``record`` for ``record["name"]:record["version"]`` atomically (temp file + rename), fsynced."""
    path = record_path(artifacts, record["name"], record["version"])
    try:
        write_bytes(path, _json_bytes(record), fsync=True)
    except OSError as e:
        raise _named(e, path) from None


def delete_record(artifacts: Path, name: str, version: int) -> None:
    path = record_path(artifacts, name, version)
    if path.exists():
        path.unlink()


def record_files(artifacts: Path) -> list[Path]:
    """Every record file in the store, sorted (temporary files skipped)."""
    root = artifacts / RECORDS_DIRNAME
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("*/*.json") if not p.name.startswith("."))


def read_records(artifacts: Path) -> list[dict]:
    """All records of the store; a malformed one is an error naming its file."""
    out = []
    for path in record_files(artifacts):
        rec = read_json(path)
        for key in ("name", "version", "kind"):
            if key not in rec:
                raise ValueError(f"{path}: field {key!r} missing; not a registry record")
        if path.parent.name != rec["name"] or path.stem != str(rec["version"]):
            raise ValueError(f"{path}: record names {rec['name']}:{rec['version']}, which does not match its file name")
        out.append(rec)
    return out


def read_store_id(artifacts: Path) -> str | None:
    path = artifacts / STORE_ID_FILE
    if not path.exists():
        return None
    data = read_json(path)
    if not isinstance(data.get("store_id"), str):
        raise ValueError(f"{path}: field 'store_id' missing")
    return data["store_id"]


def write_store_id(artifacts: Path, store_id: str) -> None:
    artifacts.mkdir(parents=True, exist_ok=True)
    data = {"store_id": store_id, "note": "identifies this artifact store; its database holds the same id"}
    write_bytes(artifacts / STORE_ID_FILE, _json_bytes(data), fsync=True)


def stored_version_dirs(artifacts: Path, kinds: tuple[str, ...]) -> list[tuple[str, str, str, Path]]:
    """``(kind, name, version dir name, path)`` of every ``<kind>/<name>/<version>`` directory."""
    out = []
    for kind in kinds:
        kdir = artifacts / kind
        if not kdir.is_dir():
            continue
        for ndir in sorted(kdir.iterdir()):
            if ndir.is_dir():
                out.extend((kind, ndir.name, v.name, v) for v in sorted(ndir.iterdir()))
    return out
