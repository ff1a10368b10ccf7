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


def accuracy_lower_bound(correct: int, n: int, confidence: float) -> float:
    """One-sided lower confidence bound of an accuracy ``correct / n`` at level ``confidence``:
    the Wilson score bound (Wilson 1927), which stays inside [0, 1] and keeps its coverage on
    a few dozen pairs, where the normal approximation ``p - z * sqrt(p(1-p)/n)`` is too
    optimistic. ``confidence`` 0.5 gives the point value ``correct / n``.

    With ``z`` the standard normal quantile at ``confidence``::

        (p + z^2/(2n) - z * sqrt(p(1-p)/n + z^2/(4n^2))) / (1 + z^2/n)

    E.g. 17 of 28 pairs (0.607) at 0.95: 0.452, below chance; 222 of 300 (0.74): 0.696.
    """
    import math
    from statistics import NormalDist

    if n <= 0:
        raise ValueError(f"accuracy_lower_bound: no pairs (n={n})")
    if not 0 <= correct <= n:
        raise ValueError(f"accuracy_lower_bound: correct={correct} is not between 0 and n={n}")
    if not 0 < confidence < 1:
        raise ValueError(f"accuracy_lower_bound: confidence={confidence} is not in (0, 1)")
    p, z = correct / n, NormalDist().inv_cdf(confidence)
    z2 = z * z
    centre = p + z2 / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return min(1.0, max(0.0, (centre - spread) / (1 + z2 / n)))


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
    flag: bool = False  # shown as "yes" when the value is true, not at all otherwise
    show: Callable[[dict], str] | None = None  # the value's text from the whole summary ("-": not shown)


@dataclass(frozen=True)
class Contribution:
    """What a stage adds to the summary: ``add(out, state, in_recipe, has_task, cfg)`` puts its
    keys into ``out`` from ``state`` (its entry of ``pipeline.json``, ``{}`` when it never ran;
    ``in_recipe``: the recipe lists it; ``has_task``: a task's gold objective judged the run;
    ``cfg``: the stage's typed config in this plan), and ``lines`` say how they print."""

    add: Callable[[dict, dict, bool, bool, object], None]
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

    if summary.get(line.key) is None:
        return "-" if line.then is None else f"- -> {fmt(line.then)}"
    if line.show is not None:
        return line.show(summary)
    if line.flag:
        return "yes" if summary.get(line.key) else "-"
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


def _sft(out: dict, state: dict, in_recipe: bool, has_task: bool, cfg=None) -> None:
    m = _metrics(state)
    out.update(sft_loss=m.get("loss"), sft_eval_loss=m.get("eval_loss"))


def _reward(out: dict, state: dict, in_recipe: bool, has_task: bool, cfg=None) -> None:
    m = _metrics(state)
    out.update({
        # the reward model on every held-out pair (none filtered; too long ones shortened and counted)
        "rm_accuracy": m.get("heldout_accuracy"),
        "rm_margin": m.get("heldout_margin"),
        "rm_heldout_pairs": m.get("heldout_pairs"),
        "rm_heldout_truncated": m.get("heldout_truncated"),
        # pairs longer than reward.train.max_length, which TRL leaves out of training (train / held out)
        "rm_train_pairs_too_long": m.get("train_pairs_too_long"),
        "rm_test_pairs_too_long": m.get("test_pairs_too_long"),
    })
    # a reward-model ensemble (reward.ensemble > 1): each member's and the ensemble's held-out accuracy
    out.update({f"rm_{k}": v for k, v in m.items() if k in ("ensemble_accuracy", "ensemble_members")
                or (k.startswith("member") and k.endswith("_accuracy") and k.count("_") == 1)})
    if has_task:  # the reward model's accuracy on noiseless pairs (rlhf.stages: the row's task_metric)
        out["rm_accuracy_gold"] = m.get("gold_accuracy")


def with_accuracy_bound(out: dict, confidence: float) -> None:
    """``rm_accuracy_lower``: the lower confidence bound (:func:`accuracy_lower_bound`) of the
    reward model's held-out accuracy at the reward gate's ``confidence``, the number the gate
    compares (``rm_accuracy_confidence`` beside it); both None without a held-out accuracy."""
    n, acc = out.get("rm_heldout_pairs"), out.get("rm_accuracy")
    scored = bool(n) and acc is not None
    out["rm_accuracy_lower"] = accuracy_lower_bound(round(acc * n), int(n), confidence) if scored else None
    out["rm_accuracy_confidence"] = confidence if scored else None


def per_gain(kl: float | None, gain: float | None) -> float | None:
    """KL spent per unit of gain; None when either is missing or the gain is not positive
    (no KL buys a loss)."""
    return kl / gain if kl is not None and gain is not None and gain > 0 else None


def _judge(m: dict, watchdog_judge: str, kl: float | None) -> dict:
    """The watchdog's judge of the SFT and the published policy (``judge_sft``, ``judge_ppo``,
    on the evaluations' first ``eval_max_prompts`` prompts or the held-out pairs), which judge it
    was (``judge``: objective, function or pairs), its gain and ``kl_per_judge_gain``: the KL to
    SFT per response spent per unit of judge gain. {} when the run had no judge."""
    sft, ppo = m.get(f"{REFERENCE}watchdog/judge"), m.get(f"{TRAINED}watchdog/judge")
    if sft is None or ppo is None:
        return {}
    kind = ("pairs" if f"{REFERENCE}judge/pairs_agreement" in m
            else "function" if watchdog_judge else "objective")
    return {"judge": kind, "judge_sft": sft, "judge_ppo": ppo, "judge_gain": ppo - sft,
            "kl_per_judge_gain": per_gain(kl, ppo - sft)}


def _ppo(out: dict, state: dict, in_recipe: bool, has_task: bool, cfg=None) -> None:
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
        # a reward-model ensemble's disagreement (members' std per response), SFT -> PPO
        "rm_disagreement_sft": m.get(key(REFERENCE, "disagreement")),
        "rm_disagreement_ppo": m.get(key(TRAINED, "disagreement")),
    })
    # what the over-optimisation watchdog saw and did (rlhf/watchdog.py)
    out.update({k.replace("final/", "").replace("/", "_"): v for k, v in m.items() if k.startswith("watchdog/")})
    out.update(_judge(m, getattr(cfg, "watchdog_judge", ""), out.get("kl_ppo_sft")))
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
    if out.get("gold_improvement") is not None:
        out["kl_per_gold_gain"] = per_gain(out.get("kl_ppo_sft"), out["gold_improvement"])


def _offline(n: str, out: dict, state: dict, in_recipe: bool, has_task: bool, cfg=None) -> None:
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
                                      Line("RM accuracy, lower confidence bound, on n held-out pairs",
                                           "rm_accuracy_lower", show=lambda s: (
                                               f"{s['rm_accuracy_lower']:.4f} at {s['rm_accuracy_confidence']:.0%}, "
                                               f"n = {s['rm_heldout_pairs']}")),
                                      Line("RM accuracy vs noiseless gold", "rm_accuracy_gold")))
PPO = Contribution(_ppo, (
    Line("gold reward, SFT policy (± s.e.)", "gold_reward_sft", se="gold_reward_sft_se"),
    Line("gold reward, PPO policy (± s.e.)", "gold_reward_ppo", se="gold_reward_ppo_se"),
    Line("gold improvement (in s.e. of the difference)", "gold_improvement_in_se"),
    Line("RM score, SFT -> PPO", "reward_score_sft", then="reward_score_ppo"),
    Line("RM ensemble disagreement (std), SFT -> PPO", "rm_disagreement_sft", then="rm_disagreement_ppo"),
    Line("win rate PPO over SFT, by the RM (± s.e.)", "win_rate_rm", se="win_rate_rm_se"),
    Line("win rate PPO over SFT, by the objective (± s.e.)", "win_rate_gold", se="win_rate_gold_se"),
    Line("KL(PPO || SFT) per response (± s.e.)", "kl_ppo_sft", se="kl_ppo_sft_se"),
    Line("watchdog judge", "judge", text=True),
    Line("watchdog judge, SFT -> PPO", "judge_sft", then="judge_ppo"),
    Line("KL per unit of judge gain", "kl_per_judge_gain"),
    Line("KL per unit of gold gain", "kl_per_gold_gain"),
    Line("watchdog tripped", "watchdog_tripped", flag=True),
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
