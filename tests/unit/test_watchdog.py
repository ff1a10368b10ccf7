"""The watchdog's bookkeeping: consecutive "reward up, judge not improving" evaluations, a final
policy judged below SFT, and the best evaluation by the judge."""

from __future__ import annotations

from rlhf.watchdog import Watchdog


def test_trips_after_patience_evaluations_in_a_row():
    w = Watchdog(patience=2)
    # step 0: start; 16: both up (healthy, new best); 32: reward up, judge below its best (1);
    # 48: reward up, judge below its best (2) -> trips; the best by the judge is step 16
    assert not w.observe(0, 0.0, 0.10)
    assert not w.observe(16, 0.5, 0.20)
    assert not w.observe(32, 0.9, 0.15)
    assert w.observe(48, 1.2, 0.05)
    assert (w.tripped_at, w.best_step, w.best_judge) == (48, 16, 0.20)
    assert w.summary() == {"watchdog/evaluations": 4.0, "watchdog/tripped": 1.0, "watchdog/tripped_step": 48.0,
                           "watchdog/below_sft": 0.0, "watchdog/best_step": 16.0, "watchdog/best_judge": 0.20}
    assert "stayed below its best for 2" in w.reason()


def test_a_judge_that_stops_improving_counts_though_it_does_not_fall():
    # issue 30: "the training reward keeps rising while the judge stops improving"
    w = Watchdog(patience=2)
    w.observe(0, 0.0, 0.10)
    w.observe(16, 0.5, 0.30)  # new best
    assert not w.observe(32, 0.9, 0.25)  # below the best, though... (1)
    assert w.observe(48, 1.2, 0.28)  # ...this one rose over the last: still not above the best (2)
    assert w.best_step == 16


def test_streak_resets_when_the_judge_improves_or_the_reward_falls():
    w = Watchdog(patience=2)
    w.observe(0, 0.0, 0.3)
    assert not w.observe(1, 1.0, 0.2)  # reward up, judge not above 0.3: 1
    assert not w.observe(2, 2.0, 0.35)  # a new best: 0
    assert not w.observe(3, 3.0, 0.2)  # 1
    assert not w.observe(4, 2.5, 0.1)  # reward fell too (not over-optimisation): 0
    assert w.streak == 0 and w.tripped_at is None
    assert w.best_step == 2
    assert w.summary()["watchdog/tripped"] == 0.0 and "watchdog/tripped_step" not in w.summary()
    assert w.reason() == ""


def test_patience_one_trips_on_the_first_divergence():
    w = Watchdog(patience=1)
    w.observe(0, 0.0, 0.3)
    assert w.observe(10, 0.1, 0.29)
    assert not w.is_new_best(10) and w.best_step == 0


def test_a_final_policy_below_sft_trips_it():
    w = Watchdog(patience=3)
    w.observe(0, 0.0, 0.30)
    w.observe(16, 0.2, 0.32)
    w.observe(32, 0.1, 0.31)  # the reward fell: no streak
    assert w.observe_final(48, 0.4, 0.29)  # below SFT's 0.30
    assert w.below_sft and w.tripped_at == 48 and w.best_step == 16
    assert w.summary()["watchdog/below_sft"] == 1.0
    assert "below the SFT policy (0.29 < 0.3)" in w.reason()


def test_a_final_policy_at_or_above_sft_does_not():
    w = Watchdog(patience=3)
    w.observe(0, 0.0, 0.30)
    w.observe(16, 0.2, 0.40)
    assert not w.observe_final(32, 0.1, 0.30)  # below the best, but not below SFT, and no streak
    assert w.tripped_at is None and not w.below_sft


def test_a_judge_level_with_its_best_is_no_sign_of_harm():
    # a judge at its ceiling from the start (SFT already perfect by it) cannot improve: the
    # reward rising beside it must not stop the run and publish SFT
    w = Watchdog(patience=2)
    w.observe(0, 0.0, 1.0)
    assert not w.observe(1, 0.5, 1.0)
    assert not w.observe(2, 0.9, 1.0)
    assert not w.observe_final(3, 1.2, 1.0)
    assert w.tripped_at is None and w.streak == 0
