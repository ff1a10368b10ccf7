"""Per-token KL estimators and the KL coefficient controllers.

Estimator names follow John Schulman's note "Approximating KL Divergence"
(2020): with tokens sampled from the policy p and ``r = p_ref / p``,

- k1 = -log r = logp - logp_ref: unbiased, can be negative per token;
- k2 = 0.5 * (log r)^2: biased, always >= 0, low variance;
- k3 = (r - 1) - log r: unbiased and always >= 0 (since log r <= r - 1).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["kl_penalty", "kl_per_unit", "FixedKLController", "AdaptiveKLController"]

_ESTIMATORS = ("k1", "k2", "k3")
_UNITS = ("response", "token")


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(policy || reference) at the sampled tokens.

    Args:
        logprobs: policy log-probabilities of the sampled tokens
            ``(batch, response_len)``.
        ref_logprobs: reference (frozen SFT) log-probabilities of the same
            tokens ``(batch, response_len)``.
        estimator: ``"k1"`` (default, as in the N+ paper and Ziegler et al.),
            ``"k2"`` or ``"k3"``; see the module docstring.

    Returns:
        ``(batch, response_len)`` per-token KL estimates. Padding positions are
        not masked here; the caller masks (``per_token_rewards`` does).
    """
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} differ"
        )
    log_ratio = ref_logprobs - logprobs  # log r, r = p_ref / p
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        # expm1 keeps (r - 1) accurate when r is close to 1, where the two
        # terms of k3 nearly cancel.
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"kl estimator must be one of {_ESTIMATORS}, got {estimator!r}")


def kl_per_unit(kl: Tensor, mask: Tensor, unit: str, all_reduce=None) -> Tensor:
    """The KL of a rollout batch that an adaptive controller compares with its target.

    Args:
        kl: per-token KL estimates ``(batch, response_len)`` (:func:`kl_penalty`).
        mask: ``(batch, response_len)``, 1 on real response tokens.
        unit: ``"response"``: the mean over responses of each response's summed KL;
            ``"token"``: summed KL over every real token / the number of real tokens
            (a token-weighted mean, so long responses count by their length).
        all_reduce: sums a tensor over processes (``rlhf.distributed.all_reduce_sum``),
            so every process gets the global number; None: this batch only.

    Returns:
        A scalar tensor.
    """
    from rlhf.ppo.masked import masked_mean, masked_sum

    if unit == "token":
        return masked_mean(kl, mask, all_reduce=all_reduce)
    if unit != "response":
        raise ValueError(f"unit must be one of {_UNITS}, got {unit!r}")
    total = masked_sum(kl, mask, dim=1).sum()
    rows = torch.tensor(float(kl.shape[0]), device=kl.device, dtype=total.dtype)
    if all_reduce is not None:
        total, rows = all_reduce(total), all_reduce(rows)
    return total / rows


class FixedKLController:
    """A constant KL coefficient beta (0.05 in the N+ paper, arXiv 2403.17031).

    Args:
        value: the coefficient.
    """

    def __init__(self, value: float) -> None:
        if value < 0:
            raise ValueError(f"KL coefficient must be >= 0, got {value}")
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Does nothing; present so both controllers share one interface."""
        del current_kl, n_steps

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state for checkpoints."""
        return {"type": "fixed", "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        _check_state(state, "fixed", ("value",))
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 (lm-human-preferences).

    After each rollout, with ``e = clip(current_kl / target - 1, -0.2, 0.2)``,
    the coefficient becomes ``value * (1 + e * n_steps / horizon)``: it grows
    when the policy drifts beyond the target KL and shrinks below it, by at
    most 20% per ``horizon`` samples.

    The target is in the ``unit`` the caller measures ``current_kl`` in: nats per
    response (Ziegler et al.) or nats per response token. A per-token target means
    the same drift for a task whose answers are 5 tokens and one whose answers are
    500, where a per-response target allows the short task a hundred times more
    drift per token. The unit is part of the state, so a checkpoint of one unit is
    never resumed as the other.

    Args:
        init_kl_coef: starting coefficient (0.15 in Ziegler et al.).
        target: target KL in nats per ``unit`` (6 per response in Ziegler et al.).
        horizon: number of samples over which the full proportional
            correction applies (10000 in Ziegler et al.).
        unit: ``"response"`` or ``"token"``: what ``current_kl`` of :meth:`update` is.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float, unit: str = "response") -> None:
        if init_kl_coef < 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef}")
        if target <= 0:
            raise ValueError(f"target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        if unit not in _UNITS:
            raise ValueError(f"unit must be one of {_UNITS}, got {unit!r}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)
        self.unit = unit

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move the coefficient towards keeping ``current_kl`` at the target.

        Args:
            current_kl: KL of the last rollout in the controller's unit (a float,
                not a tensor, so no device sync hides in here): the mean KL per
                response, or per response token (:func:`kl_per_unit`).
            n_steps: number of samples (episodes) in that rollout.
        """
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state for checkpoints."""
        return {
            "type": "adaptive",
            "value": self.value,
            "target": self.target,
            "horizon": self.horizon,
            "unit": self.unit,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        _check_state(state, "adaptive", ("value", "target", "horizon"))
        if state.get("unit", "response") != self.unit:
            raise ValueError(f"KL controller state targets KL per {state.get('unit', 'response')}, this controller "
                             f"per {self.unit}")
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])


def _check_state(state: dict[str, Any], kind: str, keys: tuple[str, ...]) -> None:
    if state.get("type", kind) != kind:
        raise ValueError(f"KL controller state is for a {state['type']!r} controller, not {kind!r}")
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"KL controller state is missing key(s) {missing}")
