"""What the jobs did, counted where it happens and reported to the supervisor in batches.

Each job counts connections, accepted messages, deliveries, deferrals, bounces, refusals
(by reply code) and delivery delays in a `JobActivity`, and keeps its recent refusals and
warnings; once a second, when something happened, the counts since the last report go to
the supervisor as one `Tally`. The supervisor adds them up for /metrics and the console
(`mailpool.supervisor.admin_view`). Counting is a few integer additions per event: the
journal stays the record of each message, this is the aggregate.
"""

from __future__ import annotations

import bisect
import logging
import time

import msgspec

# Delivery delay histogram bounds, seconds (postfix_exporter's qmgr delay buckets, shorter).
DELAY_BUCKETS = (1.0, 5.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, 14400.0, 86400.0)
EVENTS_PER_REPORT = 50  # recent refusals and warnings a job sends at most per report


class ActivityEvent(msgspec.Struct, array_like=True, omit_defaults=True):
    """A refusal ("reject") or a problem logged at warning or above ("error")."""

    time: float
    kind: str
    code: str
    detail: str
    listener: str = ""
    ip: str = ""
    queue_id: str = ""


class Tally(msgspec.Struct, array_like=True, omit_defaults=True):
    """One job's counts since its last report (all deltas)."""

    connections: dict[str, int] = {}  # listener -> connections
    received: int = 0
    delivered_local: int = 0          # recipients
    delivered_remote: int = 0         # recipients
    deferred: int = 0                 # delivery attempts that left recipients pending
    bounced: int = 0                  # recipients failed for good
    rejects: dict[str, int] = {}      # reply code -> refusals
    delay_counts: list[int] = []      # per DELAY_BUCKETS bucket (+1 above the last), or []
    delay_sum: float = 0.0
    events: list[ActivityEvent] = []
    events_dropped: int = 0


class JobActivity:
    """A job's counters since its last report."""

    def __init__(self) -> None:
        self._tally = Tally()
        self._dirty = False

    def _t(self) -> Tally:
        self._dirty = True
        return self._tally

    def connection(self, listener: str) -> None:
        t = self._t()
        t.connections[listener] = t.connections.get(listener, 0) + 1

    def received(self, n: int = 1) -> None:
        self._t().received += n

    def delivered(self, remote: bool, delay: float) -> None:
        t = self._t()
        if remote:
            t.delivered_remote += 1
        else:
            t.delivered_local += 1
        if not t.delay_counts:
            t.delay_counts = [0] * (len(DELAY_BUCKETS) + 1)
        delay = max(0.0, delay)
        t.delay_counts[bisect.bisect_left(DELAY_BUCKETS, delay)] += 1
        t.delay_sum += delay

    def deferred(self) -> None:
        self._t().deferred += 1

    def bounced(self, n: int = 1) -> None:
        self._t().bounced += n

    def rejected(self, code: int, detail: str, *, listener: str = "", ip: str = "") -> None:
        t = self._t()
        key = str(code)
        t.rejects[key] = t.rejects.get(key, 0) + 1
        self.event("reject", key, detail, listener=listener, ip=ip)

    def event(self, kind: str, code: str, detail: str, *, listener: str = "", ip: str = "",
              queue_id: str = "") -> None:
        t = self._t()
        if len(t.events) >= EVENTS_PER_REPORT:
            t.events_dropped += 1
            return
        t.events.append(ActivityEvent(time.time(), kind, code, detail[:500], listener, ip,
                                      queue_id))

    def take(self) -> Tally | None:
        """The counts since the last call, or None when nothing happened."""
        if not self._dirty:
            return None
        tally, self._tally, self._dirty = self._tally, Tally(), False
        return tally


class ProblemLog(logging.Handler):
    """Warnings and errors a job logs become "error" events of its activity, so the console
    shows recent problems without anyone reading each job's stderr."""

    def __init__(self, activity: JobActivity) -> None:
        super().__init__(logging.WARNING)
        self.activity = activity

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.activity.event("error", "", record.getMessage())
        except Exception:
            self.handleError(record)
