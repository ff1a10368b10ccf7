"""The registry's database layer: plain SQL over a DB-API connection.

Every query in the registry is written once, with ``?`` placeholders and portable SQL
(``INSERT ... RETURNING``, ``ON DELETE CASCADE``, TEXT/INTEGER columns). This module is
the only place that knows which database is behind the URL: it opens the connection,
translates the placeholder style, starts write transactions and creates the schema.
Pointing the registry at a server database later means adding a branch to ``connect``
and ``Database.begin_write`` here, not rewriting the registry.

Only SQLite is implemented in this version.
"""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

SCHEMA_VERSION = 1

# ``{pk}`` is the one dialect-specific piece of the DDL (an auto-incrementing integer key).
_SCHEMA = [
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
        ended TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS edges_parent ON edges(parent_id)",
    "CREATE INDEX IF NOT EXISTS entries_kind ON entries(kind)",
]


def parse_url(url: str) -> Path:
    """Return the database file of a ``sqlite:///`` URL.

    Follows the SQLAlchemy convention: ``sqlite:///rel/path.db`` is relative to the current
    directory and ``sqlite:////abs/path.db`` is absolute.

    Raises:
        ValueError: for any other scheme, naming the URL.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"registry URL {url!r} is not a URL; expected sqlite:///path/to/registry.db")
    if scheme != "sqlite":
        raise ValueError(
            f"registry URL {url!r}: only sqlite:/// URLs are supported in this version of rlhf "
            f"(got scheme {scheme!r}); server databases such as PostgreSQL are not implemented yet"
        )
    if not rest.startswith("/") or rest == "/":
        raise ValueError(f"registry URL {url!r}: expected sqlite:///relative.db or sqlite:////absolute.db")
    path = rest[1:]
    if path in ("", ":memory:"):
        raise ValueError(f"registry URL {url!r}: the registry needs a database file, not an in-memory database")
    return Path(path).expanduser()


class Database:
    """A thin wrapper around one DB-API connection.

    Args:
        conn: an open DB-API connection in autocommit mode (transactions are explicit).
        paramstyle: the driver's placeholder style; registry SQL is written with ``?`` and
            translated here for ``format``-style drivers.
        dialect: ``"sqlite"`` (the only one implemented).
    """

    def __init__(self, conn: Any, paramstyle: str, dialect: str):
        self.conn = conn
        self.paramstyle = paramstyle
        self.dialect = dialect

    def _sql(self, query: str) -> str:
        if self.paramstyle == "qmark":
            return query
        if self.paramstyle in ("format", "pyformat"):
            # Registry SQL never contains a literal "?" or "%", so a plain replace is exact.
            return query.replace("?", "%s")
        raise ValueError(f"unsupported DB-API paramstyle {self.paramstyle!r}")

    def execute(self, query: str, params: Sequence[Any] = ()) -> Any:
        cur = self.conn.cursor()
        cur.execute(self._sql(query), tuple(params))
        return cur

    def one(self, query: str, params: Sequence[Any] = ()) -> tuple | None:
        return self.execute(query, params).fetchone()

    def all(self, query: str, params: Sequence[Any] = ()) -> list[tuple]:
        return list(self.execute(query, params).fetchall())

    @contextmanager
    def write(self) -> Iterator["Database"]:
        """A write transaction that holds the write lock from its first statement.

        SQLite's ``BEGIN IMMEDIATE`` takes the write lock up front, so two processes that
        both read "next version = 4" cannot both commit it: the second waits (busy_timeout)
        until the first has committed and then reads 5.
        """
        if self.dialect == "sqlite":
            self.conn.execute("BEGIN IMMEDIATE")
        else:  # pragma: no cover - only sqlite is wired up in connect()
            raise ValueError(f"no write-transaction recipe for dialect {self.dialect!r}")
        try:
            yield self
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()


def connect(url: str, busy_timeout_s: float = 60.0) -> Database:
    """Open the registry database at ``url`` and make sure its schema exists.

    SQLite runs in WAL mode (readers never block the writer) with ``synchronous=FULL``, so
    a committed registration survives a crash of the process or the machine.
    """
    path = parse_url(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: autocommit, so BEGIN/COMMIT are ours and not the module's.
    conn = sqlite3.connect(str(path), timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        conn.close()
        raise RuntimeError(f"{path}: could not switch SQLite to WAL mode (journal_mode is {mode!r})")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    db = Database(conn, paramstyle=sqlite3.paramstyle, dialect="sqlite")
    _ensure_schema(db, path)
    return db


def _ensure_schema(db: Database, where: Path) -> None:
    pk = "INTEGER PRIMARY KEY AUTOINCREMENT" if db.dialect == "sqlite" else "BIGSERIAL PRIMARY KEY"
    row = None
    try:
        row = db.one("SELECT value FROM meta WHERE key = 'schema_version'")
    except sqlite3.OperationalError:
        pass  # no meta table yet: a new database
    if row is not None:
        if int(row[0]) != SCHEMA_VERSION:
            raise RuntimeError(
                f"{where}: registry schema version {row[0]} is not the version this rlhf expects ({SCHEMA_VERSION})"
            )
        return
    with db.write():
        for stmt in _SCHEMA:
            db.execute(stmt.replace("{pk}", pk))
        db.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', ?) ON CONFLICT (key) DO NOTHING",
            (str(SCHEMA_VERSION),),
        )
