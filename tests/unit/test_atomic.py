"""rlhf.atomic: the one writer of files and directories (temp name beside the target, then rename)."""

from __future__ import annotations

import ast
import errno
import json
from pathlib import Path

import pytest

from rlhf.atomic import write_bytes, write_dir, write_json, write_lines, write_text

ROOT = Path(__file__).resolve().parents[2]


def test_writes_replace_the_whole_file_and_leave_no_temp(tmp_path):
    target = tmp_path / "sub" / "state.json"
    write_json(target, {"b": 1, "a": [1, 2]})
    assert json.loads(target.read_text()) == {"a": [1, 2], "b": 1}
    assert target.read_text().index('"a"') < target.read_text().index('"b"')  # keys sorted
    write_text(target, "short")
    assert target.read_text() == "short"
    write_lines(tmp_path / "rows.jsonl", ['{"x": 1}', '{"x": 2}'])
    assert (tmp_path / "rows.jsonl").read_text() == '{"x": 1}\n{"x": 2}\n'
    write_bytes(tmp_path / "raw", b"\x00\x01", fsync=True, mode=0o640)
    assert (tmp_path / "raw").read_bytes() == b"\x00\x01" and (tmp_path / "raw").stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["raw", "rows.jsonl", "state.json", "sub"]


def test_a_failed_write_keeps_the_old_file_and_names_the_path_on_a_full_disk(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    write_json(target, {"ok": 1})
    real = Path.write_text

    def full(self, text, *a, **k):
        real(self, text[:3], *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError, match=f"while writing {target}") as e:
        write_json(target, {"ok": 2})
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_write_dir_publishes_whole_directories_only(tmp_path):
    final = tmp_path / "adapter"
    write_dir(final, lambda d: (d / "w.safetensors").write_text("v1"))
    assert (final / "w.safetensors").read_text() == "v1" and final.stat().st_mode & 0o700 == 0o700

    def broken(d: Path) -> None:
        (d / "w.safetensors").write_text("v2")
        raise RuntimeError("killed halfway")

    with pytest.raises(RuntimeError, match="halfway"):
        write_dir(final, broken)
    assert (final / "w.safetensors").read_text() == "v1"  # the old directory is intact
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no .tmp-* left behind
    write_dir(final, lambda d: (d / "other").write_text("v3"))
    assert sorted(p.name for p in final.iterdir()) == ["other"]  # replaced, not merged


def test_no_module_renames_a_temp_file_into_place_by_hand():
    """Every writer goes through rlhf.atomic: no other module of the package calls os.replace
    or Path.replace/rename on a temp file (the registry's own staging of artifact directories,
    which needs its database transaction around the rename, is the one exception)."""
    allowed = {"rlhf/atomic.py", "rlhf/registry/registry.py", "rlhf/registry/store.py"}
    offenders = []
    for path in sorted((ROOT / "rlhf").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("replace", "rename")):
                continue
            owner = node.func.value
            if isinstance(owner, ast.Name) and owner.id == "os":
                offenders.append(f"{rel}:{node.lineno}: os.{node.func.attr}")
            # Path.replace(target) / Path.rename(target) take one argument (str.replace two,
            # dataclasses.replace keyword arguments)
            elif len(node.args) == 1 and not (isinstance(owner, ast.Name) and owner.id == "dataclasses"):
                offenders.append(f"{rel}:{node.lineno}: .{node.func.attr}()")
    assert offenders == []
