"""Masked reductions and whitening."""

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


class _ThreadedAllReduce:
    """Two "processes" as two threads: each call deposits this rank's tensor, waits for the
    other, and returns the sum (what ``torch.distributed.all_reduce`` does across ranks)."""

    def __init__(self, world: int):
        import threading

        self.barrier = threading.Barrier(world)
        self.slots: list = [None] * world

    def for_rank(self, rank: int):
        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = sum(self.slots)
            self.barrier.wait()  # nobody overwrites a slot before everyone has summed
            return total

        return all_reduce


def _per_rank(fn, xs, masks):
    """``fn(x, mask, all_reduce)`` on each rank's share, run concurrently."""
    import threading

    reducer = _ThreadedAllReduce(len(xs))
    out: list = [None] * len(xs)

    def work(r):
        out[r] = fn(xs[r], masks[r], reducer.for_rank(r))

    threads = [threading.Thread(target=work, args=(r,)) for r in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_all_reduce_gives_the_statistics_of_the_concatenated_batch():
    """Rank 0 holds rows 0-1, rank 1 rows 2-4 (different real-token counts and very
    different values), so per-rank statistics differ from the global ones; with
    ``all_reduce`` each rank gets the global mean/variance and whitens its share exactly as
    the concatenated batch is whitened in one process."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, generator=g, dtype=torch.float64)
    x[2:] = x[2:] * 4 + 3
    mask = torch.ones(5, 6, dtype=torch.float64)
    mask[0, 2:] = 0
    mask[3, 4:] = 0
    xs, masks = [x[:2], x[2:]], [mask[:2], mask[2:]]

    means = _per_rank(lambda a, m, ar: masked_mean(a, m, all_reduce=ar), xs, masks)
    variances = _per_rank(lambda a, m, ar: masked_var(a, m, all_reduce=ar), xs, masks)
    for mean, var in zip(means, variances):
        torch.testing.assert_close(mean, masked_mean(x, mask))
        torch.testing.assert_close(var, masked_var(x, mask))
    for shift in (True, False):
        parts = _per_rank(lambda a, m, ar: masked_whiten(a, m, shift_mean=shift, all_reduce=ar), xs, masks)
        torch.testing.assert_close(torch.cat(parts), masked_whiten(x, mask, shift_mean=shift))
    # without the all-reduce each rank would whiten with its own statistics
    assert not torch.allclose(masked_whiten(xs[1], masks[1]), masked_whiten(x, mask)[2:])


def test_all_reduce_counts_tokens_of_every_process():
    """One real token per rank: too few alone, enough together for the unbiased variance."""
    x, m = torch.tensor([[1.0, 9.0]]), torch.tensor([[1.0, 0.0]])
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(x, m)
    var = _per_rank(lambda a, mm, ar: masked_var(a, mm, all_reduce=ar), [x, x + 2], [m, m])
    assert var[0].item() == pytest.approx(2.0)  # values 1 and 3: mean 2, (1 + 1) / (2 - 1)
    with pytest.raises(ValueError, match="dim=None"):
        masked_mean(x, m, dim=1, all_reduce=lambda t: t)
