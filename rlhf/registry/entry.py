"""The registry's vocabulary: entry kinds, adapter file names, references, errors, Entry.

Both the registry (``registry.py``) and the exporter (``export.py``) use these; keeping them
here lets the exporter read an entry without importing the registry itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("base", "adapter", "dataset", "run")
ROLES = ("sft", "reward", "policy", "value")
HEAD_ROLES = ("reward", "value")
# A run is "running" until it is finished as completed, or marked failed / killed /
# interrupted (by the stage on an exception, or later by a run whose process is gone).
RUN_STATUSES = ("completed", "failed", "killed", "interrupted")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
HEAD_WEIGHTS = "head.safetensors"
ADAPTER_META = "rlhf_adapter.json"
DATASET_MANIFEST = "manifest.json"


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RegistryError(Exception):
    """A registry operation that cannot be done as asked."""


class IntegrityError(RegistryError):
    """The database and the artifact store disagree, or the database is missing or damaged.

    The message names the file (or URL) and says how to recover; the registry never
    treats a lost database as an empty registry.
    """


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
            ``unexpected`` (a file that was not recorded), ``missing-dir``; or about the
            store's records: ``no-record``, ``bad-record``, ``record-differs`` (the record
            disagrees with the database), ``not-in-database`` (a committed version the
            database lacks, e.g. after restoring an older backup).
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
