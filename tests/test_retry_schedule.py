"""The 1st / 2nd level retry schedule and expiry, with times given by hand."""

from __future__ import annotations

import dataclasses
import math

import pytest

from mailpool.outbound.schedule import (
    RetryPolicy,
    Step,
    after_temporary_failure,
    back_to_outbound_code,
    pending_deadline,
)

# 3 tries 10 s apart, then every 100 s, undeliverable 1000 s after arrival.
POLICY = RetryPolicy(first_interval=10.0, first_count=3, second_interval=100.0,
                     max_lifetime=1000.0)


def walk(policy: RetryPolicy, arrival: float) -> list[tuple[int, float, Step]]:
    """Fail every attempt exactly when it is due: (attempt, time, step) until expiry."""
    out = []
    now, attempts = arrival, 1
    while True:
        step = after_temporary_failure(policy, arrival=arrival, attempts=attempts, now=now)
        out.append((attempts, now, step))
        if step.next_attempt is None:
            return out
        assert step.next_attempt > now
        now, attempts = step.next_attempt, attempts + 1


def test_full_schedule_first_level_second_level_last_try_at_expiry() -> None:
    steps = walk(POLICY, arrival=5000.0)
    assert [(n, t, s.queue, s.next_attempt, s.entered_retry2, s.code) for n, t, s in steps] == [
        (1, 5000.0, "retry1", 5010.0, False, "8C"),
        (2, 5010.0, "retry1", 5020.0, False, "8C"),
        (3, 5020.0, "retry1", 5030.0, False, "8C"),
        (4, 5030.0, "retry2", 5130.0, True, "8D"),  # the move: a delay notice is due
        (5, 5130.0, "retry2", 5230.0, False, "8D"),
        (6, 5230.0, "retry2", 5330.0, False, "8D"),
        (7, 5330.0, "retry2", 5430.0, False, "8D"),
        (8, 5430.0, "retry2", 5530.0, False, "8D"),
        (9, 5530.0, "retry2", 5630.0, False, "8D"),
        (10, 5630.0, "retry2", 5730.0, False, "8D"),
        (11, 5730.0, "retry2", 5830.0, False, "8D"),
        (12, 5830.0, "retry2", 5930.0, False, "8D"),
        # 6030 would be past the lifetime: one last try exactly at its end ...
        (13, 5930.0, "retry2", 6000.0, False, "8D"),
        # ... whose failure makes the message undeliverable.
        (14, 6000.0, "expired", None, False, ""),
    ]
    assert sum(s.entered_retry2 for _, _, s in steps) == 1


def test_first_count_zero_goes_straight_to_second_level() -> None:
    policy = dataclasses.replace(POLICY, first_count=0)
    first = after_temporary_failure(policy, arrival=0.0, attempts=1, now=0.0)
    assert first == Step(queue="retry2", next_attempt=100.0, entered_retry2=True, code="8D")
    second = after_temporary_failure(policy, arrival=0.0, attempts=2, now=100.0)
    assert second == Step(queue="retry2", next_attempt=200.0, entered_retry2=False, code="8D")


def test_first_count_one() -> None:
    policy = dataclasses.replace(POLICY, first_count=1)
    steps = walk(policy, arrival=0.0)
    assert [(s.queue, s.entered_retry2) for _, _, s in steps[:3]] == [
        ("retry1", False), ("retry2", True), ("retry2", False)]


def test_late_attempts_follow_the_clock_not_the_plan() -> None:
    # The retry runs late (a busy queue): the next one counts from when it failed.
    step = after_temporary_failure(POLICY, arrival=0.0, attempts=2, now=47.5)
    assert step == Step(queue="retry1", next_attempt=57.5, entered_retry2=False, code="8C")
    step = after_temporary_failure(POLICY, arrival=0.0, attempts=4, now=300.0)
    assert step == Step(queue="retry2", next_attempt=400.0, entered_retry2=True, code="8D")


def test_expiry_boundary() -> None:
    expired = Step(queue="expired", next_attempt=None, entered_retry2=False, code="")
    assert after_temporary_failure(POLICY, arrival=0.0, attempts=1, now=1000.0) == expired
    assert after_temporary_failure(POLICY, arrival=0.0, attempts=9, now=5000.0) == expired
    just_before = after_temporary_failure(POLICY, arrival=0.0, attempts=1, now=999.5)
    assert just_before == Step(queue="retry1", next_attempt=1000.0, entered_retry2=False,
                               code="8C")
    # A failure of the first attempt already past the lifetime (the message waited in
    # another queue): expired at once, no retry.
    assert after_temporary_failure(POLICY, arrival=0.0, attempts=1, now=1500.0) == expired


def test_last_try_expires_even_when_float_rounding_disagrees() -> None:
    # With epoch-sized times, (arrival + max_lifetime) - arrival falls short of
    # max_lifetime: the clamped last try lands at arrival + max_lifetime, where
    # "now - arrival" is still below max_lifetime. Its failure must expire the message,
    # not schedule another try at the same instant.
    arrival, lifetime = 1000000000.1, 300.3
    assert (arrival + lifetime) - arrival < lifetime
    policy = RetryPolicy(first_interval=1000.0, first_count=1, second_interval=1000.0,
                         max_lifetime=lifetime)
    step = after_temporary_failure(policy, arrival=arrival, attempts=1, now=arrival)
    assert step.next_attempt == arrival + lifetime
    last = after_temporary_failure(policy, arrival=arrival, attempts=2, now=step.next_attempt)
    assert last.queue == "expired" and last.next_attempt is None


def test_next_attempt_never_after_expiry_and_always_after_now() -> None:
    policy = RetryPolicy(first_interval=7.0, first_count=2, second_interval=33.0,
                         max_lifetime=250.0)
    for attempts in range(1, 8):
        for tenth in range(0, 2600, 7):
            now = 1000.0 + tenth / 10
            step = after_temporary_failure(policy, arrival=1000.0, attempts=attempts, now=now)
            if now - 1000.0 >= 250.0:
                assert step.queue == "expired"
                continue
            assert step.next_attempt is not None
            assert now < step.next_attempt <= 1250.0
            assert step.queue == ("retry1" if attempts <= 2 else "retry2")
            assert step.entered_retry2 == (attempts == 3)


def test_pending_deadline_is_where_a_failure_would_put_the_message() -> None:
    # Before the 4th attempt at t=30: a crash during it resumes at 130 (the 2nd level
    # interval), neither at once nor with the schedule restarted at the 1st level.
    assert pending_deadline(POLICY, arrival=0.0, attempts=4, now=30.0) == 130.0
    assert pending_deadline(POLICY, arrival=0.0, attempts=1, now=0.0) == 10.0
    assert pending_deadline(POLICY, arrival=0.0, attempts=13, now=930.0) == 1000.0
    # Past the lifetime: due now (the next look expires it).
    assert pending_deadline(POLICY, arrival=0.0, attempts=14, now=1000.0) == 1000.0
    for attempts, now, step in walk(POLICY, arrival=0.0):
        deadline = pending_deadline(POLICY, arrival=0.0, attempts=attempts, now=now)
        assert deadline == (now if step.next_attempt is None else step.next_attempt)


def test_back_to_outbound_codes() -> None:
    assert back_to_outbound_code("retry1") == "8E"
    assert back_to_outbound_code("retry2") == "8F"
    for bad in ("expired", "outbound", "RETRY1"):
        with pytest.raises(ValueError, match=repr(bad)):
            back_to_outbound_code(bad)


def test_attempts_must_count_the_failed_attempt() -> None:
    with pytest.raises(ValueError, match="attempts: 0"):
        after_temporary_failure(POLICY, arrival=0.0, attempts=0, now=1.0)
    with pytest.raises(ValueError, match="attempts: -1"):
        pending_deadline(POLICY, arrival=0.0, attempts=-1, now=1.0)


def test_policy_problems() -> None:
    assert POLICY.problems() == []
    assert dataclasses.replace(POLICY, first_count=0).problems() == []
    bad = RetryPolicy(first_interval=0.0, first_count=-1, second_interval=-5.0,
                      max_lifetime=math.nan)
    assert [(k, v) for k, v, _ in bad.problems()][:3] == [
        ("first_interval", 0.0), ("second_interval", -5.0), ("max_lifetime", bad.max_lifetime)]
    assert [k for k, _, _ in bad.problems()] == [
        "first_interval", "second_interval", "max_lifetime", "first_count"]
    assert all(why for _, _, why in bad.problems())
    inf = dataclasses.replace(POLICY, second_interval=math.inf)
    assert [k for k, _, _ in inf.problems()] == ["second_interval"]


def test_results_are_frozen() -> None:
    step = after_temporary_failure(POLICY, arrival=0.0, attempts=1, now=0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        step.queue = "retry2"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        POLICY.first_count = 9  # type: ignore[misc]
