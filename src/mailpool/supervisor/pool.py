"""Prestart job entry rules (the source's CHGPJE) and statistics (its DSPACTPJ), as pure logic.

No I/O, no processes, no sleeping. The supervisor reports every event to a
PoolEntry (job spawned / ready / heartbeat / exited, session booked / ended,
request held / served / refused) and then executes the Plan that plan()
returns. Time comes from an injected monotonic clock, so tests drive it by hand.

Contract with the supervisor:
- For each of `plan.spawn`, call job_spawned() to get the new job's id (before
  starting the process); if the process cannot be started, report
  job_exited(id, crashed=True). plan() books the spawns it asks for, so calling
  plan() again before the job_spawned() calls does not ask twice.
- For each (id, reason) in `plan.drain`, tell the job to take no new sessions
  and end when its sessions end; for each in `plan.kill`, kill it now. Either way
  report job_exited() when the process is gone.
- Call plan() again after every event and at `plan.wake_at` (time-based rules:
  heartbeats, drain deadlines, idle reduction, start-up back-off).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import msgspec

from mailpool.config import PoolParams

Clock = Callable[[], float]

# Start-up failures in a row are restarted after 0.5 s, 1, 2, 4 ... capped at 30 s.
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
# A job that exits before serving anything this soon after its start "died at start-up".
EARLY_WINDOW = 5.0
# A starting job has at least this long to say Ready, whatever its heartbeat_timeout.
START_GRACE = 10.0

# Why a job is drained (no new sessions, ends when its sessions end).
DRAIN_REASONS = ("max_use", "idle", "maximum", "reload", "drain")
# Why a job is killed at once.
KILL_REASONS = ("heartbeat", "drain_timeout")


class JobState(enum.Enum):
    STARTING = "starting"  # spawned, not yet reported ready
    READY = "ready"  # takes sessions
    DRAINING = "draining"  # no new sessions; ends when its sessions end
    STOPPING = "stopping"  # kill issued; gone at job_exited()


_LIVE = (JobState.STARTING, JobState.READY)


@dataclass
class Job:
    id: int
    state: JobState
    started_at: float
    last_heartbeat: float
    active: int = 0  # open sessions
    served: int = 0  # sessions ended
    ready_at: float | None = None
    idle_since: float | None = None  # READY with no session since then
    reason: str | None = None  # why it is draining or being killed
    drain_at: float | None = None


@dataclass(frozen=True)
class Plan:
    spawn: int = 0  # start this many new jobs now
    drain: list[tuple[int, str]] = field(default_factory=list)  # (job id, DRAIN_REASONS)
    kill: list[tuple[int, str]] = field(default_factory=list)  # (job id, KILL_REASONS)
    # Spawns are wanted but held back by the start-up back-off until then.
    spawn_blocked_until: float | None = None
    # Call plan() again at this time even if no event comes (None: only on events).
    wake_at: float | None = None


class _Gauge:
    """A value over time: current, peak and the time-weighted average since origin."""

    def __init__(self, now: float) -> None:
        self.reset(now)

    def reset(self, now: float) -> None:
        self.origin = self.since = now
        self.value = self.peak = 0
        self.area = 0.0

    def set(self, value: int, now: float) -> None:
        self.area += self.value * max(0.0, now - self.since)
        self.since = max(self.since, now)
        self.value = value
        self.peak = max(self.peak, value)

    def average(self, now: float) -> float:
        elapsed = now - self.origin
        if elapsed <= 0:
            return float(self.value)
        return (self.area + self.value * max(0.0, now - self.since)) / elapsed

    def as_dict(self, now: float) -> dict[str, Any]:
        return {"current": self.value, "average": self.average(now), "peak": self.peak}


def _check(params: PoolParams) -> None:
    bad = params.problems()
    if bad:
        raise ValueError("; ".join(f"{key}: {value!r}: {why}" for key, value, why in bad))


class PoolEntry:
    """One prestart job entry: its CHGPJE rules and DSPACTPJ statistics."""

    def __init__(self, name: str, params: PoolParams, clock: Clock, *,
                 early_window: float = EARLY_WINDOW, session_limit: int | None = None) -> None:
        _check(params)
        self.name = name
        # The most sessions one job process can hold (its open files limit less what it
        # needs besides): a job given more would fail to receive the next connection.
        self.session_limit = session_limit
        self.configured = params
        self.params = self._capped(params)
        self._clock = clock
        self._early_window = early_window
        self._jobs: dict[int, Job] = {}
        self._next_id = 1
        self._pending = 0  # spawns asked for by a plan, not yet reported by job_spawned()
        self._engaged = False  # rules on: after start() with start_jobs, or the first demand
        self._closing = False
        self._drains: list[tuple[int, str]] = []  # turned DRAINING since the last plan()
        self._streak = 0  # start-up failures in a row
        self._blocked_until: float | None = None
        self._last_idle_drain = -math.inf
        self._waiting = 0
        self._accepted = 0
        self._rejected = 0
        self._abandoned = 0  # held requests whose client left first
        self._wait_total = 0.0
        now = clock()
        self._g_jobs = _Gauge(now)
        self._g_in_use = _Gauge(now)
        self._g_waiting = _Gauge(now)

    # ---- control

    def start(self) -> Plan:
        """The entry starts: statistics begin; initial_jobs are asked for when start_jobs.

        With start_jobs false the entry stays empty until the first request
        (acquire() or request_waiting()), then the rules apply as usual.
        """
        now = self._clock()
        for gauge in (self._g_jobs, self._g_in_use, self._g_waiting):
            gauge.reset(now)
        self._observe(now)
        if self.params.start_jobs:
            self._engaged = True
        return self.plan()

    def change(self, params: PoolParams) -> None:
        """Live CHGPJE: every value applies at the next plan(). ValueError if inconsistent."""
        _check(params)
        self.configured = params
        self.params = self._capped(params)

    def _capped(self, params: PoolParams) -> PoolParams:
        if self.session_limit is None or params.sessions_per_job <= self.session_limit:
            return params
        return msgspec.structs.replace(params, sessions_per_job=max(1, self.session_limit))

    @property
    def capped(self) -> bool:
        """sessions_per_job was lowered to session_limit."""
        return self.params.sessions_per_job != self.configured.sessions_per_job

    def reload(self) -> None:
        """Drain every live job (reason "reload"); the next plan() starts their successors."""
        now = self._clock()
        for job in self._sorted():
            if job.state in _LIVE:
                self._begin_drain(job, "reload", now)

    def shutdown(self) -> None:
        """Drain every job (reason "drain") and start no more."""
        now = self._clock()
        self._closing = True
        self._pending = 0
        for job in self._sorted():
            if job.state in _LIVE:
                self._begin_drain(job, "drain", now)

    # ---- job events

    def job_spawned(self) -> int:
        """A new job process (about to be) started: its id, state STARTING."""
        now = self._clock()
        self._pending = max(0, self._pending - 1)
        job = Job(id=self._next_id, state=JobState.STARTING, started_at=now, last_heartbeat=now)
        self._next_id += 1
        self._jobs[job.id] = job
        self._observe(now)
        return job.id

    def job_ready(self, job_id: int) -> None:
        job = self._jobs.get(job_id)
        if job is None or job.ready_at is not None:
            return
        now = self._clock()
        job.ready_at = job.last_heartbeat = now
        if job.state is JobState.STARTING:
            job.state = JobState.READY
            job.idle_since = now

    def heartbeat(self, job_id: int) -> None:
        job = self._jobs.get(job_id)
        if job is not None:
            job.last_heartbeat = self._clock()

    def job_exited(self, job_id: int, crashed: bool) -> str:
        """The job's process is gone. Returns why, for the journal:
        a KILL_REASONS or DRAIN_REASONS value, "crash", or "exit" (ended unasked)."""
        job = self._jobs.pop(job_id)
        now = self._clock()
        never_ready = job.ready_at is None
        # A job that took a session did start: dying mid-session is a crash, not a failure
        # to start, so it does not feed the back-off.
        unused = job.served == 0 and job.active == 0
        if job.reason in KILL_REASONS:
            why = job.reason
            early = False  # a kill before READY was counted when it was issued
        elif crashed:
            why = "crash"
            early = never_ready or (unused and now - job.started_at <= self._early_window)
        elif job.reason is not None:
            why = job.reason
            early = False
        else:
            why = "exit"
            early = never_ready or (unused and now - job.started_at <= self._early_window)
        if early:
            self._start_failed(now)
        self._observe(now)
        return why

    def _start_failed(self, now: float) -> None:
        if self._closing:
            return
        self._streak += 1
        delay = min(BACKOFF_BASE * 2 ** min(self._streak - 1, 16), BACKOFF_CAP)
        self._blocked_until = now + delay

    # ---- sessions

    def acquire(self) -> int | None:
        """Book one session on the least-loaded READY job with a free slot (tie: lowest id)."""
        if not self._closing:
            self._engaged = True
        spj, max_use = self.params.sessions_per_job, self.params.max_use
        best: Job | None = None
        for job in self._jobs.values():
            if (job.state is JobState.READY and job.active < spj
                    and job.served + job.active < max_use
                    and (best is None or (job.active, job.id) < (best.active, best.id))):
                best = job
        if best is None:
            return None
        now = self._clock()
        best.active += 1
        best.idle_since = None
        self._accepted += 1
        self._observe(now)
        return best.id

    def release(self, job_id: int) -> None:
        """A session ended. At max_use served the job turns DRAINING (reason "max_use")."""
        job = self._jobs.get(job_id)
        if job is None or job.active == 0:
            return
        now = self._clock()
        job.active -= 1
        job.served += 1
        job.last_heartbeat = now  # the job reported it: it is alive
        # A job that got ready and served ends any start-up failure streak.
        self._streak = 0
        self._blocked_until = None
        if job.active == 0:
            job.idle_since = now
        if job.state is JobState.READY and job.served >= self.params.max_use:
            self._begin_drain(job, "max_use", now)
        self._observe(now)

    def cancel(self, job_id: int) -> None:
        """Undo an acquire() whose session never reached the job (it died before the hand-off).

        Unlike release() this serves nothing: no max_use count, no back-off reset."""
        job = self._jobs.get(job_id)
        if job is None or job.active == 0:
            return
        now = self._clock()
        job.active -= 1
        self._accepted = max(0, self._accepted - 1)
        if job.active == 0 and job.state is JobState.READY:
            job.idle_since = now
        self._observe(now)

    def can_wait(self) -> bool:
        """After acquire() gave None: hold the request (True, up to wait_timeout) or refuse (421).

        Refusal is only for the maximum with nothing coming (the source's wait
        parameter); while jobs are starting or can still start, the request is held.
        """
        if self._closing:
            return False
        if self.params.wait or self._pending:
            return True
        if any(j.state is JobState.STARTING for j in self._jobs.values()):
            return True
        return len(self._jobs) < self.params.maximum_jobs

    def request_waiting(self) -> None:
        """A request is now held waiting for a job."""
        if not self._closing:
            self._engaged = True
        self._waiting += 1
        self._observe(self._clock())

    def request_served(self, waited: float) -> None:
        """A held request got its session (after the acquire() that booked it)."""
        self._waiting = max(0, self._waiting - 1)
        self._wait_total += max(0.0, waited)
        self._observe(self._clock())

    def request_abandoned(self, waited: float | None) -> None:
        """A held request whose client went away before a job was free: not a rejection."""
        if waited is not None:
            self._waiting = max(0, self._waiting - 1)
        self._abandoned += 1
        self._observe(self._clock())

    def request_rejected(self, waited: float | None = None) -> None:
        """A request was refused: waited=None if refused at once, else the time it was held."""
        if waited is not None:
            self._waiting = max(0, self._waiting - 1)
        self._rejected += 1
        self._observe(self._clock())

    # ---- the rules

    def plan(self) -> Plan:
        """Evaluate every rule now; the returned actions are already booked."""
        now = self._clock()
        p = self.params
        kill: list[tuple[int, str]] = []
        for job in self._sorted():
            if job.state is JobState.STOPPING:
                continue
            if now >= self._liveness_deadline(job):
                self._begin_kill(job, "heartbeat", now, kill)
            elif job.state is JobState.DRAINING and now >= job.drain_at + p.drain_timeout:
                self._begin_kill(job, "drain_timeout", now, kill)
            elif job.state is JobState.READY and job.served >= p.max_use:
                self._begin_drain(job, "max_use", now)  # max_use lowered by change()
        self._shrink_to_maximum(now)
        spawn, blocked = 0, None
        if self._engaged and not self._closing:
            self._reduce_idle(now)
            spawn, blocked = self._spawns(now)
        drain = [(i, r) for i, r in self._drains
                 if i in self._jobs and self._jobs[i].state is JobState.DRAINING]
        self._drains = []
        self._observe(now)
        return Plan(spawn=spawn, drain=drain, kill=kill, spawn_blocked_until=blocked,
                    wake_at=self._wake_at(now, blocked))

    def _liveness_deadline(self, job: Job) -> float:
        # Before READY the start itself must finish within heartbeat_timeout, but never less
        # than START_GRACE: a Python job's start is CPU-bound (imports), and several jobs
        # starting at once on a busy machine take seconds; killing them would only restart
        # them.
        if job.ready_at is None:
            return job.started_at + max(self.params.heartbeat_timeout, START_GRACE)
        return job.last_heartbeat + self.params.heartbeat_timeout

    def _shrink_to_maximum(self, now: float) -> None:
        live = [j for j in self._jobs.values() if j.state in _LIVE]
        excess = len(live) + self._pending - self.params.maximum_jobs
        if excess <= 0:
            return
        cut = min(self._pending, excess)
        self._pending -= cut
        excess -= cut

        def order(j: Job) -> tuple[Any, ...]:
            # Idle jobs first (longest idle), then ones still starting, then the least busy.
            if j.state is JobState.READY and j.active == 0:
                return (0, j.idle_since or 0.0, -j.id)
            if j.state is JobState.STARTING:
                return (1, -j.id)
            return (2, j.active, -j.id)

        for job in sorted(live, key=order)[:excess]:
            self._begin_drain(job, "maximum", now)

    def _reduce_idle(self, now: float) -> None:
        p = self.params
        if self._pending or now - self._last_idle_drain < p.idle_timeout:
            return
        live = sum(1 for j in self._jobs.values() if j.state in _LIVE)
        if live - 1 < p.initial_jobs or self.available() - 1 < p.threshold:
            return
        idle = [j for j in self._jobs.values()
                if j.state is JobState.READY and j.active == 0 and j.idle_since is not None
                and now - j.idle_since >= p.idle_timeout]
        if idle:
            job = min(idle, key=lambda j: (j.idle_since, -j.id))
            self._begin_drain(job, "idle", now)
            self._last_idle_drain = now

    def _spawns(self, now: float) -> tuple[int, float | None]:
        p = self.params
        live = sum(1 for j in self._jobs.values() if j.state in _LIVE) + self._pending
        room = p.maximum_jobs - len(self._jobs) - self._pending
        available = self.available() + self._pending
        want = p.initial_jobs - live  # replace jobs that ended
        if available < p.threshold:
            batches = math.ceil((p.threshold - available) / p.additional_jobs)
            want = max(want, batches * p.additional_jobs)
        demand = self._waiting - self._free_slots()
        if demand > 0:  # held requests beyond every free slot (threshold 0, lazy start)
            want = max(want, math.ceil(demand / min(p.sessions_per_job, p.max_use)))
        want = min(want, room)
        if want <= 0:
            return 0, None
        if self._streak:
            if self._blocked_until is not None and now < self._blocked_until:
                return 0, self._blocked_until
            # After start-up failures, one probe at a time until a job serves.
            starting = any(j.state is JobState.STARTING for j in self._jobs.values())
            if self._pending or starting:
                return 0, None
            want = 1
        self._pending += want
        return want, None

    def _free_slots(self) -> int:
        p = self.params
        per_new = min(p.sessions_per_job, p.max_use)
        free = self._pending * per_new
        for job in self._available_jobs():
            free += min(p.sessions_per_job - job.active, p.max_use - job.served - job.active)
        return free

    def _wake_at(self, now: float, blocked: float | None) -> float | None:
        p = self.params
        times: list[float] = [blocked] if blocked is not None else []
        for job in self._jobs.values():
            if job.state is JobState.STOPPING:
                continue
            times.append(self._liveness_deadline(job))
            if job.state is JobState.DRAINING and job.drain_at is not None:
                times.append(job.drain_at + p.drain_timeout)
        if self._engaged and not self._closing:
            live = sum(1 for j in self._jobs.values() if j.state in _LIVE)
            if live > p.initial_jobs:
                for job in self._jobs.values():
                    if (job.state is JobState.READY and job.active == 0
                            and job.idle_since is not None):
                        times.append(max(job.idle_since, self._last_idle_drain) + p.idle_timeout)
        future = [t for t in times if t > now]
        return min(future) if future else None

    def _begin_drain(self, job: Job, reason: str, now: float) -> None:
        job.state = JobState.DRAINING
        job.reason = reason
        job.drain_at = now
        self._drains.append((job.id, reason))

    def _begin_kill(self, job: Job, reason: str, now: float,
                    kill: list[tuple[int, str]]) -> None:
        if job.ready_at is None:
            # Never got ready: a start-up failure, counted now so that the
            # replacement asked for in this same plan already waits its back-off.
            self._start_failed(now)
        job.state = JobState.STOPPING
        job.reason = reason
        kill.append((job.id, reason))

    # ---- views

    def _sorted(self) -> list[Job]:
        return [self._jobs[i] for i in sorted(self._jobs)]

    def _available_jobs(self) -> list[Job]:
        spj, max_use = self.params.sessions_per_job, self.params.max_use
        return [j for j in self._jobs.values()
                if j.state in _LIVE and j.active < spj and j.served + j.active < max_use]

    def available(self) -> int:
        """Jobs STARTING or READY, not draining, with a free session slot (spawned ones only)."""
        return len(self._available_jobs())

    def jobs(self) -> list[Job]:
        """Copies of every job that still exists, by id."""
        return [replace(j) for j in self._sorted()]

    def job(self, job_id: int) -> Job | None:
        job = self._jobs.get(job_id)
        return None if job is None else replace(job)

    @property
    def waiting(self) -> int:
        return self._waiting

    def _observe(self, now: float) -> None:
        self._g_jobs.set(len(self._jobs), now)
        self._g_in_use.set(sum(1 for j in self._jobs.values() if j.active > 0), now)
        self._g_waiting.set(self._waiting, now)

    def stats(self) -> dict[str, Any]:
        """The DSPACTPJ view; averages are time-weighted since start()."""
        now = self._clock()
        waiting = self._g_waiting.as_dict(now)
        waiting["average_wait_s"] = self._wait_total / self._accepted if self._accepted else 0.0
        return {
            "parameters": msgspec.structs.asdict(self.params),
            "jobs": self._g_jobs.as_dict(now),
            "in_use": self._g_in_use.as_dict(now),
            "waiting": waiting,
            "accepted": self._accepted,
            "rejected": self._rejected,
            "abandoned": self._abandoned,
            # Beyond the source's display: jobs that said Ready, and jobs free to take work.
            "ready": sum(1 for j in self._jobs.values() if j.state is JobState.READY),
            "available": self.available(),
            # Sessions (or deliveries) the ready jobs can take at once, and those taken.
            "sessions": {
                "capacity": sum(min(self.params.sessions_per_job,
                                    self.params.max_use - j.served)
                                for j in self._jobs.values() if j.state is JobState.READY),
                "in_use": sum(j.active for j in self._jobs.values()),
            },
        }
