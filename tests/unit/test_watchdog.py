"""The watchdog's bookkeeping: consecutive "reward up, judge down" evaluations, best by judge."""

from __future__ import annotations

from rlhf.watchdog import Watchdog


def test_trips_after_patience_evaluations_in_a_row():
    w = Watchdog(patience=2)
    # step 0: start; 16: both up (healthy, new best); 32: reward up, judge down (1);
    # 48: reward up, judge down (2) -> trips; the best by the judge is step 16
    assert not w.observe(0, 0.0, 0.10)
    assert not w.observe(16, 0.5, 0.20)
    assert not w.observe(32, 0.9, 0.15)
    assert w.observe(48, 1.2, 0.05)
    assert (w.tripped_at, w.best_step, w.best_judge) == (48, 16, 0.20)
    assert w.summary() == {"watchdog/evaluations": 4.0, "watchdog/tripped": 1.0, "watchdog/tripped_step": 48.0,
                           "watchdog/best_step": 16.0, "watchdog/best_judge": 0.20}


def test_streak_resets_when_the_judge_recovers_or_the_reward_falls():
    w = Watchdog(patience=2)
    w.observe(0, 0.0, 0.3)
    assert not w.observe(1, 1.0, 0.2)  # up/down: 1
    assert not w.observe(2, 2.0, 0.25)  # judge recovered: 0
    assert not w.observe(3, 3.0, 0.2)  # 1
    assert not w.observe(4, 2.5, 0.1)  # reward fell too (not over-optimisation): 0
    assert w.streak == 0 and w.tripped_at is None
    assert w.best_step == 0  # the SFT policy is still the best by the judge
    assert w.summary()["watchdog/tripped"] == 0.0 and "watchdog/tripped_step" not in w.summary()


def test_patience_one_trips_on_the_first_divergence():
    w = Watchdog(patience=1)
    w.observe(0, 0.0, 0.3)
    assert w.observe(10, 0.1, 0.29)
    assert not w.is_new_best(10) and w.best_step == 0
