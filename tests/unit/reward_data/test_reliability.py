"""Issue 17 (ingestion items) and issue 11 (reward_data stands alone): full disks, name checks,
and importing the data library with ``rlhf`` unimportable."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import reward_data
from reward_data import store
from reward_data.cli import main

REPO = Path(__file__).resolve().parents[3]


class _FullDisk(io.FileIO):
    """A file on a disk with ``quota`` bytes left: writes past it fail with ENOSPC like a real one."""

    quota = 0

    def write(self, b):
        if self.tell() + len(b) > _FullDisk.quota:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(b)


@pytest.fixture
def full_disk(monkeypatch):
    """Make the store's record files live on a nearly full disk; returns a setter for the quota."""
    real_open = open

    def fake_open(path, mode="r", *args, buffering=-1, **kwargs):
        if mode == "wb" and str(path).endswith(".jsonl"):
            return io.BufferedWriter(_FullDisk(path, "w"), buffer_size=max(buffering, io.DEFAULT_BUFFER_SIZE))
        return real_open(path, mode, *args, buffering=buffering, **kwargs)

    def set_quota(n: int) -> None:
        _FullDisk.quota = n
        monkeypatch.setattr(store, "open", fake_open, raising=False)

    return set_quota


def _rows(n, tag="q"):
    return [{"prompt": f"{tag} {i} " + "word " * 20, "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(n)]


@pytest.mark.parametrize("rows, quota", [(5000, 200_000), (10, 100)], ids=["while-writing", "at-final-flush"])
def test_disk_full_loses_nothing_leaves_no_temp_and_names_the_path(write_jsonl, tmp_path, full_disk, rows, quota,
                                                                   monkeypatch):
    home = tmp_path / "home"
    first = reward_data.ingest([write_jsonl("v1.jsonl", _rows(20))], "demo", home=home)
    before = sorted((p.name, p.read_bytes()) for p in first.path.iterdir())
    path = write_jsonl("big.jsonl", _rows(rows, "big"))

    full_disk(quota)
    with pytest.raises(store.DiskFullError) as exc:
        reward_data.ingest([path], "demo", home=home)
    msg = str(exc.value)
    assert "No space left on device" in msg and ".jsonl" in msg and str(home / "data" / "demo") in msg
    name_dir = home / "data" / "demo"
    assert [p.name for p in name_dir.iterdir()] == ["1"]  # no temporary version left behind
    assert sorted((p.name, p.read_bytes()) for p in first.path.iterdir()) == before  # nothing committed lost
    # The CLI says the same in one line, with exit status 1.
    assert main(["ingest", str(path), "--name", "other", "--home", str(home)]) == 1

    monkeypatch.undo()  # space is free again: later ingests (this name and others) work
    assert reward_data.ingest([path], "demo", home=home).version == 2
    assert reward_data.ingest([path], "other", home=home).version == 1
    assert not [p for p in (home / "data").rglob(".tmp-*")]


def test_disk_full_cli_message_names_the_path(write_jsonl, tmp_path, full_disk, capsys):
    path = write_jsonl("x.jsonl", _rows(10))
    full_disk(50)
    assert main(["ingest", str(path), "--name", "x", "--home", str(tmp_path / "h")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "No space left on device while writing" in err and str(tmp_path / "h" / "data" / "x") in err


@pytest.mark.parametrize("name", ["demo\n", "demo\r", "\ndemo", "de\nmo", "demo ", ""])
def test_dataset_name_rejects_newlines_and_blanks(name, write_jsonl, tmp_path):
    with pytest.raises(ValueError, match="dataset name"):
        store.check_name(name)
    with pytest.raises(ValueError, match="dataset name"):
        reward_data.ingest([write_jsonl("n.jsonl", _rows(2))], name, home=tmp_path)
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


_BLOCKER = r"""
import importlib, importlib.abc, pkgutil, sys

class BlockRlhf(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "rlhf" or name.startswith("rlhf."):
            raise ImportError(f"blocked import of {name}: reward_data must not depend on rlhf")
        return None

sys.meta_path.insert(0, BlockRlhf())
import reward_data
for mod in pkgutil.walk_packages(reward_data.__path__, "reward_data."):
    # reward_data.synthetic is being moved to rlhf/tasks (it is the toy task, not the library);
    # __main__ would run the CLI on import.
    if mod.name not in ("reward_data.synthetic", "reward_data.__main__"):
        importlib.import_module(mod.name)
from reward_data.cli import main
src, home = sys.argv[1], sys.argv[2]
assert main(["ingest", src, "--name", "alone", "--home", home]) == 0
assert main(["show", "alone", "--home", home]) == 0
assert not [m for m in sys.modules if m == "rlhf" or m.startswith("rlhf.")]
print("STANDALONE-OK")
"""


def test_reward_data_imports_and_ingests_without_rlhf(write_jsonl, tmp_path):
    path = write_jsonl("s.jsonl", _rows(5))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(REPO)
    r = subprocess.run([sys.executable, "-c", _BLOCKER, str(path), str(tmp_path / "home")], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "STANDALONE-OK" in r.stdout


def test_rlhf_paths_reuses_the_data_store_helpers():
    from rlhf import paths
    from reward_data import paths as rd_paths

    assert paths.fsync_dir is rd_paths.fsync_dir and paths.pid_alive is rd_paths.pid_alive
    assert paths.rlhf_home("/x") == rd_paths.default_home("/x")
    assert json.dumps(str(paths.rlhf_home())) == json.dumps(str(rd_paths.default_home()))


def _cut_gz(path: Path, text: str) -> Path:
    import gzip

    data = gzip.compress(text.encode())
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def test_truncated_gz_variants_never_give_a_traceback(tmp_path, capsys):
    rows = [{"prompt": f"question {i} " + "pad " * 30, "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(400)]
    home = str(tmp_path / "home")
    # JSON Lines and CSV: the cut point is quarantined as `truncated`, naming its 1-based line.
    jl = _cut_gz(tmp_path / "a.jsonl.gz", "".join(json.dumps(r) + "\n" for r in rows))
    header = "prompt,chosen,rejected\n"
    cs = _cut_gz(tmp_path / "b.csv.gz", header + "".join(f"{r['prompt']},{r['chosen']},{r['rejected']}\n" for r in rows))
    for path, name in ((jl, "jl"), (cs, "cs")):
        assert main(["ingest", str(path), "--name", name, "--home", home]) == 0
        assert "damaged input: truncated 1" in capsys.readouterr().err
        assert main(["quarantine", name, "--reason", "truncated", "--home", home]) == 0
        out = capsys.readouterr().out
        assert f"{path.name}:" in out and "truncated" in out and "line " in out
    # A JSON array cannot resync after a cut: a one-line error naming the file and line.
    arr = _cut_gz(tmp_path / "c.json.gz", "[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
    assert main(["ingest", str(arr), "--name", "arr", "--home", home]) == 1
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.count("\n") == 0
    assert str(arr) in err and "line " in err and "truncated" in err


def test_a_row_with_a_duplicate_key_is_quarantined_naming_the_key(tmp_path, write_jsonl, quarantined, records):
    """Issue 29 item 8: JSON keeps the last of two equal keys, so {"chosen": A, ..., "chosen": B}
    would silently train on B; the row is quarantined instead (JSONL and JSON arrays, and with
    a colon in the text, which the quick no-duplicates check must not mistake for a key)."""
    dup = '{"prompt": "q1", "chosen": "good", "rejected": "bad", "chosen": "bad"}'
    nested = '{"prompt": [{"role": "user", "content": "a: b", "content": "c"}], "chosen": "x", "rejected": "y"}'
    good = {"prompt": 'q2 ": note', "chosen": "yes: sure", "rejected": "no"}
    info = reward_data.ingest([write_jsonl("d.jsonl", [dup, good, nested])], "dup", test_fraction=0.0)
    got = [(q["reason"], q["source"]["line"]) for q in quarantined(info.ref)]
    assert got == [("duplicate_key", 1), ("duplicate_key", 3)]
    assert all("'chosen'" in q["detail"] or "'content'" in q["detail"] for q in quarantined(info.ref))
    assert [r["chosen"][-1]["content"] for r in records(info.ref)] == ["yes: sure"]
    # the quick check compares the text with a compact copy of the parsed row: spaces before the
    # colon, a quote written \u0022 and quotes inside strings must not hide a repeated key
    spaced = '{"prompt" : "q3", "chosen" : "a", "rejected" : "b", "rejected" : "c"}'
    escaped = '{"prompt": "say \\u0022x\\u0022: now", "chosen": "a", "rejected": "b", "chosen": "c"}'
    quoted = '{"prompt": "he said \\"x\\": y", "chosen": "a", "rejected": "b", "prompt": "z"}'
    info = reward_data.ingest([write_jsonl("s.jsonl", [spaced, escaped, quoted, good])], "dupq", test_fraction=0.0)
    assert [(q["reason"], q["source"]["line"]) for q in quarantined(info.ref)] == [("duplicate_key", i) for i in (1, 2, 3)]
    arr = tmp_path / "d.json"
    arr.write_text("[\n" + json.dumps(good) + ",\n" + dup + "\n]\n")
    info = reward_data.ingest([arr], "duparr", test_fraction=0.0)
    assert [(q["reason"], q["source"]["line"]) for q in quarantined(info.ref)] == [("duplicate_key", 3)]
