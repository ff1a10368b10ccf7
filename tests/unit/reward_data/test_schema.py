"""Canonical schema: message validation, prompt extraction, and the JSON fast path."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reward_data import fastjson
from reward_data.schema import (
    Pair,
    RowError,
    as_float,
    as_int,
    as_prompt,
    as_response,
    check_pair,
    normalize_messages,
    split_shared_prefix,
)


def u(t):
    return {"role": "user", "content": t}


def a(t):
    return {"role": "assistant", "content": t}


def test_normalize_maps_aliases_and_drops_extra_keys():
    msgs = [{"from": "human", "value": "hi"}, {"role": "GPT", "content": "hello", "name": "x"}]
    assert normalize_messages(msgs, "chosen") == [u("hi"), a("hello")]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("not a list", "wrong_type"),
        ([], "empty_text"),
        (["text"], "wrong_type"),
        ([{"content": "x"}], "missing_field"),
        ([{"role": "user"}], "missing_field"),
        ([{"role": "narrator", "content": "x"}], "unknown_role"),
        ([{"role": "user", "content": 3}], "wrong_type"),
        ([{"role": "user", "content": " \n\t"}], "empty_text"),
        ([{"role": "user", "content": ""}], "empty_text"),
    ],
)
def test_normalize_rejects(value, reason):
    with pytest.raises(RowError) as exc:
        normalize_messages(value, "prompt")
    assert exc.value.reason == reason
    assert "prompt" in exc.value.detail


def test_string_prompt_and_response_become_messages():
    assert as_prompt("q") == [u("q")]
    assert as_response("r", "chosen") == [a("r")]
    with pytest.raises(RowError) as exc:
        as_response([u("not an answer")], "chosen")
    assert exc.value.reason == "bad_value"


def test_shared_prefix_single_and_multi_turn():
    p = split_shared_prefix([u("q"), a("good")], [u("q"), a("bad")])
    assert (p.prompt, p.chosen, p.rejected) == ([u("q")], [a("good")], [a("bad")])
    conv = [u("q1"), a("r1"), u("q2")]
    p = split_shared_prefix(conv + [a("good")], conv + [a("bad")])
    assert p.prompt == conv


def test_shared_prefix_backs_off_to_an_assistant_turn():
    # The two sides share u(q), a(r) and then differ in a *user* turn: the comparison starts
    # at the assistant turn after u(q), so the prompt is just [u(q)].
    p = split_shared_prefix([u("q"), a("r"), u("x"), a("y")], [u("q"), a("r"), u("z"), a("w")])
    assert p.prompt == [u("q")]
    assert p.chosen == [a("r"), u("x"), a("y")]


def test_shared_prefix_errors():
    with pytest.raises(RowError) as exc:
        split_shared_prefix([u("q"), a("r")], [u("q"), a("r")])
    assert exc.value.reason == "chosen_equals_rejected"
    with pytest.raises(RowError) as exc:
        split_shared_prefix([u("q1"), a("r")], [u("q2"), a("r")])
    assert exc.value.reason == "no_prompt"


def test_check_pair():
    with pytest.raises(RowError) as exc:
        check_pair(Pair([u("q")], [a("x")], [a("x")]))
    assert exc.value.reason == "chosen_equals_rejected"
    with pytest.raises(RowError):
        check_pair(Pair([u("q"), a("r")], [a("x")], [a("y")]))


def test_numbers_from_csv_strings():
    assert as_int("1", "labels") == 1
    assert as_int(1.0, "labels") == 1
    assert as_float("2.5", "margin") == 2.5
    assert as_float("", "margin") is None
    with pytest.raises(RowError):
        as_int("one", "labels")
    with pytest.raises(RowError) as exc:
        as_float(float("nan"), "margin")
    assert exc.value.reason == "bad_value"


@given(st.lists(st.tuples(st.sampled_from(["user", "assistant", "system"]), st.text()), min_size=1, max_size=4))
def test_fast_and_stdlib_json_are_byte_identical(messages):
    # The content hash must not depend on whether orjson is installed.
    obj = {"prompt": [{"role": r, "content": c} for r, c in messages]}
    try:
        expected = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        with pytest.raises(UnicodeEncodeError):
            fastjson.dumps(obj)
        return
    assert fastjson.dumps(obj) == expected
    assert fastjson.std_dumps(obj) == expected
