"""The model registry: what an adapter is, what it sits on, what produced it, what came from it.

Entries are of four kinds:

- ``base``: a base model, either a hub id plus revision or a local directory plus the
  sha256 of each of its files (recorded in place, or copied into the store with ``copy=True``).
- ``adapter``: a LoRA adapter with a role (sft, reward, policy, value), stored as a copy
  of the directory the stage wrote (peft files, the score head for reward/value, and
  ``rlhf_adapter.json``).
- ``dataset``: a preference-dataset version written by ``reward_data`` (its manifest).
- ``run``: one stage run (stage, resolved config, metrics, package version, git commit,
  status, start/end, and why it did not complete).

Every entry is ``name:version``; versions are immutable and numbered per name. A name
belongs to one kind. ``name`` and ``name:latest`` mean the newest version; user aliases
(``name:prod``) point at one version and can be moved with ``tag``.

The database (SQLite or PostgreSQL, see ``db.py``) is the source of truth. The artifact
store keeps, beside the artifact directories, a JSON record of every entry and of every
removed version, rewritten inside the transaction that changes it; from those records a
lost database can be rebuilt, and an empty database next to a populated store is
recognised as lost rather than taken for a new registry.

Registration is crash safe: the artifact is copied into a staging directory and hashed,
renamed to its final place inside the write transaction, and the transaction commits
last. A process killed before the commit leaves no entry (at most an unreferenced
directory of a version number that was never handed out, which the next registration of
that version or ``gc --yes`` removes).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import socket
import subprocess
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import rlhf
from rlhf.paths import pid_alive, rlhf_home
from rlhf.registry import store
from rlhf.registry.db import SCHEMA_VERSION, TABLES, Database, DbUrl, connect, parse_url
from rlhf.registry.entry import (
    ADAPTER_CONFIG,
    ADAPTER_META,
    ADAPTER_WEIGHTS,
    DATASET_MANIFEST,
    HEAD_ROLES,
    HEAD_WEIGHTS,
    KINDS,
    ROLES,
    RUN_STATUSES,
    DependencyError,
    Entry,
    IntegrityError,
    NotFoundError,
    Problem,
    RegistryError,
    parse_ref,
    validate_alias,
    validate_name,
)

URL_ENV = "RLHF_REGISTRY_URL"
STORE_ENV = "RLHF_REGISTRY_STORE"

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
# Keys the registry itself writes into an adapter's metadata; user metadata may not shadow them.
_ADAPTER_RESERVED = ("role", "base", "peft_config", "head")
_REBUILD_HINT = "re-create it from the artifact store with `rlhf registry rebuild`"


def _ensure_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RegistryError(f"{path}: cannot create the artifact store ({e.strerror})") from None


# Filesystems on which SQLite's WAL mode (shared memory, POSIX locks) is not safe.
_NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse.sshfs", "9p", "lustre", "gpfs", "beegfs",
                        "glusterfs", "fuse.glusterfs", "ceph", "fuse.ceph", "afs")


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem holding ``path`` (from /proc/self/mounts), or None if unknown."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    target = os.path.realpath(path if path.exists() else path.parent)
    best, fstype = "", None
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ")  # /proc/mounts escapes spaces
        if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, fstype = mount, parts[2]
    return fstype


def _warn_if_network_filesystem(db_path: Path) -> None:
    fstype = filesystem_type(db_path)
    if fstype in _NETWORK_FILESYSTEMS:
        warnings.warn(
            f"{db_path}: the SQLite registry is on a {fstype} network filesystem, where SQLite's WAL mode is not "
            "safe (it needs shared memory on one host); keep the SQLite file on a local disk, or use a PostgreSQL "
            "registry (RLHF_REGISTRY_URL=postgresql://...) with the artifact store on the shared filesystem",
            RuntimeWarning,
            stacklevel=3,
        )


def _store_has_content(artifacts: Path) -> bool:
    """Whether the artifact store belongs to a registry that has (or had) entries."""
    return bool(store.record_files(artifacts)) or bool(store.stored_version_dirs(artifacts, KINDS))


def _lost_database(u: DbUrl, artifacts: Path, state: str) -> IntegrityError:
    n = sum(1 for p in store.record_files(artifacts) if "removed" not in store.read_json(p))
    return IntegrityError(
        f"{u.display}: the registry database is {state}, but the artifact store {artifacts} holds "
        f"{n} registered entr{'y' if n == 1 else 'ies'}; refusing to treat it as an empty registry. "
        f"Restore the database from a backup, check the registry URL, or {_REBUILD_HINT}"
    )


def _record_token(path: Path) -> str | None:
    try:
        return store.read_json(path).get("token")
    except (FileNotFoundError, ValueError):
        return None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _jsonable(value: Any) -> Any:
    """Fallback for json.dumps: tensors/numpy scalars become numbers, paths become strings."""
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except (ValueError, RuntimeError):
            pass
    if hasattr(value, "tolist") and callable(value.tolist):
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def _dumps(data: Any) -> str:
    return json.dumps(data, sort_keys=True, default=_jsonable)


def git_commit(cwd: str | os.PathLike | None = None) -> tuple[str | None, bool | None]:
    """``(HEAD commit, dirty)`` of the git repository containing ``cwd``; ``(None, None)`` outside one."""
    cwd = str(cwd or os.getcwd())
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None, None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, timeout=30,
        )
        dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
        return head.stdout.strip(), dirty
    except (OSError, subprocess.TimeoutExpired):
        return None, None


_ENTRY_COLS = "id, kind, name, version, role, path, stored, metadata, created"


def locate(
    home: str | os.PathLike | None = None, url: str | None = None, store_dir: str | os.PathLike | None = None
) -> tuple[DbUrl, Path]:
    """Where the registry's database and artifact store are.

    Database: ``url``, then ``$RLHF_REGISTRY_URL``, then ``<home>/registry/registry.db``.
    Artifact store: ``store_dir``, then ``$RLHF_REGISTRY_STORE``, then
    ``<home>/registry/artifacts``. The home is ``home``, then ``$RLHF_HOME``, then ``~/.rlhf``.
    """
    root = rlhf_home(home).expanduser().resolve() / "registry"
    u = parse_url(url or os.environ.get(URL_ENV) or str(root / "registry.db"))
    artifacts = Path(store_dir or os.environ.get(STORE_ENV) or root / "artifacts").expanduser().resolve()
    return u, artifacts


@dataclass(frozen=True)
class GcResult:
    """What ``gc`` found.

    Attributes:
        remove: ``(path, reason)`` of what the database positively lists as unreferenced;
            deleted unless it was a dry run.
        keep: ``(path, reason)`` of unowned things gc will not touch, and why.
        deleted: whether ``remove`` was deleted (False for a dry run).
    """

    remove: list[tuple[Path, str]]
    keep: list[tuple[Path, str]]
    deleted: bool


class Registry:
    """The registry: a database (SQLite file or PostgreSQL) plus an artifact directory.

    Open it with :meth:`Registry.open`. A ``Registry`` holds one database connection; use
    one per process (it is safe for many processes, on many machines for PostgreSQL, to
    open the same registry at once).
    """

    def __init__(self, db: Database, artifacts: Path):
        self.db = db
        self.artifacts = artifacts

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        home: str | os.PathLike | None = None,
        url: str | None = None,
        store_dir: str | os.PathLike | None = None,
    ) -> "Registry":
        """Open the registry, creating it when both database and artifact store are new.

        Opening checks the registry's integrity: the schema is present, the SQLite file
        passes ``PRAGMA quick_check``, and the database and the artifact store belong
        together (the same store id). A missing, empty or damaged database next to an
        artifact store that holds entries is an :class:`IntegrityError` with a recovery
        hint, never an empty registry.

        Args:
            home: the rlhf home; defaults to ``$RLHF_HOME``, then ``~/.rlhf``.
            url: the database: a path, ``sqlite:///path.db`` or
                ``postgresql://user@host:port/db``; defaults to ``$RLHF_REGISTRY_URL``,
                then ``<home>/registry/registry.db``.
            store_dir: the artifact store directory; defaults to ``$RLHF_REGISTRY_STORE``,
                then ``<home>/registry/artifacts``.

        Raises:
            IntegrityError: the database is lost, damaged, or belongs to another store.
            DatabaseError: the database cannot be opened or read.
        """
        u, artifacts = locate(home, url, store_dir)
        _ensure_dir(artifacts)
        if u.dialect == "sqlite":
            # Checked before connecting: sqlite3 would create the missing file, and a 0-byte
            # file opens as a valid, empty database.
            state = "missing" if not u.path.exists() else "empty (0 bytes)" if u.path.stat().st_size == 0 else None
            if state is not None and _store_has_content(artifacts):
                raise _lost_database(u, artifacts, state)
            _warn_if_network_filesystem(u.path)
        db = connect(u)
        try:
            reg = cls(db, artifacts)
            reg._check_integrity()
        except BaseException:
            db.close()
            raise
        return reg

    def _check_integrity(self) -> None:
        store_id = store.read_store_id(self.artifacts)
        tables = self.db.tables()
        if not tables:
            if store_id is not None or _store_has_content(self.artifacts):
                raise _lost_database(self.db.url, self.artifacts, "empty (it has no registry tables)")
            with self.db.write():
                if not self.db.tables():  # another process may have created it meanwhile
                    self.db.create_schema()
                    self.db.execute("INSERT INTO meta (key, value) VALUES ('store_id', ?)", (store_id or uuid.uuid4().hex,))
            self._adopt_store(store.read_store_id(self.artifacts))
            return
        problems = self.db.quick_check()
        if problems:
            raise IntegrityError(
                f"{self.db.where}: the registry database is damaged ({'; '.join(problems[:3])}); restore it from a "
                f"backup, or {_REBUILD_HINT}"
            )
        missing = set(TABLES) - tables
        if missing - {"tombstones"} or self.db.schema_version() is None:
            raise IntegrityError(
                f"{self.db.where}: the registry schema is incomplete (tables {', '.join(sorted(missing)) or 'meta rows'} "
                f"missing); restore it from a backup, or {_REBUILD_HINT}"
            )
        if self.db.schema_version() != SCHEMA_VERSION:
            with self.db.write():
                self.db.upgrade_schema()
        self._adopt_store(store_id)

    def _adopt_store(self, store_id: str | None) -> None:
        """Check that database and artifact store belong together; pair a fresh store."""
        if store_id is None:
            stored = self.db.one("SELECT COUNT(*) FROM entries WHERE stored = 1")[0]
            if stored and not store.stored_version_dirs(self.artifacts, KINDS):
                raise IntegrityError(
                    f"{self.artifacts}: this artifact store is empty, but the database {self.db.where} lists {stored} "
                    f"stored entr{'y' if stored == 1 else 'ies'}; check the store directory (--store / ${STORE_ENV})"
                )
        row = self.db.one("SELECT value FROM meta WHERE key = 'store_id'")
        if row is None:
            # A database from before store ids (schema version 1): pair it with this store
            # and give every entry its record, so that it can be rebuilt from the store.
            with self.db.write():
                if self.db.one("SELECT value FROM meta WHERE key = 'store_id'") is None:
                    self.db.execute("INSERT INTO meta (key, value) VALUES ('store_id', ?)", (store_id or uuid.uuid4().hex,))
                    self._sync_records([eid for (eid,) in self.db.all("SELECT id FROM entries")])
            row = self.db.one("SELECT value FROM meta WHERE key = 'store_id'")
        if store_id is None:
            store.write_store_id(self.artifacts, row[0])
        elif store_id != row[0]:
            raise IntegrityError(
                f"{self.db.where} and the artifact store {self.artifacts} belong to different registries "
                f"(store id {row[0]} in the database, {store_id} in {self.artifacts / store.STORE_ID_FILE}); "
                f"check the registry URL and the store directory"
            )

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ reading

    def _row_by_ref(self, ref: str) -> tuple:
        name, sel = parse_ref(ref)
        if isinstance(sel, int):
            row = self.db.one(f"SELECT {_ENTRY_COLS} FROM entries WHERE name = ? AND version = ?", (name, sel))
        elif sel is None:
            row = self.db.one(
                f"SELECT {_ENTRY_COLS} FROM entries WHERE name = ? ORDER BY version DESC LIMIT 1", (name,)
            )
        else:
            row = self.db.one(
                f"SELECT {', '.join('e.' + c.strip() for c in _ENTRY_COLS.split(','))} "
                "FROM aliases a JOIN entries e ON e.id = a.entry_id WHERE a.name = ? AND a.alias = ?",
                (name, sel),
            )
        if row is None:
            known = self.db.one("SELECT kind FROM names WHERE name = ?", (name,))
            if known is None:
                raise NotFoundError(f"no registry entry named {name!r}")
            raise NotFoundError(f"registry reference {ref!r} not found ({name!r} exists, but not that version/alias)")
        return row

    def _entry(self, row: tuple) -> Entry:
        eid, kind, name, version, role, path, stored, metadata, created = row
        meta = json.loads(metadata)
        if kind == "run":
            run = self.db.one(
                "SELECT stage, status, config, metrics, package_version, git_commit, pipeline, started, ended, reason "
                "FROM runs WHERE entry_id = ?",
                (eid,),
            )
            if run is not None:
                stage, status, config, metrics, pkg, commit, pipeline, started, ended, reason = run
                meta.update(
                    stage=stage, status=status, config=json.loads(config), metrics=json.loads(metrics),
                    package_version=pkg, git_commit=commit, pipeline=pipeline, started=started, ended=ended,
                    reason=reason,
                )
        files = dict(self.db.all("SELECT relpath, sha256 FROM files WHERE entry_id = ? ORDER BY relpath", (eid,)))
        relations: dict[str, list[str]] = {}
        for pname, pversion, relation in self.db.all(
            "SELECT p.name, p.version, e.relation FROM edges e JOIN entries p ON p.id = e.parent_id "
            "WHERE e.child_id = ? ORDER BY e.relation, p.name, p.version",
            (eid,),
        ):
            relations.setdefault(f"{pname}:{pversion}", []).append(relation)
        aliases = [a for (a,) in self.db.all("SELECT alias FROM aliases WHERE entry_id = ? ORDER BY alias", (eid,))]
        if path is None:
            full = None
        elif stored:
            full = self.artifacts / path
        else:
            full = Path(path)
        return Entry(
            kind=kind, name=name, version=version, ref=f"{name}:{version}", path=full, metadata=meta,
            files=files, created=created, parents=list(relations), role=role, aliases=aliases,
            relations=relations, id=eid,
        )

    def resolve(self, ref: str) -> Entry:
        """The entry a reference names: ``name`` / ``name:latest`` (newest), ``name:3``, ``name:alias``.

        Raises:
            NotFoundError: when nothing matches.
            ValueError: when ``ref`` is malformed.
        """
        return self._entry(self._row_by_ref(ref))

    def list(self, kind: str | None = None) -> list[Entry]:
        """All entries (of one kind if given), ordered by name then version."""
        if kind is not None and kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
        if kind is None:
            rows = self.db.all(f"SELECT {_ENTRY_COLS} FROM entries ORDER BY name, version")
        else:
            rows = self.db.all(f"SELECT {_ENTRY_COLS} FROM entries WHERE kind = ? ORDER BY name, version", (kind,))
        return [self._entry(r) for r in rows]

    # ------------------------------------------------------------------ writing (shared)

    def _commit(
        self,
        *,
        kind: str,
        name: str,
        role: str | None = None,
        staged: Path | None = None,
        external: str | None = None,
        metadata: dict,
        files: dict[str, tuple[str, int]],
        parents: Iterable[tuple[str, str]] = (),
        run: dict | None = None,
    ) -> Entry:
        """Allocate the next version of ``name`` and commit one entry, all under the write lock.

        Args:
            staged: a fully written and hashed staging directory to move into the store.
            external: an absolute path recorded in place of a stored directory.
            parents: ``(pinned ref, relation)`` pairs; each must still exist at commit time.
            run: the ``runs`` row of a run entry.
        """
        final: Path | None = None
        record: tuple[str, int] | None = None
        try:
            with self.db.write():
                row = self.db.one("SELECT kind, next_version FROM names WHERE name = ?", (name,))
                if row is not None and row[0] != kind:
                    raise RegistryError(
                        f"name {name!r} already belongs to a {row[0]} entry; pick another name for this {kind}"
                    )
                version = row[1] if row is not None else 1
                if row is None:
                    self.db.execute("INSERT INTO names (name, kind, next_version) VALUES (?, ?, ?)", (name, kind, 2))
                else:
                    self.db.execute("UPDATE names SET next_version = ? WHERE name = ?", (version + 1, name))
                # Parents are looked up under the write lock, so none can vanish before the commit.
                parent_ids = [(self._row_by_ref(pref)[0], relation) for pref, relation in parents]
                stored_path = None
                if staged is not None:
                    stored_path = f"{kind}/{name}/{version}"
                    final = self.artifacts / stored_path
                    if final.exists():
                        # Only a registration that died between its rename and its commit leaves
                        # a directory here: version numbers are handed out by committed
                        # transactions, and we hold the write lock.
                        store.discard_dir(self.artifacts, final)
                    final.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(staged, final)
                    store.fsync_dir(final.parent)
                    store.crash_point("renamed")
                eid = self.db.one(
                    "INSERT INTO entries (kind, name, version, role, path, stored, metadata, created) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                    (kind, name, version, role, stored_path or external, 1 if stored_path else 0,
                     _dumps(metadata), _now()),
                )[0]
                for relpath, (sha, size) in sorted(files.items()):
                    self.db.execute(
                        "INSERT INTO files (entry_id, relpath, sha256, size) VALUES (?, ?, ?, ?)",
                        (eid, relpath, sha, size),
                    )
                for pid, relation in parent_ids:
                    self.db.execute(
                        "INSERT INTO edges (child_id, parent_id, relation) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                        (eid, pid, relation),
                    )
                if run is not None:
                    self.db.execute(
                        "INSERT INTO runs (entry_id, stage, status, config, metrics, package_version, git_commit, "
                        "pipeline, started, ended) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (eid, run["stage"], run["status"], _dumps(run["config"]), _dumps({}),
                         run["package_version"], run["git_commit"], run["pipeline"], run["started"], None),
                    )
                # The store's record of the entry is written last, still inside the
                # transaction: a record without a committed entry (a writer killed right
                # here) has a version the counter never handed out, which gc recognises.
                record = (name, version)
                self._sync_records([eid])
                store.crash_point("inserted")
        except BaseException:
            # The transaction rolled back: leave neither the staged nor the moved directory
            # nor the record behind.
            for d in (staged, final):
                if d is not None and d.exists():
                    store.discard_dir(self.artifacts, d)
            if record is not None:
                store.delete_record(self.artifacts, *record)
            raise
        store.crash_point("committed")
        return self.resolve(f"{name}:{version}")

    def _stage_copy(self, src: Path, rels: list[str], desc: str) -> tuple[Path, dict[str, tuple[str, int]]]:
        tmp = store.make_tmp_dir(self.artifacts)
        try:
            files = store.copy_tree_hashed(src, tmp, rels, desc)
            store.crash_point("copied")
        except BaseException:
            store.discard_dir(self.artifacts, tmp)
            raise
        return tmp, files

    @staticmethod
    def _refuse_pickles(root: Path, rels: list[str]) -> None:
        bad = [r for r in rels if Path(r).suffix.lower() in store.PICKLE_SUFFIXES]
        if bad:
            raise ValueError(
                f"{root}: refusing to register pickle-format files {bad}; the registry stores "
                "safetensors and JSON only (save weights with safetensors and leave trainer state out)"
            )

    # ------------------------------------------------------------------ bases

    def register_base(self, name: str, source: str, revision: str | None = None, copy: bool = False) -> Entry:
        """Register a base model.

        Args:
            name: registry name (e.g. ``"qwen2.5-0.5b"``).
            source: a local model directory or a Hugging Face hub id.
            revision: hub revision (branch, tag or commit). When omitted and the hub is
                reachable, the current commit of ``main`` is looked up and pinned.
            copy: copy a local directory into the artifact store instead of recording its
                path and file hashes (multi-GB weights are not copied by default).

        Returns:
            The new entry, or the existing version of ``name`` with the same content (same
            local file hashes, or same hub id and revision), so re-running a pipeline does not
            pile up identical bases.
        """
        validate_name(name)
        src = Path(str(source)).expanduser()
        if src.is_dir():
            if revision is not None:
                raise ValueError(f"register_base({name!r}): revision applies to hub ids, not to the local directory {src}")
            src = src.resolve()
            rels = store.iter_files(src)
            self._refuse_pickles(src, rels)
            if "config.json" not in rels:
                raise ValueError(f"{src}: not a model directory (no config.json)")
            if not any(r.endswith(".safetensors") for r in rels):
                raise ValueError(f"{src}: no *.safetensors weights; the registry only loads safetensors")
            if copy:
                staged, files = self._stage_copy(src, rels, f"copying {name}")
            else:
                staged, files = None, store.hash_tree(src, f"hashing {name}")
            chash = store.content_hash({k: v[0] for k, v in files.items()})
            meta = {"source": "local", "local_path": str(src), "content_hash": chash, "copied": bool(copy)}
            gguf_source = src / "gguf_source.json"  # a folder converted from a GGUF file (rlhf.gguf)
            if gguf_source.is_file():
                meta["gguf"] = json.loads(gguf_source.read_text())
            for e in reversed(self._versions(name, "base")):
                if e.metadata.get("content_hash") == chash and e.metadata.get("copied") == bool(copy):
                    if staged is not None:
                        store.discard_dir(self.artifacts, staged)
                    return e
            return self._commit(kind="base", name=name, staged=staged, external=None if copy else str(src),
                                metadata=meta, files=files)
        if not _HUB_ID_RE.fullmatch(str(source)):
            raise ValueError(f"register_base({name!r}): source {source!r} is neither an existing directory nor a hub id")
        if copy:
            raise ValueError(f"register_base({name!r}): copy=True needs a local directory; download {source!r} first")
        resolved = _resolve_hub_revision(str(source), revision)
        meta = {"source": "hub", "hub_id": str(source), "revision": resolved or revision,
                "requested_revision": revision, "pinned": resolved is not None}
        for e in reversed(self._versions(name, "base")):
            if e.metadata.get("hub_id") == meta["hub_id"] and e.metadata.get("revision") == meta["revision"]:
                return e
        return self._commit(kind="base", name=name, metadata=meta, files={})

    def _versions(self, name: str, kind: str) -> list[Entry]:
        rows = self.db.all(f"SELECT {_ENTRY_COLS} FROM entries WHERE name = ? ORDER BY version", (name,))
        entries = [self._entry(r) for r in rows]
        if entries and entries[0].kind != kind:
            raise RegistryError(f"name {name!r} already belongs to a {entries[0].kind} entry; pick another name for this {kind}")
        return entries

    # ------------------------------------------------------------------ adapters

    def register_adapter(
        self,
        name: str,
        role: str,
        src_dir: str | os.PathLike,
        *,
        base: str,
        parents: Iterable[str] = (),
        run: str | None = None,
        metadata: dict | None = None,
    ) -> Entry:
        """Copy a LoRA adapter directory into the store as the next version of ``name``.

        ``src_dir`` must hold ``adapter_config.json`` and ``adapter_model.safetensors`` (as
        ``PeftModel.save_pretrained`` writes them); reward/value adapters also
        ``head.safetensors`` with the score head ``weight`` of shape (1, hidden) and
        optionally ``bias`` of shape (1,). An ``rlhf_adapter.json`` in ``src_dir`` is kept
        and must agree with ``role``/``base``; the stored copy's ``rlhf_adapter.json`` gets
        the pinned base reference.

        Args:
            name: registry name of the adapter.
            role: ``sft``, ``reward``, ``policy`` or ``value``.
            src_dir: the directory the stage wrote.
            base: reference of the base model entry (pinned to its version on registration).
            parents: references of adapters/datasets this one was derived from (e.g. the SFT
                adapter a policy starts from, the dataset a reward model was trained on).
            run: reference of the run that produced it.
            metadata: extra JSON-serialisable facts (must not use the keys role, base,
                peft_config, head).
        """
        validate_name(name)
        if role not in ROLES:
            raise ValueError(f"register_adapter({name!r}): role must be one of {', '.join(ROLES)}, got {role!r}")
        src = Path(src_dir).expanduser().resolve()
        if not src.is_dir():
            raise FileNotFoundError(f"register_adapter({name!r}): {src} is not a directory")
        metadata = dict(metadata or {})
        clash = [k for k in _ADAPTER_RESERVED if k in metadata]
        if clash:
            raise ValueError(f"register_adapter({name!r}): metadata keys {clash} are reserved for the registry")

        rels = store.iter_files(src, contained=True)  # never a link out of the stage's folder
        self._refuse_pickles(src, rels)
        for required in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) + ((HEAD_WEIGHTS,) if role in HEAD_ROLES else ()):
            if required not in rels:
                raise FileNotFoundError(f"{src / required}: missing; a {role} adapter directory needs it")
        peft_config = store.read_json(src / ADAPTER_CONFIG)
        if "peft_type" not in peft_config:
            raise ValueError(f"{src / ADAPTER_CONFIG}: field 'peft_type' missing; not a peft adapter config")
        store.safetensors_header(src / ADAPTER_WEIGHTS)  # fails early on a corrupt file

        base_entry = self.resolve(base)
        if base_entry.kind != "base":
            raise ValueError(f"register_adapter({name!r}): base {base!r} is a {base_entry.kind}, not a base model")
        head = None
        if HEAD_WEIGHTS in rels:
            head = self._check_head(src / HEAD_WEIGHTS, base_entry)

        own = store.read_json(src / ADAPTER_META) if ADAPTER_META in rels else {}
        if own.get("role", role) != role:
            raise ValueError(f"{src / ADAPTER_META}: field 'role' is {own['role']!r} but register_adapter got role={role!r}")
        if "base" in own and own["base"] != base:
            try:
                same = self.resolve(own["base"]).id == base_entry.id
            except (RegistryError, ValueError):
                same = False
            if not same:
                raise ValueError(f"{src / ADAPTER_META}: field 'base' is {own['base']!r} but register_adapter got base={base!r}")

        parent_refs = [(base_entry.ref, "base")]
        for p in parents:
            parent_refs.append((self.resolve(p).ref, "parent"))
        if run is not None:
            run_entry = self.resolve(run)
            if run_entry.kind != "run":
                raise ValueError(f"register_adapter({name!r}): run {run!r} is a {run_entry.kind}, not a run")
            parent_refs.append((run_entry.ref, "run"))

        staged, files = self._stage_copy(src, [r for r in rels if r != ADAPTER_META], f"copying {name}")
        try:
            own.update(role=role, base=base_entry.ref)
            files[ADAPTER_META] = store.write_json_file(staged / ADAPTER_META, own)
        except BaseException:
            store.discard_dir(self.artifacts, staged)
            raise
        meta = {"role": role, "base": base_entry.ref, "peft_config": peft_config, "head": head, **metadata}
        return self._commit(kind="adapter", name=name, role=role, staged=staged, metadata=meta,
                            files=files, parents=parent_refs)

    @staticmethod
    def _check_head(path: Path, base_entry: Entry) -> dict:
        header = store.safetensors_header(path)
        if "weight" not in header:
            raise ValueError(f"{path}: tensor 'weight' missing (the score head needs weight of shape (1, hidden))")
        shape = list(header["weight"]["shape"])
        if len(shape) != 2 or shape[0] != 1:
            raise ValueError(f"{path}: tensor 'weight' has shape {shape}, expected (1, hidden)")
        if "bias" in header and list(header["bias"]["shape"]) != [1]:
            raise ValueError(f"{path}: tensor 'bias' has shape {header['bias']['shape']}, expected (1,)")
        extra = sorted(set(header) - {"weight", "bias"})
        if extra:
            raise ValueError(f"{path}: unexpected tensors {extra}; a score head holds only 'weight' and 'bias'")
        if base_entry.path is not None and (base_entry.path / "config.json").is_file():
            cfg = store.read_json(base_entry.path / "config.json")
            hidden = cfg.get("hidden_size") or cfg.get("text_config", {}).get("hidden_size")
            if hidden is not None and shape[1] != hidden:
                raise ValueError(
                    f"{path}: tensor 'weight' has shape {shape} but base {base_entry.ref} has hidden_size {hidden}"
                )
        return {"shape": shape, "bias": "bias" in header, "dtype": header["weight"]["dtype"]}

    # ------------------------------------------------------------------ datasets

    def register_dataset(self, name: str, version_dir: str | os.PathLike, copy: bool = False) -> Entry:
        """Register a preference-dataset version written by ``reward_data``.

        Reads ``<version_dir>/manifest.json`` (keys: sources, format, options, counts,
        schema_version, created, content_hash) and records the directory's file hashes.
        The directory is recorded in place unless ``copy`` is set. Registering the same
        content hash under the same name again returns the existing version.
        """
        validate_name(name)
        src = Path(version_dir).expanduser().resolve()
        manifest_path = src / DATASET_MANIFEST
        manifest = store.read_json(manifest_path)
        for key in ("content_hash", "counts", "schema_version", "sources"):
            if key not in manifest:
                raise ValueError(f"{manifest_path}: field {key!r} missing; not a reward_data dataset manifest")
        rels = store.iter_files(src, contained=True)
        self._refuse_pickles(src, rels)
        meta = {"local_path": str(src), "copied": bool(copy), "content_hash": manifest["content_hash"],
                "manifest": manifest}
        for e in reversed(self._versions(name, "dataset")):
            if e.metadata.get("content_hash") == manifest["content_hash"] and e.metadata.get("copied") == bool(copy):
                return e
        if copy:
            staged, files = self._stage_copy(src, rels, f"copying {name}")
            return self._commit(kind="dataset", name=name, staged=staged, metadata=meta, files=files)
        files = store.hash_tree(src, f"hashing {name}")
        return self._commit(kind="dataset", name=name, external=str(src), metadata=meta, files=files)

    # ------------------------------------------------------------------ runs

    def start_run(self, stage: str, config: dict, inputs: Iterable[str], pipeline: str | None = None,
                  name: str | None = None) -> str:
        """Record the start of a stage run; returns its reference (``NAME:N``, by default
        ``run-<stage>:N``; a pipeline passes e.g. ``tiny-sft-run``).

        Inputs are pinned to their versions now, so the run's lineage does not drift when
        ``name:latest`` moves later.
        """
        validate_name(stage, "stage")
        pinned = [(self.resolve(r).ref, "input") for r in inputs]
        commit, dirty = git_commit()
        run = {
            "stage": stage, "status": "running", "config": config, "package_version": rlhf.__version__,
            "git_commit": commit, "pipeline": pipeline, "started": _now(),
        }
        meta = {"host": socket.gethostname(), "pid": os.getpid(), "git_dirty": dirty}
        if name is not None:
            validate_name(name, "run name")
        return self._commit(kind="run", name=name or f"run-{stage}", metadata=meta, files={}, parents=pinned, run=run).ref

    def finish_run(
        self, run_ref: str, status: str, metrics: dict, outputs: Iterable[str] = (), reason: str | None = None
    ) -> None:
        """End a running run: store its status, metrics and (optional) reason; link its outputs.

        Args:
            run_ref: the reference :meth:`start_run` returned.
            status: ``completed``, ``failed``, ``killed`` or ``interrupted``.
            metrics: final numbers (JSON-serialisable).
            outputs: references of the entries the run produced.
            reason: why a run did not complete (an exception's message, a signal).

        Raises:
            RegistryError: when the run is not running any more.
        """
        if status not in RUN_STATUSES:
            raise ValueError(f"finish_run({run_ref!r}): status must be one of {', '.join(RUN_STATUSES)}, got {status!r}")
        outputs = list(outputs)
        with self.db.write():
            row = self._row_by_ref(run_ref)
            if row[1] != "run":
                raise ValueError(f"finish_run: {run_ref!r} is a {row[1]}, not a run")
            current = self.db.one("SELECT status FROM runs WHERE entry_id = ?", (row[0],))[0]
            if current != "running":
                raise RegistryError(f"finish_run: run {row[2]}:{row[3]} is already {current}")
            self.db.execute(
                "UPDATE runs SET status = ?, metrics = ?, ended = ?, reason = ? WHERE entry_id = ?",
                (status, _dumps(metrics), _now(), reason, row[0]),
            )
            out_ids = []
            for out in outputs:
                oid = self._row_by_ref(out)[0]
                if oid == row[0]:
                    raise ValueError(f"finish_run: a run cannot be its own output ({out!r})")
                self.db.execute(
                    "INSERT INTO edges (child_id, parent_id, relation) VALUES (?, ?, 'run') ON CONFLICT DO NOTHING",
                    (oid, row[0]),
                )
                out_ids.append(oid)
            self._sync_records([row[0], *out_ids])

    def mark_run(self, run_ref: str, status: str, reason: str) -> None:
        """Mark a running run ``failed``, ``killed`` or ``interrupted``, keeping its metrics.

        The pipeline calls this when a stage raises (failed), on Ctrl-C (interrupted), and
        for runs found running whose process is gone (killed; see :meth:`reap_runs`).
        """
        if status not in ("failed", "killed", "interrupted"):
            raise ValueError(f"mark_run({run_ref!r}): status must be failed, killed or interrupted, got {status!r}")
        with self.db.write():
            row = self._row_by_ref(run_ref)
            if row[1] != "run":
                raise ValueError(f"mark_run: {run_ref!r} is a {row[1]}, not a run")
            current = self.db.one("SELECT status FROM runs WHERE entry_id = ?", (row[0],))[0]
            if current != "running":
                raise RegistryError(f"mark_run: run {row[2]}:{row[3]} is already {current}")
            self.db.execute(
                "UPDATE runs SET status = ?, ended = ?, reason = ? WHERE entry_id = ?",
                (status, _now(), reason, row[0]),
            )
            self._sync_records([row[0]])

    def reap_runs(self) -> list[str]:
        """Mark ``killed`` every run still ``running`` whose process on this host is gone.

        A run records its host and process id when it starts; a SIGKILLed or crashed stage
        never finishes it. Runs of other hosts are left alone (their processes cannot be
        checked from here). Returns the refs marked.
        """
        host = socket.gethostname()
        marked = []
        rows = self.db.all(
            "SELECT e.name, e.version, e.metadata FROM entries e JOIN runs r ON r.entry_id = e.id "
            "WHERE r.status = 'running' ORDER BY e.name, e.version"
        )
        for name, version, metadata in rows:
            meta = json.loads(metadata)
            pid = meta.get("pid")
            if meta.get("host") != host or not isinstance(pid, int) or pid == os.getpid() or pid_alive(pid):
                continue
            try:
                self.mark_run(f"{name}:{version}", "killed", f"process {pid} on {host} ended without finishing the run")
            except RegistryError:
                continue  # finished or marked by someone else meanwhile
            marked.append(f"{name}:{version}")
        return marked

    # ------------------------------------------------------------------ aliases

    def tag(self, ref: str, alias: str) -> Entry:
        """Point ``name:alias`` at the version ``ref`` names (moving it if it existed)."""
        validate_alias(alias)
        with self.db.write():
            row = self._row_by_ref(ref)
            old = self.db.one("SELECT entry_id FROM aliases WHERE name = ? AND alias = ?", (row[2], alias))
            self.db.execute(
                "INSERT INTO aliases (name, alias, entry_id, updated) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (name, alias) DO UPDATE SET entry_id = excluded.entry_id, updated = excluded.updated",
                (row[2], alias, row[0], _now()),
            )
            self._sync_records([row[0]] + ([old[0]] if old is not None and old[0] != row[0] else []))
        return self.resolve(f"{row[2]}:{row[3]}")

    def untag(self, name: str, alias: str) -> None:
        """Remove the alias ``name:alias``."""
        validate_name(name)
        validate_alias(alias)
        with self.db.write():
            old = self.db.one("SELECT entry_id FROM aliases WHERE name = ? AND alias = ?", (name, alias))
            if old is None:
                raise NotFoundError(f"no alias {name}:{alias}")
            self.db.execute("DELETE FROM aliases WHERE name = ? AND alias = ?", (name, alias))
            self._sync_records([old[0]])

    # ------------------------------------------------------------------ the store's records

    def _record(self, eid: int) -> dict:
        """Everything the database holds about one entry, as the JSON record the store keeps."""
        _, kind, name, version, role, path, stored, metadata, created = self.db.one(
            f"SELECT {_ENTRY_COLS} FROM entries WHERE id = ?", (eid,))
        run = self.db.one(
            "SELECT stage, status, config, metrics, package_version, git_commit, pipeline, started, ended, reason "
            "FROM runs WHERE entry_id = ?", (eid,))
        if run is not None:
            keys = ("stage", "status", "config", "metrics", "package_version", "git_commit", "pipeline", "started",
                    "ended", "reason")
            run = dict(zip(keys, run))
            run["config"], run["metrics"] = json.loads(run["config"]), json.loads(run["metrics"])
        return {
            "kind": kind, "name": name, "version": version, "role": role, "path": path, "stored": bool(stored),
            "metadata": json.loads(metadata), "created": created,
            "files": [list(r) for r in self.db.all(
                "SELECT relpath, sha256, size FROM files WHERE entry_id = ? ORDER BY relpath", (eid,))],
            "parents": [[f"{n}:{v}", rel] for n, v, rel in self.db.all(
                "SELECT p.name, p.version, e.relation FROM edges e JOIN entries p ON p.id = e.parent_id "
                "WHERE e.child_id = ? ORDER BY p.name, p.version, e.relation", (eid,))],
            "aliases": [list(r) for r in self.db.all(
                "SELECT alias, updated FROM aliases WHERE entry_id = ? ORDER BY alias", (eid,))],
            "run": run,
        }

    def _sync_records(self, eids: Iterable[int]) -> None:
        """Rewrite the store's records of these entries from the database (inside a write).

        Each write carries a fresh token that the same transaction stores in the entry's
        row. A writer killed after writing a record but before its commit leaves a record
        whose token the database does not hold: a stale record of a change that never
        happened, which ``verify`` tells apart from a damaged one and ``gc`` rewrites.
        """
        for eid in dict.fromkeys(eids):
            token = uuid.uuid4().hex
            self.db.execute("UPDATE entries SET record_token = ? WHERE id = ?", (token, eid))
            try:
                store.write_record(self.artifacts, {**self._record(eid), "token": token})
            except OSError as e:
                raise RegistryError(
                    f"{e.filename or self.artifacts / store.RECORDS_DIRNAME}: cannot write the entry's record "
                    f"({e.strerror}); nothing was committed"
                ) from None

    def dump(self) -> dict:
        """The whole registry as JSON data: what ``migrate`` copies and then compares.

        Returns:
            ``{"store_id", "names": [[name, kind, next_version]], "entries": [record...],
            "tombstones": [record...]}``, each list sorted.
        """
        return {
            "store_id": self.db.one("SELECT value FROM meta WHERE key = 'store_id'")[0],
            "names": [list(r) for r in self.db.all("SELECT name, kind, next_version FROM names ORDER BY name")],
            "entries": [self._record(eid) for (eid,) in self.db.all("SELECT id FROM entries ORDER BY name, version")],
            "tombstones": [
                {"kind": k, "name": n, "version": v, "path": p, "stored": bool(st), "removed": r}
                for n, v, k, p, st, r in self.db.all(
                    "SELECT name, version, kind, path, stored, removed FROM tombstones ORDER BY name, version")
            ],
        }

    def _load(self, data: dict) -> None:
        """Insert a :meth:`dump` (or records read from a store) into this empty registry."""
        db = self.db
        db.execute("DELETE FROM meta WHERE key = 'store_id'")
        db.execute("INSERT INTO meta (key, value) VALUES ('store_id', ?)", (data["store_id"],))
        for name, kind, next_version in data["names"]:
            db.execute("INSERT INTO names (name, kind, next_version) VALUES (?, ?, ?)", (name, kind, next_version))
        ids = {}
        for rec in data["entries"]:
            eid = db.one(
                "INSERT INTO entries (kind, name, version, role, path, stored, metadata, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (rec["kind"], rec["name"], rec["version"], rec["role"], rec["path"], 1 if rec["stored"] else 0,
                 _dumps(rec["metadata"]), rec["created"]),
            )[0]
            ids[f"{rec['name']}:{rec['version']}"] = eid
            for relpath, sha, size in rec["files"]:
                db.execute("INSERT INTO files (entry_id, relpath, sha256, size) VALUES (?, ?, ?, ?)",
                           (eid, relpath, sha, size))
            run = rec.get("run")
            if run is not None:
                db.execute(
                    "INSERT INTO runs (entry_id, stage, status, config, metrics, package_version, git_commit, "
                    "pipeline, started, ended, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (eid, run["stage"], run["status"], _dumps(run["config"]), _dumps(run["metrics"]),
                     run["package_version"], run["git_commit"], run["pipeline"], run["started"], run["ended"],
                     run.get("reason")),
                )
        for rec in data["entries"]:
            child = ids[f"{rec['name']}:{rec['version']}"]
            for pref, relation in rec["parents"]:
                if pref not in ids:
                    raise IntegrityError(
                        f"{rec['name']}:{rec['version']} depends on {pref} ({relation}), which is not in the "
                        "registry being loaded"
                    )
                db.execute("INSERT INTO edges (child_id, parent_id, relation) VALUES (?, ?, ?)",
                           (child, ids[pref], relation))
            for alias, updated in rec["aliases"]:
                db.execute("INSERT INTO aliases (name, alias, entry_id, updated) VALUES (?, ?, ?, ?)",
                           (rec["name"], alias, child, updated))
        for t in data["tombstones"]:
            db.execute(
                "INSERT INTO tombstones (name, version, kind, path, stored, removed) VALUES (?, ?, ?, ?, ?, ?)",
                (t["name"], t["version"], t["kind"], t["path"], 1 if t["stored"] else 0, t["removed"]),
            )
        # The records now belong to this database (fresh tokens).
        self._sync_records(ids.values())

    # ------------------------------------------------------------------ lineage

    def _node(self, eid: int) -> dict:
        e = self._entry(self.db.one(f"SELECT {_ENTRY_COLS} FROM entries WHERE id = ?", (eid,)))
        node = {"ref": e.ref, "kind": e.kind}
        if e.role:
            node["role"] = e.role
        m = e.metadata
        if e.kind == "base":
            node["source"] = m.get("hub_id") or m.get("local_path")
            node["revision"] = m.get("revision") if m.get("source") == "hub" else m.get("content_hash")
        elif e.kind == "dataset":
            node["content_hash"] = m.get("content_hash")
        elif e.kind == "run":
            node["stage"] = m.get("stage")
            node["status"] = m.get("status")
        return node

    def _walk(self, eid: int, up: bool, seen: frozenset) -> list[dict]:
        if up:
            q = "SELECT parent_id, relation FROM edges WHERE child_id = ? ORDER BY relation, parent_id"
        else:
            q = "SELECT child_id, relation FROM edges WHERE parent_id = ? ORDER BY relation, child_id"
        key = "ancestors" if up else "descendants"
        out = []
        for other, relation in self.db.all(q, (eid,)):
            node = {"relation": relation, **self._node(other)}
            # Guard against cycles (e.g. a run listing one of its inputs as an output).
            node[key] = [] if other in seen else self._walk(other, up, seen | {other})
            out.append(node)
        return out

    def lineage(self, ref: str) -> dict:
        """The entry with its ancestors (down to base models and datasets) and descendants.

        Returns:
            ``{"ref", "kind", ..., "ancestors": [node...], "descendants": [node...]}`` where
            each node is ``{"relation", "ref", "kind", ...}`` with its own ``ancestors`` (or
            ``descendants``) list. ``relation`` says how the child depends on the parent:
            ``base``, ``parent``, ``run`` (produced by) or ``input`` (a run's input).
        """
        eid = self._row_by_ref(ref)[0]
        root = self._node(eid)
        root["ancestors"] = self._walk(eid, True, frozenset({eid}))
        root["descendants"] = self._walk(eid, False, frozenset({eid}))
        return root

    # ------------------------------------------------------------------ verify / remove / gc

    def verify(self, ref: str | None = None) -> list[Problem]:
        """Re-hash the files of one entry (or of all) and report every difference.

        Checking all entries also compares the database with the store's records: an entry
        without a record could not be rebuilt, and a record of a committed version that
        the database lacks means the database is older than the store (a restored backup).

        Returns:
            Problems: files missing, modified (sha256 differs), or present but unrecorded;
            records missing, differing or without an entry; an empty list when all agree.
        """
        entries = [self.resolve(ref)] if ref is not None else self.list()
        problems: list[Problem] = []
        for e in entries:
            problems.extend(self._verify_record(e))
            if e.path is None:
                continue  # hub bases and runs have no files of their own
            if not e.path.is_dir():
                problems.append(Problem(e.ref, "missing-dir", str(e.path), "the entry's directory is gone"))
                continue
            present = set(store.iter_files(e.path))
            recorded = e.files
            if e.path.resolve().is_relative_to(self.artifacts.resolve()):  # a stored copy holds files, never links
                for rel in sorted(r for r in present if (e.path / r).is_symlink()):
                    problems.append(Problem(e.ref, "symlink", str(e.path / rel),
                                            f"a stored file was replaced by a symlink to {os.path.realpath(e.path / rel)}"))
                    present.discard(rel)
                    recorded = {k: v for k, v in recorded.items() if k != rel}
            total = sum((e.path / r).stat().st_size for r in present & set(recorded))
            with store._progress(total, f"verifying {e.ref}") as bar:
                for rel, sha in sorted(recorded.items()):
                    if rel not in present:
                        problems.append(Problem(e.ref, "missing", str(e.path / rel), "recorded file is gone"))
                        continue
                    actual, _ = store.sha256_file(e.path / rel, bar)
                    if actual != sha:
                        problems.append(Problem(e.ref, "modified", str(e.path / rel),
                                                f"sha256 {actual[:12]}... != recorded {sha[:12]}..."))
            for rel in sorted(present - set(recorded)):
                problems.append(Problem(e.ref, "unexpected", str(e.path / rel), "file was not part of the entry"))
        if ref is None:
            problems.extend(self._verify_orphan_records())
        return problems

    def _verify_record(self, e: Entry) -> list[Problem]:
        path = store.record_path(self.artifacts, e.name, e.version)
        if not path.is_file():
            return [Problem(e.ref, "no-record", str(path), "the artifact store has no record of this entry")]
        try:
            rec = store.read_json(path)
        except ValueError as err:
            return [Problem(e.ref, "bad-record", str(path), str(err))]
        token = self.db.one("SELECT record_token FROM entries WHERE id = ?", (e.id,))[0]
        if rec.pop("token", None) != token:
            return []  # written by a writer that died before its commit; gc rewrites it
        if rec != json.loads(_dumps(self._record(e.id))):
            return [Problem(e.ref, "record-differs", str(path), "the store's record disagrees with the database")]
        return []

    def _verify_orphan_records(self) -> list[Problem]:
        live = {(n, v) for n, v in self.db.all("SELECT name, version FROM entries")}
        gone = {(n, v) for n, v in self.db.all("SELECT name, version FROM tombstones")}
        counters = {n: nv for n, nv in self.db.all("SELECT name, next_version FROM names")}
        problems = []
        for path in store.record_files(self.artifacts):
            name, version = path.parent.name, int(path.stem) if path.stem.isdigit() else 0
            if (name, version) in live or (name, version) in gone:
                continue
            # A version the counter never handed out is a registration that died before
            # its commit, not a lost entry.
            if version >= counters.get(name, 1):
                continue
            problems.append(Problem(f"{name}:{version}", "not-in-database", str(path),
                                    "the store records this committed version but the database does not "
                                    f"(an older database?); {_REBUILD_HINT}"))
        return problems

    def dependents(self, ref: str) -> list[str]:
        """Pinned refs of the entries that depend on ``ref`` directly."""
        eid = self._row_by_ref(ref)[0]
        return [f"{n}:{v}" for n, v in self._dependent_rows(eid)]

    def _dependent_rows(self, eid: int) -> list[tuple]:
        return self.db.all(
            "SELECT DISTINCT c.name, c.version, c.id FROM edges e JOIN entries c ON c.id = e.child_id "
            "WHERE e.parent_id = ? ORDER BY c.name, c.version", (eid,))

    def remove(self, ref: str, force: bool = False) -> Entry:
        """Delete one version and its stored files.

        Refuses while other entries depend on it (adapters on their base, runs on their
        inputs, ...) unless ``force``; forcing cuts those lineage links. The database row
        goes first (leaving a tombstone), the files after, so a crash in between leaves a
        directory the database lists as removed (deleted by ``gc``), never an entry
        without files.

        Raises:
            DependencyError: when dependents exist and ``force`` is false.
        """
        with self.db.write():
            entry = self._entry(self._row_by_ref(ref))
            deps = self._dependent_rows(entry.id)
            if deps and not force:
                refs = [f"{n}:{v}" for n, v, _ in deps]
                raise DependencyError(
                    f"cannot remove {entry.ref}: {len(refs)} entr{'y' if len(refs) == 1 else 'ies'} depend on it "
                    f"({', '.join(refs)}); remove those first or force"
                )
            row = self.db.one("SELECT path, stored FROM entries WHERE id = ?", (entry.id,))
            tomb = {"kind": entry.kind, "name": entry.name, "version": entry.version, "path": row[0],
                    "stored": bool(row[1]), "removed": _now()}
            self.db.execute(
                "INSERT INTO tombstones (name, version, kind, path, stored, removed) VALUES (?, ?, ?, ?, ?, ?)",
                (entry.name, entry.version, entry.kind, row[0], row[1], tomb["removed"]),
            )
            self.db.execute("DELETE FROM entries WHERE id = ?", (entry.id,))
            self._sync_records([eid for _, _, eid in deps])
            try:
                store.write_record(self.artifacts, tomb)
            except OSError as e:
                raise RegistryError(f"{e.filename}: cannot write the removal record ({e.strerror}); nothing removed") from None
        stored = entry.path is not None and self.artifacts in entry.path.parents
        if stored:
            store.discard_dir(self.artifacts, entry.path)
        return entry

    def gc(self, dry_run: bool = True) -> GcResult:
        """Find (and unless ``dry_run``, delete) what no entry needs.

        Deleted are only things the database positively lists as unreferenced: staging
        directories of dead processes, stored directories of removed versions (tombstones)
        or of versions the name's counter never handed out (a registration that died
        before its commit), their records, and the trash. Anything else without an entry
        (an unknown name, a version the database says was committed) is kept and reported:
        an empty or wrong database must never make gc delete artifacts.
        """
        remove: list[tuple[Path, str]] = []
        keep: list[tuple[Path, str]] = []
        with self.db.write():
            counters = {n: (k, nv) for n, k, nv in self.db.all("SELECT name, kind, next_version FROM names")}
            owned = {p for (p,) in self.db.all("SELECT path FROM entries WHERE stored = 1")}
            live = {(n, v) for n, v in self.db.all("SELECT name, version FROM entries")}
            gone = {(n, v) for n, v in self.db.all("SELECT name, version FROM tombstones")}

            def unreferenced(kind: str | None, name: str, vname: str) -> str | None:
                if not vname.isdigit():
                    return None
                v = int(vname)
                if (name, v) in gone:
                    return f"{name}:{v} was removed"
                known = counters.get(name)
                if known is not None and (kind is None or known[0] == kind) and v >= known[1]:
                    return f"{name}:{v} was never committed (the counter of {name!r} is at {known[1]})"
                return None

            for d in store.stale_tmp_dirs(self.artifacts):
                remove.append((d, "staging directory of a dead process"))
            for kind, name, vname, path in store.stored_version_dirs(self.artifacts, KINDS):
                if f"{kind}/{name}/{vname}" in owned:
                    continue
                why = unreferenced(kind, name, vname)
                if why:
                    remove.append((path, why))
                else:
                    keep.append((path, "no entry owns it, but the database does not list it as unreferenced"))
            for path in store.record_files(self.artifacts):
                name, vname = path.parent.name, path.stem
                if vname.isdigit() and (name, int(vname)) in live:
                    continue
                if vname.isdigit() and (name, int(vname)) in gone:
                    continue  # the removal record itself: rebuild needs it
                why = unreferenced(None, name, vname)
                if why:
                    remove.append((path, why))
                else:
                    keep.append((path, "a record without an entry that the database does not list as unreferenced"))
            trash = self.artifacts / store.TRASH_DIRNAME
            if trash.is_dir():
                remove.extend((d, "trash") for d in sorted(trash.iterdir()))
            stale = [eid for eid, token, name, version in self.db.all(
                "SELECT id, record_token, name, version FROM entries ORDER BY id")
                if _record_token(store.record_path(self.artifacts, name, version)) != token]
            if stale:
                keep.append((self.artifacts / store.RECORDS_DIRNAME,
                             f"{len(stale)} record(s) stale or missing; {'rewritten' if not dry_run else 'gc --yes rewrites them'}"))
            if not dry_run:
                self._sync_records(stale)
                for path, _ in remove:
                    if path.is_dir() and path.parent != trash:
                        store.discard_dir(self.artifacts, path)
                    elif path.is_dir():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)
        return GcResult(remove=remove, keep=keep, deleted=not dry_run)

    # ------------------------------------------------------------------ rebuild and migrate

    @classmethod
    def rebuild(
        cls,
        home: str | os.PathLike | None = None,
        url: str | None = None,
        store_dir: str | os.PathLike | None = None,
    ) -> "Registry":
        """Re-create a lost, empty or damaged database from the artifact store's records.

        A damaged SQLite file (and its ``-wal``/``-shm``) is moved aside to
        ``<file>.damaged-<time>`` first, never deleted. A database that opens cleanly and
        holds entries is refused (nothing needs rebuilding); a PostgreSQL database must
        hold no registry entries.

        Returns:
            The opened, rebuilt registry.

        Raises:
            RegistryError: when the database still holds entries or the store has no records.
        """
        u, artifacts = locate(home, url, store_dir)
        records = store.read_records(artifacts)
        if not records:
            raise RegistryError(f"{artifacts}: the artifact store holds no entry records; there is nothing to rebuild from")
        if u.dialect == "sqlite" and u.path.exists():
            healthy = None
            try:
                with cls.open(url=str(u.path), store_dir=artifacts) as reg:
                    healthy = reg.db.one("SELECT COUNT(*) FROM entries")[0]
            except RegistryError:
                pass
            if healthy:
                raise RegistryError(f"{u.display}: the database opens cleanly and holds {healthy} entries; not rebuilding it")
            stamp = _dt.datetime.now().strftime("%Y%m%dT%H%M%S")
            for suffix in ("", "-wal", "-shm", "-journal"):
                part = Path(str(u.path) + suffix)
                if part.exists():
                    os.replace(part, Path(f"{u.path}.damaged-{stamp}{suffix}"))
        db = connect(u)
        try:
            tables = db.tables()
            if tables:
                if "entries" in tables and db.one("SELECT COUNT(*) FROM entries")[0]:
                    raise RegistryError(f"{u.display}: the database holds registry entries; not rebuilding over them")
                for table in ("edges", "aliases", "files", "runs", "tombstones", "entries", "names", "meta"):
                    if table in tables:
                        db.execute(f"DROP TABLE {table}")
            live = [r for r in records if "removed" not in r]
            tombs = [r for r in records if "removed" in r]
            counters: dict[str, list] = {}
            for r in records:
                c = counters.setdefault(r["name"], [r["kind"], 0])
                if c[0] != r["kind"]:
                    raise IntegrityError(f"{store.record_path(artifacts, r['name'], r['version'])}: name "
                                         f"{r['name']!r} is recorded as both {c[0]} and {r['kind']}")
                c[1] = max(c[1], int(r["version"]))
            data = {
                "store_id": store.read_store_id(artifacts) or uuid.uuid4().hex,
                "names": [[n, k, v + 1] for n, (k, v) in sorted(counters.items())],
                "entries": sorted(live, key=lambda r: (r["name"], r["version"])),
                "tombstones": tombs,
            }
            reg = cls(db, artifacts)
            with db.write():
                db.create_schema()
                reg._load(data)
        except BaseException:
            db.close()
            raise
        db.close()
        reg = cls.open(url=u.conninfo or str(u.path), store_dir=artifacts)
        store.write_store_id(artifacts, data["store_id"])
        return reg

    def migrate(self, to_url: str) -> "Registry":
        """Copy this registry (entries, files, aliases, lineage, runs, removed versions) into
        the empty database at ``to_url``, then check that the copy reads back identically.

        The artifact store is shared, not copied: the target uses this registry's store.

        Returns:
            The target registry, open.

        Raises:
            RegistryError: when the target holds entries, or the copy differs.
        """
        u = parse_url(to_url)
        if u == self.db.url or (u.path is not None and self.db.url.path is not None
                                and u.path.resolve() == self.db.url.path.resolve()):
            raise RegistryError(f"migrate: {u.display} is the registry's own database")
        source = self.dump()
        db = connect(u)
        try:
            tables = db.tables()
            if tables and "meta" not in tables:  # a registry's database always has its meta table
                raise RegistryError(f"migrate: {u.display} holds tables of something other than a registry "
                                    f"({', '.join(sorted(tables)[:5])}); migrate into an empty database")
            if "entries" in tables and db.one("SELECT COUNT(*) FROM entries")[0]:
                raise RegistryError(f"migrate: {u.display} already holds registry entries; migrate into an empty database")
            target = Registry(db, self.artifacts)
            with db.write():
                for table in ("edges", "aliases", "files", "runs", "tombstones", "entries", "names", "meta"):
                    if table in tables:
                        db.execute(f"DROP TABLE {table}")
                db.create_schema()
                target._load(source)
            copied = target.dump()
            if copied != source:
                diff = [k for k in source if source[k] != copied[k]]
                raise RegistryError(f"migrate: the copy in {u.display} differs from the source ({', '.join(diff)})")
        except BaseException:
            db.close()
            raise
        return target

    # ------------------------------------------------------------------ export

    def export(self, ref: str, out_dir: str | os.PathLike, dtype: str = "auto") -> Path:
        """Merge an adapter into its base and write a standalone Hugging Face model directory.

        sft/policy adapters become an ``AutoModelForCausalLM`` directory; reward/value
        adapters an ``AutoModelForSequenceClassification`` (num_labels=1) directory with the
        score head from ``head.safetensors``. The tokenizer is saved beside the weights.
        See :func:`rlhf.registry.export.export_adapter`.
        """
        from rlhf.registry.export import export_adapter

        entry = self.resolve(ref)
        if entry.kind != "adapter":
            raise ValueError(f"export: {entry.ref} is a {entry.kind}; only adapters are merged and exported")
        base = self.resolve(entry.metadata["base"])
        problems = self.verify(entry.ref)
        if problems:
            raise RegistryError(f"export: {entry.ref} fails verification: " + "; ".join(map(str, problems)))
        return export_adapter(entry, base, Path(out_dir), dtype=dtype)


def _resolve_hub_revision(hub_id: str, revision: str | None) -> str | None:
    """The commit sha a hub revision points at, or None when offline or unreachable."""
    if revision is not None and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return None
    try:
        from huggingface_hub import HfApi

        return HfApi().model_info(hub_id, revision=revision or "main", timeout=10).sha
    except Exception:  # network errors, private repos, missing package: keep the revision as given
        return None
