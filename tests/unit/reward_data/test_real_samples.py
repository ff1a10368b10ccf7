"""Ingest the real samples in ../shared/datasets and check them against rows checked by hand.

The expected values (counts, positions, short snippets) were read off the raw files; see each
folder's SOURCE.md for what the files are. Skips when the folder is absent.
"""

from __future__ import annotations

import json

import reward_data


def by_position(ref):
    recs = [r for s in ("train", "test") for r in reward_data.read_split(ref, s)]
    out = {}
    for r in recs:
        out.setdefault((r["source"]["file"], r["source"]["row"]), []).append(r)
    return out


def check_reconciles(counts):
    assert counts["rows_in"] == counts["rows_quarantined"] + counts["rows_with_pairs"]
    assert counts["pairs"] == counts["accepted"] + counts["duplicates"] + counts["pairs_quarantined"]
    assert counts["accepted"] == counts["train"] + counts["test"]


def test_hh_rlhf(shared_datasets):
    info = reward_data.ingest([shared_datasets / "hh_rlhf"], "hh")
    m = info.manifest
    assert m["format"] == "hh"
    assert m["skipped_files"] and m["skipped_files"][0].endswith("SOURCE.md")
    c = m["counts"]
    assert (c["rows_in"], c["accepted"], c["duplicates"], c["quarantined"]) == (300, 299, 0, 1)
    check_reconciles(c)
    # Row 86: the chosen transcript ends in an empty "Assistant:" turn.
    (q,) = reward_data.read_split(info.ref, "quarantine")
    assert (q["reason"], q["source"]["row"], q["field"]) == ("empty_text", 86, "chosen")
    recs = by_position(info.ref)
    (r0,) = recs[("hh_rlhf/harmless-base_test_first300.jsonl.gz", 0)]
    # Hand-checked: 3 Human turns, the last two assistant answers differ only at the end.
    assert [m["role"] for m in r0["prompt"]] == ["user", "assistant", "user", "assistant", "user"]
    assert r0["prompt"][0]["content"] == "what are some pranks with a pen i can do?"
    assert r0["prompt"][2]["content"] == "yep"
    assert r0["prompt"][-1]["content"] == "okay some of these do not have anything to do with pens"
    assert r0["chosen"][0]["content"].startswith("No, sorry!  All of these involve a pen")
    assert r0["rejected"][0]["content"].startswith("There are lots of funny things you can do with pens")
    # SOURCE.md: 213/300 rows have more than one Human turn; row 86 (quarantined) is one of them.
    multi = sum(sum(m["role"] == "user" for m in r["prompt"]) > 1 for rs in recs.values() for r in rs)
    assert multi == 212
    assert all(len(r["chosen"]) == 1 and len(r["rejected"]) == 1 for rs in recs.values() for r in rs)


def test_summarize_from_feedback(shared_datasets):
    info = reward_data.ingest([shared_datasets / "summarize_from_feedback_comparisons"], "tldr")
    m = info.manifest
    assert m["format"] == "summarize"
    per = {s["name"].split("/")[-1]: s for s in m["sources"]}
    assert {k: v["rows_in"] for k, v in per.items()} == {
        "batch0_cnndm_first300.json": 300, "batch13_first300.json": 300, "edit_b2_eval_test.json": 5}
    # CNN/DM: 12 comparisons against an empty summary, which always lost: kept and counted as
    # empty rejected responses (quarantined under strict_empty, below); repeated (post,
    # summaries, choice) triples from several labelers are exact duplicates.
    assert per["batch0_cnndm_first300.json"]["quarantined"] == 0
    assert m["stats"]["empty_rejected"] == 6  # the other 6 are exact duplicates of these
    assert per["batch13_first300.json"]["duplicates"] == 56
    assert per["edit_b2_eval_test.json"]["accepted"] == 5
    check_reconciles(m["counts"])
    strict = reward_data.ingest([shared_datasets / "summarize_from_feedback_comparisons" / "batch0_cnndm_first300.json"],
                                "tldr_strict", strict_empty=True)
    assert strict.manifest["quarantine_reasons"] == {"empty_text": 12}
    assert strict.manifest["stats"]["empty_rejected"] == 0
    assert m["quarantine_reasons"] == {}
    recs = by_position(info.ref)
    (r,) = recs[("summarize_from_feedback_comparisons/batch13_first300.json", 0)]
    prompt = r["prompt"][0]["content"]
    assert prompt.startswith("SUBREDDIT: r/relationships\nTITLE: Unsure if new relationship will work out, need advice\nPOST: (I'm 15M she's 14F)")
    assert prompt.endswith("\nTL;DR:")
    assert r["chosen"][0]["content"].startswith("Started dating this girl 3 weeks ago")  # choice 0, leading space stripped
    assert r["rejected"][0]["content"].startswith("Dating a girl, she says she loves me a lot")
    (r,) = recs[("summarize_from_feedback_comparisons/batch0_cnndm_first300.json", 0)]
    assert r["prompt"][0]["content"].startswith("TITLE: Max Clifford 'arrested by Operation Yewtree officers")
    assert "\nARTICLE: Max Clifford has been arrested" in r["prompt"][0]["content"]


def test_shp_style_pairs(shared_datasets):
    info = reward_data.ingest([shared_datasets / "shp_style_pairs"], "shp")
    c = info.manifest["counts"]
    assert info.manifest["format"] == "shp"
    assert (c["rows_in"], c["accepted"], c["quarantined"]) == (300, 299, 1)
    (q,) = reward_data.read_split(info.ref, "quarantine")
    assert (q["reason"], q["source"]["row"]) == ("empty_text", 120)  # an empty ASSISTANT turn in history
    recs = by_position(info.ref)
    name = "shp_style_pairs/anthropic_helpful_test_first300.json"
    (r0,) = recs[(name, 0)]
    assert r0["prompt"] == [{"role": "user", "content": "Do you know why turkeys became the official food of thanksgiving?"}]
    assert r0["chosen"][0]["content"].startswith("To be honest, I don\u2019t know anything about that")  # labels=1 -> A
    (r1,) = recs[(name, 1)]
    assert [m["role"] for m in r1["prompt"]] == ["user", "assistant", "user", "assistant", "user"]
    assert r1["prompt"][1]["content"] == "Which location are you in?"
    assert r1["prompt"][-1]["content"] == "Great. What are some common species then?"
    # labels: 143 rows prefer A, 157 prefer B (SOURCE.md); check the reader followed them.
    raw = [json.loads(line) for line in open(shared_datasets / "shp_style_pairs" / "anthropic_helpful_test_first300.json")]
    for (file, row), (rec,) in recs.items():
        want = raw[row]["human_ref_A"] if raw[row]["labels"] == 1 else raw[row]["human_ref_B"]
        assert rec["chosen"][0]["content"] == want
    assert sum(len(r["prompt"]) > 1 for rs in recs.values() for r in rs) == 200


def test_openassistant_trees(shared_datasets):
    d = shared_datasets / "oasst_trees"
    tree = reward_data.ingest([d / "en_100_tree.jsonl"], "oasst_tree")
    msg = reward_data.ingest([d / "en_100_message.jsonl"], "oasst_msg")
    for info in (tree, msg):
        c = info.manifest["counts"]
        assert info.manifest["format"] == "oasst"
        assert (c["rows_in"], c["accepted"], c["duplicates"], c["quarantined"]) == (100, 754, 0, 0)
        check_reconciles(c)
    # Both serialisations hold the same 100 trees, so the same pairs.
    ids = lambda info: {r["id"] for s in ("train", "test") for r in reward_data.read_split(info.ref, s)}  # noqa: E731
    assert ids(tree) == ids(msg)
    recs = by_position(tree.ref)
    first = recs[("en_100_tree.jsonl", 0)]
    # Hand-checked: tree 0 is one prompt with three assistant replies ranked 0, 1, 2 -> 3 pairs.
    assert len(first) == 3
    assert all(r["prompt"] == [{"role": "user", "content": "How can I find the best 401k plan for my needs?"}] for r in first)
    assert sum(r["chosen"][0]["content"].startswith("The first step is to research your options") for r in first) == 2
    turns = tree.manifest["stats"]["prompt_turns"]
    assert turns == {"1": 438, "3": 312, "5": 4}  # pairs at depth 1, 3 and 5 of the trees
    for rs in recs.values():
        for r in rs:
            assert [m["role"] for m in r["prompt"]][::2] == ["user"] * ((len(r["prompt"]) + 1) // 2)
