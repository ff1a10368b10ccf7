"""Masked reductions and whitening (ppo.md test 8)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf.ppo import masked_mean, masked_sum, masked_var, masked_whiten


@pytest.mark.parametrize("pad_value", [4.0, -1000.0, float("nan"), float("inf")])
def test_whiten_hand_worked_and_pad_has_no_effect(pad_value):
    # Real values [1, 2, 3]: mean 2, unbiased variance ((-1)^2 + 0 + 1^2) / (3 - 1) = 1,
    # so the whitened values are [-1, 0, 1]; the pad position comes back as 0.
    x = torch.tensor([[1.0, 2.0, 3.0, pad_value]])
    mask = torch.tensor([[1, 1, 1, 0]])
    out = masked_whiten(x, mask)
    torch.testing.assert_close(out, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)


def test_whiten_without_shift_keeps_the_mean():
    # shift_mean=False: (x - 2) / 1 + 2 = x, so the mean (2) is kept.
    x = torch.tensor([[1.0, 2.0, 3.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    out = masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(out, torch.tensor([[1.0, 2.0, 3.0, 0.0]]), atol=1e-6, rtol=0)
    # Scaled input: real values [2, 4, 6] have mean 4 and std 2 -> [3, 4, 5].
    out = masked_whiten(2 * x, mask, shift_mean=False)
    torch.testing.assert_close(out, torch.tensor([[3.0, 4.0, 5.0, 0.0]]), atol=1e-6, rtol=0)
    assert masked_mean(out, mask).item() == pytest.approx(4.0)


def test_whiten_uses_whole_batch_statistics():
    x = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(
        masked_whiten(x, mask), torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]), atol=1e-6, rtol=0
    )


def test_masked_mean_sum_var():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 6.0, float("nan")]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    assert masked_sum(x, mask).item() == 12.0
    assert masked_mean(x, mask).item() == 3.0
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 4.5]))
    torch.testing.assert_close(masked_sum(x, mask, dim=0), torch.tensor([4.0, 8.0, 0.0]))
    # deviations from 3: -2, -1, 0, 3 -> squares sum 14; biased 14/4, unbiased 14/3
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(3.5)
    assert masked_var(x, mask).item() == pytest.approx(14 / 3)


def test_masked_var_needs_two_tokens_when_unbiased():
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(torch.tensor([[1.0, 2.0]]), torch.tensor([[1, 0]]))


def test_masked_mean_gradient_is_zero_on_padding_even_with_nan():
    x = torch.tensor([[1.0, float("nan")]], requires_grad=True)
    masked_mean(x, torch.tensor([[1, 0]])).backward()
    assert torch.equal(x.grad, torch.tensor([[1.0, 0.0]]))


@settings(max_examples=60, deadline=None)
@given(
    real=st.lists(st.floats(-100, 100, allow_nan=False), min_size=2, max_size=12),
    pads=st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=6),
)
def test_whiten_is_invariant_to_padding_values(real, pads):
    n = len(real)
    x = torch.tensor([real + pads], dtype=torch.float64)
    mask = torch.tensor([[1] * n + [0] * len(pads)])
    out = masked_whiten(x, mask)
    ref = masked_whiten(torch.tensor([real], dtype=torch.float64), torch.ones(1, n))
    torch.testing.assert_close(out[:, :n], ref)
    assert torch.all(out[:, n:] == 0)
