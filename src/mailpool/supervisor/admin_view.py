"""What the admin console and /metrics read from a running supervisor (the AdminSource of
mailpool.admin.app): pool figures and queue operations through the supervisor, mail flow
summed from the jobs' activity reports, queue contents and journal traces from disk."""

from __future__ import annotations

import itertools
import logging
import time
from typing import TYPE_CHECKING, Any

from mailpool.activity import Tally
from mailpool.admin.history import MinuteHistory, RecentEvents
from mailpool.admin.metrics import DelayHistogram
from mailpool.config import POP_LISTENERS
from mailpool.framework.spool import Spool, SpoolError
from mailpool.journal.dump import DumpOptions, record_dict, select
from mailpool.journal.selection import normalise_message_id
from mailpool.queue_view import queued

if TYPE_CHECKING:
    from mailpool.supervisor.supervisor import Supervisor


class ActivityTotals:
    """Mail flow since the supervisor started: the jobs' tallies added up (never down)."""

    def __init__(self) -> None:
        self.connections: dict[str, int] = {}
        self.received = 0
        self.delivered = {"local": 0, "remote": 0}
        self.deferred = 0
        self.bounced = 0
        self.rejects: dict[str, int] = {}
        self.delays = DelayHistogram()
        self.minutes = MinuteHistory(time.time)
        self.recent = RecentEvents(time.time)

    def add(self, tally: Tally, job: str = "") -> None:
        for listener, n in tally.connections.items():
            self.connections[listener] = self.connections.get(listener, 0) + n
        self.received += tally.received
        self.delivered["local"] += tally.delivered_local
        self.delivered["remote"] += tally.delivered_remote
        self.deferred += tally.deferred
        self.bounced += tally.bounced
        for code, n in tally.rejects.items():
            self.rejects[code] = self.rejects.get(code, 0) + n
        if tally.delay_counts:
            self.delays.merge(tally.delay_counts, tally.delay_sum)
        if tally.received:
            self.minutes.count("received", tally.received)
        if tally.delivered_local or tally.delivered_remote:
            self.minutes.count("delivered", tally.delivered_local + tally.delivered_remote)
        for e in tally.events:
            self.recent.add(e.kind, e.code, e.detail, at=e.time, job=job or None,
                            listener=e.listener or None, ip=e.ip or None,
                            queue_id=e.queue_id or None)
        if tally.events_dropped:
            self.recent.add("error", "", f"{tally.events_dropped} more events from {job} "
                                         "in one second were not kept", job=job or None)

    def refused(self, code: int, detail: str, listener: str, ip: str) -> None:
        """A refusal the supervisor itself sent (421 at the maximum or per-client limit)."""
        key = str(code)
        self.rejects[key] = self.rejects.get(key, 0) + 1
        self.recent.add("reject", key, detail, listener=listener, ip=ip, job="supervisor")

    def counters(self) -> dict[str, Any]:
        pop = {k: n for k, n in self.connections.items() if k in POP_LISTENERS}
        smtp = {k: n for k, n in self.connections.items() if k not in POP_LISTENERS}
        return {"smtpd_connections": smtp, "pop3d_connections": pop,
                "received": self.received, "delivered": dict(self.delivered),
                "deferred": self.deferred, "bounced": self.bounced,
                "rejects": dict(self.rejects), "delivery_delay": self.delays.snapshot()}


class SupervisorProblems(logging.Handler):
    """The supervisor's own warnings and errors as "error" events of the console."""

    def __init__(self, totals: ActivityTotals) -> None:
        super().__init__(logging.WARNING)
        self.totals = totals

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.totals.recent.add("error", "", record.getMessage()[:500], job="supervisor")
        except Exception:
            self.handleError(record)


def watch_problems(totals: ActivityTotals) -> None:
    """Send the supervisor's warnings to `totals` (once: a handler from before is replaced)."""
    root = logging.getLogger("mailpool")
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, SupervisorProblems)]
    root.addHandler(SupervisorProblems(totals))


class AdminView:
    """The AdminSource the console is served from."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup

    # loop
    def pool_stats(self) -> dict[str, dict[str, Any]]:
        return self.sup.pool_stats()

    def status(self) -> dict[str, Any]:
        return self.sup.status()

    async def change_pool(self, entry: str, changes: dict[str, Any]) -> dict[str, Any]:
        return await self.sup.control({"op": "pool-change", "entry": entry,
                                       "changes": changes})

    async def control(self, request: dict[str, Any]) -> dict[str, Any]:
        return await self.sup.control(request)

    def counters(self) -> dict[str, Any]:
        return self.sup.activity.counters()

    def history(self) -> list[dict[str, int]]:
        return self.sup.activity.minutes.samples()

    def events(self) -> list[dict[str, Any]]:
        return self.sup.activity.recent.recent()

    # worker thread: files only
    def queue_counts(self) -> dict[str, int]:
        spool = self.sup.spool
        return {q: len(spool.list(q)) for q in Spool.QUEUES}

    def queue_messages(self, queue: str, limit: int) -> list[dict[str, Any]]:
        return list(itertools.islice(queued(self.sup.spool, (queue,)), limit))

    def queue_oldest(self) -> dict[str, float]:
        spool = self.sup.spool
        oldest: dict[str, float] = {}
        for queue in Spool.QUEUES:
            for queue_id in spool.list(queue):  # oldest first
                try:
                    oldest[queue] = spool.load_envelope(queue, queue_id).received_ns / 1e9
                except (FileNotFoundError, SpoolError):
                    continue
                break
        return oldest

    def journal_bytes(self) -> int:
        total = 0
        for path in self.sup.loaded.journal_dir.glob("receiver-*.jrn"):
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                pass  # rotated away while we looked
        return total

    def trace(self, message_id: str, limit: int) -> list[dict[str, Any]]:
        opts = DumpOptions(message_id=normalise_message_id(message_id))
        records = (r for r in select(opts, self.sup.loaded.journal_dir) if r is not None)
        return [record_dict(r) for r in itertools.islice(records, limit)]
