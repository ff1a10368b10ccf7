"""The store holds only what a source folder contains (issue 29, item 5): registering an
adapter or a dataset refuses a symlink that leaves the folder, stored copies are never
more readable than their sources or than the umask allows, and ``verify`` reports a
stored file that was replaced by a symlink."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

pytestmark = pytest.mark.reliability


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_an_adapter_symlink_out_of_its_folder_is_refused(reg, base_dir, make_adapter, tmp_path):
    reg.register_base("tiny", str(base_dir))
    secret = tmp_path / "secret.txt"
    secret.write_text("root:$6$hash")
    src = make_adapter()
    (src / "notes.txt").symlink_to(secret)
    with pytest.raises(ValueError, match=r"notes.txt: a symlink to .*secret.txt, outside "):
        reg.register_adapter("sft", "sft", src, base="tiny")
    assert reg.list() == [reg.resolve("tiny")]  # nothing registered
    stored = list((reg.artifacts).rglob("notes.txt"))
    assert stored == []


def test_an_adapter_symlink_inside_its_folder_is_copied_as_a_file(reg, base_dir, make_adapter):
    reg.register_base("tiny", str(base_dir))
    src = make_adapter()
    (src / "real.txt").write_text("inside")
    (src / "notes.txt").symlink_to("real.txt")
    e = reg.register_adapter("sft", "sft", src, base="tiny")
    assert (e.path / "notes.txt").read_text() == "inside" and not (e.path / "notes.txt").is_symlink()


def test_stored_copies_are_no_more_readable_than_the_source_or_the_umask(reg, base_dir, make_adapter):
    reg.register_base("tiny", str(base_dir))
    src = make_adapter()
    os.chmod(src / "adapter_model.safetensors", 0o600)  # a private file stays private in a shared store
    e = reg.register_adapter("sft", "sft", src, base="tiny")
    assert _mode(e.path / "adapter_model.safetensors") == 0o600
    assert _mode(e.path / "adapter_config.json") == 0o644 & ~_umask()
    old = os.umask(0o077)
    try:
        e2 = reg.register_adapter("sft", "sft", make_adapter(seed=5), base="tiny")
    finally:
        os.umask(old)
    assert {_mode(p) for p in e2.path.iterdir()} == {0o600}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_verify_reports_a_stored_file_replaced_by_a_symlink(reg, base_dir, make_adapter, tmp_path):
    reg.register_base("tiny", str(base_dir))
    e = reg.register_adapter("sft", "sft", make_adapter(), base="tiny")
    outside = tmp_path / "copy.json"
    target = e.path / "adapter_config.json"
    outside.write_bytes(target.read_bytes())  # same bytes, so the hash alone cannot tell
    target.unlink()
    target.symlink_to(outside)
    found = [(p.problem, Path(p.path).name) for p in reg.verify("sft:1")]
    assert found == [("symlink", "adapter_config.json")]


def _forge(path: Path, header: bytes, data: bytes = b"") -> None:
    import struct

    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


@pytest.mark.parametrize("header, why", [
    (b"[" * 100_000 + b"]" * 100_000, "nests too deeply"),
    (b'{"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}', "outside the 16 data bytes"),
    (b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [8, 4]}}', "data_offsets"),
    (b'[1, 2]', "not a mapping"),
])
def test_a_forged_safetensors_header_is_refused_naming_the_file(reg, base_dir, make_adapter, header, why):
    reg.register_base("tiny", str(base_dir))
    src = make_adapter()
    _forge(src / "adapter_model.safetensors", header, b"\0" * 16)
    with pytest.raises(ValueError, match=f"adapter_model.safetensors: not a safetensors file .*{why}"):
        reg.register_adapter("sft", "sft", src, base="tiny")
    assert [e.kind for e in reg.list()] == ["base"]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_migrate_into_a_database_of_something_else_says_so(reg, base_dir, tmp_path, capsys):
    import sqlite3

    from rlhf.registry.cli import main

    reg.register_base("tiny", str(base_dir))
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:  # another application's database with an `entries` table
        conn.execute("CREATE TABLE entries (x INTEGER)")
        conn.execute("INSERT INTO entries VALUES (1)")
    assert main(["migrate", "--to", str(other)]) == 1
    err = capsys.readouterr().err
    assert "something other than a registry" in err and "already holds registry entries" not in err, err
