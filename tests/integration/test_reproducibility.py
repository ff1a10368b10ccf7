"""Same seed, same library versions, same thread count: the same numbers, to the last digit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _quick(run_dir: Path, home: Path, threads_env: str | None) -> dict:
    env = dict(os.environ, RLHF_HOME=str(home), PYTHONPATH=str(ROOT))
    env.pop("RLHF_NUM_THREADS", None)
    if threads_env is not None:  # the recipe's num_threads must win over a stray environment
        env["RLHF_NUM_THREADS"] = threads_env
    proc = subprocess.run([sys.executable, "-m", "rlhf", "run", "pipelines/quick.yaml", "--output-dir", str(run_dir),
                           "seed=0"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
def test_quick_recipe_twice_gives_identical_numbers(tmp_path):
    home = tmp_path / "home"  # one home: the second run reuses the tiny base the first one built
    first = _quick(tmp_path / "a", home, None)
    second = _quick(tmp_path / "b", home, "1")
    assert first == second
    assert first["gold_reward_ppo"] > first["gold_reward_sft"]  # and PPO did something
