"""Issue 16: real-world exports -- system prompts, typed columns, per-response scores, templated
transcripts, loud misconfiguration, truncation, 1-based lines, resolved options, empty rejected."""

from __future__ import annotations

import csv
import gzip
import io
import json

import pytest

import reward_data
from reward_data import store
from reward_data.ingestion import IngestRefused
from reward_data.readers.scored import parse_score


def u(t):
    return {"role": "user", "content": t}


def a(t):
    return {"role": "assistant", "content": t}


def s(t):
    return {"role": "system", "content": t}


def write_csv(tmp_path, name, header, rows) -> object:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    path = tmp_path / name
    path.write_text(buf.getvalue(), encoding="utf-8")
    return path


# --- system prompts ---------------------------------------------------------------------------


def test_csv_system_column_is_mapped_and_counted(tmp_path, records):
    rows = [["You are terse." if i % 4 else "", f"question {i}", f"good {i}", f"bad {i}"] for i in range(20)]
    path = write_csv(tmp_path, "sys.csv", ["system", "question", "chosen", "rejected"], rows)
    info = reward_data.ingest([path], "sys", mapping={"system": "system", "prompt": "question", "chosen": "chosen",
                                                      "rejected": "rejected"}, test_fraction=0.0)
    recs = records(info.ref)
    assert len(recs) == 20
    by_row = {r["source"]["row"]: r for r in recs}
    assert by_row[1]["prompt"] == [s("You are terse."), u("question 1")]
    assert by_row[0]["prompt"] == [u("question 0")]  # a blank system cell adds nothing
    assert info.manifest["stats"]["with_system"] == 15
    assert info.manifest["options"]["mapping"]["system"] == "system"


@pytest.mark.parametrize("row, fmt", [
    ({"system": "Be kind.", "prompt": "q", "chosen": "yes", "rejected": "no"}, "explicit"),
    ({"system": "Be kind.", "prompt": "q", "response_a": "yes", "response_b": "no", "winner": "model_a"}, "two_response"),
    ({"system": "Be kind.", "instruction": "q", "completions": [{"response": "yes", "score": 5},
                                                                {"response": "no", "score": 1}]}, "rated"),
    ({"system": "Be kind.", "chosen": [u("q"), a("yes")], "rejected": [u("q"), a("no")]}, "implicit"),
])
def test_every_reader_with_a_system_field_puts_it_first(write_jsonl, records, row, fmt):
    info = reward_data.ingest([write_jsonl(f"{fmt}.jsonl", [row])], fmt, test_fraction=0.0)
    assert info.manifest["format"] == fmt
    (rec,) = records(info.ref)
    assert rec["prompt"] == [s("Be kind."), u("q")]
    assert rec["chosen"] == [a("yes")]
    assert info.manifest["stats"]["with_system"] == 1


# --- text stays text ----------------------------------------------------------------------------


def test_mapped_text_that_looks_like_json_stays_text(tmp_path, records):
    rows = [["Give me a JSON array of three numbers", "[1, 2, 3]", "I cannot"],
            ["List two fruits as JSON", '["apple", "pear"]', "apples and pears"]]
    path = write_csv(tmp_path, "j.csv", ["q", "good", "bad"], rows)
    info = reward_data.ingest([path], "j", mapping={"prompt": "q", "chosen": "good", "rejected": "bad"},
                              test_fraction=0.0)
    recs = records(info.ref)
    assert [r["chosen"] for r in recs] == [[a("[1, 2, 3]")], [a('["apple", "pear"]')]]
    assert info.manifest["counts"]["quarantined"] == 0


def test_jsonl_answer_that_is_a_json_array_stays_text(write_jsonl, records):
    row = {"prompt": "Reply with a JSON list", "response_a": '["a", "b"]', "response_b": "no", "winner": "model_a"}
    info = reward_data.ingest([write_jsonl("arr.jsonl", [row])], "arr", test_fraction=0.0)
    (rec,) = records(info.ref)
    assert rec["chosen"] == [a('["a", "b"]')]


def test_two_response_text_that_looks_like_turn_lists_is_decided_per_file(write_jsonl, records):
    """A file of plain-text answers where one row's prompt and both answers happen to be JSON
    array text: the file's columns are text, so that row stays text (decided per column from
    the file's sample, not per row); a file of encoded turn lists is decoded on every row."""
    looks = {"prompt": '["q"]', "response_a": '["x"]', "response_b": '["y"]', "winner": "model_a"}
    plain = {"prompt": "Reply", "response_a": "fine", "response_b": "no", "winner": "model_b"}
    info = reward_data.ingest([write_jsonl("mixed.jsonl", [looks, plain])], "mixed", test_fraction=0.0)
    assert "json_fields" not in info.manifest["sources"][0]["resolved"]  # text columns
    recs = {r["chosen"][0]["content"]: r for r in records(info.ref)}
    assert recs['["x"]']["prompt"] == [u('["q"]')] and recs["no"]["prompt"] == [u("Reply")]
    turns = {"prompt": json.dumps(["q1"]), "response_a": json.dumps(["a1"]), "response_b": json.dumps(["b1"]),
             "winner": "model_a"}
    info = reward_data.ingest([write_jsonl("turns.jsonl", [turns, dict(turns, response_a=json.dumps(["a2"]))])],
                              "turns", test_fraction=0.0)
    assert info.manifest["sources"][0]["resolved"]["json_fields"] == ["prompt", "response_a", "response_b"]
    assert {r["chosen"][0]["content"] for r in records(info.ref)} == {"a1", "a2"}


def test_json_fields_declares_which_columns_are_json(tmp_path, records):
    conv_c = json.dumps([u("hi"), a("hello")])
    conv_r = json.dumps([u("hi"), a("go away")])
    path = write_csv(tmp_path, "conv.csv", ["c", "r"], [[conv_c, conv_r]])
    mapping = {"chosen": "c", "rejected": "r"}
    # Detected: a message list is decoded...
    info = reward_data.ingest([path], "conv", mapping=mapping, test_fraction=0.0)
    assert records(info.ref)[0]["prompt"] == [u("hi")]
    # ...and declaring no JSON fields keeps it text, which an implicit pair cannot use.
    with pytest.raises(IngestRefused, match="must be a message list"):
        reward_data.ingest([path], "conv2", mapping=mapping, json_fields=())


# --- per-response scored data -------------------------------------------------------------------


def _helpsteer(prompt, response, h, c, **extra):
    return {"prompt": prompt, "response": response, "helpfulness": h, "correctness": c, "coherence": 4,
            "complexity": 1, "verbosity": 2, **extra}


def test_parse_score_expressions():
    assert parse_score("helpfulness") == [("helpfulness", 1.0)]
    assert parse_score("helpfulness*0.6+correctness*0.4") == [("helpfulness", 0.6), ("correctness", 0.4)]
    assert parse_score("0.5*helpfulness - verbosity") == [("helpfulness", 0.5), ("verbosity", -1.0)]
    with pytest.raises(ValueError, match="option score"):
        parse_score("helpfulness**2")
    with pytest.raises(ValueError, match="option score"):
        parse_score("__import__('os')")


def test_scored_rows_grouped_by_prompt_with_attribute_or_weighted_score(write_jsonl, records):
    rows = [
        _helpsteer("p1", "r1a", 4, 0), _helpsteer("p1", "r1b", 1, 4), _helpsteer("p1", "r1c", 2, 2),
        _helpsteer("p2", "r2a", 3, 3), _helpsteer("p2", "r2b", 0, 0),
    ]
    path = write_jsonl("hs.jsonl", rows)
    info = reward_data.ingest([path], "hs", score="helpfulness", test_fraction=0.0)
    assert info.manifest["format"] == "scored"
    recs = records(info.ref)
    assert [(r["prompt"], r["chosen"], r["rejected"], r["margin"]) for r in recs] == [
        ([u("p1")], [a("r1a")], [a("r1b")], 3.0), ([u("p2")], [a("r2a")], [a("r2b")], 3.0)]
    src = info.manifest["sources"][0]
    # Counts are in source records (the file's 5 lines), with the 2 prompt groups beside them.
    assert (src["records_in"], src["rows_in"], src["groups"], src["rows_with_pairs"]) == (5, 5, 2, 5)
    assert info.manifest["resolved_options"]["score"] == "helpfulness*1"
    # A weighted sum changes the ranking: p1 = 2.4, 2.2, 2.0 -> r1a over r1c.
    info = reward_data.ingest([path], "hs2", score="helpfulness*0.6+correctness*0.4", test_fraction=0.0)
    first = records(info.ref)[0]
    assert (first["chosen"], first["rejected"]) == ([a("r1a")], [a("r1c")])
    assert first["margin"] == pytest.approx(0.4)


def test_scored_ties_and_group_key(write_jsonl, records, quarantined):
    rows = [_helpsteer("p", "x", 3, 0, id="g1"), _helpsteer("p", "y", 3, 0, id="g1"),
            _helpsteer("q", "z", 1, 0, id="g2"), _helpsteer("q2", "w", 4, 0, id="g2")]
    path = write_jsonl("ties.jsonl", rows)
    info = reward_data.ingest([path], "ties", score="helpfulness", ties="keep", test_fraction=0.0, allow_partial=True)
    recs = records(info.ref)
    assert [(r["chosen"], r.get("tie"), r["margin"]) for r in recs] == [([a("x")], True, 0.0)]
    assert [q["reason"] for q in quarantined(info.ref)] == ["no_pairs", "no_pairs"]  # one response per prompt
    info = reward_data.ingest([path], "ties2", score="helpfulness", test_fraction=0.0, allow_partial=True)
    # The tied group's two records are quarantined one entry each, at their own lines.
    q = quarantined(info.ref)
    assert [(e["reason"], e["source"]["line"]) for e in q] == [("tie_dropped", 1), ("tie_dropped", 2), ("no_pairs", 3),
                                                             ("no_pairs", 4)]
    c = info.manifest["counts"]
    assert (c["rows_in"], c["rows_quarantined"], c["quarantined"]) == (4, 4, 4)
    # Grouping by an explicit key joins rows whose prompt text differs.
    info = reward_data.ingest([path], "ties3", score="helpfulness", group_by="id", test_fraction=0.0,
                              allow_partial=True)
    assert [(r["chosen"], r["rejected"]) for r in records(info.ref)] == [([a("w")], [a("z")])]


def test_scored_global_grouping_joins_non_adjacent_rows(write_jsonl, records):
    rows = [_helpsteer("p", "good", 4, 0), _helpsteer("q", "fine", 3, 0), _helpsteer("p", "bad", 0, 0),
            _helpsteer("q", "meh", 1, 0)]
    path = write_jsonl("g.jsonl", rows)
    info = reward_data.ingest([path], "g", score="helpfulness", group_mode="global", test_fraction=0.0)
    assert [(r["chosen"], r["rejected"]) for r in records(info.ref)] == [
        ([a("good")], [a("bad")]), ([a("fine")], [a("meh")])]


NEMO = "<extra_id_0>System\n{s}\n<extra_id_1>User\n{u}\n<extra_id_1>Assistant\n{a}\n"


def test_templated_transcript_split_into_messages(write_jsonl, records):
    multi = "<extra_id_0>System\n\n<extra_id_1>User\nhi\n<extra_id_1>Assistant\nhello\n<extra_id_1>User\nand now?\n"
    rows = [
        {"text": NEMO.format(s="Be brief.", u="What is 2+2?", a="4"), "helpfulness": 4, "correctness": 4},
        {"text": NEMO.format(s="Be brief.", u="What is 2+2?", a="five"), "helpfulness": 0, "correctness": 0},
        {"text": multi + "<extra_id_1>Assistant\nnothing\n", "helpfulness": 1, "correctness": 1},
        {"text": multi + "<extra_id_1>Assistant\nmore?\n", "helpfulness": 3, "correctness": 1},
    ]
    path = write_jsonl("nemo.jsonl", rows)
    info = reward_data.ingest([path], "nemo", score="helpfulness", transcript_template="nemo", test_fraction=0.0)
    r0, r1 = records(info.ref)
    assert r0["prompt"] == [s("Be brief."), u("What is 2+2?")]
    assert (r0["chosen"], r0["rejected"]) == ([a("4")], [a("five")])
    assert r1["prompt"] == [u("hi"), a("hello"), u("and now?")]  # the empty system turn is dropped
    assert (r1["chosen"], r1["rejected"]) == ([a("more?")], [a("nothing")])
    # Without a template the transcript cannot be read: refused, naming the option.
    with pytest.raises(IngestRefused, match="transcript-template"):
        reward_data.ingest([path], "nemo2", score="helpfulness")


def test_user_given_role_markers(write_jsonl, records):
    row = {"prompt": "### User: hi ### Bot: hey ### User: bye", "chosen": "see you", "rejected": "no"}
    info = reward_data.ingest([write_jsonl("m.jsonl", [row])], "m", test_fraction=0.0,
                              transcript_template="user=### User:;assistant=### Bot:")
    (rec,) = records(info.ref)
    assert rec["prompt"] == [u("hi"), a("hey"), u("bye")]


def test_scored_needs_a_score_and_names_the_columns(write_jsonl):
    path = write_jsonl("ns.jsonl", [_helpsteer("p", "x", 1, 1), _helpsteer("p", "y", 2, 2)])
    with pytest.raises(ValueError, match="needs --score.*helpfulness"):
        reward_data.ingest([path], "ns")
    with pytest.raises(ValueError, match="helpfullness.*not among the columns.*'helpfullness' -> 'helpfulness'"):
        reward_data.ingest([path], "ns", score="helpfullness")


# --- loud misconfiguration ---------------------------------------------------------------------


def _nothing_published(home, name):
    root = store.data_root(home) / name
    return not store.versions(name, home) and not any(p.name.startswith(".tmp-") for p in root.glob("*"))


def test_typo_in_map_fails_fast_with_closest_column(tmp_path):
    path = write_csv(tmp_path, "t.csv", ["question", "good", "bad"], [["q", "a", "b"]])
    with pytest.raises(ValueError, match=r"--map prompt=qestion: no such column.*'qestion' -> 'question'"):
        reward_data.ingest([path], "t", mapping={"prompt": "qestion", "chosen": "good", "rejected": "bad"},
                           home=tmp_path / "h")
    assert _nothing_published(tmp_path / "h", "t")


def test_wrong_label_field_fails_fast(write_jsonl, tmp_path):
    row = {"prompt": "q", "response_0": "a", "response_1": "b", "better_response_id": 0, "safer_response_id": 1}
    with pytest.raises(ValueError, match=r"--label-field safer_id: no such column.*safer_response_id"):
        reward_data.ingest([write_jsonl("pku.jsonl", [row])], "pku", label_field="safer_id", home=tmp_path / "h")


def test_wrong_format_quarantining_every_row_is_refused(write_jsonl, tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(10)]
    path = write_jsonl("e.jsonl", rows)
    home = tmp_path / "h"
    with pytest.raises(IngestRefused, match=r"nothing was accepted from 10 rows.*columns seen: chosen, prompt, rejected"):
        reward_data.ingest([path], "e", format="shp", home=home)
    assert _nothing_published(home, "e")
    info = reward_data.ingest([path], "e", format="shp", home=home, allow_partial=True)
    assert info.manifest["counts"]["accepted"] == 0  # the override publishes


def test_most_rows_failing_one_field_is_refused(write_jsonl, tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": 5 if i < 7 else "b"} for i in range(10)]
    path = write_jsonl("m.jsonl", rows)
    with pytest.raises(IngestRefused, match=r"7 of 10 rows fail with wrong_type on field 'rejected'"):
        reward_data.ingest([path], "m", home=tmp_path / "h")
    assert _nothing_published(tmp_path / "h", "m")


def test_misleading_reason_for_missing_prompt_now_points_at_the_mapping(tmp_path):
    # A prompt mapped to a column that exists on no row used to read as "field 'rejected' must be
    # a message list"; now the mapped column is checked first.
    path = write_csv(tmp_path, "p.csv", ["question", "good", "bad"], [["q", "a", "b"]])
    with pytest.raises(ValueError, match="--map prompt=Question: no such column"):
        reward_data.ingest([path], "p", mapping={"prompt": "Question", "chosen": "good", "rejected": "bad"})


# --- truncation and damage ---------------------------------------------------------------------


def test_csv_cut_inside_last_quoted_cell_is_truncated_not_accepted(tmp_path, records, quarantined):
    text = 'prompt,chosen,rejected\nq1,a,b\nq2,"a long answer that was\ncut in the mid'
    path = tmp_path / "cut.csv"
    path.write_text(text)
    info = reward_data.ingest([path], "cut", test_fraction=0.0)
    assert [r["prompt"] for r in records(info.ref)] == [[u("q1")]]
    q = quarantined(info.ref)
    assert q[0]["reason"] == "truncated" and q[0]["source"]["line"] == 3 and "line 3" in q[0]["detail"]
    # The cut cell's remaining line is read on its own after the resume: a short row, never accepted.
    assert [(e["reason"], e["source"]["line"]) for e in q[1:]] == [("short_row", 4)]


def test_csv_short_row_and_stray_quote(tmp_path, quarantined, records):
    text = 'prompt,chosen,rejected\nq1,a,b\nq2,a\nq3,"multi\nline",b\nq4,"a,b\nq5,a,b\nq6,a,b\n'
    path = tmp_path / "short.csv"
    path.write_text(text)
    info = reward_data.ingest([path], "short", test_fraction=0.0, allow_partial=True)
    q = quarantined(info.ref)
    assert [(e["reason"], e["source"]["line"]) for e in q] == [("short_row", 3), ("truncated", 6)]
    assert "record has 2 fields, the header has 3" in q[0]["detail"]
    assert "never closes" in q[1]["detail"]
    # The stray quote costs its own row only: reading resumes on the next line.
    recs = records(info.ref)
    assert [r["prompt"] for r in recs] == [[u("q1")], [u("q3")], [u("q5")], [u("q6")]]
    assert recs[1]["chosen"] == [a("multi\nline")]
    assert [r["source"]["row"] for r in recs] == [0, 2, 4, 5]


def test_truncated_jsonl_gz_from_real_sample(shared_datasets, tmp_path, quarantined):
    data = (shared_datasets / "hh_rlhf" / "harmless-base_test_first300.jsonl.gz").read_bytes()
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[: len(data) // 2])
    n_lines = len(gzip.decompress(data).splitlines())
    info = reward_data.ingest([cut], "cutgz", allow_partial=True)
    c = info.manifest["counts"]
    assert 0 < c["accepted"] < n_lines
    (q,) = [e for e in quarantined(info.ref) if e["reason"] == "truncated"]
    assert q["source"]["line"] == c["rows_in"] and f"line {c['rows_in']}:" in q["detail"]
    assert "truncated" in q["detail"]


def test_jsonl_last_line_cut_is_truncated(tmp_path, quarantined):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + '\n{"prompt": "q2", "cho')
    info = reward_data.ingest([path], "c", allow_partial=True)
    (q,) = quarantined(info.ref)
    assert (q["reason"], q["source"]["line"]) == ("truncated", 2)


def test_deep_json_rows_and_huge_csv_fields_are_quarantined(tmp_path, write_jsonl, quarantined, records):
    deep = '{"prompt": "q", "chosen": "a", "rejected": "b", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    good = {"prompt": "q2", "chosen": "a", "rejected": "b"}
    info = reward_data.ingest([write_jsonl("deep.jsonl", [deep, good])], "deep", test_fraction=0.0)
    assert [(q["reason"], q["source"]["line"]) for q in quarantined(info.ref)] == [("too_deep", 1)]
    arr = tmp_path / "deep.json"
    arr.write_text("[\n" + deep + ",\n" + json.dumps(good) + "\n]\n")
    info = reward_data.ingest([arr], "deeparr", test_fraction=0.0)
    assert [(q["reason"], q["source"]["line"]) for q in quarantined(info.ref)] == [("too_deep", 2)]
    assert len(records(info.ref)) == 1
    big = tmp_path / "big.csv"
    big.write_text('prompt,chosen,rejected\nq1,"' + "x\n" * 100_000 + '",b\nq2,a,b\n')
    info = reward_data.ingest([big], "bigcsv", test_fraction=0.0, max_row_bytes=1000)
    assert [(q["reason"], q["source"]["line"]) for q in quarantined(info.ref)] == [("row_too_large", 2)]
    assert [r["prompt"] for r in records(info.ref)] == [[u("q2")]]


def test_quarantine_lines_are_one_based_editor_lines(tmp_path, quarantined):
    path = tmp_path / "lines.csv"
    path.write_text('prompt,chosen,rejected\n"multi\nline",a,b\nq2,,b\n')
    info = reward_data.ingest([path], "lines", allow_partial=True)
    (q,) = quarantined(info.ref)
    assert (q["source"]["row"], q["source"]["line"]) == (1, 4)


# --- resolved options and shortcuts ------------------------------------------------------------


def test_manifest_records_resolved_label_field(write_jsonl):
    row = {"prompt": "q", "response_0": "a", "response_1": "b", "better_response_id": 1, "safer_response_id": 0}
    info = reward_data.ingest([write_jsonl("pku.jsonl", [row])], "pku")
    assert info.manifest["options"]["label_field"] is None
    assert info.manifest["resolved_options"] == {"format": "two_response", "label_field": "better_response_id"}
    assert info.manifest["sources"][0]["resolved"]["label_field"] == "better_response_id"


def test_shortcut_warnings(write_jsonl):
    from reward_data.stats import shortcut_warnings

    rows = [{"prompt": f"q{i}", "chosen": f"Sure! answer {i}", "rejected": f" no {i}"} for i in range(20)]
    info = reward_data.ingest([write_jsonl("sc.jsonl", rows)], "sc")
    warnings = shortcut_warnings(info.manifest["stats"], info.manifest["counts"]["accepted"])
    text = " | ".join(warnings)
    assert "100% of rejected responses start with whitespace" in text
    assert "every chosen response starts with 'Sure! answer '" in text
    assert "chosen response is the longer one in 100% of pairs" in text
    words = ["yes", "no", " maybe", "sure", "never"]
    balanced = [{"prompt": f"q{i}", "chosen": f"{words[i % 5]} {i}" * (1 + i % 2),
                 "rejected": f"{words[(i + 2) % 5]} {i}" * (2 - i % 2)} for i in range(20)]
    info = reward_data.ingest([write_jsonl("ok.jsonl", balanced)], "ok")
    assert shortcut_warnings(info.manifest["stats"], info.manifest["counts"]["accepted"]) == []


# --- empty responses ---------------------------------------------------------------------------


def test_empty_rejected_is_kept_and_counted_empty_chosen_is_not(write_jsonl, records, quarantined):
    rows = [{"prompt": "q1", "chosen": "an answer", "rejected": ""},
            {"prompt": "q2", "chosen": "  ", "rejected": "x"},
            {"prompt": "q3", "chosen": "fine", "rejected": "ok"}]
    path = write_jsonl("empty.jsonl", rows)
    info = reward_data.ingest([path], "empty", test_fraction=0.0)
    assert [r["rejected"] for r in records(info.ref)] == [[a("")], [a("ok")]]
    assert [(q["reason"], q["field"]) for q in quarantined(info.ref)] == [("empty_text", "chosen")]
    assert info.manifest["stats"]["empty_rejected"] == 1
    info = reward_data.ingest([path], "strict", test_fraction=0.0, strict_empty=True)
    assert [(q["reason"], q["field"]) for q in quarantined(info.ref)] == [("empty_text", "rejected"),
                                                                         ("empty_text", "chosen")]
