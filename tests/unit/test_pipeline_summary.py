"""The pipeline's summary (``summary.json`` and the table ``rlhf run`` prints) is assembled from
the stage table's rows; these cases pin what it says for a recipe of each shape.

``data/summary_golden.json`` was written by the pipeline before the summary moved into the
stage table (``python tests/unit/test_pipeline_summary.py``, at commit e9b6aa2): every metric a
stage could report gets a distinct number, so a key read from the wrong metric or the wrong
stage changes the summary. One line was added by hand since: a run with ``register: false``
whose policy is DPO's or KTO's (no PPO) now says why no export lines follow, as a PPO run did.

Rewritten after the merge with the reward gate's bound, ensemble accuracies, the watchdog's judge
and provisional summaries (written by the pipeline before the merge, at its first parent, with
this file's cases): summary.json identical for every case; the printed table differs only in the
labels of the bound and judge lines (and a run without a reward model no longer prints an empty
"-, n = -" bound line).

Issue 30 added the reward-model ensemble's disagreement SFT -> PPO (``rm_disagreement_*`` and
its printed line); the golden file was written again then, and differs from the one before in
those keys and that line alone; and a run the reward gate blocked is no longer provisional
(its PPO is not "to come": the run ended there)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

GOLDEN = Path(__file__).parent / "data" / "summary_golden.json"

_POLICY_KEYS = [f"{where}eval/{name}_{stat}" for where in ("initial/", "final/")
                for name in ("gold", "score", "kl", "entropy", "length", "win_rate", "gold_win_rate")
                for stat in ("mean", "se")] + ["final/eval/prompts"]
_METRICS = {  # what each stage's final metrics may hold
    "sft": ["loss", "eval_loss"],
    "reward": ["eval_accuracy", "eval_margin", "train_pairs_too_long", "test_pairs_too_long", "gold_accuracy",
               "test_pairs", "heldout_pairs", "heldout_correct", "heldout_accuracy", "heldout_margin",
               "heldout_truncated", "member0_accuracy", "member1_accuracy", "member0_eval_accuracy",
               "ensemble_accuracy", "ensemble_members"],
    "ppo": _POLICY_KEYS + ["final/watchdog/evaluations", "final/watchdog/tripped", "final/watchdog/best_step",
                           "watchdog/best_judge", "initial/watchdog/judge", "final/watchdog/judge",
                           "initial/eval/disagreement_mean", "final/eval/disagreement_mean"],
    "dpo": _POLICY_KEYS + ["eval_loss", "train_pairs_too_long", "test_pairs_too_long", "eval_rewards_accuracies",
                           "eval_rewards_margins"],
    "kto": _POLICY_KEYS + ["eval_loss", "train_pairs_too_long", "test_pairs_too_long", "eval_rewards_accuracies",
                           "eval_rewards_margins"],
}
_OUTPUTS = {"sft": {"adapter": "adapter"}, "reward": {"adapter": "adapter"},
            "ppo": {"policy": "policy", "value": "value"}, "dpo": {"adapter": "adapter"}, "kto": {"adapter": "adapter"}}

CASES = {  # name -> (the recipe's stages, stages with a state, with a task, register, ppo blocked)
    "rlhf": (("sft", "reward", "ppo"), ("sft", "reward", "ppo"), True, True, False),
    "all": (("sft", "reward", "ppo", "dpo", "kto"), ("sft", "reward", "ppo", "dpo", "kto"), True, True, False),
    "dpo_alone": (("sft", "dpo"), ("sft", "dpo"), False, True, False),
    "kto_with_rm": (("sft", "reward", "kto"), ("sft", "reward", "kto"), True, False, False),
    "blocked": (("sft", "reward", "ppo"), ("sft", "reward", "ppo"), False, False, True),
    "unregistered": (("sft", "reward", "ppo", "dpo"), ("sft", "reward", "ppo", "dpo"), True, False, False),
    "dpo_not_in_recipe": (("sft", "reward", "ppo"), ("sft", "reward", "ppo", "dpo"), True, True, False),
}


def _state(run_dir: Path, stages: tuple[str, ...], register: bool, blocked: bool) -> dict:
    state = {"stages": {}}
    for i, stage in enumerate(stages):
        if stage == "ppo" and blocked:
            state["stages"][stage] = {"status": "blocked", "reason": "held-out accuracy 0.500 < 0.6"}
            continue
        metrics = {key: round(100 * i + j + 0.125 * (j % 5), 4) for j, key in enumerate(_METRICS[stage])}
        if stage == "reward":  # counts that agree with each other (the gate's bound reads them)
            metrics.update(heldout_pairs=300, heldout_correct=222, heldout_accuracy=0.74, ensemble_members=2)
        dirs = {name: str(run_dir / stage / d) for name, d in _OUTPUTS[stage].items()}
        outputs = {name: f"r-{stage}-{name}:1" for name in _OUTPUTS[stage]} if register else {}
        state["stages"][stage] = {"status": "completed", "metrics": metrics, "dirs": dirs, "outputs": outputs,
                                  "run": f"r-{stage}-run:1" if register else None}
    return state


def summarize(case: str, run_dir: Path) -> dict:
    """``{"summary": summary.json's dict, "printed": what rlhf run prints}`` for ``case``, run in
    ``run_dir`` (relative to the working directory, so that the printed paths do not vary)."""
    from rlhf.pipeline import Pipeline, Plan, print_summary

    recipe_stages, with_state, task, register, blocked = CASES[case]
    run_dir.mkdir(parents=True, exist_ok=True)
    state = _state(run_dir, with_state, register, blocked)
    (run_dir / "pipeline.json").write_text(json.dumps(state))
    plan = Plan(recipe=run_dir / "r.yaml", run_dir=run_dir,
                pipeline=SimpleNamespace(name="r", registry_home=str(run_dir / "home"),
                                             reward_gate=SimpleNamespace(confidence=0.95), task=SimpleNamespace(module="")),
                configs={"ppo": SimpleNamespace(watchdog_judge="")},
                task_files=None, stages=recipe_stages, task_obj=SimpleNamespace(name="synthetic") if task else None)
    pipe = Pipeline(plan)
    summary = pipe.summary(plan.task())
    out = io.StringIO()
    print_summary(summary, run_dir, file=out)
    return {"summary": json.loads(json.dumps(summary)), "printed": out.getvalue()}


@pytest.mark.parametrize("case", list(CASES))
def test_the_summary_reads_as_before_the_stage_table_held_it(case, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    monkeypatch.chdir(tmp_path)
    got = summarize(case, Path(case))
    want = json.loads(GOLDEN.read_text())[case]
    assert got["summary"] == want["summary"]
    assert got["printed"].splitlines() == want["printed"].splitlines()


if __name__ == "__main__":  # write the golden file (run with the pipeline the cases pin)
    import os
    import tempfile

    os.environ["COLUMNS"] = "120"
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        GOLDEN.write_text(json.dumps({c: summarize(c, Path(c)) for c in CASES}, indent=1, sort_keys=True) + "\n")
    sys.exit(0)
