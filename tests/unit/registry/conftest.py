"""Fixtures for the registry tests: both database backends, and small fake model, adapter
and dataset directories.

Every test here runs twice, against SQLite and against PostgreSQL (the ``backend`` fixture
sets ``$RLHF_REGISTRY_URL``, which subprocesses inherit too). A module limits itself with
``BACKENDS = ("sqlite",)``, a test with ``@pytest.mark.parametrize("backend", [...],
indirect=True)``. The PostgreSQL server is a real one, started once per session from
Debian's ``postgresql`` package (``initdb`` + ``pg_ctl`` on a temporary directory, loopback
only, a free port) and stopped at the end; each test gets a fresh schema on it, which the
registry sees as an empty database. The
PostgreSQL half skips, saying why, only when no server binaries are installed.

The unit tests exercise bookkeeping only (versions, hashes, lineage), so the "model" here
is a config.json plus a small safetensors file; the export tests under tests/integration
build a real tiny Llama.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rlhf.registry import Registry

HIDDEN = 16
BACKENDS = ("sqlite", "postgres")


def _pg_bindir() -> Path | None:
    """A directory holding initdb, pg_ctl and postgres: $PATH first, then Debian's layout."""
    found = shutil.which("pg_ctl")
    candidates = [Path(os.path.realpath(found)).parent] if found else []
    candidates += [Path(d) for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for d in candidates:
        if all((d / exe).is_file() for exe in ("initdb", "pg_ctl", "postgres")):
            return d
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """A throwaway PostgreSQL server; ``new_database()`` hands out a fresh database URL."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        # The server refuses to run as root: run it as the postgres account (Debian's
        # package creates it) or nobody, in a directory that user owns.
        self.user = None
        if os.geteuid() == 0:
            for name in ("postgres", "nobody"):
                try:
                    self.user = pwd.getpwnam(name)
                    break
                except KeyError:
                    continue
            if self.user is None:
                raise RuntimeError("running as root and no unprivileged account (postgres, nobody) to run the server")
        self.dir = Path(tempfile.mkdtemp(prefix="rlhf-test-pg-"))
        if self.user is not None:
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self.port = _free_port()
        self.prefix = f"postgresql://rlhf@127.0.0.1:{self.port}"
        self._counter = itertools.count()
        self._admin = None

    def _run(self, *args: str) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.user is not None:
            cmd = ["runuser", "-u", self.user.pw_name, "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            log = (self.dir / "log").read_text() if (self.dir / "log").exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()} {log[-2000:]}")

    def start(self) -> None:
        data = self.dir / "data"
        self._run("initdb", "-D", str(data), "-A", "trust", "-U", "rlhf", "-E", "UTF8", "--no-sync", "--locale=C")
        # Loopback TCP only, socket in our own directory, no fsync (the server is thrown away;
        # crash tests kill clients, never the server).
        opts = f"-h 127.0.0.1 -p {self.port} -k {self.dir} -F -c max_connections=200"
        self._run("pg_ctl", "-D", str(data), "-o", opts, "-l", str(self.dir / "log"), "-w", "-t", "60", "start")
        import psycopg

        with psycopg.connect(f"{self.prefix}/postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE rlhf")
        self._admin = psycopg.connect(f"{self.prefix}/rlhf", autocommit=True)

    def new_database(self) -> str:
        """A URL whose connections see only a fresh, empty schema: to the registry it is an
        empty database (a schema costs a catalog row; a database copies 7 MB of template)."""
        name = f"reg{next(self._counter)}"
        self._admin.execute(f"CREATE SCHEMA {name}")
        return f"{self.prefix}/rlhf?options=-csearch_path%3D{name}"

    def stop(self) -> None:
        if self._admin is not None:
            self._admin.close()
        try:
            self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server():
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl, postgres) on PATH or in /usr/lib/postgresql/*/bin; "
                    "install Debian's postgresql package (scripts/test.sh does when run as root)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg 3 is not installed; pip install 'rlhf[postgres]'")
    server = PostgresServer(bindir)
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    yield server
    server.stop()


def pytest_generate_tests(metafunc):
    if "backend" not in metafunc.fixturenames:
        return
    if any(m.args and "backend" in str(m.args[0]) for m in metafunc.definition.iter_markers("parametrize")):
        return
    metafunc.parametrize("backend", getattr(metafunc.module, "BACKENDS", BACKENDS), indirect=True)


@pytest.fixture(autouse=True)
def backend(request, monkeypatch) -> str:
    """``"sqlite"`` or ``"postgres"``; for postgres, $RLHF_REGISTRY_URL names a fresh database."""
    if request.param == "postgres":
        monkeypatch.setenv("RLHF_REGISTRY_URL", request.getfixturevalue("pg_server").new_database())
    else:
        monkeypatch.delenv("RLHF_REGISTRY_URL", raising=False)
    return request.param


@pytest.fixture
def reg():
    r = Registry.open()  # $RLHF_HOME is a fresh tmp dir per test (tests/conftest.py)
    yield r
    r.close()


@pytest.fixture
def base_dir(tmp_path) -> Path:
    d = tmp_path / "base-model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": HIDDEN}))
    save_file({"w": torch.arange(8, dtype=torch.float32)}, str(d / "model.safetensors"))
    (d / "tokenizer.json").write_text("{}")
    return d


@pytest.fixture
def make_adapter(tmp_path):
    """make_adapter(role, seed=0, hidden=HIDDEN) -> a directory shaped like a stage's output."""
    counter = iter(range(10_000))

    def _make(role: str = "sft", seed: int = 0, hidden: int = HIDDEN, head: bool | None = None) -> Path:
        d = tmp_path / f"adapter-{role}-{next(counter)}"
        d.mkdir()
        g = torch.Generator().manual_seed(seed)
        (d / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
            "task_type": "CAUSAL_LM",
        }))
        save_file({"base_model.model.layer.q_proj.lora_A.weight": torch.randn(2, hidden, generator=g)},
                  str(d / "adapter_model.safetensors"))
        if head if head is not None else role in ("reward", "value"):
            save_file({"weight": torch.randn(1, hidden, generator=g)}, str(d / "head.safetensors"))
        (d / "rlhf_adapter.json").write_text(json.dumps({"role": role, "note": "written by the stage"}))
        return d

    return _make


@pytest.fixture
def dataset_dir(tmp_path) -> Path:
    d = tmp_path / "prefs" / "v1"
    d.mkdir(parents=True)
    (d / "train.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    (d / "manifest.json").write_text(json.dumps({
        "sources": [{"path": "/data/raw.jsonl", "sha256": "0" * 64}], "format": "jsonl", "options": {},
        "counts": {"train": 1}, "schema_version": 1, "created": "2026-01-01T00:00:00Z",
        "content_hash": "ab" * 32,
    }))
    return d
