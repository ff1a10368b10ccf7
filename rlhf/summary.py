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
