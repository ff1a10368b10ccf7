"""Registry integrity: a lost or damaged database is an error, never an empty registry;
gc deletes only what the database lists as unreferenced; rebuild and migrate; run marking;
full disks. Every test runs on SQLite and PostgreSQL unless it says otherwise.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rlhf.registry import DatabaseError, IntegrityError, Registry, RegistryError
from rlhf.registry.cli import main

REPO = Path(__file__).resolve().parents[3]
SQLITE_ONLY = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


def _populate(base_dir, make_adapter, dataset_dir) -> dict:
    """Fill the registry with every kind of entry, lineage, aliases, a failed run and a
    removed version; return its dump."""
    with Registry.open() as reg:
        reg.register_base("tiny", str(base_dir))
        reg.register_base("tiny-copy", str(base_dir), copy=True)
        reg.register_dataset("prefs", dataset_dir)
        run = reg.start_run("sft", {"lr": 0.1}, ["tiny"])
        sft = reg.register_adapter("sft", "sft", make_adapter(seed=1), base="tiny", run=run)
        reg.finish_run(run, "completed", {"loss": 1.5}, outputs=[sft.ref])
        reg.register_adapter("sft", "sft", make_adapter(seed=2), base="tiny")
        reg.register_adapter("sft", "sft", make_adapter(seed=3), base="tiny")
        reg.remove("sft:2")
        reg.register_adapter("rm", "reward", make_adapter("reward"), base="tiny", parents=["prefs", sft.ref])
        reg.tag("rm:1", "prod")
        failed = reg.start_run("reward", {"lr": 1.0}, ["prefs"])
        reg.finish_run(failed, "failed", {}, reason="ValueError: loss is nan")
        return reg.dump()


@pytest.fixture
def populated(base_dir, make_adapter, dataset_dir) -> dict:
    return _populate(base_dir, make_adapter, dataset_dir)


def _db_file() -> Path:
    return Path(os.environ["RLHF_HOME"]) / "registry" / "registry.db"


def _lose_database(backend: str) -> None:
    """What a lost database looks like: a 0-byte SQLite file, a PostgreSQL database without tables."""
    if backend == "sqlite":
        for suffix in ("-wal", "-shm"):
            Path(f"{_db_file()}{suffix}").unlink(missing_ok=True)
        _db_file().write_bytes(b"")
    else:
        import psycopg

        with psycopg.connect(os.environ["RLHF_REGISTRY_URL"], autocommit=True) as conn:
            conn.execute("DROP TABLE edges, aliases, files, runs, tombstones, entries, names, meta")


def _cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI, expect exit 1 and exactly one line on stderr, without a traceback."""
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def _artifact_dirs(reg_home: Path) -> list[Path]:
    return sorted(p for p in (reg_home / "registry" / "artifacts").glob("*/*/*") if p.is_dir())


# ---------------------------------------------------------------- a lost database


def test_lost_database_next_to_artifacts_is_an_error_not_an_empty_registry(populated, backend, capsys):
    home = Path(os.environ["RLHF_HOME"])
    dirs = _artifact_dirs(home)
    assert len(dirs) == 4  # tiny-copy:1, sft:1, sft:3, rm:1
    _lose_database(backend)
    with pytest.raises(IntegrityError, match=r"rlhf registry rebuild") as e:
        Registry.open()
    assert "empty" in str(e.value) and "refusing to treat it as an empty registry" in str(e.value)
    assert "8 registered entries" in str(e.value)
    err = _cli_error(capsys, ["verify"])
    assert "rebuild" in err and ("registry.db" in err if backend == "sqlite" else "postgresql://" in err)
    _cli_error(capsys, ["gc", "--yes"])
    _cli_error(capsys, ["list"])
    assert _artifact_dirs(home) == dirs and all(any(d.iterdir()) for d in dirs)


@SQLITE_ONLY
def test_missing_sqlite_file_is_an_error_and_is_not_recreated(populated, capsys):
    for suffix in ("", "-wal", "-shm"):
        Path(f"{_db_file()}{suffix}").unlink(missing_ok=True)
    err = _cli_error(capsys, ["list"])
    assert "missing" in err and str(_db_file()) in err
    assert not _db_file().exists()


@SQLITE_ONLY
def test_damaged_sqlite_file_is_a_one_line_error(populated, capsys):
    raw = bytearray(_db_file().read_bytes())
    raw[:100] = b"\x00garbage" * 12 + b"abcd"
    _db_file().write_bytes(bytes(raw))
    err = _cli_error(capsys, ["list"])
    assert str(_db_file()) in err and "damaged" in err and "rebuild" in err
    with pytest.raises(RegistryError, match="damaged"):
        Registry.open()


@SQLITE_ONLY
def test_half_truncated_sqlite_file_is_a_one_line_error(base_dir, capsys):
    with Registry.open() as reg:
        reg.register_base("tiny", str(base_dir))
        for i in range(60):  # enough rows for a file of many pages
            reg.start_run("sft", {"i": i, "pad": "x" * 2000}, ["tiny"])
    size = _db_file().stat().st_size
    assert size > 100_000 and not Path(f"{_db_file()}-wal").exists()  # checkpointed on close
    with open(_db_file(), "r+b") as f:
        f.truncate(size // 2)
    err = _cli_error(capsys, ["list"])
    assert str(_db_file()) in err and ("damaged" in err or "malformed" in err)


def test_database_and_store_of_different_registries_are_refused(populated, tmp_path, base_dir):
    other_store = tmp_path / "other-store"
    with Registry.open(url=str(tmp_path / "other.db"), store_dir=other_store) as other:
        other.register_base("x", str(base_dir), copy=True)
    with pytest.raises(IntegrityError, match="belong to different registries"):
        Registry.open(store_dir=other_store)


def test_a_populated_database_with_an_empty_store_is_refused(populated, tmp_path):
    with pytest.raises(IntegrityError, match="store is empty"):
        Registry.open(store_dir=tmp_path / "fresh-store")


# ---------------------------------------------------------------- gc


def test_gc_deletes_only_what_the_database_lists_as_unreferenced(base_dir, make_adapter, backend, monkeypatch):
    from rlhf.registry import store

    with Registry.open() as reg:
        reg.register_base("tiny", str(base_dir))
        keep = reg.register_adapter("keep", "sft", make_adapter(seed=1), base="tiny")
        gone = reg.register_adapter("gone", "sft", make_adapter(seed=2), base="tiny")
        lost = reg.register_adapter("lost", "sft", make_adapter(seed=3), base="tiny")
        # A removal that died after its commit, before deleting the files: a tombstone.
        monkeypatch.setattr(store, "discard_dir", lambda *a: None)
        reg.remove(gone.ref)
        monkeypatch.undo()
        # A name the database has never heard of, and an entry the database lost without a
        # tombstone (as if it were an older backup): neither is positively unreferenced.
        ghost = reg.artifacts / "adapter" / "ghost" / "1"
        ghost.mkdir(parents=True)
        reg.db.execute("DELETE FROM entries WHERE id = ?", (lost.id,))

        dry = reg.gc()
        assert not dry.deleted
        assert [p for p, _ in dry.remove] == [gone.path]
        assert {p for p, _ in dry.keep} >= {ghost, lost.path}
        assert gone.path.is_dir()  # a dry run deletes nothing
        result = reg.gc(dry_run=False)
        assert [p for p, _ in result.remove] == [gone.path]
        assert not gone.path.exists()
        assert ghost.is_dir() and lost.path.is_dir() and keep.path.is_dir()
        assert reg.verify("keep") == []
        # the lost entry's record is still in the store, and verify says what that means
        problems = [(p.ref, p.problem) for p in reg.verify()]
        assert ("lost:1", "not-in-database") in problems


def test_cli_gc_is_a_dry_run_unless_yes(base_dir, make_adapter, capsys):
    with Registry.open() as reg:
        reg.register_base("tiny", str(base_dir))
        reg.register_adapter("a", "sft", make_adapter(), base="tiny")
        orphan = reg.artifacts / "adapter" / "a" / "5"  # the counter of "a" is at 2
        orphan.mkdir()
    assert main(["gc"]) == 0
    out = capsys.readouterr().out
    assert f"would remove {orphan}" in out and "--yes" in out and orphan.is_dir()
    assert main(["gc", "--yes"]) == 0
    assert f"removed {orphan}" in capsys.readouterr().out and not orphan.exists()


# ---------------------------------------------------------------- rebuild


def test_rebuild_recreates_the_database_from_the_store(populated, backend, make_adapter, capsys):
    _lose_database(backend)
    assert main(["rebuild"]) == 0
    assert "8 entries, 0 problems" in capsys.readouterr().out
    with Registry.open() as reg:
        assert reg.dump() == populated  # entries, files, lineage, aliases, runs, tombstones, counters
        assert reg.resolve("rm:prod").ref == "rm:1"
        assert reg.resolve("run-reward:1").metadata["reason"] == "ValueError: loss is nan"
        assert reg.verify() == []
        # a removed version's number stays used
        assert reg.register_adapter("sft", "sft", make_adapter(seed=9), base="tiny").ref == "sft:4"


@SQLITE_ONLY
def test_rebuild_moves_a_damaged_file_aside_and_refuses_a_healthy_one(populated, capsys):
    err = _cli_error(capsys, ["rebuild"])
    assert "opens cleanly" in err
    _db_file().write_bytes(b"this is not a database" * 100)
    assert main(["rebuild"]) == 0
    capsys.readouterr()
    aside = list(_db_file().parent.glob("registry.db.damaged-*"))
    assert [p.read_bytes()[:22] for p in aside] == [b"this is not a database"]
    with Registry.open() as reg:
        assert reg.dump() == populated


# ---------------------------------------------------------------- migrate


@SQLITE_ONLY  # each direction sets both URLs itself
@pytest.mark.parametrize("direction", ["sqlite->postgres", "postgres->sqlite"])
def test_migrate_copies_entries_aliases_and_lineage_and_verifies(
    direction, pg_server, base_dir, make_adapter, dataset_dir, tmp_path, monkeypatch, capsys
):
    pg_url = pg_server.new_database()
    sqlite_url = f"sqlite:///{tmp_path / 'migrated' / 'registry.db'}"
    source, target = (None, pg_url) if direction == "sqlite->postgres" else (pg_url, sqlite_url)
    if source:
        monkeypatch.setenv("RLHF_REGISTRY_URL", source)
    dump = _populate(base_dir, make_adapter, dataset_dir)
    assert main(["migrate", "--to", target]) == 0
    assert "migrated 8 entries" in capsys.readouterr().out
    with Registry.open(url=target) as reg:
        assert reg.dump() == dump
        assert reg.verify() == []
        assert reg.resolve("rm:prod").ref == "rm:1"
        tree = reg.lineage("rm:1")
        assert {(n["relation"], n["ref"]) for n in tree["ancestors"]} == {
            ("base", "tiny:1"), ("parent", "prefs:1"), ("parent", "sft:1")}
        assert reg.register_adapter("sft", "sft", make_adapter(seed=7), base="tiny").ref == "sft:4"
    # a target that already holds a registry is refused
    err = _cli_error(capsys, ["migrate", "--to", target])
    assert "already holds registry entries" in err


# ---------------------------------------------------------------- runs


KILLED_CHILD = textwrap.dedent(
    """
    import os, signal
    from rlhf.registry import Registry

    reg = Registry.open()
    print(reg.start_run("sft", {"lr": 0.1}, []), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # dies without finishing the run
    """
)


def test_killed_runs_are_reaped_and_runs_can_be_marked(reg, backend, capsys):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", KILLED_CHILD], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    killed = proc.stdout.strip()
    # another process whose run is still going: it waits for a line on stdin
    alive = subprocess.Popen([sys.executable, "-c", KILLED_CHILD.replace("os.kill(os.getpid(), signal.SIGKILL)",
                                                                         "input()")],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        other = alive.stdout.readline().strip()
        mine = reg.start_run("ppo", {}, [])
        assert reg.resolve(killed).metadata["status"] == "running"
        assert reg.reap_runs() == [killed]
        meta = reg.resolve(killed).metadata
        assert meta["status"] == "killed" and meta["ended"] is not None and "ended without finishing" in meta["reason"]
        assert reg.resolve(mine).metadata["status"] == "running"  # this process is alive
        assert reg.resolve(other).metadata["status"] == "running"  # and so is the other one
        assert reg.reap_runs() == []
    finally:
        alive.communicate("\n", timeout=900)

    reg.mark_run(mine, "interrupted", "KeyboardInterrupt")
    assert (reg.resolve(mine).metadata["status"], reg.resolve(mine).metadata["reason"]) == ("interrupted", "KeyboardInterrupt")
    with pytest.raises(RegistryError, match="already interrupted"):
        reg.finish_run(mine, "completed", {})
    with pytest.raises(ValueError, match="failed, killed or interrupted"):
        reg.mark_run(reg.start_run("ppo", {}, []), "completed", "")
    assert reg.verify() == []  # the store's records follow every change
    assert main(["list", "--kind", "run"]) == 0
    assert "status=killed (process" in capsys.readouterr().out


# ---------------------------------------------------------------- full disks


@SQLITE_ONLY
def test_full_database_is_a_one_line_error_and_commits_nothing(reg, base_dir, make_adapter):
    reg.register_base("tiny", str(base_dir))
    first = reg.register_adapter("a", "sft", make_adapter(seed=1), base="tiny")
    pages = reg.db.one("PRAGMA page_count")[0]
    reg.db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own "disk full" (SQLITE_FULL)
    with pytest.raises(DatabaseError, match=r"registry\.db: the disk holding the registry database is full") as e:
        reg.register_adapter("a", "sft", make_adapter(seed=2), base="tiny", metadata={"blob": "x" * 50_000})
    assert "\n" not in str(e.value)
    assert [x.ref for x in reg.list(kind="adapter")] == [first.ref]
    assert not any((reg.artifacts / ".tmp").iterdir())
    assert not (reg.artifacts / "adapter" / "a" / "2").exists()
    assert reg.verify() == []
    reg.db.execute("PRAGMA max_page_count = 1073741823")
    assert reg.register_adapter("a", "sft", make_adapter(seed=2), base="tiny").ref == "a:2"


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (needs root; skipped elsewhere)."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill up needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


def test_full_disk_under_the_registry_loses_nothing_and_names_the_path(small_disk, base_dir, make_adapter, backend,
                                                                        monkeypatch, capsys):
    if backend == "sqlite":
        monkeypatch.setenv("RLHF_REGISTRY_URL", str(small_disk / "registry.db"))
    monkeypatch.setenv("RLHF_REGISTRY_STORE", str(small_disk / "store"))
    with Registry.open() as reg:
        reg.register_base("tiny", str(base_dir), copy=True)
        kept = reg.register_adapter("a", "sft", make_adapter(seed=1), base="tiny")
        filler = _fill(small_disk)
        with pytest.raises((OSError, RegistryError)) as e:
            reg.register_adapter("a", "sft", make_adapter(seed=2), base="tiny")
        msg = str(e.value) if isinstance(e.value, RegistryError) else f"{e.value.filename}: {e.value.strerror}"
        assert str(small_disk) in msg and "\n" not in msg, msg
        err = _cli_error(capsys, ["tag", "a:1", "prod"])
        assert str(small_disk) in err, err
        filler.unlink()
        assert [x.ref for x in reg.list(kind="adapter")] == [kept.ref]
        assert not any((reg.artifacts / ".tmp").iterdir())
        assert reg.verify() == []
        assert reg.register_adapter("a", "sft", make_adapter(seed=2), base="tiny").ref == "a:2"



@SQLITE_ONLY
def test_a_full_disk_during_registry_list_names_a_full_disk(small_disk, backend, monkeypatch, capsys):
    """Issue 29 item 8: reading a registry on a full disk fails in SQLite as "disk I/O error"
    (it cannot create its shared-memory file); the message must say the disk is full."""
    monkeypatch.setenv("RLHF_REGISTRY_URL", str(small_disk / "registry.db"))
    monkeypatch.setenv("RLHF_REGISTRY_STORE", str(small_disk / "store"))
    Registry.open().close()
    filler = _fill(small_disk)
    err = _cli_error(capsys, ["list"])
    assert str(small_disk / "registry.db") in err and "the disk holding the registry database is full" in err, err
    filler.unlink()
    assert main(["list"]) == 0



def test_a_disk_io_error_names_a_full_disk_only_when_it_is_full(tmp_path, monkeypatch):
    """The same check without a small disk to fill: the free space decides the message."""
    import sqlite3
    from collections import namedtuple

    from rlhf.registry import db

    usage = namedtuple("usage", "total used free")
    where = str(tmp_path / "registry.db")
    monkeypatch.setattr(db.shutil, "disk_usage", lambda path: usage(1 << 30, (1 << 30) - 4096, 4096))
    assert "is full (4096 bytes free" in db.describe_error(where, sqlite3.OperationalError("disk I/O error"))
    monkeypatch.setattr(db.shutil, "disk_usage", lambda path: usage(1 << 30, 1 << 29, 1 << 29))
    assert db.describe_error(where, sqlite3.OperationalError("disk I/O error")) == f"{where}: disk I/O error"


# ---------------------------------------------------------------- SQLite on a network filesystem


@SQLITE_ONLY
def test_sqlite_on_a_network_filesystem_warns(monkeypatch, recwarn):
    from rlhf.registry import registry as registry_module

    Registry.open().close()
    assert not [w for w in recwarn if "network filesystem" in str(w.message)]  # a local disk: no warning
    monkeypatch.setattr(registry_module, "filesystem_type", lambda path: "nfs4")
    with pytest.warns(RuntimeWarning, match="registry.db: the SQLite registry is on a nfs4 network filesystem"):
        Registry.open().close()


@SQLITE_ONLY
def test_filesystem_type_reads_the_mount_table(small_disk):
    from rlhf.registry.registry import filesystem_type

    assert filesystem_type(small_disk / "registry.db") == "tmpfs"
    (small_disk / "sub").mkdir()
    assert filesystem_type(small_disk / "sub" / "x.db") == "tmpfs"


# ---------------------------------------------------------------- older registries


def test_a_schema_version_1_registry_is_upgraded_and_gets_its_records(populated, backend):
    """Registries written before store ids, tombstones and records open, upgrade in place,
    and can be rebuilt from then on."""
    with Registry.open() as reg:
        db = reg.db
        db.execute("DROP TABLE tombstones")
        db.execute("ALTER TABLE runs DROP COLUMN reason")
        db.execute("ALTER TABLE entries DROP COLUMN record_token")
        db.execute("DELETE FROM meta WHERE key = 'store_id'")
        db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
        artifacts = reg.artifacts
    shutil.rmtree(artifacts / ".records")
    (artifacts / ".registry-store.json").unlink()
    with Registry.open() as reg:
        assert reg.db.schema_version() == 2
        assert reg.verify() == []  # every entry has its record again
        assert len(list((artifacts / ".records").glob("*/*.json"))) == 8
        assert reg.resolve("rm:prod").ref == "rm:1"


@SQLITE_ONLY  # needs no server: that is the point
def test_an_unreachable_postgres_server_is_a_one_line_error(capsys):
    pytest.importorskip("psycopg")
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = _cli_error(capsys, ["list", "--url", f"postgresql://rlhf:secret@127.0.0.1:{port}/reg"])
    assert f"postgresql://rlhf:***@127.0.0.1:{port}/reg: cannot connect" in err and "secret" not in err


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_a_dropped_server_connection_is_reopened_between_transactions(reg, base_dir, pg_server):
    """A pipeline holds its registry through hours of training; a server restart or idle
    timeout in between must not fail the run when it registers its outputs."""
    reg.register_base("tiny", str(base_dir))
    pid = reg.db.one("SELECT pg_backend_pid()")[0]
    pg_server._admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    assert reg.resolve("tiny").ref == "tiny:1"
    assert reg.db.one("SELECT pg_backend_pid()")[0] != pid
    run = reg.start_run("sft", {}, ["tiny"])
    reg.finish_run(run, "completed", {})
    assert reg.verify() == []
