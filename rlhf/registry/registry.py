"""The model registry: what an adapter is, what it sits on, what produced it, what came from it.

Entries are of four kinds:

- ``base``: a base model, either a hub id plus revision or a local directory plus the
  sha256 of each of its files (recorded in place, or copied into the store with ``copy=True``).
- ``adapter``: a LoRA adapter with a role (sft, reward, policy, value), stored as a copy
  of the directory the stage wrote (peft files, the score head for reward/value, and
  ``rlhf_adapter.json``).
- ``dataset``: a preference-dataset version written by ``reward_data`` (its manifest).
- ``run``: one stage run (stage, resolved config, metrics, package version, git commit,
  status, start/end).

Every entry is ``name:version``; versions are immutable and numbered per name. A name
belongs to one kind. ``name`` and ``name:latest`` mean the newest version; user aliases
(``name:prod``) point at one version and can be moved with ``tag``.

Registration is crash safe: the artifact is copied into a staging directory and hashed,
renamed to its final place inside the write transaction, and the transaction commits
last. A process killed before the commit leaves no entry (at most an unreferenced
directory, which the next registration of that version or ``gc`` removes).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import rlhf
from rlhf.paths import rlhf_home
from rlhf.registry import store
from rlhf.registry.db import Database, connect

KINDS = ("base", "adapter", "dataset", "run")
ROLES = ("sft", "reward", "policy", "value")
HEAD_ROLES = ("reward", "value")
RUN_STATUSES = ("completed", "failed")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
HEAD_WEIGHTS = "head.safetensors"
ADAPTER_META = "rlhf_adapter.json"
DATASET_MANIFEST = "manifest.json"

URL_ENV = "RLHF_REGISTRY_URL"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
# Keys the registry itself writes into an adapter's metadata; user metadata may not shadow them.
_ADAPTER_RESERVED = ("role", "base", "peft_config", "head")


class RegistryError(Exception):
    """A registry operation that cannot be done as asked."""


class NotFoundError(RegistryError, LookupError):
    """A reference that names no entry."""


class DependencyError(RegistryError):
    """An entry cannot be removed because other entries depend on it."""


def validate_name(name: str, what: str = "name") -> str:
    """Check an entry name (or alias): letters, digits, ``.``, ``_``, ``-``; at most 128 chars.

    Names become directory names in the artifact store, so separators (``/``, ``\\``),
    ``:`` (the version separator) and ``..`` are refused.

    Raises:
        ValueError: naming the offending value.
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise ValueError(
            f"invalid registry {what} {name!r}: use 1-128 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit, without '..', '/', '\\' or ':'"
        )
    return name


def validate_alias(alias: str) -> str:
    """An alias is a name that is neither a version number nor the reserved ``latest``."""
    validate_name(alias, "alias")
    if alias.isdigit():
        raise ValueError(f"invalid alias {alias!r}: all-digit aliases would read as version numbers")
    if alias == "latest":
        raise ValueError("alias 'latest' is reserved: it always means the newest version")
    return alias


def parse_ref(ref: str) -> tuple[str, int | str | None]:
    """Split ``"name"``, ``"name:3"`` or ``"name:alias"`` into ``(name, 3 | "alias" | None)``."""
    if not isinstance(ref, str) or not ref:
        raise ValueError(f"invalid registry reference {ref!r}: expected name, name:VERSION or name:ALIAS")
    name, sep, sel = ref.partition(":")
    validate_name(name)
    if not sep:
        return name, None
    if sel.isdigit():
        if int(sel) < 1:
            raise ValueError(f"invalid registry reference {ref!r}: versions start at 1")
        return name, int(sel)
    validate_name(sel, "alias")
    return name, None if sel == "latest" else sel


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


@dataclass(frozen=True)
class Entry:
    """One registry entry (an immutable version).

    Attributes:
        kind: ``base``, ``adapter``, ``dataset`` or ``run``.
        name: the entry's name.
        version: its version number (1, 2, ...).
        ref: ``"name:version"``, the pinned reference.
        path: the directory holding its files (in the artifact store, or the recorded local
            directory of an external base/dataset); ``None`` for hub bases and runs.
        metadata: kind-specific facts (adapter: role, base, peft_config, head, user keys;
            base: source, hub_id/revision or local_path/content_hash; dataset: manifest;
            run: stage, status, config, metrics, package_version, git_commit, started, ended).
        files: ``{relpath: sha256}`` of every file under ``path``.
        created: ISO-8601 UTC time of registration.
        parents: pinned refs of the entries this one depends on.
        role: the adapter role, ``None`` for other kinds.
        aliases: user aliases currently pointing at this version.
        relations: ``{parent ref: [relations]}`` (``base``, ``parent``, ``run``, ``input``).
    """

    kind: str
    name: str
    version: int
    ref: str
    path: Path | None
    metadata: dict
    files: dict[str, str]
    created: str
    parents: list[str]
    role: str | None = None
    aliases: list[str] = field(default_factory=list)
    relations: dict[str, list[str]] = field(default_factory=dict)
    id: int = field(default=0, repr=False, compare=False)

    def to_dict(self) -> dict:
        """A JSON-ready view (what ``show --json`` prints)."""
        return {
            "kind": self.kind,
            "name": self.name,
            "version": self.version,
            "ref": self.ref,
            "role": self.role,
            "path": str(self.path) if self.path is not None else None,
            "aliases": list(self.aliases),
            "created": self.created,
            "parents": list(self.parents),
            "relations": {k: list(v) for k, v in self.relations.items()},
            "metadata": self.metadata,
            "files": dict(self.files),
        }


@dataclass(frozen=True)
class Problem:
    """One finding of ``verify``.

    Attributes:
        ref: the entry (``name:version``).
        problem: ``missing`` (a recorded file is gone), ``modified`` (its sha256 changed),
            ``unexpected`` (a file that was not recorded) or ``missing-dir``.
        path: the file concerned.
        detail: a human-readable explanation.
    """

    ref: str
    problem: str
    path: str
    detail: str

    def __str__(self) -> str:
        return f"{self.ref}: {self.problem}: {self.path} ({self.detail})"

    def to_dict(self) -> dict:
        return {"ref": self.ref, "problem": self.problem, "path": self.path, "detail": self.detail}


_ENTRY_COLS = "id, kind, name, version, role, path, stored, metadata, created"


class Registry:
    """The registry at one home: a database plus an artifact directory.

    Open it with :meth:`Registry.open`. A ``Registry`` holds one database connection; use
    one per process (it is safe for many processes to open the same registry at once).
    """

    def __init__(self, db: Database, root: Path):
        self.db = db
        self.root = root
        self.artifacts = root / "artifacts"
        self.artifacts.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, home: str | os.PathLike | None = None, url: str | None = None) -> "Registry":
        """Open (creating if needed) the registry under ``<home>/registry``.

        Args:
            home: the rlhf home; defaults to ``$RLHF_HOME``, then ``~/.rlhf``.
            url: database URL; defaults to ``$RLHF_REGISTRY_URL``, then
                ``sqlite:///<home>/registry/registry.db``. Only ``sqlite:///`` URLs are
                supported in this version. Artifacts always live in
                ``<home>/registry/artifacts``.
        """
        root = rlhf_home(home).resolve() / "registry"
        root.mkdir(parents=True, exist_ok=True)
        url = url or os.environ.get(URL_ENV) or f"sqlite:///{root / 'registry.db'}"
        return cls(connect(url), root)

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
                "SELECT stage, status, config, metrics, package_version, git_commit, pipeline, started, ended "
                "FROM runs WHERE entry_id = ?",
                (eid,),
            )
            if run is not None:
                stage, status, config, metrics, pkg, commit, pipeline, started, ended = run
                meta.update(
                    stage=stage, status=status, config=json.loads(config), metrics=json.loads(metrics),
                    package_version=pkg, git_commit=commit, pipeline=pipeline, started=started, ended=ended,
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
                store.crash_point("inserted")
        except BaseException:
            # The transaction rolled back: leave neither the staged nor the moved directory behind.
            for d in (staged, final):
                if d is not None and d.exists():
                    store.discard_dir(self.artifacts, d)
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

        rels = store.iter_files(src)
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
        rels = store.iter_files(src)
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

    def finish_run(self, run_ref: str, status: str, metrics: dict, outputs: Iterable[str] = ()) -> None:
        """Mark a running run completed or failed, store its metrics, and link its outputs."""
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
                "UPDATE runs SET status = ?, metrics = ?, ended = ? WHERE entry_id = ?",
                (status, _dumps(metrics), _now(), row[0]),
            )
            for out in outputs:
                oid = self._row_by_ref(out)[0]
                if oid == row[0]:
                    raise ValueError(f"finish_run: a run cannot be its own output ({out!r})")
                self.db.execute(
                    "INSERT INTO edges (child_id, parent_id, relation) VALUES (?, ?, 'run') ON CONFLICT DO NOTHING",
                    (oid, row[0]),
                )

    # ------------------------------------------------------------------ aliases

    def tag(self, ref: str, alias: str) -> Entry:
        """Point ``name:alias`` at the version ``ref`` names (moving it if it existed)."""
        validate_alias(alias)
        with self.db.write():
            row = self._row_by_ref(ref)
            self.db.execute(
                "INSERT INTO aliases (name, alias, entry_id, updated) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (name, alias) DO UPDATE SET entry_id = excluded.entry_id, updated = excluded.updated",
                (row[2], alias, row[0], _now()),
            )
        return self.resolve(f"{row[2]}:{row[3]}")

    def untag(self, name: str, alias: str) -> None:
        """Remove the alias ``name:alias``."""
        validate_name(name)
        validate_alias(alias)
        with self.db.write():
            cur = self.db.execute("DELETE FROM aliases WHERE name = ? AND alias = ?", (name, alias))
            if cur.rowcount == 0:
                raise NotFoundError(f"no alias {name}:{alias}")

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

        Returns:
            Problems: files missing, modified (sha256 differs), or present but unrecorded;
            an empty list when everything matches.
        """
        entries = [self.resolve(ref)] if ref is not None else self.list()
        problems: list[Problem] = []
        for e in entries:
            if e.path is None:
                continue  # hub bases and runs have no files of their own
            if not e.path.is_dir():
                problems.append(Problem(e.ref, "missing-dir", str(e.path), "the entry's directory is gone"))
                continue
            present = set(store.iter_files(e.path))
            recorded = e.files
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
        return problems

    def dependents(self, ref: str) -> list[str]:
        """Pinned refs of the entries that depend on ``ref`` directly."""
        eid = self._row_by_ref(ref)[0]
        return [f"{n}:{v}" for n, v in self.db.all(
            "SELECT DISTINCT c.name, c.version FROM edges e JOIN entries c ON c.id = e.child_id "
            "WHERE e.parent_id = ? ORDER BY c.name, c.version", (eid,))]

    def remove(self, ref: str, force: bool = False) -> Entry:
        """Delete one version and its stored files.

        Refuses while other entries depend on it (adapters on their base, runs on their
        inputs, ...) unless ``force``; forcing cuts those lineage links. The database row
        goes first, the files after, so a crash in between leaves an unreferenced
        directory (removed by ``gc``), never an entry without files.

        Raises:
            DependencyError: when dependents exist and ``force`` is false.
        """
        with self.db.write():
            entry = self._entry(self._row_by_ref(ref))
            deps = self.dependents(entry.ref)
            if deps and not force:
                raise DependencyError(
                    f"cannot remove {entry.ref}: {len(deps)} entr{'y' if len(deps) == 1 else 'ies'} depend on it "
                    f"({', '.join(deps)}); remove those first or force"
                )
            self.db.execute("DELETE FROM entries WHERE id = ?", (entry.id,))
        stored = entry.path is not None and self.artifacts in entry.path.parents
        if stored:
            store.discard_dir(self.artifacts, entry.path)
        return entry

    def gc(self) -> list[Path]:
        """Delete staging directories of dead processes and stored directories no entry owns."""
        removed = []
        with self.db.write():
            for d in store.stale_tmp_dirs(self.artifacts):
                store.discard_dir(self.artifacts, d)
                removed.append(d)
            owned = {p for (p,) in self.db.all("SELECT path FROM entries WHERE stored = 1")}
            for kind in KINDS:
                kdir = self.artifacts / kind
                if not kdir.is_dir():
                    continue
                for ndir in kdir.iterdir():
                    for vdir in ndir.iterdir() if ndir.is_dir() else ():
                        if f"{kind}/{ndir.name}/{vdir.name}" not in owned:
                            store.discard_dir(self.artifacts, vdir)
                            removed.append(vdir)
            trash = self.artifacts / store.TRASH_DIRNAME
            if trash.is_dir():
                for d in trash.iterdir():
                    shutil.rmtree(d, ignore_errors=True)
        return removed

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
