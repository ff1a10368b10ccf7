"""The lower confidence bound the reward gate applies to a held-out accuracy, against
hand-computed Wilson bounds."""

from __future__ import annotations

import math

import pytest

from rlhf.summary import accuracy_lower_bound


def test_wilson_lower_bound_matches_hand_computed_values():
    # z at one-sided 0.95 = 1.644854; z^2 = 2.705543.
    # 17 of 28: p = 0.607143, z^2/n = 0.096627, centre = p + z^2/(2n) = 0.655456,
    # spread = z * sqrt(p(1-p)/28 + z^2/(4 * 28^2)) = 1.644854 * sqrt(0.0085186 + 0.0008627) = 0.159316,
    # bound = (0.655456 - 0.159316) / 1.096627 = 0.452424: under chance, although p = 0.607.
    assert accuracy_lower_bound(17, 28, 0.95) == pytest.approx(0.452424, abs=2e-6)
    # 222 of 300: p = 0.74, z^2/n = 0.009018, centre = 0.744509,
    # spread = 1.644854 * sqrt(0.000641333 + 0.0000075150) = 0.041899, bound = 0.702610 / 1.009018 = 0.696331
    assert accuracy_lower_bound(222, 300, 0.95) == pytest.approx(0.696331, abs=2e-6)
    # 20 of 20: p = 1, spread = z * z / (2n) = 0.067639 = centre - 1, bound = 1 / (1 + z^2/20) = 0.880842
    assert accuracy_lower_bound(20, 20, 0.95) == pytest.approx(1 / (1 + 2.705543 / 20), abs=2e-6)
    assert accuracy_lower_bound(0, 10, 0.95) == 0.0


def test_confidence_one_half_is_the_point_value_and_the_bound_grows_with_n():
    assert accuracy_lower_bound(17, 28, 0.5) == pytest.approx(17 / 28)
    bounds = [accuracy_lower_bound(round(0.6 * n), n, 0.95) for n in (25, 100, 400, 1600)]
    assert bounds == sorted(bounds) and bounds[-1] < 0.6
    # at large n Wilson meets the normal approximation p - z * sqrt(p(1-p)/n)
    n = 100_000
    assert accuracy_lower_bound(60_000, n, 0.95) == pytest.approx(0.6 - 1.644854 * math.sqrt(0.24 / n), abs=1e-5)


def test_bad_counts_are_refused():
    for args in ((1, 0, 0.95), (5, 4, 0.95), (-1, 4, 0.95), (2, 4, 1.0), (2, 4, 0.0)):
        with pytest.raises(ValueError, match="accuracy_lower_bound"):
            accuracy_lower_bound(*args)
