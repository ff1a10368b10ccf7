"""Versioned store: numbering, immutability, reproducible hashes, atomic publish, races, split."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import reward_data
from reward_data import store

REPO = Path(__file__).resolve().parents[3]


def rows(n, offset=0):
    return [{"prompt": f"question {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(offset, offset + n)]


def test_versions_number_up_and_resolve(write_jsonl, tmp_path):
    path = write_jsonl("a.jsonl", rows(20))
    v1 = reward_data.ingest([path], "ds")
    v2 = reward_data.ingest([path], "ds", test_fraction=0.5)
    assert (v1.version, v2.version) == (1, 2)
    home = Path(os.environ["RLHF_HOME"])
    assert v1.path == home / "data" / "ds" / "1"
    assert reward_data.resolve("ds") == v2.path
    assert reward_data.resolve("ds:latest") == v2.path
    assert reward_data.resolve("ds:1") == v1.path
    with pytest.raises(KeyError, match="available: 1, 2"):
        reward_data.resolve("ds:3")
    with pytest.raises(KeyError, match="not found"):
        reward_data.resolve("nope")
    # explicit home argument wins over $RLHF_HOME
    other = tmp_path / "other_home"
    v = reward_data.ingest([path], "ds", home=other)
    assert v.version == 1 and v.path == other / "data" / "ds" / "1"
    assert reward_data.resolve("ds", home=other) == v.path


def test_same_input_same_content_hash_and_manifest(write_jsonl):
    path = write_jsonl("a.jsonl", rows(50) + [{"prompt": "x", "chosen": "", "rejected": "y"}])
    v1 = reward_data.ingest([path], "ds")
    v2 = reward_data.ingest([path], "ds")
    assert v1.content_hash == v2.content_hash
    m = json.loads((v1.path / "manifest.json").read_text())
    assert m["content_hash"] == v1.content_hash and m["version"] == 1 and m["schema_version"] == 1
    for key in ("rows_in", "accepted", "duplicates", "quarantined", "train", "test"):
        assert key in m["counts"]
    (src,) = m["sources"]
    import hashlib
    assert src["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert src["format"] == "explicit" and src["name"] == "a.jsonl"
    assert m["options"]["test_fraction"] == 0.05 and m["options"]["ties"] == "drop"
    assert m["created"].endswith("Z")
    for name, meta in m["files"].items():
        assert hashlib.sha256((v1.path / name).read_bytes()).hexdigest() == meta["sha256"]
    # A different option gives a different hash.
    v3 = reward_data.ingest([path], "ds", test_fraction=0.5)
    assert v3.content_hash != v1.content_hash


def test_same_data_at_another_path_hashes_the_same(write_jsonl, tmp_path):
    path = write_jsonl("a.jsonl", rows(10))
    copy = tmp_path / "elsewhere" / "a.jsonl"
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    assert reward_data.ingest([path], "x").content_hash == reward_data.ingest([copy], "y").content_hash


def test_versions_are_read_only(write_jsonl):
    v = reward_data.ingest([write_jsonl("a.jsonl", rows(5))], "ds")
    for f in v.path.iterdir():
        assert not os.access(f, os.W_OK) or os.geteuid() == 0
        assert f.stat().st_mode & 0o222 == 0


def test_failed_ingest_leaves_no_version(write_jsonl, monkeypatch):
    path = write_jsonl("a.jsonl", rows(10))
    reward_data.ingest([path], "ds")
    from reward_data import ingestion

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(ingestion.LengthStats, "add", boom)
    with pytest.raises(RuntimeError):
        reward_data.ingest([path], "ds")
    name_dir = Path(os.environ["RLHF_HOME"]) / "data" / "ds"
    assert sorted(p.name for p in name_dir.iterdir()) == ["1"]


def test_killed_ingest_leaves_no_half_version(write_jsonl, tmp_path):
    big = tmp_path / "big.jsonl"
    with open(big, "w") as f:
        for i in range(400_000):
            f.write(f'{{"prompt": "question {i}", "chosen": "good {i}", "rejected": "bad {i}"}}\n')
    home = tmp_path / "kill_home"
    env = dict(os.environ, RLHF_HOME=str(home), PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "reward_data", "ingest", str(big), "--name", "ds"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    name_dir = home / "data" / "ds"
    deadline = time.time() + 900  # a hang guard only, never a speed check
    # Kill it once it is writing records into its temporary directory.
    while time.time() < deadline and proc.poll() is None:
        tmps = list(name_dir.glob(".tmp-*")) if name_dir.is_dir() else []
        if tmps and (tmps[0] / "train.jsonl").exists() and (tmps[0] / "train.jsonl").stat().st_size > 0:
            break
        time.sleep(0.02)
    else:
        proc.kill()
        pytest.fail("ingest ended (or hung) before it was seen writing")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert reward_data.list_names(home=home) == []
    with pytest.raises(KeyError):
        reward_data.resolve("ds", home=home)
    # The next ingest removes the dead process's leftovers and publishes version 1.
    v = reward_data.ingest([write_jsonl("small.jsonl", rows(3))], "ds", home=home)
    assert v.version == 1
    assert not list(name_dir.glob(".tmp-*"))


def test_concurrent_ingests_get_distinct_versions(write_jsonl):
    paths = [write_jsonl(f"{i}.jsonl", rows(200, offset=1000 * i)) for i in range(4)]
    results, errors = [], []

    def run(p):
        try:
            results.append(reward_data.ingest([p], "race"))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(p,)) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(r.version for r in results) == [1, 2, 3, 4]
    for r in results:
        m = store.read_manifest(r.path)
        assert m["version"] == r.version and m["content_hash"] == r.content_hash


def test_publish_retries_when_a_version_number_is_taken(write_jsonl, monkeypatch):
    path = write_jsonl("a.jsonl", rows(5))
    real_versions = store.versions
    calls = {"n": 0}

    def stale_versions(name, home=None):
        # The first look-up misses a version published meanwhile by "another process".
        calls["n"] += 1
        return [] if calls["n"] == 1 else real_versions(name, home)

    reward_data.ingest([path], "ds")
    monkeypatch.setattr(store, "versions", stale_versions)
    v = reward_data.ingest([path], "ds")
    assert v.version == 2 and store.read_manifest(v.path)["version"] == 2
    assert store.read_manifest(reward_data.resolve("ds:1"))["version"] == 1


def test_split_by_prompt_hash_is_deterministic_and_disjoint(write_jsonl, records):
    data = []
    for i in range(300):
        # Several pairs per prompt: all of them must land on the same side.
        data += [{"prompt": f"p{i}", "chosen": f"c{i}-{k}", "rejected": f"r{i}-{k}"} for k in range(3)]
    path = write_jsonl("s.jsonl", data)
    v = reward_data.ingest([path], "s", test_fraction=0.2)
    train = {r["prompt"][0]["content"] for r in reward_data.read_split(v.ref, "train")}
    test = {r["prompt"][0]["content"] for r in reward_data.read_split(v.ref, "test")}
    assert not train & test
    assert len(train) + len(test) == 300
    assert 30 <= len(test) <= 90  # about 20% of prompts
    c = v.manifest["counts"]
    assert c["test"] == 3 * len(test) and c["train"] == 3 * len(train)
    # Same prompts in another dataset, different order: same side.
    v2 = reward_data.ingest([write_jsonl("s2.jsonl", list(reversed(data)))], "s2", test_fraction=0.2)
    assert {r["prompt"][0]["content"] for r in reward_data.read_split(v2.ref, "test")} == test


def test_zero_test_fraction(write_jsonl):
    v = reward_data.ingest([write_jsonl("a.jsonl", rows(30))], "z", test_fraction=0.0)
    assert v.manifest["counts"]["test"] == 0


def test_bad_arguments_are_named(write_jsonl):
    path = write_jsonl("a.jsonl", rows(3))
    with pytest.raises(ValueError, match="bad name"):
        reward_data.ingest([path], "bad name")
    with pytest.raises(ValueError, match="test_fraction"):
        reward_data.ingest([path], "x", test_fraction=1.5)
    with pytest.raises(ValueError, match="unknown ingest option.*colour"):
        reward_data.ingest([path], "x", colour="red")
    with pytest.raises(ValueError, match="binarize"):
        reward_data.ingest([path], "x", binarize="best_of_all")
    with pytest.raises(ValueError, match="unknown format"):
        reward_data.ingest([path], "x", format="xml")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        reward_data.ingest([path.parent / "missing.jsonl"], "x")
    assert reward_data.list_names() == []


def test_read_split_records_are_reward_trainer_ready(write_jsonl):
    v = reward_data.ingest([write_jsonl("a.jsonl", rows(10))], "r", test_fraction=0.0)
    for rec in reward_data.read_split(v.ref, "train"):
        for side in ("prompt", "chosen", "rejected"):
            assert all(set(m) == {"role", "content"} for m in rec[side])
        assert rec["prompt"][-1]["role"] == "user" and rec["chosen"][0]["role"] == "assistant"
        assert len(rec["id"]) == 32 and isinstance(rec["source"]["row"], int)
    # also readable by directory path
    assert len(list(reward_data.read_split(v.path, "train"))) == 10
