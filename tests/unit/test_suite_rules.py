"""Rules the test suite itself keeps: real-data tests fail under CI instead of skipping."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("ci, outcome", [("true", "1 error"), ("", "1 skipped")])
def test_missing_shared_datasets_fail_under_ci_and_skip_otherwise(tmp_path, ci, outcome):
    # A copy of the suite's conftest.py two levels below tmp_path looks for tmp_path/shared/datasets,
    # which does not exist.
    suite = tmp_path / "checkout" / "tests"
    suite.mkdir(parents=True)
    shutil.copy(TESTS / "conftest.py", suite / "conftest.py")
    (suite / "test_uses_samples.py").write_text("def test_samples(shared_datasets):\n    assert shared_datasets.is_dir()\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = ci
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(suite)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert outcome in proc.stdout and proc.returncode == (1 if ci else 0), proc.stdout + proc.stderr
    if ci:
        assert "not present and CI is set" in proc.stdout


def test_ci_prints_the_slowest_tests():
    """Both runs of scripts/test.sh (the CI job, .ci/run) print their 25 slowest tests."""
    script = (Path(__file__).resolve().parents[2] / "scripts" / "test.sh").read_text()
    runs = [line for line in script.splitlines() if "-m pytest" in line and not line.lstrip().startswith(("#", "exec"))]
    assert len(runs) == 2 and all("--durations=25" in line for line in runs)
