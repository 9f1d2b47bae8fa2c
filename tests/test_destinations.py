"""Per-destination concurrency feedback and dead destinations, on a fake clock."""

from __future__ import annotations

import random

import pytest

from mailpool.outbound.destinations import DestinationLimits, Destinations


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


D = "example.org"


def make(**kw: float) -> tuple[FakeClock, Destinations]:
    clock = FakeClock()
    return clock, Destinations(DestinationLimits(**kw), clock)  # type: ignore[arg-type]


def fill(dests: Destinations, dest: str) -> int:
    """Start deliveries while check() says go; how many started."""
    n = 0
    while dests.check(dest) == "go":
        dests.started(dest)
        n += 1
        assert n <= 100, "check() never said busy"
    return n


def info(dests: Destinations, dest: str = D) -> dict[str, object]:
    return dests.stats()[dest]


# ---- concurrency

def test_new_destination_starts_at_initial_concurrency() -> None:
    _, dests = make()
    assert dests.check(D) == "go"
    assert dests.stats() == {}  # asking creates nothing
    assert fill(dests, D) == 5
    assert dests.check(D) == "busy"
    assert dests.stats() == {D: {"limit": 5, "active": 5, "paused_until": None, "failures": 0}}
    assert dests.check("other.example") == "go"  # destinations are independent


def test_ok_grows_the_limit_by_one_up_to_maximum() -> None:
    _, dests = make(initial=2, maximum=4)
    limits = []
    for _ in range(5):
        dests.started(D)
        dests.finished(D, "ok")
        limits.append(info(dests)["limit"])
    assert limits == [3, 4, 4, 4, 4]
    assert fill(dests, D) == 4


def test_a_freed_slot_lets_the_next_one_go() -> None:
    _, dests = make(initial=2, maximum=2)
    assert fill(dests, D) == 2
    dests.finished(D, "ok")
    assert dests.check(D) == "go"
    dests.started(D)
    assert dests.check(D) == "busy"


def test_failed_halves_the_limit_down_to_one() -> None:
    _, dests = make(initial=20, maximum=20)
    limits = []
    for _ in range(6):
        dests.started(D)
        dests.finished(D, "failed")
        limits.append(info(dests)["limit"])
    assert limits == [10, 5, 2, 1, 1, 1]
    assert info(dests)["failures"] == 6
    assert info(dests)["paused_until"] is None
    assert dests.check(D) == "go"  # a temporary failure does not pause the destination
    dests.started(D)
    dests.finished(D, "ok")
    assert info(dests) == {"limit": 2, "active": 0, "paused_until": None, "failures": 0}


def test_finished_without_a_running_delivery_is_ignored() -> None:
    _, dests = make()
    dests.finished(D, "unreachable")  # unknown destination
    assert dests.stats() == {}
    dests.started(D)
    dests.finished(D, "ok")
    dests.finished(D, "unreachable")  # nothing running any more
    dests.finished(D, "failed")
    assert info(dests) == {"limit": 6, "active": 0, "paused_until": None, "failures": 0}
    assert dests.check(D) == "go"


def test_bad_outcome_is_refused() -> None:
    _, dests = make()
    dests.started(D)
    with pytest.raises(ValueError, match="'timeout'"):
        dests.finished(D, "timeout")
    assert info(dests)["active"] == 1


# ---- dead destinations

def test_unreachable_pauses_then_one_probe_at_a_time() -> None:
    clock, dests = make()
    dests.started(D)
    dests.finished(D, "unreachable")
    assert dests.check(D) == "paused"
    assert dests.paused_until(D) == 1060.0
    assert dests.wake_at() == 1060.0
    assert info(dests) == {"limit": 1, "active": 0, "paused_until": 1060.0, "failures": 1}
    clock.advance(59.9)
    assert dests.check(D) == "paused"
    clock.advance(0.1)
    assert dests.paused_until(D) is None
    assert dests.wake_at() is None
    assert fill(dests, D) == 1  # exactly one probe
    assert dests.check(D) == "busy"
    dests.finished(D, "ok")  # alive again: the limit climbs back one success at a time
    assert info(dests) == {"limit": 2, "active": 0, "paused_until": None, "failures": 0}
    assert fill(dests, D) == 2


def test_pause_doubles_per_unreachable_probe_capped_at_eight_times() -> None:
    clock, dests = make(dead_pause=60.0)
    pauses = []
    for _ in range(6):
        dests.started(D)  # the first as a fresh destination, then the single probe
        assert dests.check(D) == ("go" if not pauses else "busy")
        dests.finished(D, "unreachable")
        until = dests.paused_until(D)
        assert until is not None
        pauses.append(until - clock.now)
        clock.now = until
    assert pauses == [60.0, 120.0, 240.0, 480.0, 480.0, 480.0]
    # The remote answers (even a temporary failure): the count starts again.
    dests.started(D)
    dests.finished(D, "failed")
    dests.started(D)
    dests.finished(D, "unreachable")
    assert dests.paused_until(D) == clock.now + 60.0


def test_deliveries_running_when_the_pause_began_are_not_probes() -> None:
    clock, dests = make(dead_pause=60.0)
    assert fill(dests, D) == 5
    dests.finished(D, "unreachable")
    assert dests.paused_until(D) == 1060.0
    # The other four report the same news, some during the pause, some after it:
    # the pause neither grows nor starts again, and no probe goes while they run.
    clock.advance(10)
    dests.finished(D, "unreachable")
    dests.finished(D, "unreachable")
    assert dests.paused_until(D) == 1060.0
    clock.advance(60)  # t = 1070, the pause is over
    assert dests.check(D) == "busy"  # two old ones still hold the single slot
    dests.finished(D, "unreachable")
    assert dests.check(D) == "busy"
    dests.finished(D, "unreachable")
    assert dests.paused_until(D) is None
    assert info(dests) == {"limit": 1, "active": 0, "paused_until": None, "failures": 5}
    # Now the probe; its failure is the second pause in a row: doubled.
    assert fill(dests, D) == 1
    dests.finished(D, "unreachable")
    assert dests.paused_until(D) == clock.now + 120.0


def test_an_ok_during_the_pause_lifts_it() -> None:
    clock, dests = make()
    assert fill(dests, D) == 5
    dests.finished(D, "unreachable")
    clock.advance(5)
    dests.finished(D, "ok")  # another delivery did reach it
    assert dests.paused_until(D) is None
    assert dests.wake_at() is None
    assert info(dests) == {"limit": 2, "active": 3, "paused_until": None, "failures": 0}
    assert dests.check(D) == "busy"  # not paused; the three still running fill limit 2
    # And the streak started again: a new dead spell pauses for dead_pause.
    for _ in range(3):
        dests.finished(D, "failed")
    dests.started(D)
    dests.finished(D, "unreachable")
    assert dests.paused_until(D) == clock.now + 60.0


def test_resume_one_or_all() -> None:
    clock, dests = make()
    for dest, wait in (("a.example", 0.0), ("b.example", 10.0), ("c.example", 20.0)):
        clock.advance(wait)
        dests.started(dest)
        dests.finished(dest, "unreachable")
    assert dests.wake_at() == 1060.0  # a.example: paused at 1000 for 60 s
    dests.resume("a.example")
    assert dests.check("a.example") == "go"
    assert dests.wake_at() == 1070.0  # b.example
    assert info(dests, "a.example")["limit"] == 1  # one probe, as after a pause
    dests.resume("unknown.example")  # harmless
    dests.resume()
    assert [dests.check(d) for d in ("a.example", "b.example", "c.example")] == ["go"] * 3
    assert dests.wake_at() is None


def test_wake_at_is_the_earliest_pause_end() -> None:
    clock, dests = make(dead_pause=100.0)
    assert dests.wake_at() is None
    dests.started("late.example")
    dests.finished("late.example", "unreachable")  # until 1100
    clock.advance(30)
    for _ in range(2):  # second pause in a row: 200 s
        dests.started("early.example")
        dests.finished("early.example", "unreachable")
        dests.resume("early.example")
    assert dests.paused_until("early.example") is None
    dests.started("early.example")
    dests.finished("early.example", "unreachable")  # third in a row: until 1030 + 400
    assert dests.wake_at() == 1100.0
    clock.now = 1100.0
    assert dests.wake_at() == 1430.0


# ---- forgetting

def test_idle_destination_is_forgotten_after_idle_forget() -> None:
    clock, dests = make(idle_forget=600.0)
    for _ in range(4):
        dests.started(D)
        dests.finished(D, "ok")
    assert info(dests)["limit"] == 9
    clock.advance(599.9)
    assert D in dests.stats()
    clock.advance(0.1)
    assert dests.stats() == {}
    dests.started(D)
    assert info(dests)["limit"] == 5  # starts afresh


def test_forgetting_is_exact_whatever_is_asked_first() -> None:
    clock, dests = make(idle_forget=600.0)
    for _ in range(4):
        dests.started(D)
        dests.finished(D, "ok")
    clock.advance(600.0)
    dests.started(D)  # not stats() first: the stale limit of 9 must not come back
    assert info(dests)["limit"] == 5


def test_busy_and_paused_destinations_are_not_forgotten() -> None:
    clock, dests = make(dead_pause=60.0, idle_forget=100.0)
    dests.started("busy.example")
    dests.started("dead.example")
    dests.finished("dead.example", "unreachable")
    dests.started("dead.example")  # forced during the pause (a flush raced it)
    dests.finished("dead.example", "unreachable")  # second pause in a row: 120 s
    assert dests.paused_until("dead.example") == 1120.0
    clock.advance(1000)
    assert set(dests.stats()) == {"busy.example"}  # still running after 1000 s
    dests.finished("busy.example", "ok")
    clock.advance(99)
    assert set(dests.stats()) == {"busy.example"}
    clock.advance(1)
    assert dests.stats() == {}

    clock, dests = make(dead_pause=60.0, idle_forget=100.0)
    dests.started(D)
    dests.finished(D, "unreachable")  # paused until 1060
    clock.advance(159)
    assert info(dests)["failures"] == 1  # kept until idle_forget after the pause ended
    clock.advance(1)
    assert dests.stats() == {}


def test_memory_stays_bounded_with_many_destinations() -> None:
    clock, dests = make(idle_forget=60.0)
    for i in range(5000):
        dest = f"d{i}.example"
        dests.started(dest)
        dests.finished(dest, "ok")
        clock.advance(1.0)
        # Swept without stats(): at most the last two idle_forget periods are kept.
        assert len(dests._dests) <= 121


def test_invalid_limits_are_refused() -> None:
    with pytest.raises(ValueError, match=r"initial: 0: must be at least 1"):
        make(initial=0)
    with pytest.raises(ValueError, match=r"maximum: 3: "):
        make(initial=5, maximum=3)
    with pytest.raises(ValueError, match=r"dead_pause: 0.0: .*idle_forget: -1.0: "):
        make(dead_pause=0.0, idle_forget=-1.0)
    assert DestinationLimits().problems() == []


# ---- invariants under random load

def test_random_load_keeps_the_rules() -> None:
    floor, ceiling = 1, 6  # halving never goes below one delivery; growth stops at maximum
    clock, dests = make(initial=3, maximum=ceiling, dead_pause=10.0, idle_forget=50.0)
    rng = random.Random(11)
    names = ["a.example", "b.example", "c.example"]
    running: list[str] = []
    for _ in range(5000):
        clock.advance(rng.random() * 2)
        if running and rng.random() < 0.5:
            dest = running.pop(rng.randrange(len(running)))
            dests.finished(dest, rng.choice(["ok", "ok", "ok", "failed", "unreachable"]))
        else:
            dest = rng.choice(names)
            verdict = dests.check(dest)
            if verdict == "go":
                dests.started(dest)
                running.append(dest)
                row = dests.stats()[dest]
                assert row["active"] <= row["limit"] and row["paused_until"] is None
            elif verdict == "busy":
                row = dests.stats()[dest]
                assert row["active"] >= row["limit"] and row["paused_until"] is None
        if rng.random() < 0.01:
            dests.resume(rng.choice([None, *names]))
        for name, row in dests.stats().items():
            assert row["active"] == running.count(name)
            assert floor <= row["limit"] <= ceiling
            until = row["paused_until"]
            assert until is None or clock.now < until <= clock.now + 80.0
        for name in names:
            if name not in dests.stats():
                assert running.count(name) == 0


def test_release_frees_the_slot_and_learns_nothing() -> None:
    now = [0.0]
    d = Destinations(DestinationLimits(initial=1, maximum=3), lambda: now[0])
    d.started("a.test")
    assert d.check("a.test") == "busy"
    d.release("a.test")
    assert d.check("a.test") == "go"
    assert d.stats()["a.test"]["limit"] == 1  # no growth: nothing was delivered
    d.release("a.test")  # nothing running: ignored, never negative
    assert d.stats()["a.test"]["active"] == 0
