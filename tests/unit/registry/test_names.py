"""Names, aliases and references: what the registry accepts and how references parse."""

from __future__ import annotations

import pytest

from rlhf.registry import parse_ref, validate_alias, validate_name

BACKENDS = ("sqlite",)  # pure functions: no database involved


@pytest.mark.parametrize("name", ["tiny", "Qwen2.5-0.5B", "sft_v2", "a", "a" * 128, "run-sft", "x.y-z_1"])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "..", "a..b", "../etc", "a/b", "a\\b", "a:b", ".hidden", "-dash", "_under", "a b", "a" * 129,
     "é", "a\x00b", "name\n"],
)
def test_invalid_names_are_refused(name):
    with pytest.raises(ValueError, match="invalid registry name"):
        validate_name(name)


def test_non_string_name_is_refused():
    with pytest.raises(ValueError):
        validate_name(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "ref,expected",
    [("tiny", ("tiny", None)), ("tiny:latest", ("tiny", None)), ("tiny:3", ("tiny", 3)),
     ("tiny:prod", ("tiny", "prod")), ("tiny:v1.2", ("tiny", "v1.2"))],
)
def test_parse_ref(ref, expected):
    assert parse_ref(ref) == expected


@pytest.mark.parametrize("ref", ["", "tiny:", "tiny:0", ":3", "a/b:1", "tiny:1:2", "tiny:../x", "../x:1"])
def test_bad_refs(ref):
    with pytest.raises(ValueError):
        parse_ref(ref)


@pytest.mark.parametrize("alias", ["latest", "3", "a/b", ".."])
def test_bad_aliases(alias):
    with pytest.raises(ValueError):
        validate_alias(alias)
