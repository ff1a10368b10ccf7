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
"""

from __future__ import annotations

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
