"""scripts/bench_safe_defaults.py: the arms' overrides are valid recipe keys, and the table reads summaries."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_safe_defaults", ROOT / "scripts" / "bench_safe_defaults.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_task_and_arm_is_a_valid_recipe(tmp_path):
    from rlhf.pipeline import plan

    bench = _bench()
    for task, (recipe, extra) in bench.RECIPES.items():
        for arm, overrides in bench.ARMS.items():
            p = plan(ROOT / recipe, tmp_path / f"{task}-{arm}", [*extra, *overrides], check_inputs=False)
            assert p.task().name == task
            assert p.ppo.safe_defaults == (arm == "new")
            assert p.ppo.kl_unit == ("token" if arm == "new" else "response")
            assert (p.ppo.watchdog, p.ppo.watchdog_judge) == (("auto", "pairs") if arm == "new" else ("off", ""))


def test_table_only_prints_kept_summaries(tmp_path, capsys):
    bench = _bench()
    run = tmp_path / "weak-seed0"
    run.mkdir()
    (run / "summary-old.json").write_text(json.dumps({"gold_improvement_in_se": -0.5, "kl_ppo_sft": 1.75,
                                                      "gold_reward_sft": 0.1, "gold_reward_ppo": 0.09}))
    assert bench.main(["--tasks", "weak", "--root", str(tmp_path), "--table-only"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and "| weak | 0 | old | -0.50 | 0.100 -> 0.090 | 1.75 |" in out[2]
