"""KL estimators and KL coefficient controllers."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf.ppo import AdaptiveKLController, FixedKLController, kl_penalty, kl_per_unit


def test_kl_estimators_hand_worked():
    # p = .5, p_ref = .25:  k1 = log(.5/.25) = log 2 = .693147
    # r = p_ref / p = .5:   k3 = (r - 1) - log r = -.5 + .693147 = .193147
    #                       k2 = .5 * (log r)^2 = .5 * .480453 = .240227
    logp = torch.tensor([math.log(0.5)], dtype=torch.float64)
    ref = torch.tensor([math.log(0.25)], dtype=torch.float64)
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(0.693147, abs=1e-6)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.193147, abs=1e-6)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.240227, abs=1e-6)
    assert kl_penalty(logp, ref).item() == kl_penalty(logp, ref, "k1").item()


def test_kl_unknown_estimator_is_rejected():
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "k4")


def test_k3_nonnegative_on_random_inputs():
    gen = torch.Generator().manual_seed(0)
    logp = torch.randn(64, 128, generator=gen) * 5
    ref = torch.randn(64, 128, generator=gen) * 5
    assert torch.all(kl_penalty(logp, ref, "k3") >= 0)
    assert torch.all(kl_penalty(logp, ref, "k2") >= 0)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(-30, 0, allow_nan=False, width=32), min_size=1, max_size=16),
    st.lists(st.floats(-30, 0, allow_nan=False, width=32), min_size=1, max_size=16),
)
def test_k3_nonnegative_property(logps, refs):
    n = min(len(logps), len(refs))
    k3 = kl_penalty(torch.tensor(logps[:n]), torch.tensor(refs[:n]), "k3")
    assert torch.all(k3 >= 0), (logps[:n], refs[:n], k3)


def test_k1_and_k3_are_unbiased_monte_carlo():
    # Sample tokens from p; the means of k1 and k3 estimate KL(p || q) exactly
    # (both are unbiased), so with 400k samples they land within 1e-2.
    gen = torch.Generator().manual_seed(1234)
    logits_p = torch.randn(10, generator=gen, dtype=torch.float64)
    logits_q = logits_p + 0.7 * torch.randn(10, generator=gen, dtype=torch.float64)
    logp_all = torch.log_softmax(logits_p, -1)
    logq_all = torch.log_softmax(logits_q, -1)
    analytic = (logp_all.exp() * (logp_all - logq_all)).sum().item()
    assert analytic > 0.05  # the test would be vacuous for nearly equal distributions
    samples = torch.multinomial(logp_all.exp(), 400_000, replacement=True, generator=gen)
    logp, logq = logp_all[samples], logq_all[samples]
    assert kl_penalty(logp, logq, "k1").mean().item() == pytest.approx(analytic, abs=1e-2)
    assert kl_penalty(logp, logq, "k3").mean().item() == pytest.approx(analytic, abs=1e-2)


def test_adaptive_controller_reference_numbers():
    # e = clip(12/6 - 1, -.2, .2) = .2;  .15 * (1 + .2 * 512 / 1e4) = .151536
    up = AdaptiveKLController(0.15, target=6.0, horizon=10_000)
    up.update(12.0, 512)
    assert up.value == pytest.approx(0.151536, abs=1e-9)
    # e = clip(0/6 - 1) = -.2;  .15 * (1 - .2 * 512 / 1e4) = .148464
    down = AdaptiveKLController(0.15, target=6.0, horizon=10_000)
    down.update(0.0, 512)
    assert down.value == pytest.approx(0.148464, abs=1e-9)
    # Inside the clip: e = 7/6 - 1 = 1/6
    mid = AdaptiveKLController(0.15, target=6.0, horizon=10_000)
    mid.update(7.0, 512)
    assert mid.value == pytest.approx(0.15 * (1 + (1 / 6) * 512 / 1e4), abs=1e-12)


def test_fixed_controller_never_moves():
    ctl = FixedKLController(0.05)
    for kl in (0.0, 6.0, 1e6, -3.0):
        ctl.update(kl, 512)
    assert ctl.value == 0.05


def test_controller_state_round_trips_through_json():
    ctl = AdaptiveKLController(0.15, 6.0, 10_000)
    ctl.update(12.0, 512)
    restored = AdaptiveKLController(1.0, 1.0, 1.0)
    restored.load_state_dict(json.loads(json.dumps(ctl.state_dict())))
    assert (restored.value, restored.target, restored.horizon) == (ctl.value, 6.0, 10_000.0)
    fixed = FixedKLController(0.3)
    fixed.load_state_dict(FixedKLController(0.05).state_dict())
    assert fixed.value == 0.05
    with pytest.raises(ValueError, match="adaptive"):
        fixed.load_state_dict(ctl.state_dict())
    with pytest.raises(ValueError, match="horizon"):
        restored.load_state_dict({"type": "adaptive", "value": 1.0, "target": 2.0})


def test_adaptive_controller_validates_arguments():
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, 0.0, 10)
    with pytest.raises(ValueError, match="horizon"):
        AdaptiveKLController(0.1, 6.0, 0)


def test_kl_per_unit_hand_worked():
    # two responses of 2 and 1 real tokens (the third column is padding, its 9.0 must not count):
    #   per response: (0.1 + 0.3) = 0.4 and 0.05 -> mean (0.4 + 0.05) / 2 = 0.225
    #   per token:    (0.1 + 0.3 + 0.05) / 3 real tokens = 0.15
    kl = torch.tensor([[0.1, 0.3, 9.0], [0.05, 9.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.float64)
    assert kl_per_unit(kl, mask, "response").item() == pytest.approx(0.225, abs=1e-12)
    assert kl_per_unit(kl, mask, "token").item() == pytest.approx(0.15, abs=1e-12)
    # two processes holding the same batch: all_reduce doubles sums and counts, the means stay
    doubled = kl_per_unit(kl, mask, "token", all_reduce=lambda t: 2 * t)
    assert doubled.item() == pytest.approx(0.15, abs=1e-12)
    assert kl_per_unit(kl, mask, "response", all_reduce=lambda t: 2 * t).item() == pytest.approx(0.225, abs=1e-12)
    with pytest.raises(ValueError, match="unit"):
        kl_per_unit(kl, mask, "sequence")


def test_adaptive_controller_per_token_target_hand_worked():
    # the batch above, per token 0.15 against a target of 0.1 per token:
    #   e = clip(0.15 / 0.1 - 1, -.2, .2) = .2 -> .1 * (1 + .2 * 64 / 512) = .1025
    up = AdaptiveKLController(0.1, target=0.1, horizon=512, unit="token")
    up.update(0.15, 64)
    assert up.value == pytest.approx(0.1025, abs=1e-12)
    # inside the clip: 0.09 per token, e = 0.9 - 1 = -0.1 -> .1 * (1 - .1 * 64 / 512) = .09875
    down = AdaptiveKLController(0.1, target=0.1, horizon=512, unit="token")
    down.update(0.09, 64)
    assert down.value == pytest.approx(0.09875, abs=1e-12)
    # the same rollout measured per response (0.225) against the same number as a per-response
    # target would have pushed beta up too, but a 0.225-per-response target would have held it
    held = AdaptiveKLController(0.1, target=0.225, horizon=512, unit="response")
    held.update(0.225, 64)
    assert held.value == pytest.approx(0.1, abs=1e-12)


def test_controller_state_keeps_its_unit():
    per_token = AdaptiveKLController(0.1, 0.08, 512, unit="token")
    state = json.loads(json.dumps(per_token.state_dict()))
    assert state["unit"] == "token"
    restored = AdaptiveKLController(1.0, 1.0, 1.0, unit="token")
    restored.load_state_dict(state)
    assert (restored.value, restored.target, restored.horizon, restored.unit) == (0.1, 0.08, 512.0, "token")
    with pytest.raises(ValueError, match="per token"):
        AdaptiveKLController(1.0, 1.0, 1.0).load_state_dict(state)
    # a checkpoint written before units existed targeted KL per response
    old = {"type": "adaptive", "value": 0.2, "target": 6.0, "horizon": 10_000}
    AdaptiveKLController(1.0, 1.0, 1.0).load_state_dict(old)
    with pytest.raises(ValueError, match="per response"):
        restored.load_state_dict(old)
    with pytest.raises(ValueError, match="unit"):
        AdaptiveKLController(0.1, 6.0, 10, unit="sequence")
