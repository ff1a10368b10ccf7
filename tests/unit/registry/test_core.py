"""Registry bookkeeping: entries, versions, aliases, runs, lineage, verify, rm, gc, URLs.

Every test runs against SQLite and PostgreSQL (see conftest.py) unless it says otherwise.
"""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
import subprocess
from pathlib import Path

import pytest

import rlhf
from rlhf.registry import DependencyError, NotFoundError, Registry, RegistryError
from rlhf.registry.db import parse_url
from rlhf.registry.store import content_hash, sha256_file


# ---------------------------------------------------------------- storage layout


SQLITE_ONLY = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


@SQLITE_ONLY
def test_open_creates_wal_sqlite_under_home(reg, tmp_path):
    root = tmp_path / "rlhf_home" / "registry"
    assert (root / "registry.db").is_file()
    assert (root / "artifacts").is_dir()
    assert reg.db.one("PRAGMA journal_mode")[0] == "wal"


@SQLITE_ONLY
def test_home_argument_overrides_env(tmp_path):
    with Registry.open(home=tmp_path / "elsewhere") as r:
        assert r.artifacts == (tmp_path / "elsewhere" / "registry" / "artifacts").resolve()
    assert (tmp_path / "elsewhere" / "registry" / "registry.db").is_file()


@SQLITE_ONLY
def test_url_env_points_the_database_elsewhere(tmp_path, monkeypatch, base_dir):
    db = tmp_path / "custom" / "reg.db"
    monkeypatch.setenv("RLHF_REGISTRY_URL", f"sqlite:///{db}")
    with Registry.open() as r:
        r.register_base("m", str(base_dir))
    assert db.is_file()
    assert not (tmp_path / "rlhf_home" / "registry" / "registry.db").exists()
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT name, version FROM entries").fetchall() == [("m", 1)]


@SQLITE_ONLY
def test_url_parsing():
    assert parse_url("sqlite:////abs/reg.db").path == Path("/abs/reg.db")
    assert parse_url("sqlite:///rel/reg.db").path == Path("rel/reg.db")
    assert (parse_url("/just/a/path.db").dialect, parse_url("/just/a/path.db").path) == ("sqlite", Path("/just/a/path.db"))
    pg = parse_url("postgresql://user:secret@host:5433/db")
    assert (pg.dialect, pg.path, pg.conninfo) == ("postgresql", None, "postgresql://user:secret@host:5433/db")
    assert "secret" not in pg.display  # messages never show the password
    with pytest.raises(ValueError, match="unsupported scheme 'mysql'"):
        parse_url("mysql://user@host/db")
    with pytest.raises(ValueError, match="in-memory"):
        parse_url("sqlite:///:memory:")


# ---------------------------------------------------------------- bases


def test_register_local_base_records_path_and_hashes_without_copying(reg, base_dir):
    e = reg.register_base("tiny", str(base_dir))
    assert (e.kind, e.name, e.version, e.ref) == ("base", "tiny", 1, "tiny:1")
    assert e.path == base_dir.resolve()
    assert set(e.files) == {"config.json", "model.safetensors", "tokenizer.json"}
    assert e.files["model.safetensors"] == sha256_file(base_dir / "model.safetensors")[0]
    assert e.metadata["content_hash"] == content_hash(e.files)
    assert not any(reg.artifacts.glob("base/*"))  # not copied


def test_register_base_is_idempotent_on_same_content_and_versions_on_change(reg, base_dir):
    a = reg.register_base("tiny", str(base_dir))
    assert reg.register_base("tiny", str(base_dir)).ref == a.ref
    (base_dir / "tokenizer.json").write_text('{"changed": true}')
    assert reg.register_base("tiny", str(base_dir)).ref == "tiny:2"


def test_register_base_copy_puts_files_in_store(reg, base_dir):
    e = reg.register_base("tiny", str(base_dir), copy=True)
    assert reg.artifacts in e.path.parents
    assert (e.path / "model.safetensors").read_bytes() == (base_dir / "model.safetensors").read_bytes()
    assert reg.verify(e.ref) == []


def test_register_hub_base_offline_keeps_revision(reg):
    e = reg.register_base("qwen", "Qwen/Qwen2.5-0.5B-Instruct", revision="v1.0")
    assert e.path is None and e.files == {}
    assert e.metadata["hub_id"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert e.metadata["revision"] == "v1.0"
    sha = "a" * 40
    assert reg.register_base("qwen", "Qwen/Qwen2.5-0.5B-Instruct", revision=sha).metadata["revision"] == sha


def test_register_base_refuses_pickle_weights_and_non_models(reg, tmp_path, base_dir):
    (base_dir / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="pickle"):
        reg.register_base("tiny", str(base_dir))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="config.json"):
        reg.register_base("x", str(empty))
    with pytest.raises(ValueError, match="neither an existing directory nor a hub id"):
        reg.register_base("x", "/no/such/dir")


# ---------------------------------------------------------------- adapters


def test_register_adapter_copies_hashes_and_pins_base(reg, base_dir, make_adapter):
    reg.register_base("tiny", str(base_dir))
    src = make_adapter("reward")
    e = reg.register_adapter("rm", "reward", src, base="tiny:latest", metadata={"eval_acc": 0.9})
    assert e.kind == "adapter" and e.role == "reward" and e.ref == "rm:1"
    assert reg.artifacts / "adapter" / "rm" / "1" == e.path
    assert set(e.files) == {"adapter_config.json", "adapter_model.safetensors", "head.safetensors", "rlhf_adapter.json"}
    for rel, sha in e.files.items():
        assert sha256_file(e.path / rel)[0] == sha
    assert e.metadata["base"] == "tiny:1"  # pinned, not "latest"
    assert e.metadata["head"]["shape"] == [1, 16]
    assert e.metadata["eval_acc"] == 0.9
    assert e.relations == {"tiny:1": ["base"]}
    stored_meta = json.loads((e.path / "rlhf_adapter.json").read_text())
    assert stored_meta == {"role": "reward", "base": "tiny:1", "note": "written by the stage"}
    # the source directory is untouched
    assert json.loads((src / "rlhf_adapter.json").read_text()) == {"role": "reward", "note": "written by the stage"}


def test_versions_increase_and_are_immutable(reg, base_dir, make_adapter):
    reg.register_base("tiny", str(base_dir))
    e1 = reg.register_adapter("sft", "sft", make_adapter(seed=1), base="tiny")
    e2 = reg.register_adapter("sft", "sft", make_adapter(seed=2), base="tiny")
    assert (e1.version, e2.version) == (1, 2)
    assert reg.resolve("sft").ref == "sft:2"
    assert reg.resolve("sft:latest").ref == "sft:2"
    assert reg.resolve("sft:1").files == e1.files != e2.files


def test_adapter_validation_errors(reg, base_dir, make_adapter):
    reg.register_base("tiny", str(base_dir))
    with pytest.raises(ValueError, match="role must be one of"):
        reg.register_adapter("a", "critic", make_adapter(), base="tiny")
    with pytest.raises(FileNotFoundError, match="head.safetensors"):
        reg.register_adapter("a", "value", make_adapter("value", head=False), base="tiny")
    with pytest.raises(ValueError, match="hidden_size 16"):
        reg.register_adapter("a", "reward", make_adapter("reward", hidden=8), base="tiny")
    with pytest.raises(ValueError, match="field 'role'"):
        reg.register_adapter("a", "policy", make_adapter("sft"), base="tiny")
    d = make_adapter()
    (d / "training_args.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="pickle"):
        reg.register_adapter("a", "sft", d, base="tiny")
    with pytest.raises(NotFoundError):
        reg.register_adapter("a", "sft", make_adapter(), base="nope")
    with pytest.raises(ValueError, match="reserved"):
        reg.register_adapter("a", "sft", make_adapter(), base="tiny", metadata={"base": "x"})
    with pytest.raises(ValueError, match="invalid registry name"):
        reg.register_adapter("../evil", "sft", make_adapter(), base="tiny")
    assert reg.list(kind="adapter") == []
    tmp = reg.artifacts / ".tmp"
    assert not tmp.exists() or not any(tmp.iterdir())


def test_a_name_belongs_to_one_kind(reg, base_dir, make_adapter):
    reg.register_base("tiny", str(base_dir))
    with pytest.raises(RegistryError, match="already belongs to a base"):
        reg.register_adapter("tiny", "sft", make_adapter(), base="tiny")
    with pytest.raises(ValueError, match="is a base"):
        reg.register_adapter("x", "sft", make_adapter(), base="tiny", run="tiny")


# ---------------------------------------------------------------- datasets and runs


def test_register_dataset_from_manifest(reg, dataset_dir):
    e = reg.register_dataset("prefs", dataset_dir)
    assert e.kind == "dataset" and e.path == dataset_dir.resolve()
    assert e.metadata["content_hash"] == "ab" * 32
    assert e.metadata["manifest"]["counts"] == {"train": 1}
    assert set(e.files) == {"manifest.json", "train.jsonl"}
    assert reg.register_dataset("prefs", dataset_dir).ref == e.ref


def test_register_dataset_bad_manifest_names_file_and_field(reg, dataset_dir):
    m = json.loads((dataset_dir / "manifest.json").read_text())
    del m["content_hash"]
    (dataset_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"manifest\.json: field 'content_hash' missing"):
        reg.register_dataset("prefs", dataset_dir)
    (dataset_dir / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"manifest\.json: not valid JSON"):
        reg.register_dataset("prefs", dataset_dir)


def test_runs_record_config_versions_metrics_and_lineage(reg, base_dir, dataset_dir, make_adapter, monkeypatch, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(git + ["init", "-q"], cwd=repo, check=True)
    subprocess.run(git + ["commit", "-q", "--allow-empty", "-m", "x"], cwd=repo, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    monkeypatch.chdir(repo)

    reg.register_base("tiny", str(base_dir))
    reg.register_dataset("prefs", dataset_dir)
    run = reg.start_run("reward", {"lr": 1e-4, "path": Path("/x")}, inputs=["tiny", "prefs:latest"], pipeline="tiny")
    assert run == "run-reward:1"
    r = reg.resolve(run)
    assert r.kind == "run"
    assert r.metadata["status"] == "running" and r.metadata["ended"] is None
    assert r.metadata["config"] == {"lr": 1e-4, "path": "/x"}
    assert r.metadata["package_version"] == rlhf.__version__
    assert r.metadata["git_commit"] == head
    assert r.relations == {"prefs:1": ["input"], "tiny:1": ["input"]}

    rm = reg.register_adapter("rm", "reward", make_adapter("reward"), base="tiny", parents=["prefs"], run=run)
    reg.finish_run(run, "completed", {"eval/accuracy": 0.75}, outputs=[rm.ref])
    r = reg.resolve(run)
    assert r.metadata["status"] == "completed" and r.metadata["ended"] is not None
    assert r.metadata["metrics"] == {"eval/accuracy": 0.75}
    with pytest.raises(RegistryError, match="already completed"):
        reg.finish_run(run, "failed", {})
    with pytest.raises(ValueError, match="status must be"):
        reg.finish_run(reg.start_run("ppo", {}, []), "ok", {})

    tree = reg.lineage("rm")
    assert tree["ref"] == "rm:1"
    anc = {(n["relation"], n["ref"]): n for n in tree["ancestors"]}
    assert set(anc) == {("base", "tiny:1"), ("parent", "prefs:1"), ("run", "run-reward:1")}
    # through the run, down to its inputs
    run_node = anc[("run", "run-reward:1")]
    assert {(n["relation"], n["ref"]) for n in run_node["ancestors"]} == {("input", "tiny:1"), ("input", "prefs:1")}
    # and from the base upward: everything derived from it
    down = reg.lineage("tiny")
    assert {(n["relation"], n["ref"]) for n in down["descendants"]} == {("base", "rm:1"), ("input", "run-reward:1")}
    run_down = next(n for n in down["descendants"] if n["ref"] == "run-reward:1")
    assert [(n["relation"], n["ref"]) for n in run_down["descendants"]] == [("run", "rm:1")]


def test_run_outside_git_records_no_commit(reg, tmp_path, monkeypatch):
    outside = tmp_path / "nogit"
    outside.mkdir()
    monkeypatch.chdir(outside)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    run = reg.start_run("sft", {}, [])
    assert reg.resolve(run).metadata["git_commit"] is None


# ---------------------------------------------------------------- aliases


def test_aliases_move_and_latest_is_reserved(reg, base_dir, make_adapter):
    reg.register_base("tiny", str(base_dir))
    for seed in range(3):
        reg.register_adapter("pol", "policy", make_adapter("policy", seed=seed), base="tiny")
    reg.tag("pol:1", "prod")
    assert reg.resolve("pol:prod").ref == "pol:1"
    assert reg.resolve("pol:1").aliases == ["prod"]
    reg.tag("pol:3", "prod")
    assert reg.resolve("pol:prod").ref == "pol:3"
    assert reg.resolve("pol:1").aliases == []
    reg.tag("pol", "staging")  # "pol" means latest
    assert reg.resolve("pol:staging").ref == "pol:3"
    with pytest.raises(ValueError, match="reserved"):
        reg.tag("pol:1", "latest")
    with pytest.raises(NotFoundError, match="not that version/alias"):
        reg.resolve("pol:canary")
    reg.untag("pol", "prod")
    with pytest.raises(NotFoundError):
        reg.resolve("pol:prod")


# ---------------------------------------------------------------- verify


def test_verify_detects_modified_deleted_and_extra_files(reg, base_dir, make_adapter):
    reg.register_base("tiny", str(base_dir))
    e = reg.register_adapter("rm", "reward", make_adapter("reward"), base="tiny")
    assert reg.verify() == []

    head = e.path / "head.safetensors"
    raw = bytearray(head.read_bytes())
    raw[-1] ^= 0xFF  # flip the last byte: same size, different content
    head.write_bytes(bytes(raw))
    (e.path / "adapter_config.json").unlink()
    (e.path / "notes.txt").write_text("x")
    found = {(p.ref, p.problem, Path(p.path).name) for p in reg.verify("rm:1")}
    assert found == {("rm:1", "modified", "head.safetensors"), ("rm:1", "missing", "adapter_config.json"),
                     ("rm:1", "unexpected", "notes.txt")}


def test_verify_checks_external_base_files(reg, base_dir):
    reg.register_base("tiny", str(base_dir))
    (base_dir / "model.safetensors").unlink()
    assert [(p.problem, Path(p.path).name) for p in reg.verify()] == [("missing", "model.safetensors")]
    shutil.rmtree(base_dir)
    assert [p.problem for p in reg.verify("tiny")] == ["missing-dir"]


# ---------------------------------------------------------------- rm and gc


def test_rm_refuses_with_dependents_unless_forced(reg, base_dir, make_adapter):
    reg.register_base("tiny", str(base_dir))
    sft = reg.register_adapter("sft", "sft", make_adapter(), base="tiny")
    pol = reg.register_adapter("pol", "policy", make_adapter("policy"), base="tiny", parents=[sft.ref])
    with pytest.raises(DependencyError, match=r"pol:1"):
        reg.remove("sft:1")
    with pytest.raises(DependencyError, match=r"pol:1, sft:1"):
        reg.remove("tiny")
    assert reg.resolve("sft:1").path.is_dir()

    removed = reg.remove("pol")
    assert removed.ref == "pol:1" and not pol.path.exists()
    reg.remove("sft:1")  # no dependents any more
    reg.remove("tiny", force=False)
    assert reg.list() == []
    assert base_dir.is_dir()  # an external base's files are never deleted


def test_forced_rm_cuts_lineage_and_version_numbers_are_not_reused(reg, base_dir, make_adapter):
    reg.register_base("tiny", str(base_dir))
    sft = reg.register_adapter("sft", "sft", make_adapter(), base="tiny")
    reg.register_adapter("pol", "policy", make_adapter("policy"), base="tiny", parents=[sft.ref])
    reg.remove("sft", force=True)
    assert not sft.path.exists()
    assert reg.resolve("pol").relations == {"tiny:1": ["base"]}
    assert reg.register_adapter("sft", "sft", make_adapter(seed=5), base="tiny").ref == "sft:2"
    with pytest.raises(NotFoundError):
        reg.resolve("sft:1")


def test_gc_removes_orphans_but_keeps_entries(reg, base_dir, make_adapter):
    reg.register_base("tiny", str(base_dir))
    e = reg.register_adapter("sft", "sft", make_adapter(), base="tiny")
    orphan = reg.artifacts / "adapter" / "sft" / "7"
    orphan.mkdir()
    dead_tmp = reg.artifacts / ".tmp" / f"{socket.gethostname()}-999999999-deadbeef"
    dead_tmp.mkdir(parents=True)
    dry = reg.gc()  # a dry run by default: reports, deletes nothing
    assert not dry.deleted and {p.name for p, _ in dry.remove} == {"7", dead_tmp.name}
    assert orphan.is_dir() and dead_tmp.is_dir()
    removed = reg.gc(dry_run=False)
    assert removed.deleted and {p.name for p, _ in removed.remove} == {"7", dead_tmp.name}
    assert not orphan.exists() and not dead_tmp.exists()
    assert e.path.is_dir() and reg.verify() == []


@pytest.mark.parametrize("point", ["copied", "renamed", "inserted"])
def test_failure_inside_registration_leaves_nothing(reg, base_dir, make_adapter, monkeypatch, point):
    from rlhf.registry import store

    reg.register_base("tiny", str(base_dir))

    def boom(p):
        if p == point:
            raise OSError(f"injected failure at {p}")

    monkeypatch.setattr(store, "crash_point", boom)
    with pytest.raises(OSError, match="injected"):
        reg.register_adapter("sft", "sft", make_adapter(), base="tiny")
    assert reg.list(kind="adapter") == []
    assert not (reg.artifacts / "adapter" / "sft" / "1").exists()
    assert not any((reg.artifacts / ".tmp").iterdir())
    assert not (reg.artifacts / ".records" / "sft").exists() or not any((reg.artifacts / ".records" / "sft").iterdir())
    monkeypatch.undo()
    # the failed attempt consumed no version number
    assert reg.register_adapter("sft", "sft", make_adapter(), base="tiny").ref == "sft:1"
