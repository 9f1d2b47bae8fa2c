"""The prestart job entry rules (CHGPJE) and statistics (DSPACTPJ), on a fake clock."""

from __future__ import annotations

import json
import random

import msgspec
import pytest

from mailpool.config import PoolParams
from mailpool.supervisor.pool import (
    BACKOFF_CAP,
    START_GRACE,
    JobState,
    Plan,
    PoolEntry,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def entry(clock: FakeClock, **kw: object) -> PoolEntry:
    return PoolEntry("smtp-server", PoolParams(**kw), clock)  # type: ignore[arg-type]


def execute(pool: PoolEntry, plan: Plan, *, ready: bool = True) -> list[int]:
    """What the supervisor does with a plan; drained jobs end once they have no session."""
    new = []
    for _ in range(plan.spawn):
        job_id = pool.job_spawned()
        if ready:
            pool.job_ready(job_id)
        new.append(job_id)
    for job_id, _ in plan.kill:
        pool.job_exited(job_id, crashed=True)
    end_drained(pool)
    return new


def end_drained(pool: PoolEntry) -> None:
    for job in pool.jobs():
        if job.state is JobState.DRAINING and job.active == 0:
            pool.job_exited(job.id, crashed=False)


def settle(pool: PoolEntry) -> None:
    """Run plans until the rules ask for nothing more."""
    for _ in range(100):
        plan = pool.plan()
        execute(pool, plan)
        if not (plan.spawn or plan.drain or plan.kill):
            return
    raise AssertionError("the rules never settled")


def started(clock: FakeClock, **kw: object) -> PoolEntry:
    pool = entry(clock, **kw)
    execute(pool, pool.start())
    settle(pool)
    return pool


def states(pool: PoolEntry) -> list[JobState]:
    return [j.state for j in pool.jobs()]


# ---- start

def test_start_asks_for_initial_jobs() -> None:
    clock = FakeClock()
    pool = entry(clock)
    plan = pool.start()
    assert plan.spawn == 4 and plan.drain == [] and plan.kill == []
    # Booked: asking again before the jobs are reported does not ask twice.
    assert pool.plan().spawn == 0
    ids = [pool.job_spawned() for _ in range(4)]
    assert ids == [1, 2, 3, 4]
    assert states(pool) == [JobState.STARTING] * 4
    assert pool.available() == 4  # starting jobs count as available
    assert pool.acquire() is None  # but take no session before they are ready
    for job_id in ids:
        pool.job_ready(job_id)
    assert states(pool) == [JobState.READY] * 4
    assert pool.plan().spawn == 0


def test_start_jobs_false_starts_nothing_until_demand() -> None:
    clock = FakeClock()
    pool = entry(clock, start_jobs=False)
    assert pool.start().spawn == 0
    assert pool.plan().spawn == 0
    assert pool.acquire() is None
    assert pool.can_wait()
    pool.request_waiting()
    assert pool.plan().spawn == 4  # the rules apply from the first request on


def test_threshold_zero_grows_on_held_requests() -> None:
    clock = FakeClock()
    pool = started(clock, initial_jobs=1, threshold=0, additional_jobs=1, maximum_jobs=3,
                   sessions_per_job=2)
    assert [pool.acquire(), pool.acquire()] == [1, 1]
    assert pool.acquire() is None
    for _ in range(3):
        pool.request_waiting()
    assert pool.plan().spawn == 2  # 3 held requests, 2 slots per job, room for 2 jobs
    assert pool.plan().spawn == 0


# ---- growth by the threshold rule

def test_growth_follows_threshold_rule_up_to_maximum() -> None:
    clock = FakeClock()
    pool = started(clock)  # 4 / 2 / 2 / 20, one session per job
    counts = [len(pool.jobs())]
    for _ in range(20):
        assert pool.acquire() is not None
        settle(pool)
        counts.append(len(pool.jobs()))
    assert counts == [4, 4, 4, 6, 6, 8, 8, 10, 10, 12, 12, 14, 14, 16, 16, 18, 18,
                      20, 20, 20, 20]
    assert pool.acquire() is None
    assert pool.plan().spawn == 0
    assert pool.available() == 0


def test_threshold_asks_enough_batches_at_once() -> None:
    clock = FakeClock()
    pool = entry(clock, initial_jobs=1, threshold=5, additional_jobs=2, maximum_jobs=20)
    assert pool.start().spawn == 6  # 1 wanted, but 5 available need 3 batches of 2


def test_maximum_never_exceeded_under_random_load() -> None:
    clock = FakeClock()
    rng = random.Random(7)
    pool = started(clock, initial_jobs=2, threshold=3, additional_jobs=3, maximum_jobs=9,
                   max_use=5, idle_timeout=2.0)
    open_sessions: list[int] = []
    drained: set[str] = set()
    for _ in range(2000):
        clock.advance(rng.random() * 0.5)
        if open_sessions and rng.random() < 0.45:
            pool.release(open_sessions.pop(rng.randrange(len(open_sessions))))
        else:
            job_id = pool.acquire()
            if job_id is not None:
                open_sessions.append(job_id)
        for job in pool.jobs():
            pool.heartbeat(job.id)
        plan = pool.plan()
        assert len(pool.jobs()) + plan.spawn <= 9
        reasons = {reason for _, reason in plan.drain}
        assert not ("idle" in reasons and plan.spawn)  # idle reduction never flaps
        drained |= reasons
        execute(pool, plan)
        assert all(j.active <= 1 and j.served + j.active <= 5 for j in pool.jobs())
    assert pool.stats()["jobs"]["peak"] == 9
    assert drained == {"max_use", "idle"}  # the load did exercise both


def test_at_maximum_wait_or_refuse() -> None:
    clock = FakeClock()
    pool = started(clock, initial_jobs=2, threshold=1, additional_jobs=1, maximum_jobs=2,
                   wait=False)
    assert pool.acquire() == 1
    assert pool.acquire() == 2
    assert pool.acquire() is None
    assert not pool.can_wait()  # at the maximum, nothing coming: 421
    pool.change(msgspec.structs.replace(pool.params, wait=True))
    assert pool.can_wait()


def test_below_maximum_requests_wait_even_without_wait() -> None:
    clock = FakeClock()
    pool = entry(clock, initial_jobs=1, threshold=1, additional_jobs=1, maximum_jobs=3,
                 wait=False)
    execute(pool, pool.start(), ready=False)
    assert pool.acquire() is None
    assert pool.can_wait()  # a job is starting


# ---- max_use

def test_max_use_drains_and_replaces() -> None:
    clock = FakeClock()
    pool = started(clock, initial_jobs=1, threshold=0, additional_jobs=1, maximum_jobs=2,
                   max_use=2)
    for _ in range(2):
        assert pool.acquire() == 1
        pool.release(1)
    assert pool.job(1).state is JobState.DRAINING  # type: ignore[union-attr]
    assert pool.acquire() is None
    plan = pool.plan()
    assert plan.drain == [(1, "max_use")]
    assert plan.spawn == 1  # replaced at once: the entry stays at initial_jobs
    assert pool.job_exited(1, crashed=False) == "max_use"
    assert pool.plan().drain == []  # reported once
    (new,) = [pool.job_spawned()]
    pool.job_ready(new)
    assert pool.acquire() == new


def test_max_use_replacement_waits_for_room_at_maximum() -> None:
    clock = FakeClock()
    pool = started(clock, initial_jobs=2, threshold=0, additional_jobs=1, maximum_jobs=2,
                   max_use=1)
    assert pool.acquire() == 1
    pool.release(1)
    plan = pool.plan()
    assert plan.drain == [(1, "max_use")] and plan.spawn == 0  # draining job still counts
    pool.job_exited(1, crashed=False)
    assert pool.plan().spawn == 1


def test_max_use_with_several_sessions_per_job() -> None:
    clock = FakeClock()
    pool = started(clock, initial_jobs=1, threshold=0, additional_jobs=1, maximum_jobs=1,
                   sessions_per_job=4, max_use=3)
    assert [pool.acquire() for _ in range(4)] == [1, 1, 1, None]  # never beyond max_use
    pool.release(1)
    pool.release(1)
    assert pool.job(1).state is JobState.READY  # type: ignore[union-attr]
    pool.release(1)
    assert pool.job(1).state is JobState.DRAINING  # type: ignore[union-attr]


# ---- sessions_per_job

def test_sessions_per_job_availability_and_spread() -> None:
    clock = FakeClock()
    pool = started(clock, initial_jobs=2, threshold=1, additional_jobs=1, maximum_jobs=3,
                   sessions_per_job=3)
    # Least-loaded first, ties to the lowest id.
    assert [pool.acquire() for _ in range(4)] == [1, 2, 1, 2]
    assert pool.available() == 2  # 1 slot left on each
    assert pool.plan().spawn == 0
    assert [pool.acquire(), pool.acquire()] == [1, 2]
    assert pool.available() == 0
    assert pool.stats()["in_use"]["current"] == 2
    plan = pool.plan()
    assert plan.spawn == 1  # available 0 < threshold 1
    execute(pool, plan)
    pool.release(1)
    assert pool.available() == 2
    assert pool.acquire() == 3  # the new, empty job is the least loaded


def test_sessions_per_job_is_capped_by_what_a_job_can_hold() -> None:
    """A job past its open files limit would lose the next connection handed to it: the
    rules never book more than session_limit sessions on one job, and say so."""
    clock = FakeClock()
    params = PoolParams(initial_jobs=1, threshold=0, additional_jobs=1, maximum_jobs=2,
                        sessions_per_job=4096)
    pool = PoolEntry("smtp-server", params, clock, session_limit=2)
    assert pool.capped and pool.params.sessions_per_job == 2
    assert pool.configured.sessions_per_job == 4096
    execute(pool, pool.start())
    assert [pool.acquire(), pool.acquire(), pool.acquire()] == [1, 1, None]
    assert pool.stats()["sessions"]["capacity"] == 2
    pool.change(msgspec.structs.replace(params, sessions_per_job=2))
    assert not pool.capped
    assert not PoolEntry("smtp-server", params, clock, session_limit=5000).capped


# ---- idle reduction

def test_idle_surplus_drained_one_per_period_never_below_initial() -> None:
    clock = FakeClock()
    pool = started(clock, initial_jobs=2, threshold=1, additional_jobs=2, maximum_jobs=10,
                   idle_timeout=60.0, heartbeat_timeout=1000.0)
    held = []
    for _ in range(5):
        held.append(pool.acquire())
        settle(pool)
    assert len(pool.jobs()) == 6
    for job_id in held:
        pool.release(job_id)
    assert pool.plan().drain == []  # not idle long enough
    clock.advance(59.0)
    plan = pool.plan()
    assert plan.drain == [] and plan.wake_at == 60.0
    clock.advance(1.0)
    plan = pool.plan()
    assert len(plan.drain) == 1 and plan.drain[0][1] == "idle"
    assert pool.plan().drain == []  # one per idle_timeout period
    end_drained(pool)
    counts = [len(pool.jobs())]
    for _ in range(6):
        clock.advance(60.0)
        plan = pool.plan()
        assert plan.spawn == 0
        end_drained(pool)
        counts.append(len(pool.jobs()))
    assert counts == [5, 4, 3, 2, 2, 2, 2]
    # The longest idle, highest id jobs went; the reused low ids stay.
    assert [j.id for j in pool.jobs()] == [1, 2]


def test_idle_reduction_keeps_threshold() -> None:
    clock = FakeClock()
    pool = started(clock, initial_jobs=1, threshold=3, additional_jobs=1, maximum_jobs=10,
                   idle_timeout=10.0, heartbeat_timeout=1000.0)
    assert len(pool.jobs()) == 3
    clock.advance(100.0)
    assert pool.plan().drain == []  # 3 available is the threshold: none is surplus


# ---- start-up back-off

def test_backoff_grows_caps_and_resets() -> None:
    clock = FakeClock()
    pool = entry(clock, initial_jobs=1, threshold=0, additional_jobs=1, maximum_jobs=4)
    plan = pool.start()
    delays = []
    for _ in range(9):
        assert plan.spawn == 1
        job_id = pool.job_spawned()
        clock.advance(0.1)
        assert pool.job_exited(job_id, crashed=True) == "crash"  # died before READY
        plan = pool.plan()
        assert plan.spawn == 0 and plan.spawn_blocked_until is not None
        assert plan.wake_at == plan.spawn_blocked_until
        delays.append(round(plan.spawn_blocked_until - clock.now, 6))
        clock.now = plan.spawn_blocked_until
        plan = pool.plan()
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert BACKOFF_CAP == 30.0
    # A job that gets ready and serves ends the streak.
    job_id = pool.job_spawned()
    pool.job_ready(job_id)
    assert pool.acquire() == job_id
    pool.release(job_id)
    clock.advance(100.0)
    pool.heartbeat(job_id)
    assert pool.job_exited(job_id, crashed=True) == "crash"  # served: not a start-up failure
    plan = pool.plan()
    assert plan.spawn == 1 and plan.spawn_blocked_until is None


def test_ready_job_dying_at_once_counts_as_early_failure() -> None:
    clock = FakeClock()
    pool = started(clock, initial_jobs=1, threshold=0, additional_jobs=1, maximum_jobs=4)
    clock.advance(1.0)
    assert pool.job_exited(1, crashed=False) == "exit"
    assert pool.plan().spawn_blocked_until == 1.5


def test_backoff_probes_one_job_at_a_time() -> None:
    clock = FakeClock()
    pool = entry(clock)
    execute(pool, pool.start(), ready=False)
    for job in pool.jobs():
        pool.job_exited(job.id, crashed=True)
    plan = pool.plan()
    assert plan.spawn == 0 and plan.spawn_blocked_until == 0.5 * 2 ** 3
    clock.now = plan.spawn_blocked_until
    plan = pool.plan()
    assert plan.spawn == 1
    pool.job_spawned()
    assert pool.plan().spawn == 0  # the probe is still starting


def test_drained_jobs_are_not_failures() -> None:
    clock = FakeClock()
    pool = started(clock)
    pool.reload()
    plan = pool.plan()
    assert sorted(plan.drain) == [(i, "reload") for i in range(1, 5)]
    assert plan.spawn == 4  # successors start at once
    for job_id, _ in plan.drain:
        assert pool.job_exited(job_id, crashed=False) == "reload"
    assert pool.plan().spawn_blocked_until is None


# ---- heartbeat

def test_heartbeat_kill_of_silent_ready_job() -> None:
    clock = FakeClock()
    pool = started(clock, initial_jobs=2, threshold=0, additional_jobs=1,
                   heartbeat_timeout=30.0)
    clock.advance(20.0)
    pool.heartbeat(1)
    plan = pool.plan()
    assert plan.kill == [] and plan.wake_at == 30.0
    clock.advance(10.0)
    plan = pool.plan()
    assert plan.kill == [(2, "heartbeat")]
    assert plan.spawn == 1  # its successor starts at once (the killed job still counts)
    assert pool.job(2).state is JobState.STOPPING  # type: ignore[union-attr]
    assert pool.available() == 1
    assert pool.plan().kill == []  # killed once
    assert pool.job_exited(2, crashed=True) == "heartbeat"
    assert pool.plan().spawn == 0  # not asked twice
    assert pool.plan().spawn_blocked_until is None  # it had got ready: not a start-up failure


def test_starting_job_that_never_gets_ready_is_killed() -> None:
    clock = FakeClock()
    pool = entry(clock, initial_jobs=1, threshold=0, additional_jobs=1, heartbeat_timeout=15.0)
    execute(pool, pool.start(), ready=False)
    clock.advance(15.0)
    plan = pool.plan()
    assert plan.kill == [(1, "heartbeat")]
    assert plan.spawn == 0 and plan.spawn_blocked_until == 15.5  # a start-up failure
    assert pool.job_exited(1, crashed=True) == "heartbeat"
    assert pool.plan().spawn_blocked_until == 15.5  # counted once
    clock.advance(0.5)
    assert pool.plan().spawn == 1


def test_a_starting_job_has_the_start_grace_even_with_a_short_heartbeat() -> None:
    clock = FakeClock()
    pool = entry(clock, initial_jobs=1, threshold=0, additional_jobs=1, heartbeat_timeout=1.0)
    execute(pool, pool.start(), ready=False)
    clock.advance(START_GRACE - 0.1)
    assert pool.plan().kill == []  # still importing, not hung
    clock.advance(0.1)
    assert pool.plan().kill == [(1, "heartbeat")]


def test_drain_timeout_kills_a_draining_job() -> None:
    clock = FakeClock()
    pool = started(clock, initial_jobs=1, threshold=0, additional_jobs=1, maximum_jobs=2,
                   drain_timeout=10.0, heartbeat_timeout=100.0)
    assert pool.acquire() == 1
    pool.reload()
    assert pool.plan().drain == [(1, "reload")]
    clock.advance(10.0)
    assert pool.plan().kill == [(1, "drain_timeout")]


# ---- change()

def test_change_lower_maximum_drains_surplus_idle_first() -> None:
    clock = FakeClock()
    pool = started(clock, initial_jobs=6, threshold=0, additional_jobs=1, maximum_jobs=10)
    assert pool.acquire() == 1
    pool.change(msgspec.structs.replace(pool.params, initial_jobs=3, maximum_jobs=3))
    plan = pool.plan()
    assert sorted(plan.drain) == [(4, "maximum"), (5, "maximum"), (6, "maximum")]
    assert plan.spawn == 0
    end_drained(pool)
    assert [j.id for j in pool.jobs()] == [1, 2, 3]


def test_change_higher_threshold_starts_more() -> None:
    clock = FakeClock()
    pool = started(clock)
    pool.change(msgspec.structs.replace(pool.params, threshold=7, additional_jobs=3))
    assert pool.plan().spawn == 3  # available 4 < 7: one batch of 3
    pool.change(msgspec.structs.replace(pool.params, threshold=12))
    assert pool.plan().spawn == 6  # available 7 < 12: two batches of 3


def test_change_lower_max_use_drains_jobs_past_it() -> None:
    clock = FakeClock()
    pool = started(clock, initial_jobs=1, threshold=0, additional_jobs=1, maximum_jobs=2)
    for _ in range(3):
        pool.acquire()
        pool.release(1)
    pool.change(msgspec.structs.replace(pool.params, max_use=2))
    plan = pool.plan()
    assert plan.drain == [(1, "max_use")] and plan.spawn == 1


def test_change_rejects_inconsistent_values() -> None:
    clock = FakeClock()
    pool = entry(clock)
    with pytest.raises(ValueError, match="initial_jobs"):
        pool.change(PoolParams(initial_jobs=30, maximum_jobs=20))
    assert pool.params.maximum_jobs == 20


# ---- shutdown

def test_shutdown_drains_all_and_starts_nothing() -> None:
    clock = FakeClock()
    pool = started(clock)
    assert pool.acquire() == 1
    pool.shutdown()
    plan = pool.plan()
    assert sorted(plan.drain) == [(i, "drain") for i in range(1, 5)]
    assert plan.spawn == 0
    assert not pool.can_wait()
    end_drained(pool)
    assert [j.id for j in pool.jobs()] == [1]
    pool.release(1)
    assert pool.job_exited(1, crashed=False) == "drain"
    assert pool.plan().spawn == 0


# ---- statistics

def test_stats_time_weighted_averages() -> None:
    clock = FakeClock()
    pool = started(clock)  # 4 jobs at t=0
    clock.advance(10.0)
    for _ in range(2):
        pool.job_ready(pool.job_spawned())  # 6 jobs for the next 10 s
    clock.advance(10.0)
    stats = pool.stats()
    assert stats["jobs"] == {"current": 6, "average": pytest.approx(5.0), "peak": 6}


def test_stats_in_use_waiting_and_wait_time() -> None:
    clock = FakeClock()
    pool = started(clock, initial_jobs=1, threshold=0, additional_jobs=1, maximum_jobs=1,
                   heartbeat_timeout=1000.0)
    assert pool.acquire() == 1  # accepted at once: waited 0
    clock.advance(10.0)  # 1 in use, 0 waiting
    assert pool.acquire() is None
    pool.request_waiting()
    pool.request_waiting()
    clock.advance(5.0)  # 2 waiting
    pool.request_rejected(5.0)
    clock.advance(5.0)  # 1 waiting
    pool.release(1)
    assert pool.acquire() == 1
    pool.request_served(10.0)
    pool.request_rejected()  # refused at once, never held
    clock.advance(20.0)  # 1 in use, 0 waiting
    stats = pool.stats()
    assert stats["in_use"] == {"current": 1, "average": pytest.approx(1.0), "peak": 1}
    assert stats["waiting"] == {"current": 0, "average": pytest.approx(15 / 40), "peak": 2,
                                "average_wait_s": pytest.approx(5.0)}
    assert stats["accepted"] == 2
    assert stats["rejected"] == 2


def test_stats_json_shape() -> None:
    clock = FakeClock()
    pool = started(clock)
    stats = json.loads(json.dumps(pool.stats()))
    assert set(stats) == {"parameters", "jobs", "in_use", "waiting", "accepted", "rejected",
                          "ready", "available", "sessions", "abandoned"}
    assert stats["sessions"] == {"capacity": 4 * stats["parameters"]["sessions_per_job"],
                                 "in_use": 0}
    assert set(stats["parameters"]) == set(PoolParams.__struct_fields__)
    assert stats["parameters"]["maximum_jobs"] == 20
    for key in ("jobs", "in_use"):
        assert set(stats[key]) == {"current", "average", "peak"}
    assert set(stats["waiting"]) == {"current", "average", "peak", "average_wait_s"}
    assert stats["jobs"]["current"] == 4
    assert isinstance(stats["jobs"]["average"], float)
    pool.change(msgspec.structs.replace(pool.params, maximum_jobs=30))
    assert pool.stats()["parameters"]["maximum_jobs"] == 30


def test_stats_before_any_time_passes() -> None:
    clock = FakeClock()
    pool = started(clock)
    stats = pool.stats()
    assert stats["jobs"] == {"current": 4, "average": 4.0, "peak": 4}
    assert stats["waiting"]["average_wait_s"] == 0.0


# ---- bookings that never became sessions

def test_cancel_undoes_a_booking_without_serving() -> None:
    clock = FakeClock()
    pool = started(clock, initial_jobs=1, threshold=0, additional_jobs=1, max_use=1)
    assert pool.acquire() == 1
    pool.cancel(1)
    job = pool.job(1)
    assert job is not None and job.state is JobState.READY and job.served == 0
    assert pool.stats()["accepted"] == 0
    assert pool.acquire() == 1  # still usable: max_use counts served sessions only


def test_job_exit_drops_its_open_sessions() -> None:
    clock = FakeClock()
    pool = started(clock, initial_jobs=2, threshold=0, additional_jobs=1)
    assert pool.acquire() == 1
    clock.advance(100.0)
    pool.heartbeat(2)
    assert pool.job_exited(1, crashed=True) == "crash"
    pool.release(1)  # a late report about a job already gone is ignored
    assert pool.stats()["in_use"]["current"] == 0
    assert pool.plan().spawn == 1
