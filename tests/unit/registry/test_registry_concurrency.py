"""Crash safety and concurrency of registration, with real processes.

Crash safety: a subprocess registering a multi-megabyte adapter is SIGKILLed at random
times (the copy is slowed by a test hook so that kills land mid-copy) and at exact points
(after the copy, after the rename into place, after the database insert but before the
commit). Afterwards the registry must hold either a complete entry that verifies, or none.

Concurrency: several processes register versions of the same name at once; every
registration succeeds and the versions are distinct and gapless.

Both run against SQLite and PostgreSQL (conftest.py); the children inherit
$RLHF_REGISTRY_URL. Against PostgreSQL a killed client's transaction is rolled back by the
server when its connection drops.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rlhf.registry import Registry
from rlhf.registry.db import DatabaseError, connect

REPO = Path(__file__).resolve().parents[3]

CHILD = textwrap.dedent(
    """
    import os, sys
    from rlhf.registry import Registry

    # Arm the kill point only around register_adapter (start_run commits too).
    kill_at = os.environ.pop("CHILD_KILL_AT", None)

    src, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    go = sys.argv[4] if len(sys.argv) > 4 else None
    reg = Registry.open()
    print("ready", flush=True)
    if go:  # a start barrier, so that concurrent children really overlap
        import time
        while not os.path.exists(go):
            time.sleep(0.005)
    for i in range(n):
        run = reg.start_run("sft", {"i": i}, ["tiny"])
        if kill_at:
            os.environ["RLHF_REGISTRY_TEST_KILL_AT"] = kill_at
        e = reg.register_adapter(name, "sft", src, base="tiny", run=run, metadata={"i": i})
        reg.finish_run(run, "completed", {}, outputs=[e.ref])
        print("registered", e.ref, run, flush=True)
    """
)


@pytest.fixture
def setup(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    save_file({"w": torch.zeros(4)}, str(base / "model.safetensors"))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    g = torch.Generator().manual_seed(0)
    # ~6 MiB over three files: with the copy delay below, copying takes about 0.35 s.
    save_file({"lora_A": torch.randn(512, 1024, generator=g)}, str(adapter / "adapter_model.safetensors"))
    save_file({"x": torch.randn(256, 1024, generator=g)}, str(adapter / "extra_a.safetensors"))
    save_file({"y": torch.randn(256, 1024, generator=g)}, str(adapter / "extra_b.safetensors"))
    with Registry.open() as reg:
        reg.register_base("tiny", str(base))
    return adapter


def _child(args: list[str], extra_env: dict | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra_env or {})
    return subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=REPO)


def _check_consistent(reg: Registry) -> list[str]:
    """Every adapter entry is complete and verifies; nothing points into staging dirs."""
    adapters = reg.list(kind="adapter")
    for e in adapters:
        assert e.path.is_dir(), e
        assert ".tmp" not in e.path.parts
        assert set(e.files) == {"adapter_config.json", "adapter_model.safetensors", "extra_a.safetensors",
                                "extra_b.safetensors", "rlhf_adapter.json"}
    assert reg.verify() == []
    return [e.ref for e in adapters]


def _kill_after(proc: subprocess.Popen, delay: float) -> None:
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_sigkill_at_random_times_leaves_complete_entry_or_none(setup):
    rng = random.Random(1234)
    delays = [0.0, 0.05] + [rng.uniform(0.0, 0.6) for _ in range(5)]
    outcomes = []
    for delay in delays:
        with Registry.open() as reg:
            before = _check_consistent(reg)
        proc = _child([str(setup), "sft", "1"], {"RLHF_REGISTRY_TEST_COPY_DELAY": "0.05"})
        _kill_after(proc, delay)
        with Registry.open() as reg:
            after = _check_consistent(reg)
        assert after[: len(before)] == before and len(after) - len(before) in (0, 1), (delay, before, after)
        outcomes.append(len(after) - len(before))
    # at delay 0 the child is killed before its copy completes: no entry
    assert outcomes[0] == 0
    with Registry.open() as reg:
        reg.gc(dry_run=False)
        assert not any((reg.artifacts / ".tmp").iterdir())
        e = reg.register_adapter("sft", "sft", setup, base="tiny")
        assert reg.verify(e.ref) == []


@pytest.mark.parametrize("point,expect_entry", [("copied", False), ("renamed", False), ("inserted", False),
                                                ("committed", True)])
def test_sigkill_at_each_step_of_registration(setup, point, expect_entry):
    proc = _child([str(setup), "sft", "1"], {"CHILD_KILL_AT": point})
    proc.wait(timeout=900)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    with Registry.open() as reg:
        refs = _check_consistent(reg)
        assert refs == (["sft:1"] if expect_entry else [])
        if point == "renamed":
            # the killed process left a fully moved directory that no entry owns...
            assert (reg.artifacts / "adapter" / "sft" / "1").is_dir()
        # ...and the next registration of that version takes its place cleanly
        e = reg.register_adapter("sft", "sft", setup, base="tiny")
        assert e.ref == ("sft:2" if expect_entry else "sft:1")
        assert reg.verify() == []
        reg.gc(dry_run=False)
        assert not any((reg.artifacts / ".tmp").iterdir())
        assert reg.verify() == []


def test_several_processes_register_the_same_name_concurrently(setup, tmp_path):
    go = tmp_path / "go"
    n, writers = 3, 3
    procs = [_child([str(setup), "shared", str(n), str(go)]) for _ in range(writers)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
    go.touch()
    outputs = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err
        outputs.append([line.split()[1:] for line in out.splitlines() if line.startswith("registered")])
    assert [len(o) for o in outputs] == [n] * writers
    refs = [r for o in outputs for r, _ in o]
    runs = [r for o in outputs for _, r in o]
    assert sorted(refs, key=lambda r: int(r.split(":")[1])) == [f"shared:{v}" for v in range(1, writers * n + 1)]
    assert sorted(runs, key=lambda r: int(r.split(":")[1])) == [f"run-sft:{v}" for v in range(1, writers * n + 1)]
    with Registry.open() as reg:
        assert [e.ref for e in reg.list(kind="adapter")] == [f"shared:{v}" for v in range(1, writers * n + 1)]
        assert reg.verify() == []
        for ref, run in (pair for o in outputs for pair in o):
            assert reg.resolve(ref).relations == {"tiny:1": ["base"], run: ["run"]}
            assert reg.resolve(run).metadata["status"] == "completed"


FRESH_CHILD = textwrap.dedent(
    """
    import os, sys, time
    go = sys.argv[1]
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.005)
    from rlhf.registry import Registry

    with Registry.open() as reg:  # all at once, on a registry nobody has created yet
        print(reg.start_run("sft", {}, []), flush=True)
    """
)


def test_several_processes_create_a_fresh_registry_at_once(tmp_path):
    go = tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, "-c", FRESH_CHILD, str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(4)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    go.touch()
    refs = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err
        refs.append(out.strip())
    assert sorted(refs) == ["run-sft:1", "run-sft:2", "run-sft:3", "run-sft:4"]
    with Registry.open() as reg:
        assert reg.verify() == [] and len(reg.list()) == 4


# SQLite answers "database is locked" to a WAL switch at once, without calling the busy
# handler, while another connection holds the write lock of a file still in rollback-journal
# mode: exactly what a process switching a fresh file to WAL holds. Opening must wait.
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_opening_a_fresh_file_waits_while_another_opener_holds_its_lock(tmp_path, backend):
    path = tmp_path / "fresh.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.5, holder.execute, ("ROLLBACK",))
    release.start()
    try:
        db = connect(path, busy_timeout_s=60)
        assert db.one("PRAGMA journal_mode")[0] == "wal"
        db.close()
    finally:
        release.join()
        holder.close()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_opening_a_file_locked_for_longer_than_the_busy_timeout_names_it(tmp_path, backend):
    path = tmp_path / "held.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(DatabaseError, match=r"held\.db: database is locked"):
            connect(path, busy_timeout_s=0.3)
    finally:
        holder.close()
