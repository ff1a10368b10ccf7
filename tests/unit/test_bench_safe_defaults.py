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
            assert p.task().name == {"scarce": "synthetic", "weak50": "weak"}.get(task, task)
            assert p.ppo.safe_defaults == (arm == "new")
            assert p.ppo.kl_unit == ("token" if arm == "new" else "response")
            assert (p.ppo.watchdog, p.ppo.watchdog_judge) == (("auto", "pairs") if arm == "new" else ("off", ""))
            # the old arm: one reward model, as before issue 30; the new arm: the defaults' ensemble
            assert p.reward.ensemble == (3 if arm == "new" else 1)


def test_extra_arms_add_overrides_to_the_new_arm_and_share_its_run_dir(tmp_path):
    bench = _bench()
    bench.main(["--tasks", "weak", "--root", str(tmp_path), "--table-only", "--arms", "old", "k2:ppo.ensemble_k=2"])
    assert bench.ARMS["k2"] == bench.ARMS["new"] + ["ppo.ensemble_k=2"]
    new, k2 = (bench.summary_path(tmp_path, "weak", 0, a) for a in ("new", "k2"))
    old = bench.summary_path(tmp_path, "weak", 0, "old")
    assert new.parent == k2.parent != old.parent and old.parent.name == "weak-seed0-rm1"


def test_table_only_prints_kept_summaries(tmp_path, capsys):
    bench = _bench()
    run = tmp_path / "weak-seed0-rm1"
    run.mkdir()
    (run / "summary-old.json").write_text(json.dumps({"gold_improvement_in_se": -0.5, "kl_ppo_sft": 1.75,
                                                      "gold_reward_sft": 0.1, "gold_reward_ppo": 0.09}))
    assert bench.main(["--tasks", "weak", "--root", str(tmp_path), "--table-only"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and "| weak | 0 | old | -0.50 | 0.100 -> 0.090 | 1.75 |" in out[2]


def test_a_run_the_gate_stopped_is_a_row_that_says_so(tmp_path, capsys):
    bench = _bench()
    run = tmp_path / "scarce-seed0"
    run.mkdir()
    (run / "summary-new.json").write_text(json.dumps({"ppo_blocked": "held-out accuracy 0.556 ...",
                                                      "rm_accuracy_gold": 0.44}))
    assert bench.main(["--tasks", "scarce", "--arms", "new", "--root", str(tmp_path), "--table-only"]) == 0
    row = capsys.readouterr().out.splitlines()[2]
    assert "| scarce | 0 | new | - |" in row and "PPO not run: the reward gate stopped it" in row


def test_aggregate_gives_mean_sd_and_the_worst_seed(tmp_path, capsys):
    bench = _bench()
    for seed, gain, kl in ((0, 4.0, 0.5), (1, 2.0, 0.7)):
        run = tmp_path / f"weak-seed{seed}"
        run.mkdir()
        (run / "summary-new.json").write_text(json.dumps({"gold_improvement_in_se": gain, "kl_ppo_sft": kl,
                                                          "rm_accuracy_gold": 0.6, "watchdog_tripped": seed == 1}))
    assert bench.main(["--tasks", "weak", "--seeds", "0", "1", "--arms", "new", "--root", str(tmp_path),
                       "--table-only", "--aggregate"]) == 0
    row = capsys.readouterr().out.splitlines()[-1]
    # mean 3.0, sample sd sqrt(2) = 1.41; worst seed +2.00; KL 0.60 ± 0.14; one of two tripped
    assert row == "| weak | new | 2 | +3.00 ± 1.41 | +2.00 | 0.60 ± 0.14 | - | 0.600 ± 0.000 | 1 of 2 |", row
