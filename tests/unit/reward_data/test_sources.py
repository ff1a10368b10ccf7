"""Containers (JSONL, JSON, gz, CSV, Parquet, directories, `datasets`) and format detection."""

from __future__ import annotations

import csv
import gzip
import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reward_data
from reward_data import FormatError
from reward_data.sources import _split_lines

ROWS = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(12)]


def contents(ref):
    recs = [r for s in ("train", "test") for r in reward_data.read_split(ref, s)]
    return sorted((r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in recs)


EXPECTED = sorted((r["prompt"], r["chosen"], r["rejected"]) for r in ROWS)


def test_jsonl_gz_json_array_csv_parquet_all_agree(tmp_path):
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in ROWS).encode()))
    (tmp_path / "b.json").write_text(json.dumps(ROWS, indent=1))
    with open(tmp_path / "c.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
        w.writeheader()
        w.writerows(ROWS)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    hashes = set()
    for name in ("a.jsonl.gz", "b.json", "c.csv", "d.parquet"):
        info = reward_data.ingest([tmp_path / name], name.replace(".", "_"))
        assert contents(info.ref) == EXPECTED, name
        assert info.manifest["sources"][0]["kind"] in ("jsonl", "json", "csv", "parquet")
        # Records carry the source file name, so hash the records without it.
        hashes.add(tuple(r["id"] for s in ("train", "test") for r in reward_data.read_split(info.ref, s)))
    assert len(hashes) == 1  # same canonical content -> same ids whatever the container


def test_csv_multiline_fields_invalid_utf8_and_ragged_rows(tmp_path):
    path = tmp_path / "x.csv"
    path.write_bytes(
        b'prompt,chosen,rejected\n"line one\nline two",yes,no\nq2,\xff\xfe,no\nq3,yes,no,EXTRA\nq4,yes,no\n'
    )
    info = reward_data.ingest([path], "x")
    q = list(reward_data.read_split(info.ref, "quarantine"))
    assert [(e["reason"], e["source"]["row"], e["source"]["line"]) for e in q] == [
        ("invalid_utf8", 1, 4), ("long_row", 2, 5)]
    assert ("line one\nline two", "yes", "no") in contents(info.ref)


def test_csv_labels_as_strings(tmp_path):
    path = tmp_path / "shp.csv"
    path.write_text("history,human_ref_A,human_ref_B,labels,score_A,score_B\nq,a,b,0,2,8\n")
    info = reward_data.ingest([path], "shp")
    (rec,) = [r for s in ("train", "test") for r in reward_data.read_split(info.ref, s)]
    assert rec["chosen"][0]["content"] == "b" and rec["margin"] == 4.0


def test_directory_is_walked_in_order_and_non_data_files_reported(tmp_path):
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[6:]))
    (d / "1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:6]))
    (d / "README.md").write_text("not data")
    (d / ".hidden.jsonl").write_text("garbage\n")
    info = reward_data.ingest([d], "dir")
    m = info.manifest
    assert [s["name"] for s in m["sources"]] == ["data/1.jsonl", "data/sub/2.jsonl"]
    assert [s["rows_in"] for s in m["sources"]] == [6, 6]
    assert m["skipped_files"] == [str((d / "README.md").resolve())]
    assert contents(info.ref) == EXPECTED


def test_datasets_load_from_disk(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:8]), "test": datasets.Dataset.from_list(ROWS[8:])})
    dd.save_to_disk(str(tmp_path / "hf"))
    info = reward_data.ingest([tmp_path / "hf"], "hf")
    assert sorted(s["name"] for s in info.manifest["sources"]) == ["hf[test]", "hf[train]"]
    assert contents(info.ref) == EXPECTED
    only = reward_data.ingest([tmp_path / "hf"], "hf_train", hf_split="train")
    assert only.manifest["counts"]["rows_in"] == 8
    with pytest.raises(ValueError, match="no split 'valid'"):
        reward_data.ingest([tmp_path / "hf"], "bad", hf_split="valid")


def test_ambiguous_format_lists_the_matches(tmp_path):
    row = {"prompt": "q", "chosen": "a", "rejected": "b", "response_0": "x", "response_1": "y", "better_response_id": 0}
    path = tmp_path / "amb.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(FormatError, match=r"amb\.jsonl.*ambiguous.*explicit, two_response.*--format"):
        reward_data.ingest([path], "amb")
    info = reward_data.ingest([path], "amb", format="two_response")
    assert info.manifest["format"] == "two_response"


def test_unknown_format_names_columns_and_suggests_mapping(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps({"question": "q", "good": "a", "bad": "b"}) + "\n")
    with pytest.raises(FormatError, match=r"no known format.*bad, good, question.*--map"):
        reward_data.ingest([path], "u")


def test_mixed_formats_across_files(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"history": "h", "human_ref_A": "x", "human_ref_B": "y", "labels": 1}) + "\n")
    info = reward_data.ingest([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], "mix")
    assert info.manifest["format"] == "mixed"
    assert [s["format"] for s in info.manifest["sources"]] == ["explicit", "shp"]


def test_same_basename_in_two_folders_stays_distinguishable(tmp_path):
    for d, row in (("x", ROWS[0]), ("y", ROWS[1])):
        (tmp_path / d).mkdir()
        (tmp_path / d / "train.jsonl").write_text(json.dumps(row) + "\n")
    info = reward_data.ingest([tmp_path / "x" / "train.jsonl", tmp_path / "y" / "train.jsonl"], "same")
    names = [s["name"] for s in info.manifest["sources"]]
    assert len(set(names)) == 2


@given(
    st.lists(st.sampled_from([0, 1, 63, 64, 65, 1 << 20, (1 << 20) + 1, 1_500_000]), max_size=12),
    st.booleans(),
    st.sampled_from([64, 1 << 20]),
)
@settings(max_examples=60, deadline=None)
def test_line_splitter_matches_naive_split(lengths, trailing_newline, limit):
    # Block-wise splitting must agree with bytes.split for every line length around the block
    # size and the limit, while never returning more than 200 bytes of an oversize line.
    data = b"\n".join(bytes([97 + i % 26]) * n for i, n in enumerate(lengths)) + (b"\n" if trailing_newline else b"")
    expected = data.split(b"\n")
    if expected and expected[-1] == b"":
        expected.pop()
    expected = [(line[:200], len(line), None) if len(line) > limit else (line, 0, None) for line in expected]
    if expected and not data.endswith(b"\n"):
        expected[-1] = (*expected[-1][:2], "")  # the last line has no newline
    assert list(_split_lines(io.BytesIO(data), limit)) == expected
