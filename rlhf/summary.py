"""One convention for the numbers a policy-training stage reports, read alike by the pipeline's
summary (``summary.json`` and the table ``rlhf run`` prints), the dashboard and the report.

A stage that trains a policy from the SFT policy (PPO, DPO) samples both on the same held-out
prompts with the same sampler and seed, and its final metrics hold::

    initial/eval/<name>_mean, initial/eval/<name>_se    the SFT policy, before any update
    final/eval/<name>_mean,   final/eval/<name>_se      the trained policy

with ``<name>`` among :data:`POLICY_EVALS` (``prompts`` is a count, without ``_se``). Only the
trained policy has win rates over SFT (:data:`WIN_RATES`): the SFT policy's win rate over
itself is no number to show. Its metric log (``metrics.jsonl``) holds ``eval/<name>_mean`` and
``_se`` at each evaluation step, the SFT policy's at step 0.

Each stage's part of the run's summary (its keys of ``summary.json``, the lines of the printed
table, the artifacts the closing lines offer to export) is a :class:`Contribution` here, named
by the stage's row of the stage table (:data:`rlhf.stages.STAGES`); the pipeline assembles them
in table order and names no stage.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

REFERENCE = "initial/"  # the SFT policy's evaluation
TRAINED = "final/"  # the trained policy's last evaluation

#: Evaluated per policy: RM score, the task's gold objective, KL to SFT, entropy, response length.
POLICY_EVALS = ("gold", "score", "kl", "entropy", "length")
#: Of the trained policy over SFT, on the same prompts: by the reward model, by the gold objective.
WIN_RATES = ("win_rate", "gold_win_rate")


def key(where: str, name: str, stat: str = "mean") -> str:
    """``initial/eval/gold_mean`` and the like: ``where`` is :data:`REFERENCE` or :data:`TRAINED`
    ("" for a step's log row), ``stat`` "mean" or "se"."""
    return f"{where}eval/{name}_{stat}"


def prefixed(where: str, evaluation: dict) -> dict:
    """An evaluation's ``eval/*`` numbers under ``initial/`` or ``final/``."""
    return {f"{where}{k}": v for k, v in evaluation.items()}


def is_win_rate(name: str) -> bool:
    """Whether ``eval/<name>`` is a win rate over SFT (not shown for the SFT policy itself)."""
    return name in WIN_RATES


# ----------------------------------------------------------------------------------------
# The run's summary: each stage's contribution, named by its row of the stage table
# (rlhf.stages.STAGES: ``Stage.summary``), so the pipeline assembles ``summary.json`` and the
# table ``rlhf run`` prints without naming a stage.


@dataclass(frozen=True)
class Line:
    """One line of the table ``rlhf run`` prints, read from the summary's keys."""

    label: str
    key: str
    se: str | None = None  # shown as "value ± se"
    then: str | None = None  # shown as "value -> then" (before -> after training)
    text: bool = False  # the value is a sentence, shown as it is


@dataclass(frozen=True)
class Contribution:
    """What a stage adds to the summary: ``add(out, state, in_recipe, has_task)`` puts its keys
    into ``out`` from ``state`` (its entry of ``pipeline.json``, ``{}`` when it never ran;
    ``in_recipe``: the recipe lists it; ``has_task``: a task's gold objective judged the run),
    and ``lines`` say how they print."""

    add: Callable[[dict, dict, bool, bool], None]
    lines: tuple[Line, ...] = ()


def line_value(line: Line, summary: dict) -> str:
    """The text of ``line``'s value; "-" (or "- -> -") when the run has no such number."""

    def fmt(key: str, se_key: str | None = None) -> str:
        v = summary.get(key)
        if v is None:
            return "-"
        if line.text:
            return str(v)
        if se_key and summary.get(se_key) is not None:
            return f"{v:.4f} ± {summary[se_key]:.4f}"
        return f"{v:.4f}"

    if line.then is not None:
        return f"{fmt(line.key)} -> {fmt(line.then)}"
    return fmt(line.key, line.se)


def _metrics(state: dict) -> dict:
    return state.get("metrics", {})


def _improvement(out: dict, suffix: str, before: float | None, before_se: float | None, after: float | None,
                 after_se: float | None) -> None:
    """``gold_improvement<suffix>``: the gold reward after minus before, and its size in
    standard errors of the difference (the two samples are independent)."""
    if None not in (before, after):
        diff = after - before
        se = math.hypot(before_se, after_se)
        out[f"gold_improvement{suffix}"] = diff
        out[f"gold_improvement{suffix}_in_se"] = diff / se if se > 0 else None


def _sft(out: dict, state: dict, in_recipe: bool, has_task: bool) -> None:
    m = _metrics(state)
    out.update(sft_loss=m.get("loss"), sft_eval_loss=m.get("eval_loss"))


def _reward(out: dict, state: dict, in_recipe: bool, has_task: bool) -> None:
    m = _metrics(state)
    out.update({
        "rm_accuracy": m.get("eval_accuracy"),
        "rm_margin": m.get("eval_margin"),
        # pairs longer than reward.train.max_length, which TRL leaves out (train / held out)
        "rm_train_pairs_too_long": m.get("train_pairs_too_long"),
        "rm_test_pairs_too_long": m.get("test_pairs_too_long"),
    })
    if has_task:  # the reward model's accuracy on noiseless pairs (rlhf.stages: the row's task_metric)
        out["rm_accuracy_gold"] = m.get("gold_accuracy")


def _ppo(out: dict, state: dict, in_recipe: bool, has_task: bool) -> None:
    m = _metrics(state)
    out.update({
        "reward_score_sft": m.get(key(REFERENCE, "score")),
        "reward_score_sft_se": m.get(key(REFERENCE, "score", "se")),
        "reward_score_ppo": m.get(key(TRAINED, "score")),
        "reward_score_ppo_se": m.get(key(TRAINED, "score", "se")),
        "kl_sft": m.get(key(REFERENCE, "kl")),
        "kl_ppo_sft": m.get(key(TRAINED, "kl")),
        "kl_ppo_sft_se": m.get(key(TRAINED, "kl", "se")),
        "response_length_sft": m.get(key(REFERENCE, "length")),
        "response_length_sft_se": m.get(key(REFERENCE, "length", "se")),
        "response_length_ppo": m.get(key(TRAINED, "length")),
        "response_length_ppo_se": m.get(key(TRAINED, "length", "se")),
        "win_rate_rm": m.get(key(TRAINED, "win_rate")),
        "win_rate_rm_se": m.get(key(TRAINED, "win_rate", "se")),
        "eval_prompts": m.get("final/eval/prompts"),
    })
    # what the over-optimisation watchdog saw and did (rlhf/watchdog.py)
    out.update({k.replace("final/", "").replace("/", "_"): v for k, v in m.items() if k.startswith("watchdog/")})
    if not has_task:
        return
    out.update(
        win_rate_gold=m.get(key(TRAINED, "gold_win_rate")),
        win_rate_gold_se=m.get(key(TRAINED, "gold_win_rate", "se")),
        gold_reward_sft=m.get(key(REFERENCE, "gold")),
        gold_reward_sft_se=m.get(key(REFERENCE, "gold", "se")),
        gold_reward_ppo=m.get(key(TRAINED, "gold")),
        gold_reward_ppo_se=m.get(key(TRAINED, "gold", "se")),
    )
    _improvement(out, "", out["gold_reward_sft"], out["gold_reward_sft_se"], out["gold_reward_ppo"],
                 out["gold_reward_ppo_se"])


def _offline(n: str, out: dict, state: dict, in_recipe: bool, has_task: bool) -> None:
    """DPO's or KTO's numbers (stage ``n``) next to PPO's, under the same keys with ``n`` in
    place of ``ppo`` (``gold_reward_dpo``, ``win_rate_kto_sft``...). The stage sampled the SFT
    and its policy on the same held-out prompts as PPO's evaluation, with PPO's sampler,
    settings and seed, and reports them by the same convention; without a PPO stage its SFT
    numbers stand in for the SFT row."""
    if not in_recipe or state.get("status") != "completed":
        return
    m = _metrics(state)
    out.update({
        f"{n}_eval_loss": m.get("eval_loss"),
        # pairs longer than train.max_length, which TRL truncates (train / held out)
        f"{n}_train_pairs_too_long": m.get("train_pairs_too_long"),
        f"{n}_test_pairs_too_long": m.get("test_pairs_too_long"),
        f"{n}_reward_accuracy": m.get("eval_rewards_accuracies"),
        f"{n}_reward_margin": m.get("eval_rewards_margins"),
        f"reward_score_{n}": m.get(key(TRAINED, "score")),
        f"kl_{n}_sft": m.get(key(TRAINED, "kl")),
        f"kl_{n}_sft_se": m.get(key(TRAINED, "kl", "se")),
        f"response_length_{n}": m.get(key(TRAINED, "length")),
        f"win_rate_{n}_sft": m.get(key(TRAINED, "win_rate")),
        f"win_rate_{n}_sft_se": m.get(key(TRAINED, "win_rate", "se")),
    })
    if out.get("reward_score_sft") is None:
        out["reward_score_sft"] = m.get(key(REFERENCE, "score"))
    if not has_task:
        return
    out.update({f"gold_reward_{n}": m.get(key(TRAINED, "gold")),
                f"gold_reward_{n}_se": m.get(key(TRAINED, "gold", "se")),
                f"gold_win_rate_{n}_sft": m.get(key(TRAINED, "gold_win_rate")),
                f"gold_win_rate_{n}_sft_se": m.get(key(TRAINED, "gold_win_rate", "se"))})
    sft, sft_se = m.get(key(REFERENCE, "gold")), m.get(key(REFERENCE, "gold", "se"))
    if out.get("gold_reward_sft") is None:
        out.update(gold_reward_sft=sft, gold_reward_sft_se=sft_se)
    # against this stage's own SFT sample, not PPO's
    _improvement(out, f"_{n}", sft, sft_se, out[f"gold_reward_{n}"], out[f"gold_reward_{n}_se"])


SFT = Contribution(_sft, (Line("SFT loss (train, last logged)", "sft_loss"), Line("SFT eval loss", "sft_eval_loss")))
REWARD_MODEL = Contribution(_reward, (Line("RM held-out accuracy (noisy labels)", "rm_accuracy"),
                                      Line("RM accuracy vs noiseless gold", "rm_accuracy_gold")))
PPO = Contribution(_ppo, (
    Line("gold reward, SFT policy (± s.e.)", "gold_reward_sft", se="gold_reward_sft_se"),
    Line("gold reward, PPO policy (± s.e.)", "gold_reward_ppo", se="gold_reward_ppo_se"),
    Line("gold improvement (in s.e. of the difference)", "gold_improvement_in_se"),
    Line("RM score, SFT -> PPO", "reward_score_sft", then="reward_score_ppo"),
    Line("win rate PPO over SFT, by the RM (± s.e.)", "win_rate_rm", se="win_rate_rm_se"),
    Line("win rate PPO over SFT, by the objective (± s.e.)", "win_rate_gold", se="win_rate_gold_se"),
    Line("KL(PPO || SFT) per response (± s.e.)", "kl_ppo_sft", se="kl_ppo_sft_se"),
    Line("response length, SFT -> PPO", "response_length_sft", then="response_length_ppo"),
))


def offline_policy(n: str) -> Contribution:
    """The contribution of an offline preference stage ``n`` (DPO, KTO): see :func:`_offline`."""
    name = n.upper()
    return Contribution(functools.partial(_offline, n), (
        Line(f"gold reward, {name} policy (± s.e.)", f"gold_reward_{n}", se=f"gold_reward_{n}_se"),
        Line(f"{name} gold improvement (in s.e. of the difference)", f"gold_improvement_{n}_in_se"),
        Line(f"RM score, {name} policy", f"reward_score_{n}"),
        Line(f"{name} win rate over SFT, by RM (± s.e.)", f"win_rate_{n}_sft", se=f"win_rate_{n}_sft_se"),
        Line(f"{name} win rate over SFT, by gold (± s.e.)", f"gold_win_rate_{n}_sft",
             se=f"gold_win_rate_{n}_sft_se"),
        Line(f"KL({name} || SFT) per response (± s.e.)", f"kl_{n}_sft", se=f"kl_{n}_sft_se"),
    ))


@dataclass(frozen=True)
class Export:
    """A published artifact the run's closing lines offer to export (and, for a policy, to
    sample from): ``output`` names it among the stage's outputs."""

    output: str
    what: str  # the export's comment: "the policy as a standalone HF model"
    sample: str | None = None  # a policy: the generate line's comment ("the trained policy")
