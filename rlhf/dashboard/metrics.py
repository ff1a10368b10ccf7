"""What a logged metric means: its human label, the page section it belongs to, its error bar.

The stages log flat keys (``reward/score_mean``, ``eval/gold_se``, TRL's ``eval_accuracy``);
this module is the one place that turns them into what a reader sees:

- :func:`label` gives a human label ("RM score of rollouts"); unknown keys keep their name.
- :func:`section_of` puts a key in one of :data:`SECTIONS` (reward, KL, policy, value, lengths,
  training, optimization, throughput, evaluation, other).
- :func:`plan_stage` splits a stage's series into charts (with a standard-error band when a
  ``*_se`` series matches a mean) and constants (a value that never changed, or was logged
  once, is a number, not a chart).
- :func:`ema` is the smoothing the page applies in the browser, kept here so tests can
  compute the expected curve independently of the JavaScript.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["SECTIONS", "ChartPlan", "StagePlan", "ema", "label", "plan_stage", "section_of", "se_partner"]

#: (id, title) in the order sections appear under a stage.
SECTIONS = (
    ("reward", "Reward"),
    ("kl", "KL"),
    ("policy", "Policy"),
    ("value", "Value"),
    ("lengths", "Lengths"),
    ("training", "Training loss and accuracy"),
    ("optimization", "Optimization"),
    ("throughput", "Throughput"),
    ("evaluation", "Evaluation"),
    ("other", "Other"),
)

# Human labels for the keys our stages and TRL log. Keys not listed keep their own name.
LABELS = {
    # PPO rollouts and update (rlhf/stages/ppo.py)
    "reward/score_mean": "RM score of rollouts (mean)",
    "reward/score_std": "RM score of rollouts (std over the batch)",
    "reward/shaped_mean": "Shaped reward per response (RM score - beta * KL)",
    "advantage/mean": "Advantage (mean)",
    "kl/mean": "KL to the SFT policy per response (rollouts)",
    "kl/coef": "KL coefficient beta",
    "entropy/mean": "Policy entropy per token (rollouts)",
    "response/length_mean": "Response length, tokens (rollouts)",
    "response/stop_rate": "Responses that ended with the stop token (fraction)",
    "value/mean": "Value estimate (mean)",
    "value/vf_clipfrac": "Value clip fraction",
    "value/explained_variance": "Value explained variance (1 - Var[returns - values] / Var[returns])",
    "loss/policy": "Policy loss (clipped surrogate)",
    "loss/value": "Value loss",
    "policy/clipfrac": "Policy clip fraction",
    "policy/approxkl": "Approximate KL, new vs rollout policy",
    "policy/ratio_mean": "Probability ratio, new / rollout policy (mean)",
    "lr": "Learning rate",
    "grad_norm": "Gradient norm (before clipping)",
    "optimizer_steps": "Optimizer steps per update",
    "episodes": "Episodes seen",
    "episodes_per_s": "Episodes per second",
    "time/generate_s": "Generation time per update (s)",
    "time/score_s": "Scoring time per update (s)",
    "time/update_s": "PPO update time per update (s)",
    "eval/score_mean": "RM score, held-out prompts",
    "eval/gold_mean": "Gold reward (objective), held-out prompts",
    "eval/kl_mean": "KL to the SFT policy per response, held-out prompts",
    "eval/entropy_mean": "Policy entropy per token, held-out prompts",
    "eval/length_mean": "Response length in tokens, held-out prompts",
    "eval/win_rate_mean": "Win rate against the SFT policy, held-out prompts",
    # TRL SFTTrainer / RewardTrainer
    "loss": "Training loss",
    "train_loss": "Training loss (mean over the run)",
    "eval_loss": "Eval loss",
    "accuracy": "Preference accuracy (training batches)",
    "margin": "Reward margin, chosen - rejected (training batches)",
    "eval_accuracy": "RM accuracy, held-out pairs",
    "eval_margin": "Reward margin, chosen - rejected, held-out pairs",
    "min_reward": "Lowest reward in the batch",
    "mean_reward": "Mean reward in the batch",
    "max_reward": "Highest reward in the batch",
    "eval_min_reward": "Lowest reward, held-out pairs",
    "eval_mean_reward": "Mean reward, held-out pairs",
    "eval_max_reward": "Highest reward, held-out pairs",
    "entropy": "Token entropy (training batches)",
    "eval_entropy": "Token entropy, held-out",
    "mean_token_accuracy": "Next-token accuracy (training batches)",
    "eval_mean_token_accuracy": "Next-token accuracy, held-out",
    "learning_rate": "Learning rate",
    "epoch": "Epoch",
    "num_tokens": "Tokens seen",
    "eval_num_tokens": "Tokens seen (at evaluation)",
    "train_runtime": "Training time (s)",
    "train_samples_per_second": "Training samples per second",
    "train_steps_per_second": "Training steps per second",
    "total_flos": "Total floating-point operations",
    "eval_runtime": "Evaluation time (s)",
    "eval_samples_per_second": "Evaluation samples per second",
    "eval_steps_per_second": "Evaluation steps per second",
    # pipeline.json / summary.json
    "gold_accuracy": "RM accuracy vs the noiseless gold preference",
    "test_pairs": "Held-out preference pairs",
    "train_pairs": "Training preference pairs",
}

# Counters that are the page's second x-axis (episodes for PPO, epoch for TRL stages), not charts.
AXIS_COUNTERS = ("episodes", "epoch")

# Units the tests and the page agree on for keys whose meaning is a standard error.
_SE_SUFFIX = "_se"


def label(key: str) -> str:
    """Human label of a metric key; the key itself when it is not a known one.

    ``eval/<k>_se`` is labelled after its mean; pipeline.json's ``initial/…`` and ``final/…``
    prefixes (PPO's first and last evaluation) are spelled out.
    """
    for prefix, words in (("initial/", "before training: "), ("final/", "after training: "), ("train/", "last update: ")):
        if key.startswith(prefix):
            return words + label(key[len(prefix):])
    if key in LABELS:
        return LABELS[key]
    if key.endswith(_SE_SUFFIX):
        mean = se_partner(key, {key[: -len(_SE_SUFFIX)] + "_mean", key[: -len(_SE_SUFFIX)]})
        if mean is not None and mean in LABELS:
            return LABELS[mean] + " (standard error)"
    return key


def se_partner(se_key: str, keys: Any) -> str | None:
    """The mean a ``*_se`` key is the standard error of, if ``keys`` holds it.

    ``eval/gold_se`` pairs with ``eval/gold_mean`` (how the PPO evaluation names them), else
    with ``eval/gold``.
    """
    if not se_key.endswith(_SE_SUFFIX):
        return None
    stem = se_key[: -len(_SE_SUFFIX)]
    for candidate in (stem + "_mean", stem):
        if candidate in keys:
            return candidate
    return None


def section_of(key: str) -> str:
    """The section id (from :data:`SECTIONS`) a metric key is shown in."""
    name = key.lower()
    if (
        name.startswith("time/")
        or name.endswith(("_per_s", "_per_second", "runtime"))
        or name in ("total_flos", "num_tokens", "eval_num_tokens", "episodes")
    ):
        return "throughput"
    if name.startswith(("eval/", "eval_")):
        return "evaluation"
    if name.startswith(("reward/", "advantage/")) or name in ("min_reward", "mean_reward", "max_reward"):
        return "reward"
    if name.startswith(("kl/", "kl_")) or name == "kl":
        return "kl"
    if name.startswith(("policy/", "entropy/")) or name == "loss/policy":
        return "policy"
    if name.startswith("value/") or name == "loss/value" or "explained_var" in name:
        return "value"
    if name.startswith("response/") or "length" in name:
        return "lengths"
    if name in ("loss", "train_loss", "accuracy", "margin", "entropy", "mean_token_accuracy") or name.startswith("loss/"):
        return "training"
    if name in ("lr", "learning_rate", "grad_norm", "epoch", "optimizer_steps") or name.startswith("optim"):
        return "optimization"
    return "other"


@dataclass
class ChartPlan:
    """One chart: a metric, and the standard-error series drawn as a band around it."""

    key: str = field(metadata={"help": "metric key of the mean (the line)"})
    se_key: str | None = field(default=None, metadata={"help": "metric key of its standard error, if logged"})


@dataclass
class StagePlan:
    """A stage's metrics, sorted into sections of charts and constants."""

    charts: dict[str, list[ChartPlan]] = field(default_factory=dict, metadata={"help": "section id -> charts"})
    constants: dict[str, dict[str, dict[str, Any]]] = field(
        default_factory=dict,
        metadata={"help": "section id -> metric -> {'value': number|None (never finite), 'steps': [int], 'se': number|None}"},
    )


def _finite_values(values: list) -> list[float]:
    return [v for v in values if v is not None]


def plan_stage(series: dict[str, dict[str, list]]) -> StagePlan:
    """Sort a stage's series (``metric -> {'step', 'value'}``) into charts and constants.

    A series is a constant when all its logged values are equal or it has one point (a
    one-point chart says nothing a number does not); it is shown as a number. A ``*_se``
    series with a matching mean becomes that mean's band and is never a chart of its own.
    """
    plan = StagePlan()
    keys = list(series)
    band_of: dict[str, str] = {}
    for key in keys:
        mean = se_partner(key, series)
        if mean is not None:
            band_of[mean] = key
    bands = set(band_of.values())
    for key in keys:
        if key in bands or key in AXIS_COUNTERS:
            continue
        values = _finite_values(series[key]["value"])
        section = section_of(key)
        if not values:
            # Never finite (NaN or infinite every time): worth seeing, but there is no curve.
            plan.constants.setdefault(section, {})[key] = {"value": None, "steps": series[key]["step"], "se": None}
            continue
        se_key = band_of.get(key)
        if len(values) == 1 or all(v == values[0] for v in values):
            se_values = _finite_values(series[se_key]["value"]) if se_key else []
            plan.constants.setdefault(section, {})[key] = {
                "value": values[-1],
                "steps": series[key]["step"],
                "se": se_values[-1] if se_values else None,
            }
            continue
        plan.charts.setdefault(section, []).append(ChartPlan(key, se_key))
    return plan


def ema(values: list[float | None], weight: float) -> list[float | None]:
    """Exponential moving average with start-up bias correction (TensorBoard's smoothing).

    ``weight`` 0 returns the values unchanged; gaps (None) stay gaps and do not reset the
    average. Bias correction divides by ``1 - weight**n`` so the first points are not pulled
    towards zero.
    """
    out: list[float | None] = []
    last, count = 0.0, 0
    for value in values:
        if value is None:
            out.append(None)
            continue
        count += 1
        last = last * weight + (1 - weight) * value
        out.append(last / (1 - weight**count) if weight > 0 else value)
    return out
