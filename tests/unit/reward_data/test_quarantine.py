"""Malformed input: every quarantine reason, with positions, and exact count reconciliation."""

from __future__ import annotations

import json

import pytest

import reward_data
from reward_data.cli import reconciliation
from reward_data.schema import REASONS

GOOD = {"prompt": "q", "chosen": "yes", "rejected": "no"}


def row(**kw):
    out = dict(GOOD)
    out.update(kw)
    return {k: v for k, v in out.items() if v is not ...}


# (raw line or row object, expected reason); each must land in quarantine with this reason.
CASES = [
    (b'{"prompt": "q", "chosen": "yes", "rejected": ', "malformed_json"),
    (b'{"prompt": "q\xff\xfe", "chosen": "yes", "rejected": "no"}', "invalid_utf8"),
    (b'{"prompt": "q\\ud800", "chosen": "yes", "rejected": "no"}', "invalid_utf8"),
    (b'["a", "list"]', "not_an_object"),
    (row(rejected=...), "missing_field"),
    (row(chosen=None), "missing_field"),
    (row(chosen=5), "wrong_type"),
    (row(prompt={"text": "q"}), "wrong_type"),
    (row(margin="big"), "wrong_type"),
    (b'{"prompt": "q", "chosen": "yes", "rejected": "no", "margin": NaN}', "bad_value"),
    (row(chosen="   \n"), "empty_text"),
    (row(prompt=""), "empty_text"),
    (row(prompt=[{"role": "narrator", "content": "q"}]), "unknown_role"),
    (row(chosen="same", rejected="same"), "chosen_equals_rejected"),
    (row(prompt=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]), "bad_value"),
    (b'{"prompt": "' + b"x" * 5000 + b'", "chosen": "yes", "rejected": "no"}', "row_too_large"),
]


@pytest.fixture(params=["fast", "stdlib"])
def json_backend(request, monkeypatch):
    """Run a test with orjson (when installed) and with the pure-stdlib fallback."""
    if request.param == "stdlib":
        from reward_data import fastjson, ingestion, sources

        monkeypatch.setattr(sources, "fast_loads", None)
        monkeypatch.setattr(ingestion, "dumps", fastjson.std_dumps)
    return request.param


def test_every_reason_is_quarantined_with_its_position(write_jsonl, quarantined, json_backend):
    lines = []
    for i, (value, _) in enumerate(CASES):
        lines.append(row(prompt=f"good {i}"))  # a good row between bad ones keeps positions honest
        lines.append(value)
    path = write_jsonl("bad.jsonl", lines)
    info = reward_data.ingest([path], "bad", format="explicit", max_row_bytes=4096)
    q = quarantined(info.ref)
    assert [(e["reason"], e["source"]["row"]) for e in q] == [(reason, 2 * i + 1) for i, (_, reason) in enumerate(CASES)]
    for e in q:
        assert e["source"]["file"] == "bad.jsonl"
        assert e["detail"] and e["reason"] in REASONS
        assert e["raw"]  # the raw line (or its head) is kept for inspection
    c = info.manifest["counts"]
    assert c["rows_in"] == 2 * len(CASES)
    assert c["accepted"] == len(CASES) and c["quarantined"] == len(CASES) and c["duplicates"] == 0
    assert c["rows_in"] == c["accepted"] + c["duplicates"] + c["quarantined"]
    assert info.manifest["quarantine_reasons"]["invalid_utf8"] == 2


def test_field_errors_name_the_field(write_jsonl, quarantined):
    path = write_jsonl("f.jsonl", [row(chosen=5), row(rejected=...)])
    info = reward_data.ingest([path], "f", allow_partial=True)
    assert [(e["field"], "'chosen'" in e["detail"] or "'rejected'" in e["detail"]) for e in quarantined(info.ref)] == [
        ("chosen", True), ("rejected", True)]


def test_huge_line_is_skipped_without_reading_it_whole(write_jsonl, records, quarantined):
    big = b'{"prompt": "' + b"y" * 3_000_000 + b'", "chosen": "a", "rejected": "b"}'
    path = write_jsonl("big.jsonl", [big, row()])
    info = reward_data.ingest([path], "big", max_row_bytes=100_000)
    (q,) = quarantined(info.ref)
    assert q["reason"] == "row_too_large" and str(len(big)) in q["detail"]
    assert len(q["raw"]) <= 200
    assert [r["source"]["row"] for r in records(info.ref)] == [1]


def test_duplicates_counted_and_listed(write_jsonl):
    path = write_jsonl("d.jsonl", [GOOD, row(margin=3.0), GOOD, row(prompt="other")])
    info = reward_data.ingest([path], "d")
    c = info.manifest["counts"]
    # A margin is not part of the content: row 1 duplicates row 0.
    assert (c["accepted"], c["duplicates"]) == (2, 2)
    dups = list(reward_data.read_split(info.ref, "duplicates"))
    assert [d["source"]["row"] for d in dups] == [1, 2]
    kept = {r["id"] for s in ("train", "test") for r in reward_data.read_split(info.ref, s)}
    assert {d["id"] for d in dups} <= kept


def test_blank_lines_are_not_rows(write_jsonl):
    path = write_jsonl("b.jsonl", [GOOD, "", "   ", row(prompt="q2")])
    info = reward_data.ingest([path], "b")
    assert info.manifest["counts"]["rows_in"] == 2


@pytest.mark.parametrize("counts", [
    {"rows_in": 10, "rows_quarantined": 2, "rows_with_pairs": 8, "pairs": 20, "accepted": 15, "duplicates": 3,
     "pairs_quarantined": 2, "train": 14, "test": 1},
])
def test_reconciliation_lines(counts):
    assert all(ok for _, ok in reconciliation(counts))
    broken = dict(counts, accepted=16)
    assert not all(ok for _, ok in reconciliation(broken))


def test_bad_json_array_element_is_a_clear_error(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text('[{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": ]')
    with pytest.raises(ValueError, match=r"arr\.json.*element 1"):
        reward_data.ingest([path], "arr")
    assert reward_data.list_names() == []


def test_json_array_rows_are_quarantined_individually(tmp_path, quarantined):
    path = tmp_path / "arr.json"
    path.write_text(json.dumps([GOOD, row(chosen=""), row(prompt="z")], indent=2))
    info = reward_data.ingest([path], "arr")
    assert [(e["reason"], e["source"]["row"]) for e in quarantined(info.ref)] == [("empty_text", 1)]
    assert info.manifest["counts"]["accepted"] == 2


def test_content_hash_does_not_depend_on_the_json_backend(write_jsonl, monkeypatch):
    from reward_data import fastjson, ingestion, sources

    lines = [row(prompt=f"caf\u00e9 {i} \u2028 \x01", chosen="\U0001f600 ok") for i in range(50)]
    lines += [row(chosen="\t"), b'{"prompt": "q\\ud800", "chosen": "a", "rejected": "b"}', b"{bad"]
    path = write_jsonl("h.jsonl", lines)
    fast = reward_data.ingest([path], "h")
    monkeypatch.setattr(sources, "fast_loads", None)
    monkeypatch.setattr(ingestion, "dumps", fastjson.std_dumps)
    slow = reward_data.ingest([path], "h")
    assert fast.content_hash == slow.content_hash
    assert fast.manifest["quarantine_reasons"] == {"empty_text": 1, "invalid_utf8": 1, "malformed_json": 1}
