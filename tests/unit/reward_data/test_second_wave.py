"""Issue 27: the second wave of preference layouts, on rows written by hand after each public schema.

Chatbot Arena conversations, Nectar ranked answers, UltraFeedback-binarized with scores, typed
content parts, NeMo-Aligner regression labels, ShareGPT and OpenAI preference JSONL, KTO-style
unpaired feedback; plus the smaller fixes (score-field typos, scored counts, version reuse).
"""

from __future__ import annotations

import json

import pytest

import reward_data
from reward_data.cli import main as data_main
from reward_data.ingestion import IngestRefused


def u(t):
    return {"role": "user", "content": t}


def a(t):
    return {"role": "assistant", "content": t}


def ingest_rows(write_jsonl, rows, name="t", fmt=None, **kw):
    path = write_jsonl(f"{name}.jsonl", rows)
    return reward_data.ingest([path], name, format=fmt, test_fraction=0.0, **kw)


def reconciles(c):
    return (c["rows_in"] == c["rows_quarantined"] + c["rows_with_pairs"]
            and c["pairs"] == c["accepted"] + c["duplicates"] + c["pairs_quarantined"]
            and c["accepted"] == c["train"] + c["test"])


# --- 1. Chatbot Arena conversations ------------------------------------------------------------------


def _arena(qid, winner, a_turns, b_turns, user_turns):
    conv = lambda answers: [m for q, r in zip(user_turns, answers) for m in (u(q), a(r))]  # noqa: E731
    return {"question_id": qid, "model_a": "vicuna-13b", "model_b": "koala-13b", "winner": winner, "judge": "arena_user_1",
            "conversation_a": conv(a_turns), "conversation_b": conv(b_turns), "turn": len(user_turns),
            "anony": True, "language": "English", "tstamp": 1682351591.1322}


ARENA = [
    _arena("q0", "model_a", ["A0"], ["B0"], ["What is 2+2?"]),
    _arena("q1", "model_b", ["A1"], ["B1"], ["Name a colour."]),
    _arena("q2", "tie", ["A2"], ["B2"], ["Say hi."]),
    _arena("q3", "tie (bothbad)", ["A3"], ["B3"], ["Tell a joke."]),
    _arena("q4", "model_b", ["a1", "a2"], ["b1", "b2"], ["first question", "follow-up"]),
]


def test_arena_reads_winner_and_ties(write_jsonl, records, quarantined):
    info = ingest_rows(write_jsonl, ARENA, name="arena")
    assert info.manifest["format"] == "arena"
    recs = {r["source"]["row"]: r for r in records(info.ref)}
    assert (recs[0]["chosen"], recs[0]["rejected"]) == ([a("A0")], [a("B0")])
    assert (recs[1]["chosen"], recs[1]["rejected"]) == ([a("B1")], [a("A1")])  # model_b won: not swapped
    # Multi-turn: the conversations differ from the first answer, so the prompt is the first question.
    assert recs[4]["prompt"] == [u("first question")]
    assert recs[4]["chosen"] == [a("b1"), u("follow-up"), a("b2")]
    assert sorted(q["source"]["row"] for q in quarantined(info.ref)) == [2, 3]
    assert {q["reason"] for q in quarantined(info.ref)} == {"tie_dropped"}
    info = ingest_rows(write_jsonl, ARENA, name="arena_keep", ties="keep")
    ties = [r for r in records(info.ref) if r.get("tie")]
    assert sorted(r["source"]["row"] for r in ties) == [2, 3]
    assert reconciles(info.manifest["counts"])


def test_arena_unknown_winner_is_quarantined(write_jsonl, quarantined):
    rows = ARENA[:2] + [_arena("q9", "model_c", ["x"], ["y"], ["q"])]
    info = ingest_rows(write_jsonl, rows, name="bad_winner")
    (q,) = quarantined(info.ref)
    assert (q["reason"], q["field"], q["source"]["row"]) == ("bad_value", "winner", 2)


def test_mapping_chosen_rejected_next_to_a_label_column_is_refused(write_jsonl, records):
    path = write_jsonl("arena_map.jsonl", ARENA)
    mapping = {"chosen": "conversation_a", "rejected": "conversation_b"}
    with pytest.raises(ValueError, match=r"ignores the label column 'winner'.*--format arena"):
        reward_data.ingest([path], "m", mapping=mapping)
    # Told so explicitly, the mapping is taken as given (conversation_a always preferred).
    info = reward_data.ingest([path], "m", mapping=mapping, ignore_label_column=True, test_fraction=0.0)
    assert records(info.ref)[1]["chosen"] == [a("A1")]


# --- 2. Ranked answers (Nectar) -----------------------------------------------------------------------


def _nectar(prompt, ranked):
    """Nectar rows list answers in an arbitrary order, each with its model and rank (1 = best)."""
    return {"prompt": prompt, "answers": [{"answer": t, "model": f"model-{r}", "rank": r} for t, r in ranked],
            "turns": prompt.count("Human:"), "num_responses": len(ranked), "source": ["sharegpt"], "good_natured": True}


NECTAR = [
    _nectar("\n\nHuman: What is the capital of France?\n\nAssistant:", [("Lyon.", 3), ("Paris.", 1), ("Nice.", 2)]),
    _nectar("\n\nHuman: hi\n\nAssistant: Hello!\n\nHuman: Tell me a fact.\n\nAssistant:",
            [("Water is wet.", 2), ("The sun is a star.", 1)]),
]


def test_nectar_ranked_answers_rank_one_is_best(write_jsonl, records):
    info = ingest_rows(write_jsonl, NECTAR, name="nectar")
    assert info.manifest["format"] == "ranked"
    r0, r1 = records(info.ref)
    assert r0["prompt"] == [u("What is the capital of France?")]  # the trailing "Assistant:" cue is no turn
    assert (r0["chosen"], r0["rejected"], r0["margin"]) == ([a("Paris.")], [a("Lyon.")], 2.0)
    assert r1["prompt"] == [u("hi"), a("Hello!"), u("Tell me a fact.")]
    assert r1["chosen"] == [a("The sun is a star.")]
    info = ingest_rows(write_jsonl, NECTAR, name="nectar_all", binarize="all_pairs")
    assert len(records(info.ref)) == 4 and all(r["margin"] > 0 for r in records(info.ref))
    assert reconciles(info.manifest["counts"])
    info = ingest_rows(write_jsonl, NECTAR, name="nectar_up", lower_is_better=False)
    assert records(info.ref)[0]["chosen"] == [a("Lyon.")]


def test_rated_score_field_named_rank_is_lower_is_better(write_jsonl, records):
    rows = [{"instruction": "q", "completions": [{"response": "best", "rank": 1}, {"response": "worst", "rank": 4},
                                                  {"response": "mid", "rank": 2}]}]
    info = ingest_rows(write_jsonl, rows, name="rank", score_field="rank")
    (r,) = records(info.ref)
    assert (r["chosen"], r["rejected"], r["margin"]) == ([a("best")], [a("worst")], 3.0)
    assert info.manifest["resolved_options"]["order"] == "lower is better"
    info = ingest_rows(write_jsonl, rows, name="rank_hi", score_field="rank", lower_is_better=False)
    assert records(info.ref)[0]["chosen"] == [a("worst")]


def test_hh_template_prompt_ending_in_the_assistant_cue(write_jsonl, records):
    rows = [{"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": "hello", "rejected": "go"}]
    info = ingest_rows(write_jsonl, rows, name="cue", transcript_template="hh")
    assert records(info.ref)[0]["prompt"] == [u("hi")]


# --- 3. Binarized sets with scores (UltraFeedback-binarized) --------------------------------------------


def _ufb(prompt, chosen, rejected, sc, sr):
    return {"prompt": prompt, "prompt_id": str(abs(hash(prompt)))[:8],
            "chosen": [u(prompt), a(chosen)], "rejected": [u(prompt), a(rejected)],
            "messages": [u(prompt), a(chosen)], "score_chosen": sc, "score_rejected": sr}


UFB = [_ufb("Explain DNS.", "DNS maps names to addresses.", "It is a thing.", 8.5, 3.0),
       _ufb("Add 2 and 3.", "5", "6", 7.0, 7.0),
       _ufb("Say yes.", "Yes.", "No.", 9.0, 2.0)]


def test_ultrafeedback_binarized_without_flags(write_jsonl, records, quarantined):
    info = ingest_rows(write_jsonl, UFB, name="ufb")
    assert info.manifest["format"] == "explicit"
    recs = records(info.ref)
    assert [(r["prompt"], r["chosen"], r["margin"]) for r in recs] == [
        ([u("Explain DNS.")], [a("DNS maps names to addresses.")], 5.5), ([u("Say yes.")], [a("Yes.")], 7.0)]
    (q,) = quarantined(info.ref)
    assert (q["reason"], q["source"]["row"]) == ("tie_dropped", 1)
    info = ingest_rows(write_jsonl, UFB, name="ufb_keep", ties="keep")
    tie = [r for r in records(info.ref) if r.get("tie")]
    assert [(r["source"]["row"], r["margin"]) for r in tie] == [(1, 0.0)]


def test_ultrafeedback_binarized_parquet(tmp_path, records):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "train_prefs-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(UFB), path)
    info = reward_data.ingest([path], "ufbpq", test_fraction=0.0, ties="keep")
    assert info.manifest["format"] == "explicit"
    assert [r["chosen"] for r in records(info.ref)] == [[a(r["chosen"][1]["content"])] for r in UFB]


# --- 6. Typed content parts --------------------------------------------------------------------------


def test_typed_content_parts_are_joined_and_non_text_quarantined(write_jsonl, records, quarantined):
    rows = [
        {"prompt": [{"role": "user", "content": [{"type": "text", "text": "Describe"}, {"type": "text", "value": "this."}]}],
         "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}], "rejected": [a("A dog.")]},
        {"prompt": [{"role": "user", "content": [{"type": "text", "text": "What is in"},
                                                 {"type": "image_url", "image_url": {"url": "https://x/cat.png"}}]}],
         "chosen": [a("A cat.")], "rejected": [a("A dog.")]},
        {"prompt": "plain", "chosen": "x", "rejected": "y"},
    ]
    info = ingest_rows(write_jsonl, rows, name="parts")
    recs = records(info.ref)
    assert recs[0]["prompt"] == [u("Describe\nthis.")] and recs[0]["chosen"] == [a("A cat.")]
    (q,) = quarantined(info.ref)
    assert (q["reason"], q["source"]["row"]) == ("non_text_content", 1)
    assert "image_url" in q["detail"]


# --- 7. NeMo-Aligner regression labels -------------------------------------------------------------------

NEMO = "<extra_id_0>System\n\n<extra_id_1>User\n{u}\n<extra_id_1>Assistant\n{a}\n<extra_id_2>"


def test_nemo_regression_label_vector_by_position(write_jsonl, records):
    # label = [helpfulness, correctness, coherence, complexity, verbosity]
    rows = [{"text": NEMO.format(u="Why is the sky blue?", a="Rayleigh scattering."), "label": [4, 4, 4, 2, 0]},
            {"text": NEMO.format(u="Why is the sky blue?", a="Because."), "label": [1, 2, 4, 0, 3]},
            {"text": NEMO.format(u="2+2?", a="4"), "label": [3, 4, 4, 0, 0]},
            {"text": NEMO.format(u="2+2?", a="5"), "label": [0, 0, 4, 0, 1]}]
    path = write_jsonl("nemo.jsonl", rows)
    with pytest.raises(ValueError, match=r"--score 'label\[4\]'"):
        reward_data.ingest([path], "nemo", transcript_template="nemo")
    info = reward_data.ingest([path], "nemo", transcript_template="nemo", score="label[0]", test_fraction=0.0)
    assert info.manifest["format"] == "scored"
    r0, r1 = records(info.ref)
    assert (r0["prompt"], r0["chosen"], r0["rejected"], r0["margin"]) == (
        [u("Why is the sky blue?")], [a("Rayleigh scattering.")], [a("Because.")], 3.0)
    # Verbosity (position 4) ranks the other way round.
    info = reward_data.ingest([path], "nemo4", transcript_template="nemo", score="label[4]", test_fraction=0.0)
    assert records(info.ref)[0]["chosen"] == [a("Because.")]


def test_nemo_minus_100_is_not_a_score(write_jsonl, quarantined):
    rows = [{"text": NEMO.format(u="q", a="x"), "label": [4, -100]}, {"text": NEMO.format(u="q", a="y"), "label": [1, 2]}]
    path = write_jsonl("nemo100.jsonl", rows)
    info = reward_data.ingest([path], "n100", transcript_template="nemo", score="label[1]", allow_partial=True)
    reasons = [(q["reason"], q["source"]["line"]) for q in quarantined(info.ref)]
    assert ("missing_field", 1) in reasons


# --- named formats: sharegpt, openai ---------------------------------------------------------------------


def test_sharegpt_dpo_rows(write_jsonl, records):
    rows = [{"conversations": [{"from": "system", "value": "Be terse."}, {"from": "human", "value": "Hi"}],
             "chosen": {"from": "gpt", "value": "Hello."}, "rejected": {"from": "gpt", "value": "What?"}}]
    info = ingest_rows(write_jsonl, rows, name="sg")
    assert info.manifest["format"] == "sharegpt"
    (r,) = records(info.ref)
    assert r["prompt"] == [{"role": "system", "content": "Be terse."}, u("Hi")] and r["chosen"] == [a("Hello.")]


def test_openai_preference_jsonl(write_jsonl, records):
    rows = [{"input": {"messages": [{"role": "developer", "content": "Answer in French."},
                                    {"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
                       "tools": [], "parallel_tool_calls": True},
             "preferred_output": [{"role": "assistant", "content": "Bonjour"}],
             "non_preferred_output": [{"role": "assistant", "content": "Hi"}]}]
    info = ingest_rows(write_jsonl, rows, name="oai")
    assert info.manifest["format"] == "openai"
    (r,) = records(info.ref)
    assert r["prompt"] == [{"role": "system", "content": "Answer in French."}, u("Hello")]
    assert (r["chosen"], r["rejected"]) == ([a("Bonjour")], [a("Hi")])


# --- 5. unpaired feedback ----------------------------------------------------------------------------


KTO = [
    {"prompt": [u("Capital of France?")], "completion": [a("Paris.")], "label": True},
    {"prompt": [u("Capital of France?")], "completion": [a("Berlin.")], "label": False},
    {"prompt": [u("Capital of France?")], "completion": [a("Paris.")], "label": True},  # duplicate
    {"prompt": [u("2+2?")], "completion": [a("4")], "label": "thumbs_up"},
    {"prompt": [u("2+2?")], "completion": [a("5")], "label": "maybe"},  # bad label
    {"prompt": [u("3+3?")], "completion": [a("  ")], "label": False},  # empty completion
]


def test_unpaired_records_are_their_own_kind(write_jsonl, quarantined):
    info = ingest_rows(write_jsonl, KTO, name="kto")
    m = info.manifest
    assert (m["format"], m["kind"]) == ("unpaired", "unpaired")
    recs = [r for s in ("train", "test") for r in reward_data.read_split(info.ref, s)]
    assert [(r["prompt"], r["completion"], r["label"], r["source"]["row"]) for r in recs] == [
        ([u("Capital of France?")], [a("Paris.")], True, 0), ([u("Capital of France?")], [a("Berlin.")], False, 1),
        ([u("2+2?")], [a("4")], True, 3)]
    assert set(recs[0]) == {"id", "prompt", "completion", "label", "source"}
    c = m["counts"]
    assert (c["rows_in"], c["accepted"], c["duplicates"], c["quarantined"]) == (6, 3, 1, 2)
    assert reconciles(c)
    assert [(q["reason"], q["source"]["row"]) for q in quarantined(info.ref)] == [("bad_value", 4), ("empty_text", 5)]
    assert (m["stats"]["desirable"], m["stats"]["undesirable"]) == (2, 1)


def test_unpaired_messages_layout_and_versioning(write_jsonl):
    rows = [{"messages": [u("hi"), a("hello")], "label": 1}, {"messages": [u("hi"), a("go away")], "label": 0}]
    info = ingest_rows(write_jsonl, rows, name="thumbs")
    recs = list(reward_data.read_split(info.ref, "train"))
    assert [(r["prompt"], r["completion"], r["label"]) for r in recs] == [
        ([u("hi")], [a("hello")], True), ([u("hi")], [a("go away")], False)]
    again = ingest_rows(write_jsonl, rows, name="thumbs")
    assert (again.version, again.reused) == (1, True)
    changed = ingest_rows(write_jsonl, rows[:1], name="thumbs")
    assert (changed.version, changed.reused) == (2, False)


def test_pairs_and_unpaired_sources_do_not_mix(write_jsonl):
    p1 = write_jsonl("pairs.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    p2 = write_jsonl("kto.jsonl", KTO[:2])
    with pytest.raises(ValueError, match="mix preference pairs and unpaired"):
        reward_data.ingest([p1, p2], "mixed")


# --- 8. smaller ----------------------------------------------------------------------------------------


def test_misspelled_score_field_is_named(write_jsonl):
    rows = [{"instruction": "q", "completions": [{"response": "x", "overall_score": 3}, {"response": "y", "overall_score": 1}]}]
    path = write_jsonl("uf.jsonl", rows)
    with pytest.raises(ValueError, match=r"--score-field overal_score: no such key.*closest: overall_score"):
        reward_data.ingest([path], "uf", score_field="overal_score")


def test_identical_content_reuses_the_version(write_jsonl, tmp_path, capsys):
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "q", "chosen": "c", "rejected": "r"}]
    path = write_jsonl("same.jsonl", rows)
    home = str(tmp_path / "home")
    assert data_main(["ingest", str(path), "--name", "same", "--home", home]) == 0
    assert data_main(["ingest", str(path), "--name", "same", "--home", home]) == 0
    out = capsys.readouterr().out
    assert "same:1: identical content to the latest version" in out and "reusing it" in out
    assert reward_data.versions("same", home) == [1]
    assert data_main(["ingest", str(path), "--name", "same", "--home", home, "--test-fraction", "0.5"]) == 0
    assert reward_data.versions("same", home) == [1, 2]


def test_ingest_help_lists_every_format_with_an_example(capsys):
    with pytest.raises(SystemExit):
        data_main(["ingest", "--help"])
    out = capsys.readouterr().out
    for name, reader in reward_data.READERS.items():
        assert f"  {name}: " in out
        assert json.dumps(reader.EXAMPLE, ensure_ascii=False) in out


def test_every_named_example_is_detected_as_its_own_format():
    for name, reader in reward_data.READERS.items():
        matched = [n for n, r in reward_data.READERS.items() if r.detect(reader.EXAMPLE)]
        assert matched == ([] if name == "generic" else [name]), name


# --- layouts without a sample in /work/shared/datasets: rows written after each public schema ------------


def _uf_completion(model, response, overall, helpfulness, honesty, following="4", truthfulness="4"):
    """One completion of raw openbmb/UltraFeedback: GPT-4 ratings per aspect (strings, "N/A" where
    the aspect does not apply), their mean (fine-grained_score) and the critique's overall_score."""
    aspects = {"helpfulness": helpfulness, "honesty": honesty, "instruction_following": following,
               "truthfulness": truthfulness}
    rated = [float(r) for r in aspects.values() if r != "N/A"]
    annotations = {k: {"Rating": r, "Rationale": f"{k} rationale"} for k, r in aspects.items()}
    for k in ("helpfulness", "truthfulness"):
        annotations[k].update({"Type": ["1", "2"], "Rationale For Rating": "why"})
    return {"annotations": annotations, "critique": "ok", "custom_system_prompt": "Be helpful.",
            "fine-grained_score": sum(rated) / len(rated), "model": model, "overall_score": overall,
            "principle": "helpfulness", "response": response}


UF_RAW = [
    {"source": "evol_instruct", "instruction": "Name a prime above 10.", "models": ["m1", "m2", "m3", "m4"],
     "completions": [_uf_completion("m1", "11", 7.0, "5", "5"), _uf_completion("m2", "12", 8.5, "1", "2"),
                     _uf_completion("m3", "13 is prime.", 6.0, "4", "N/A"), _uf_completion("m4", "9", 3.0, "2", "3")],
     "correct_answers": ["None"], "incorrect_answers": ["None"]},
    {"source": "flan", "instruction": "Say hi.", "models": ["m1", "m2"],
     "completions": [_uf_completion("m1", "hi", 5.0, "3", "3"), _uf_completion("m2", "hello!", 5.0, "4", "5")],
     "correct_answers": ["None"], "incorrect_answers": ["None"]},
]


def test_raw_ultrafeedback_by_overall_score_or_per_aspect_ratings(write_jsonl, records, quarantined):
    info = ingest_rows(write_jsonl, UF_RAW, name="ufraw")
    assert (info.manifest["format"], info.manifest["resolved_options"]["score_field"]) == ("rated", "overall_score")
    r0, = records(info.ref)  # row 1: both completions have overall_score 5, no gap
    assert (r0["prompt"], r0["chosen"], r0["rejected"], r0["margin"]) == ([u("Name a prime above 10.")], [a("12")],
                                                                         [a("9")], 5.5)
    assert [(q["reason"], q["source"]["row"]) for q in quarantined(info.ref)] == [("no_pairs", 1)]
    # One aspect by its dotted path: the ratings are strings; "11" wins helpfulness, "12" loses it.
    info = ingest_rows(write_jsonl, UF_RAW, name="ufhelp", score_field="annotations.helpfulness.Rating")
    r0, r1 = records(info.ref)
    assert (r0["chosen"], r0["rejected"], r0["margin"]) == ([a("11")], [a("12")], 4.0)
    assert (r1["chosen"], r1["rejected"], r1["margin"]) == ([a("hello!")], [a("hi")], 1.0)
    assert info.manifest["resolved_options"]["score_field"] == "annotations.helpfulness.Rating"
    # Honesty is "N/A" for "13 is prime.": that completion takes part in no pair.
    info = ingest_rows(write_jsonl, UF_RAW, name="ufhon", score_field="annotations.honesty.Rating",
                       binarize="all_pairs")
    assert all("13 is prime." not in (r["chosen"][0]["content"], r["rejected"][0]["content"])
               for r in records(info.ref))
    assert len(records(info.ref)) == 3 + 1
    # A weighted sum of aspects; the mean of the rated aspects is fine-grained_score.
    info = ingest_rows(write_jsonl, UF_RAW, name="ufsum",
                       score="annotations.helpfulness.Rating*0.5+annotations.instruction_following.Rating*0.5")
    assert [(r["chosen"], r["margin"]) for r in records(info.ref)] == [([a("11")], 2.0), ([a("hello!")], 0.5)]
    info = ingest_rows(write_jsonl, UF_RAW, name="uffine", score_field="fine-grained_score")
    assert [r["chosen"] for r in records(info.ref)] == [[a("11")], [a("hello!")]]


def test_raw_ultrafeedback_misspelled_aspect_is_named(write_jsonl):
    path = write_jsonl("ufbad.jsonl", UF_RAW)
    with pytest.raises(ValueError, match=r"--score-field annotations.helpfulnes.Rating: no such key.*"
                                         r"closest: annotations.helpfulness.Rating"):
        reward_data.ingest([path], "ufbad", score_field="annotations.helpfulnes.Rating")
    with pytest.raises(ValueError, match=r"--score term annotations.honest.Rating: no such key"):
        reward_data.ingest([path], "ufbad", score="annotations.honest.Rating")
    with pytest.raises(ValueError, match="not both"):
        reward_data.ingest([path], "ufbad", score="overall_score", score_field="overall_score")


def _se(qid, question, j, k):
    """lvwerra/stack-exchange-paired: response_j is the answer with the higher vote-derived score."""
    return {"qid": qid, "question": question, "date": "2010/09/13",
            "metadata": [f"https://stackoverflow.com/questions/{qid}", "https://stackoverflow.com",
                         "https://stackoverflow.com/users/0"], "response_j": j, "response_k": k}


SE = [_se(1, "How do I reverse a list in Python?", "Use `lst[::-1]` or `lst.reverse()`.", "You can't."),
      _se(1, "How do I reverse a list in Python?", "Use `lst[::-1]` or `lst.reverse()`.", "Sort it descending."),
      _se(2, "Why is <code>0.1 + 0.2 != 0.3</code>?", '[{"role": "assistant", "content": "hi"}] is not it; '
          "floats are binary fractions.", "Bug in Python."),
      _se(3, "What is [this] syntax?", "[1, 2, 3] is a list literal.", "A dict.")]


def test_stack_exchange_paired_is_named_in_the_error_and_reads_with_map(write_jsonl, records):
    path = write_jsonl("se.jsonl", SE)
    with pytest.raises(reward_data.FormatError, match=r"stack-exchange-paired.*--map prompt=question --map "
                                                      r"chosen=response_j --map rejected=response_k"):
        reward_data.ingest([path], "se")
    mapping = {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}
    info = reward_data.ingest([path], "se", mapping=mapping, test_fraction=0.0)
    recs = records(info.ref)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in recs] == [
        ([u(row["question"])], [a(row["response_j"])], [a(row["response_k"])]) for row in SE]
    assert info.manifest["counts"]["accepted"] == 4 and reconciles(info.manifest["counts"])


SKYWORK = [
    {"chosen": [{"content": "Is 7 prime?", "role": "user"}, {"content": "Yes.", "role": "assistant"}],
     "rejected": [{"content": "Is 7 prime?", "role": "user"}, {"content": "No.", "role": "assistant"}],
     "source": "magpie_ultra"},
    {"chosen": [{"content": "Be brief.", "role": "system"}, {"content": "hi", "role": "user"},
                {"content": "hello", "role": "assistant"}, {"content": "a fact?", "role": "user"},
                {"content": "Water boils at 100 C.", "role": "assistant"}],
     "rejected": [{"content": "Be brief.", "role": "system"}, {"content": "hi", "role": "user"},
                  {"content": "hello", "role": "assistant"}, {"content": "a fact?", "role": "user"},
                  {"content": "I like turtles.", "role": "assistant"}],
     "source": "offsetbias"},
]


def test_skywork_implicit_prompt_content_first_messages(write_jsonl, records, tmp_path):
    """Skywork-Reward-Preference rows (and most parquet/hub exports) order each message as
    {"content", "role"}; the stored records and their ids must match the role-first spelling."""
    info = ingest_rows(write_jsonl, SKYWORK, name="sky")
    assert info.manifest["format"] == "implicit"
    r0, r1 = records(info.ref)
    assert (r0["prompt"], r0["chosen"], r0["rejected"]) == ([u("Is 7 prime?")], [a("Yes.")], [a("No.")])
    assert r1["prompt"] == [{"role": "system", "content": "Be brief."}, u("hi"), a("hello"), u("a fact?")]
    assert r1["chosen"] == [a("Water boils at 100 C.")]
    stored = (info.path / "train.jsonl").read_text()
    assert '{"role":"user","content":"Is 7 prime?"}' in stored
    # The same rows written role-first are exact duplicates of the content-first ones.
    role_first = [{k: [{"role": m["role"], "content": m["content"]} for m in row[k]] for k in ("chosen", "rejected")}
                  for row in SKYWORK]
    p1 = write_jsonl("sky_content_first.jsonl", SKYWORK)
    p2 = write_jsonl("sky_role_first.jsonl", role_first)
    both = reward_data.ingest([p1, p2], "sky2", test_fraction=0.0)
    assert (both.manifest["counts"]["accepted"], both.manifest["counts"]["duplicates"]) == (2, 2)


def test_trl_implicit_prompt_with_scores(write_jsonl, records, quarantined):
    """trl-lib/ultrafeedback_binarized: chosen/rejected conversations, no prompt column, scores."""
    rows = [{"chosen": r["chosen"], "rejected": r["rejected"], "score_chosen": r["score_chosen"],
             "score_rejected": r["score_rejected"]} for r in UFB]
    info = ingest_rows(write_jsonl, rows, name="trlufb")
    assert info.manifest["format"] == "implicit"
    assert [(r["prompt"], r["chosen"], r["margin"]) for r in records(info.ref)] == [
        ([u("Explain DNS.")], [a("DNS maps names to addresses.")], 5.5), ([u("Say yes.")], [a("Yes.")], 7.0)]
    assert [(q["reason"], q["source"]["row"]) for q in quarantined(info.ref)] == [("tie_dropped", 1)]
    info = ingest_rows(write_jsonl, rows, name="trlufb_keep", ties="keep")
    assert [(r["source"]["row"], r["margin"]) for r in records(info.ref) if r.get("tie")] == [(1, 0.0)]


def test_trl_standard_implicit_strings_are_refused_with_the_reason(write_jsonl):
    path = write_jsonl("trlstr.jsonl", [{"chosen": "The sky is blue.", "rejected": "The sky is green."}])
    with pytest.raises(reward_data.FormatError, match=r"plain text and no prompt column"):
        reward_data.ingest([path], "trlstr")


# --- 7b. named label positions ---------------------------------------------------------------------------


def test_nemo_label_positions_by_name(write_jsonl, records):
    # HelpSteer2 rows in NeMo-Aligner's 9-attribute layout: the four OpenAssistant attributes are -100.
    def row(q, ans, helpful, correct, verbose):
        return {"text": NEMO.format(u=q, a=ans), "label": [-100, -100, -100, -100, helpful, correct, 4, 1, verbose]}

    rows = [row("Why is the sky blue?", "Rayleigh scattering.", 4, 4, 0), row("Why is the sky blue?", "Because.", 1, 3, 3),
            row("2+2?", "4", 3, 4, 0), row("2+2?", "5", 0, 0, 1)]
    path = write_jsonl("hs2.jsonl", rows)
    with pytest.raises(ValueError, match=r"--label-names steerlm"):
        reward_data.ingest([path], "hs2", transcript_template="nemo")
    by_index = reward_data.ingest([path], "hs2", transcript_template="nemo", score="label[4]", test_fraction=0.0)
    for spec in ("helpfulness", "label[helpfulness]"):
        info = reward_data.ingest([path], "hs2n", transcript_template="nemo", label_names="steerlm", score=spec,
                                  test_fraction=0.0)
        assert info.manifest["resolved_options"]["score"] == "label[4]*1"
        assert [(r["chosen"], r["margin"]) for r in records(info.ref)] == [
            (r["chosen"], r["margin"]) for r in records(by_index.ref)]
    info = reward_data.ingest([path], "hs2v", transcript_template="nemo", label_names="steerlm", score="verbosity",
                              test_fraction=0.0)
    assert records(info.ref)[0]["chosen"] == [a("Because.")]
    info = reward_data.ingest([path], "hs2w", transcript_template="nemo", score="helpfulness*0.5+correctness*0.5",
                              label_names="label=quality,toxicity,humor,creativity,helpfulness,correctness,coherence,"
                                          "complexity,verbosity", test_fraction=0.0)
    assert [r["margin"] for r in records(info.ref)] == [2.0, 3.5]


def test_named_label_positions_misconfigured_fail_fast(write_jsonl):
    path = write_jsonl("nemo5.jsonl", [{"text": NEMO.format(u="q", a=x), "label": [v, 1, 1, 1, 1]}
                                       for x, v in (("x", 4), ("y", 1))])
    kw = dict(transcript_template="nemo")
    with pytest.raises(ValueError, match=r"names 9 positions of 'label', but its first row holds 5 values"):
        reward_data.ingest([path], "n5", label_names="steerlm", score="helpfulness", **kw)
    with pytest.raises(ValueError, match=r"'helpfulnes' is not among --label-names \(h, c"):
        reward_data.ingest([path], "n5", label_names="h,c,coh,cx,v", score="label[helpfulnes]", **kw)
    with pytest.raises(ValueError, match=r"names a position; say which name each position has with --label-names"):
        reward_data.ingest([path], "n5", score="label[h]", **kw)
    with pytest.raises(ValueError, match=r"option label_names='a,a': expected"):
        reward_data.ingest([path], "n5", label_names="a,a", score="a", **kw)
    home = str(path.parent.parent / "home")
    assert data_main(["ingest", str(path), "--name", "n5", "--home", home, "--transcript-template", "nemo",
                      "--label-names", "label=h,c,coh,cx,v", "--score", "h", "--test-fraction", "0"]) == 0
    (r,) = reward_data.read_split("n5", "train", home=home)
    assert r["chosen"] == [a("x")] and r["margin"] == 3.0
