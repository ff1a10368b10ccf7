"""scripts/bench_ingest.py: the report states issue 27's floor and judges the run against it.

Nothing here depends on how fast this machine is: the verdicts are checked against the numbers
the same run reports, and ``--check`` is exercised with a floor no machine meets.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPTS))  # the spawned ingest process imports the script by name
    try:
        import bench_ingest

        yield bench_ingest
    finally:
        sys.path.remove(str(SCRIPTS))


def test_report_states_the_floor_and_the_verdicts(bench, tmp_path, capsys, monkeypatch):
    assert bench.main(["--pairs", "300", "--workdir", str(tmp_path / "w")]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out.strip().splitlines()[-1])
    assert (out["floor_pairs_per_s"], out["floor_peak_rss_mb"]) == (25_000, 1024)
    assert out["rows_in"] == 300 and out["accepted"] + out["duplicates"] == 300
    assert out["meets_floor_cpu"] == (out["pairs_per_cpu_s"] >= 25_000 and out["peak_rss_mb"] < 1024)
    assert out["meets_floor_wall"] == (out["pairs_per_s"] >= 25_000 and out["peak_rss_mb"] < 1024)
    assert "floor (issue 27): 25,000 pairs/s" in captured.err and "load average" in captured.err
    monkeypatch.setattr(bench, "FLOOR_PAIRS_PER_S", 10**12)
    assert bench.main(["--pairs", "300", "--workdir", str(tmp_path / "x"), "--check", "--judge", "cpu"]) == 1
    assert "MISSES the floor (cpu)" in capsys.readouterr().err
