"""The registry's database layer: plain SQL over a DB-API connection, SQLite or PostgreSQL.

Every query in the registry is written once, with ``?`` placeholders and portable SQL
(``INSERT ... RETURNING``, ``ON CONFLICT``, ``ON DELETE CASCADE``, TEXT/INTEGER columns).
This module is the only place that knows which database is behind the URL: it parses the
URL, opens the connection, translates the placeholder style, starts write transactions,
creates the schema and turns driver errors into one-line :class:`DatabaseError` messages
that name the file or server.

- SQLite (a path or ``sqlite:///...``): one machine. WAL mode needs shared memory on one
  host, so the file must not live on NFS or another network filesystem.
- PostgreSQL (``postgresql://user@host:port/db``, needs the ``postgres`` extra, psycopg 3):
  a registry a team or a multi-node run shares.

Both serialise writers the same way: a write transaction takes one registry-wide lock
before its first statement (SQLite's ``BEGIN IMMEDIATE``; a transaction-scoped advisory
lock in PostgreSQL), so two writers that both read "next version = 4" cannot both commit
it, and ``UNIQUE (name, version)`` backs that up. Registry writes are a few small rows
(artifact copies happen before the lock), so one lock costs nothing measurable.
"""

from __future__ import annotations

import random
import re
import shutil
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from rlhf.registry.entry import RegistryError

SCHEMA_VERSION = 2

# Any constant works; it only has to be the same in every process that writes this registry.
_PG_WRITE_LOCK = 0x726C6866  # "rlhf"

# ``{pk}`` is the one dialect-specific piece of the DDL (an auto-incrementing integer key).
SCHEMA = [
    """CREATE TABLE IF NOT EXISTS meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )""",
    # A name belongs to exactly one kind and hands out version numbers from a counter, so a
    # removed version's number is never reused (a ref like "rm:3" keeps meaning one thing).
    """CREATE TABLE IF NOT EXISTS names (
        name TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        next_version INTEGER NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS entries (
        id {pk},
        kind TEXT NOT NULL,
        name TEXT NOT NULL REFERENCES names(name),
        version INTEGER NOT NULL,
        role TEXT,
        path TEXT,
        stored INTEGER NOT NULL,
        metadata TEXT NOT NULL,
        created TEXT NOT NULL,
        record_token TEXT,
        UNIQUE (name, version)
    )""",
    """CREATE TABLE IF NOT EXISTS files (
        entry_id INTEGER NOT NULL REFERENCES entries(id) ON DELETE CASCADE,
        relpath TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        PRIMARY KEY (entry_id, relpath)
    )""",
    """CREATE TABLE IF NOT EXISTS aliases (
        name TEXT NOT NULL,
        alias TEXT NOT NULL,
        entry_id INTEGER NOT NULL REFERENCES entries(id) ON DELETE CASCADE,
        updated TEXT NOT NULL,
        PRIMARY KEY (name, alias)
    )""",
    # child depends on parent; relation is one of base / parent / run / input.
    """CREATE TABLE IF NOT EXISTS edges (
        child_id INTEGER NOT NULL REFERENCES entries(id) ON DELETE CASCADE,
        parent_id INTEGER NOT NULL REFERENCES entries(id) ON DELETE CASCADE,
        relation TEXT NOT NULL,
        PRIMARY KEY (child_id, parent_id, relation)
    )""",
    """CREATE TABLE IF NOT EXISTS runs (
        entry_id INTEGER PRIMARY KEY REFERENCES entries(id) ON DELETE CASCADE,
        stage TEXT NOT NULL,
        status TEXT NOT NULL,
        config TEXT NOT NULL,
        metrics TEXT NOT NULL,
        package_version TEXT,
        git_commit TEXT,
        pipeline TEXT,
        started TEXT NOT NULL,
        ended TEXT,
        reason TEXT
    )""",
    # Versions that were committed and later removed. gc deletes a stored directory only
    # when the database positively lists it as unreferenced: a tombstone, or a version
    # number the name's counter never handed out (a registration that died before commit).
    """CREATE TABLE IF NOT EXISTS tombstones (
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        kind TEXT NOT NULL,
        path TEXT,
        stored INTEGER NOT NULL,
        removed TEXT NOT NULL,
        PRIMARY KEY (name, version)
    )""",
    "CREATE INDEX IF NOT EXISTS edges_parent ON edges(parent_id)",
    "CREATE INDEX IF NOT EXISTS entries_kind ON entries(kind)",
]
TABLES = ("meta", "names", "entries", "files", "aliases", "edges", "runs", "tombstones")

# Schema version 1 (before tombstones and run reasons) upgrades in place.
_UPGRADE_FROM_1 = [
    "ALTER TABLE runs ADD COLUMN reason TEXT",
    "ALTER TABLE entries ADD COLUMN record_token TEXT",
    SCHEMA[7],
]


class DatabaseError(RegistryError):
    """A database operation failed; the message names the file or server and the cause."""


@dataclass(frozen=True)
class DbUrl:
    """A parsed registry location.

    Attributes:
        dialect: ``"sqlite"`` or ``"postgresql"``.
        path: the SQLite database file; ``None`` for PostgreSQL.
        conninfo: the PostgreSQL connection URL; ``None`` for SQLite.
        display: what messages show (a path, or the URL without its password).
    """

    dialect: str
    path: Path | None
    conninfo: str | None
    display: str


def parse_url(url: str | Path) -> DbUrl:
    """Parse a registry location: a file path, ``sqlite:///...`` or ``postgresql://...``.

    Follows the SQLAlchemy convention for SQLite: ``sqlite:///rel/path.db`` is relative to
    the current directory and ``sqlite:////abs/path.db`` is absolute. A plain path (no
    ``scheme://``) is a SQLite file.

    Raises:
        ValueError: for any other scheme or a malformed URL, naming the URL.
    """
    url = str(url)
    scheme, sep, rest = url.partition("://")
    if not sep:
        if not url.strip():
            raise ValueError("registry URL is empty; expected a path, sqlite:///path.db or postgresql://...")
        return DbUrl("sqlite", Path(url).expanduser(), None, str(Path(url).expanduser()))
    if scheme in ("postgresql", "postgres"):
        if not rest or rest.startswith("/") and len(rest) == 1:
            raise ValueError(f"registry URL {url!r}: expected postgresql://user@host:port/database")
        # Messages must not leak a password given in the URL.
        display = re.sub(r"^(postgres(?:ql)?://[^:@/]*):[^@/]*@", r"\1:***@", url)
        return DbUrl("postgresql", None, url, display)
    if scheme != "sqlite":
        raise ValueError(
            f"registry URL {url!r}: unsupported scheme {scheme!r}; use a path, sqlite:///path.db "
            "or postgresql://user@host:port/database"
        )
    if not rest.startswith("/") or rest == "/":
        raise ValueError(f"registry URL {url!r}: expected sqlite:///relative.db or sqlite:////absolute.db")
    path = rest[1:]
    if path in ("", ":memory:"):
        raise ValueError(f"registry URL {url!r}: the registry needs a database file, not an in-memory database")
    return DbUrl("sqlite", Path(path).expanduser(), None, str(Path(path).expanduser()))


def _driver_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [sqlite3.Error]
    try:
        import psycopg

        errors.append(psycopg.Error)
    except ImportError:
        pass
    return tuple(errors)


_NEARLY_FULL = 1 << 20  # bytes: less free space than SQLite's WAL and shared-memory files may need


def _free_bytes(where: str) -> int | None:
    """Free bytes on the filesystem of the database file ``where`` (None for a server URL)."""
    folder = Path(where).parent
    try:
        return shutil.disk_usage(folder).free if folder.is_dir() else None
    except OSError:
        return None


def describe_error(where: str, err: BaseException) -> str:
    """One line naming the database and the cause, with a hint for the common ones."""
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    low = msg.lower()
    if "disk is full" in low or "no space left" in low or "could not extend file" in low:
        return f"{where}: the disk holding the registry database is full ({msg}); nothing was committed; free space and retry"
    if "disk i/o error" in low:
        # SQLite reports a full disk as an I/O error when it cannot create a file it needs
        # (the WAL's shared-memory index, even to read): ask the filesystem
        free = _free_bytes(where)
        if free is not None and free < _NEARLY_FULL:
            return (f"{where}: the disk holding the registry database is full ({free} bytes free; SQLite says "
                    f"{msg!r}); nothing was committed; free space and retry")
    if "not a database" in low or "malformed" in low or "corrupt" in low:
        return (f"{where}: the registry database is damaged ({msg}); restore it from a backup, or move it aside "
                "and re-create it from the artifact store with `rlhf registry rebuild`")
    if "readonly" in low or "read-only" in low:
        return f"{where}: the registry database is read-only ({msg})"
    return f"{where}: {msg}"


class Database:
    """A thin wrapper around one DB-API connection.

    Args:
        conn: an open DB-API connection in autocommit mode (transactions are explicit).
        url: where it points (for messages and for the dialect).
        paramstyle: the driver's placeholder style; registry SQL is written with ``?`` and
            translated here for ``format``-style drivers.
        reopen: makes a new connection. A server connection held through a long stage can
            be dropped (server restart, idle timeout); outside a write transaction the next
            statement then reconnects once instead of failing the run at its end.
    """

    def __init__(self, conn: Any, url: DbUrl, paramstyle: str, reopen: Callable[[], Any] | None = None):
        self.conn = conn
        self._reopen = reopen
        self.url = url
        self.dialect = url.dialect
        self.where = url.display
        self.paramstyle = paramstyle
        self._errors = _driver_errors()
        self._in_write = False

    def _sql(self, query: str) -> str:
        if self.paramstyle == "qmark":
            return query
        if self.paramstyle in ("format", "pyformat"):
            # Registry SQL never contains a literal "?" or "%", so a plain replace is exact.
            return query.replace("?", "%s")
        raise ValueError(f"unsupported DB-API paramstyle {self.paramstyle!r}")

    def execute(self, query: str, params: Sequence[Any] = ()) -> Any:
        try:
            cur = self.conn.cursor()
            cur.execute(self._sql(query), tuple(params))
            return cur
        except self._errors as e:
            if self._in_write or self._reopen is None or not getattr(self.conn, "broken", False):
                raise DatabaseError(describe_error(self.where, e)) from None
        self.conn = self._reopen()
        try:
            cur = self.conn.cursor()
            cur.execute(self._sql(query), tuple(params))
            return cur
        except self._errors as e:
            raise DatabaseError(describe_error(self.where, e)) from None

    def one(self, query: str, params: Sequence[Any] = ()) -> tuple | None:
        cur = self.execute(query, params)
        try:
            return cur.fetchone()
        except self._errors as e:
            raise DatabaseError(describe_error(self.where, e)) from None

    def all(self, query: str, params: Sequence[Any] = ()) -> list[tuple]:
        cur = self.execute(query, params)
        try:
            return list(cur.fetchall())
        except self._errors as e:
            raise DatabaseError(describe_error(self.where, e)) from None

    @contextmanager
    def write(self) -> Iterator["Database"]:
        """A write transaction that holds the registry's write lock from its first statement.

        SQLite's ``BEGIN IMMEDIATE`` takes the write lock up front; PostgreSQL takes a
        transaction-scoped advisory lock, released by COMMIT, ROLLBACK or the server when
        the client's connection drops (a killed writer never leaves it held).
        """
        if self._in_write:
            raise RuntimeError("nested registry write transaction")
        self.execute("BEGIN IMMEDIATE" if self.dialect == "sqlite" else "BEGIN")
        self._in_write = True
        try:
            if self.dialect == "postgresql":
                self.execute(f"SELECT pg_advisory_xact_lock({_PG_WRITE_LOCK})")
            yield self
        except BaseException:
            self._in_write = False
            try:
                self.conn.execute("ROLLBACK")
            except self._errors:
                pass  # the connection is gone; the server (or SQLite's journal) rolls back
            raise
        else:
            self._in_write = False
            try:
                self.execute("COMMIT")
            except DatabaseError:
                # A failed COMMIT (a full disk) can leave SQLite's transaction open.
                try:
                    self.conn.execute("ROLLBACK")
                except self._errors:
                    pass
                raise

    def tables(self) -> set[str]:
        """The registry tables present in this database."""
        if self.dialect == "sqlite":
            rows = self.all("SELECT name FROM sqlite_master WHERE type = 'table'")
        else:
            rows = self.all("SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()")
        return {r[0] for r in rows} & set(TABLES)

    def quick_check(self) -> list[str]:
        """Structural problems of the database file (SQLite ``PRAGMA quick_check``); [] when sound.

        A PostgreSQL server checks its own pages; reading the catalog is all that is done here.
        """
        if self.dialect != "sqlite":
            self.one("SELECT 1")
            return []
        rows = [r[0] for r in self.all("PRAGMA quick_check")]
        return [] if rows == ["ok"] else rows

    def create_schema(self) -> None:
        """Create every table (inside the caller's write transaction)."""
        pk = "INTEGER PRIMARY KEY AUTOINCREMENT" if self.dialect == "sqlite" else "BIGSERIAL PRIMARY KEY"
        for stmt in SCHEMA:
            self.execute(stmt.replace("{pk}", pk))
        self.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', ?) ON CONFLICT (key) DO NOTHING",
            (str(SCHEMA_VERSION),),
        )

    def schema_version(self) -> int | None:
        row = self.one("SELECT value FROM meta WHERE key = 'schema_version'")
        return int(row[0]) if row is not None else None

    def upgrade_schema(self) -> None:
        """Bring an older schema up to :data:`SCHEMA_VERSION` (inside a write transaction)."""
        version = self.schema_version()
        if version == 1:
            for stmt in _UPGRADE_FROM_1:
                self.execute(stmt)
            self.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
        elif version != SCHEMA_VERSION:
            raise DatabaseError(
                f"{self.where}: registry schema version {version} is not one this rlhf knows (it expects "
                f"{SCHEMA_VERSION}); use the rlhf version that wrote it"
            )

    def close(self) -> None:
        try:
            self.conn.close()
        except self._errors:
            pass


def connect(url: str | DbUrl, busy_timeout_s: float = 60.0) -> Database:
    """Open the database at ``url`` (the schema is the registry's business, not this one's).

    SQLite runs in WAL mode (readers never block the writer) with ``synchronous=FULL``, so
    a committed registration survives a crash of the process or the machine.

    Raises:
        DatabaseError: when the database cannot be opened (damaged file, server down,
            driver missing), naming the file or server.
    """
    u = url if isinstance(url, DbUrl) else parse_url(url)
    if u.dialect == "postgresql":
        return _connect_postgres(u, busy_timeout_s)
    assert u.path is not None
    try:
        u.path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DatabaseError(f"{u.path.parent}: cannot create the registry directory ({e.strerror})") from None
    try:
        # isolation_level=None: autocommit, so BEGIN/COMMIT are ours and not the module's.
        conn = sqlite3.connect(str(u.path), timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as e:
        raise DatabaseError(describe_error(u.display, e)) from None
    db = Database(conn, u, paramstyle=sqlite3.paramstyle)
    try:
        db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        _switch_to_wal(db, busy_timeout_s)
        db.execute("PRAGMA synchronous = FULL")
        db.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        db.close()
        raise
    return db


def _is_busy(err: BaseException) -> bool:
    msg = str(err).lower()
    return "database is locked" in msg or "database is busy" in msg or "database table is locked" in msg


def _switch_to_wal(db: Database, busy_timeout_s: float) -> None:
    """Put a SQLite database in WAL mode, waiting out other processes that open it at once.

    The switch needs an exclusive lock. When several processes open a fresh file together,
    SQLite can answer ``database is locked`` at once instead of calling the busy handler (it
    does so when waiting could deadlock: both sides hold a shared lock and want to upgrade),
    so the busy timeout alone does not cover it. The switch is retried with a short random
    back-off until ``busy_timeout_s`` has passed. WAL mode is stored in the file, so once any
    process has switched it, the others only read the mode back.
    """
    deadline = time.monotonic() + busy_timeout_s
    while True:
        try:
            mode = str(db.one("PRAGMA journal_mode")[0]).lower()
            if mode != "wal":
                mode = str(db.one("PRAGMA journal_mode = WAL")[0]).lower()
        except DatabaseError as e:
            if not _is_busy(e) or time.monotonic() >= deadline:
                raise
            time.sleep(random.uniform(0.01, 0.1))
            continue
        if mode != "wal":  # the file system or the file refuses WAL; waiting will not change that
            raise DatabaseError(f"{db.where}: could not switch SQLite to WAL mode (journal_mode is {mode!r})")
        return


def _connect_postgres(u: DbUrl, busy_timeout_s: float) -> Database:
    try:
        import psycopg
    except ImportError:
        raise DatabaseError(
            f"{u.display}: PostgreSQL registries need psycopg 3; install the extra: pip install 'rlhf[postgres]'"
        ) from None

    def open_connection():
        try:
            conn = psycopg.connect(u.conninfo, autocommit=True, connect_timeout=max(1, int(min(busy_timeout_s, 30))))
            # Writers queue on the advisory lock; give up after the same time SQLite would.
            conn.execute(f"SET lock_timeout = '{int(busy_timeout_s * 1000)}ms'")
            conn.execute("SET client_min_messages = warning")  # CREATE ... IF NOT EXISTS notices
        except psycopg.Error as e:
            raise DatabaseError(
                f"{u.display}: cannot connect to the PostgreSQL registry ({str(e).strip().splitlines()[0]})"
            ) from None
        return conn

    return Database(open_connection(), u, paramstyle="format", reopen=open_connection)
