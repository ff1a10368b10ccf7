"""scripts/bench_scoring.py: the scoring phase with the frozen roles mixed and apart, run end
to end at the tiny shape; both ways must give the same numbers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_scoring.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_scoring", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_both_ways_timed_and_equal(capsys):
    bench = _load()
    assert bench.main(["--shape", "tiny", "--batch", "4", "--prompt-len", "8", "--response-len", "8",
                       "--chunk", "2", "--members", "1,3", "--repeats", "2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["device"] == "cpu" and result["shape"] == "tiny"
    rows = result["rows"]
    assert [(r["members"], r["part"]) for r in rows] == [(1, "frozen"), (1, "whole"), (3, "frozen"), (3, "whole")]
    for r in rows:
        assert r["mixed_s"] > 0 and r["apart_s"] > 0
        assert r["mixed_range"][0] <= r["mixed_s"] <= r["mixed_range"][1]
        assert r["speedup_apart"] == r["mixed_s"] / r["apart_s"]
        assert r["max_diff_ref_logprob"] < 1e-5 and r["max_diff_score"] < 1e-5
    table = [line for line in out if line.startswith("| 3 |")]
    assert len(table) == 2 and "frozen roles" in table[0]


@pytest.mark.parametrize("argv", [["--members", "0"], ["--members", "1,-2"], ["--batch", "0"]])
def test_bad_arguments_are_refused(capsys, argv):
    with pytest.raises(SystemExit) as e:
        _load().parse_args(argv)
    assert e.value.code == 2 and "must be positive" in capsys.readouterr().err


def test_each_row_times_what_it_names(monkeypatch, capsys):
    """Both parts run the frozen roles mixed once and apart once: the frozen-roles row calls
    frozen_role_scores directly, the whole-phase row through score_rollout's setting."""
    from rlhf import scoring

    calls, inside = [], [False]
    frozen, whole = scoring.frozen_role_scores, scoring.score_rollout

    def counted_frozen(*args, mixed=True, **kwargs):
        calls.append(("whole" if inside[0] else "frozen", mixed))
        return frozen(*args, mixed=mixed, **kwargs)

    def counted_whole(*args, **kwargs):
        inside[0] = True
        try:
            return whole(*args, **kwargs)
        finally:
            inside[0] = False

    monkeypatch.setattr(scoring, "frozen_role_scores", counted_frozen)
    monkeypatch.setattr(scoring, "score_rollout", counted_whole)
    _load().main(["--shape", "tiny", "--batch", "2", "--prompt-len", "8", "--response-len", "4", "--members", "1",
                  "--repeats", "1"])
    capsys.readouterr()
    # one warm-up and one timed call of each part, each way
    assert sorted(calls) == sorted([(part, mixed) for part in ("frozen", "whole") for mixed in (True, False)] * 2)
