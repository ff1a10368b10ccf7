"""One test group per reader, on small hand-written rows ingested end to end."""

from __future__ import annotations

import json

import pytest

import reward_data
from reward_data.options import IngestOptions
from reward_data.readers import READERS
from reward_data.schema import RowError


def u(t):
    return {"role": "user", "content": t}


def a(t):
    return {"role": "assistant", "content": t}


def ingest_rows(write_jsonl, rows, fmt=None, name="t", **kw):
    path = write_jsonl(f"{name}.jsonl", rows)
    return reward_data.ingest([path], name, format=fmt, test_fraction=0.0, **kw)


# --- explicit ----------------------------------------------------------------------------------


def test_explicit_standard_and_conversational(write_jsonl, records):
    rows = [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 1.5},
        {"prompt": [{"role": "system", "content": "be brief"}, u("hi")], "chosen": [a("hello")], "rejected": [a("go away")]},
    ]
    info = ingest_rows(write_jsonl, rows)
    assert info.manifest["format"] == "explicit"
    recs = records(info.ref)
    assert recs[0]["prompt"] == [u("2+2?")] and recs[0]["chosen"] == [a("4")] and recs[0]["margin"] == 1.5
    assert recs[1]["prompt"][0] == {"role": "system", "content": "be brief"}
    assert recs[1]["margin"] is None
    assert set(recs[0]) == {"id", "prompt", "chosen", "rejected", "margin", "source"}


# --- implicit ----------------------------------------------------------------------------------


def test_implicit_shared_prefix_becomes_prompt(write_jsonl, records):
    conv = [u("q1"), a("r1"), u("q2")]
    info = ingest_rows(write_jsonl, [{"chosen": conv + [a("good")], "rejected": conv + [a("bad")]}])
    assert info.manifest["format"] == "implicit"
    (rec,) = records(info.ref)
    assert rec["prompt"] == conv and rec["chosen"] == [a("good")] and rec["rejected"] == [a("bad")]


# --- HH-RLHF -----------------------------------------------------------------------------------


def test_hh_multi_turn_transcript(write_jsonl, records):
    base = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me a joke"
    row = {"chosen": base + "\n\nAssistant: Why did the chicken...", "rejected": base + "\n\nAssistant: No."}
    info = ingest_rows(write_jsonl, [row])
    assert info.manifest["format"] == "hh"
    (rec,) = records(info.ref)
    assert rec["prompt"] == [u("Hi there"), a("Hello!"), u("Tell me a joke")]
    assert rec["chosen"] == [a("Why did the chicken...")]
    assert rec["rejected"] == [a("No.")]


def test_hh_bad_transcripts(write_jsonl, quarantined):
    rows = [
        {"chosen": "preamble\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"},
        {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant:   "},
    ]
    info = ingest_rows(write_jsonl, rows, fmt="hh")
    # An empty rejected answer is kept by default ("an answer beats no answer")...
    assert [q["reason"] for q in quarantined(info.ref)] == ["bad_transcript"]
    assert info.manifest["stats"]["empty_rejected"] == 1
    # ...and quarantined under strict_empty.
    info = ingest_rows(write_jsonl, rows, fmt="hh", name="strict", strict_empty=True, allow_partial=True)
    assert [q["reason"] for q in quarantined(info.ref)] == ["bad_transcript", "empty_text"]


# --- summarize-from-feedback --------------------------------------------------------------------


def _summ(info, choice=1):
    return {"info": info, "split": "train", "summaries": [{"text": " first", "policy": "p"}, {"text": " second", "policy": "q"}],
            "choice": choice, "worker": "w", "batch": "b", "extra": {}}


def test_summarize_tldr_and_cnndm(write_jsonl, records):
    rows = [
        _summ({"id": "t3_x", "post": "My post body", "title": "A title", "subreddit": "advice"}, choice=1),
        _summ({"id": "abc", "site": "dailymail", "title": "Headline", "article": "Article body"}, choice=0),
    ]
    info = ingest_rows(write_jsonl, rows)
    assert info.manifest["format"] == "summarize"
    r0, r1 = records(info.ref)
    assert r0["prompt"] == [u("SUBREDDIT: r/advice\nTITLE: A title\nPOST: My post body\nTL;DR:")]
    assert r0["chosen"] == [a("second")] and r0["rejected"] == [a("first")]
    assert r1["prompt"] == [u("TITLE: Headline\nARTICLE: Article body\nTL;DR:")]
    assert r1["chosen"] == [a("first")]


# --- SHP -------------------------------------------------------------------------------------------


def test_shp_labels_history_and_score_ratio(write_jsonl, records):
    rows = [
        {"post_id": "1", "history": "Why is the sky blue?", "human_ref_A": "Rayleigh scattering", "human_ref_B": "Magic",
         "labels": 1, "score_A": 30, "score_B": 10},
        {"history": "HUMAN: hi\n\nASSISTANT: hello\n\nHUMAN: help me", "human_ref_A": "no", "human_ref_B": "sure",
         "labels": 0},
    ]
    info = ingest_rows(write_jsonl, rows)
    assert info.manifest["format"] == "shp"
    r0, r1 = records(info.ref)
    assert r0["chosen"] == [a("Rayleigh scattering")] and r0["margin"] == 3.0
    assert r1["prompt"] == [u("hi"), a("hello"), u("help me")]
    assert r1["chosen"] == [a("sure")] and r1["margin"] is None


# --- OpenAssistant ---------------------------------------------------------------------------------


def _node(mid, role, text, rank=None, replies=(), **kw):
    n = {"message_id": mid, "role": role, "text": text, "replies": list(replies), **kw}
    if rank is not None:
        n["rank"] = rank
    return n


def test_oasst_sibling_ranks_at_every_depth(write_jsonl, records):
    deep = _node("p2", "prompter", "follow up", rank=0, replies=[
        _node("a4", "assistant", "deep best", rank=0), _node("a5", "assistant", "deep worse", rank=1)])
    tree = _node("root", "prompter", "question", replies=[
        _node("a1", "assistant", "best", rank=0, replies=[deep, _node("p3", "prompter", "other", rank=1)]),
        _node("a2", "assistant", "middle", rank=1),
        _node("a3", "assistant", "worst", rank=2),
        _node("a6", "assistant", "unranked"),
        _node("a7", "assistant", "deleted", rank=3, deleted=True),
    ])
    info = ingest_rows(write_jsonl, [{"message_tree_id": "root", "tree_state": "ready_for_export", "prompt": tree}, tree])
    recs = records(info.ref)
    assert info.manifest["format"] == "oasst"
    c = info.manifest["counts"]
    # Depth 1: ranks 0,1,2 -> 3 pairs; depth 3: 1 pair; prompter siblings p2/p3 give none. Both rows
    # (tree-wrapper and bare root) are the same tree, so the second row's 4 pairs are duplicates.
    assert (c["rows_in"], c["pairs"], c["accepted"], c["duplicates"]) == (2, 8, 4, 4)
    by_item = {r["item"]: r for r in recs}
    assert set(by_item) == {"a1>a2", "a1>a3", "a2>a3", "a4>a5"}
    assert by_item["a4>a5"]["prompt"] == [u("question"), a("best"), u("follow up")]
    assert by_item["a1>a3"]["chosen"] == [a("best")] and by_item["a1>a3"]["rejected"] == [a("worst")]


def test_oasst_pair_level_quarantine_and_no_pairs(write_jsonl, quarantined):
    bad = _node("root", "prompter", "q", replies=[
        _node("a1", "assistant", "ok", rank=0), _node("a2", "assistant", "  ", rank=1), _node("a3", "assistant", "fine", rank=2)])
    empty = _node("r2", "prompter", "q2", replies=[_node("b1", "assistant", "only one", rank=0)])
    info = ingest_rows(write_jsonl, [bad, empty], fmt="oasst")
    c = info.manifest["counts"]
    # a1>a2 is kept (an empty rejected reply is a preference too); a2>a3 has an empty chosen one.
    assert (c["rows_in"], c["rows_quarantined"], c["pairs"], c["accepted"], c["pairs_quarantined"]) == (2, 1, 3, 2, 1)
    q = quarantined(info.ref)
    assert sorted((e["reason"], e["item"]) for e in q) == [("empty_text", "a2>a3"), ("no_pairs", None)]


# --- two responses + label ------------------------------------------------------------------------


def _pku(better, safer):
    return {"prompt": "How?", "response_0": "zero", "response_1": "one", "better_response_id": better,
            "safer_response_id": safer, "is_response_0_safe": True}


def test_pku_label_field_selectable(write_jsonl, records):
    info = ingest_rows(write_jsonl, [_pku(1, 0)], name="better")
    assert info.manifest["format"] == "two_response"
    assert records(info.ref)[0]["chosen"] == [a("one")]
    info = ingest_rows(write_jsonl, [_pku(1, 0)], name="safer", label_field="safer_response_id")
    assert records(info.ref)[0]["chosen"] == [a("zero")]


def test_response_ab_winner_labels_and_ties(write_jsonl, records, quarantined):
    rows = [
        {"prompt": "q1", "response_a": "A1", "response_b": "B1", "winner": "model_b"},
        {"prompt": "q2", "response_a": "A2", "response_b": "B2", "winner": "tie"},
        {"prompt": "q3", "response_a": "A3", "response_b": "B3", "winner": "model_a"},
    ]
    dropped = ingest_rows(write_jsonl, rows, name="drop")
    recs = records(dropped.ref)
    assert [r["chosen"][0]["content"] for r in recs] == ["B1", "A3"]
    assert [q["reason"] for q in quarantined(dropped.ref)] == ["tie_dropped"]
    kept = ingest_rows(write_jsonl, rows, name="keep", ties="keep")
    recs = records(kept.ref)
    assert [r.get("tie", False) for r in recs] == [False, True, False]
    assert kept.manifest["stats"]["ties"] == 1
    assert kept.manifest["stats"]["tie_rate"] == pytest.approx(1 / 3, abs=1e-5)


def test_arena_one_hot_and_json_turn_lists(write_jsonl, records):
    row = {"id": 1, "prompt": json.dumps(["first q", "second q"]), "response_a": json.dumps(["a1", "a2"]),
           "response_b": json.dumps(["b1", "b2"]), "winner_model_a": 0, "winner_model_b": 1, "winner_tie": 0}
    same_first = dict(row, response_b=json.dumps(["a1", "b2"]))
    info = ingest_rows(write_jsonl, [row, same_first])
    r0, r1 = records(info.ref)
    assert r0["prompt"] == [u("first q")]
    assert r0["chosen"] == [a("b1"), u("second q"), a("b2")]
    # When both models gave the same first answer, that exchange joins the prompt.
    assert r1["prompt"] == [u("first q"), a("a1"), u("second q")] and r1["chosen"] == [a("b2")]


# --- rated completions ------------------------------------------------------------------------------


def _uf():
    return {"instruction": "Write a haiku", "completions": [
        {"response": "r0", "overall_score": 6.0}, {"response": "r1", "overall_score": 9.0},
        {"response": "r2", "overall_score": 2.0}, {"response": "r3", "overall_score": "N/A"},
        {"response": "r4", "overall_score": 8.5}]}


def test_rated_best_worst(write_jsonl, records):
    info = ingest_rows(write_jsonl, [_uf()])
    assert info.manifest["format"] == "rated"
    (rec,) = records(info.ref)
    assert (rec["chosen"], rec["rejected"], rec["margin"]) == ([a("r1")], [a("r2")], 7.0)


def test_rated_all_pairs_above_margin(write_jsonl, records):
    info = ingest_rows(write_jsonl, [_uf()], binarize="all_pairs", min_margin=1.0)
    got = {(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in records(info.ref)}
    # Gaps: r1-r4 = 0.5 (not above 1.0) is left out; r3 has no numeric score.
    assert got == {("r1", "r0"), ("r1", "r2"), ("r4", "r0"), ("r4", "r2"), ("r0", "r2")}


def test_rated_best_random_is_seeded(write_jsonl, records):
    picks = set()
    for seed in range(6):
        info = ingest_rows(write_jsonl, [_uf()], name=f"s{seed}", binarize="best_random", seed=seed)
        again = ingest_rows(write_jsonl, [_uf()], name=f"s{seed}", binarize="best_random", seed=seed)
        assert info.content_hash == again.content_hash
        (rec,) = records(info.ref)
        assert rec["chosen"] == [a("r1")]
        picks.add(rec["rejected"][0]["content"])
    assert picks <= {"r0", "r2", "r4"} and len(picks) > 1


def test_rated_parallel_lists_and_all_equal(write_jsonl, records, quarantined):
    rows = [{"prompt": "p", "responses": ["x", "y"], "scores": [1, 3]},
            {"prompt": "p2", "responses": ["x", "y"], "scores": [2, 2]}]
    info = ingest_rows(write_jsonl, rows)
    (rec,) = records(info.ref)
    assert rec["chosen"] == [a("y")] and rec["margin"] == 2.0
    assert [q["reason"] for q in quarantined(info.ref)] == ["no_pairs"]


# --- generic mapping ---------------------------------------------------------------------------------


def test_generic_mapping_with_json_columns_and_nested_fields(write_jsonl, records):
    rows = [
        {"meta": {"q": "nested question"}, "good": "yes", "bad": "no", "score": "0.5"},
        {"meta": {"q": json.dumps([u("turn one"), a("reply"), u("turn two")])}, "good": json.dumps([a("ok")]),
         "bad": "nope", "score": None},
    ]
    info = ingest_rows(write_jsonl, rows, mapping={"prompt": "meta.q", "chosen": "good", "rejected": "bad", "margin": "score"})
    assert info.manifest["format"] == "generic"
    r0, r1 = records(info.ref)
    assert r0["prompt"] == [u("nested question")] and r0["margin"] == 0.5
    # Decided per column: these columns hold plain text on row 0, so row 1's JSON-looking text stays text.
    assert r1["prompt"] == [u(rows[1]["meta"]["q"])] and r1["chosen"] == [a(rows[1]["good"])]
    assert info.manifest["resolved_options"]["json_fields"] == []
    # Declared JSON columns are decoded on every row.
    info = ingest_rows(write_jsonl, rows[1:], name="t2", json_fields="prompt,chosen",
                       mapping={"prompt": "meta.q", "chosen": "good", "rejected": "bad"})
    (r1,) = records(info.ref)
    assert r1["prompt"] == [u("turn one"), a("reply"), u("turn two")] and r1["chosen"] == [a("ok")]


def test_json_looking_text_is_decided_per_column(write_jsonl, records):
    """Issue 27 point 4: an answer whose text is a JSON message list stays that text when its
    column holds text; a column whose every value is an encoded message list is decoded."""
    looks = json.dumps([a("hi")])
    rows = [{"q": "first", "good": looks, "bad": "plain"},
            {"q": "second", "good": "plain text", "bad": "other"}]
    info = ingest_rows(write_jsonl, rows, mapping={"prompt": "q", "chosen": "good", "rejected": "bad"})
    recs = records(info.ref)
    assert recs[0]["chosen"] == [a(looks)]
    rows = [{"q": "first", "good": json.dumps([a("x")]), "bad": json.dumps([a("y")])},
            {"q": "second", "good": json.dumps([a("z")]), "bad": json.dumps([a("w")])}]
    info = ingest_rows(write_jsonl, rows, name="cols", mapping={"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert [r["chosen"] for r in records(info.ref)] == [[a("x")], [a("z")]]
    assert info.manifest["resolved_options"]["json_fields"] == ["chosen", "rejected"]


def test_generic_implicit_from_json_conversations(write_jsonl, records):
    conv = [{"from": "human", "value": "hi"}]
    rows = [{"c": json.dumps(conv + [{"from": "gpt", "value": "hello"}]), "r": json.dumps(conv + [{"from": "gpt", "value": "bye"}])}]
    info = ingest_rows(write_jsonl, rows, mapping={"chosen": "c", "rejected": "r"})
    (rec,) = records(info.ref)
    assert rec["prompt"] == [u("hi")] and rec["chosen"] == [a("hello")]


def test_mapping_renames_columns_for_a_named_format(write_jsonl, records):
    info = ingest_rows(write_jsonl, [{"question": "q", "good": "g", "bad": "b"}], fmt="explicit",
                       mapping={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert records(info.ref)[0]["chosen"] == [a("g")]


# --- detection --------------------------------------------------------------------------------------


def test_every_reader_detects_only_its_own_rows():
    samples = {
        "explicit": {"prompt": "p", "chosen": "c", "rejected": "r"},
        "implicit": {"chosen": [u("p"), a("c")], "rejected": [u("p"), a("r")]},
        "hh": {"chosen": "\n\nHuman: p\n\nAssistant: c", "rejected": "\n\nHuman: p\n\nAssistant: r"},
        "summarize": _summ({"post": "x"}),
        "shp": {"history": "h", "human_ref_A": "a", "human_ref_B": "b", "labels": 1},
        "oasst": {"message_tree_id": "x", "prompt": _node("x", "prompter", "q")},
        "two_response": _pku(0, 1),
        "rated": _uf(),
    }
    for name, row in samples.items():
        matched = [n for n, reader in READERS.items() if reader.detect(row)]
        assert matched == [name], (name, matched)


def test_reader_errors_name_the_field():
    with pytest.raises(RowError) as exc:
        READERS["shp"].read({"history": "h", "human_ref_A": "a", "human_ref_B": "b", "labels": 7}, IngestOptions())
    assert exc.value.reason == "bad_value" and exc.value.field == "labels"
