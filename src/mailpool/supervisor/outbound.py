"""The outbound dispatcher: messages waiting for the SMTP client, fed to smtp-client jobs.

Every queued message (outbound, 1st and 2nd level retry) is known here with its next hops and
the time it is due. A due message goes to a job only when each of its next hops has a free
slot under its per-destination limit (mailpool.outbound.destinations); a next hop paused as
dead is skipped (its recipients stay pending) and a message whose every next hop is paused
waits, journaled 86, without costing an attempt. Due messages are grouped by next hops and
the groups served in turn, so one busy or dead domain never holds up the others.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import trio

from mailpool.outbound.destinations import Destinations
from mailpool.supervisor.channel import ChannelClosed, Deliver, Delivered, OutboundItem
from mailpool.supervisor.jobs import EntryRuntime, JobHandle, JobPools, Record

log = logging.getLogger("mailpool.supervisor")

Group = tuple[str, ...]


class OutboundDispatcher:
    def __init__(self, pools: JobPools, entry: EntryRuntime, destinations: Destinations,
                 record: Record, wall: Callable[[], float] = time.time) -> None:
        self.pools = pools
        self.entry = entry
        self.destinations = destinations
        self.record = record
        self.wall = wall
        self.items: dict[str, OutboundItem] = {}     # waiting: due or not
        self.timers: list[tuple[float, str]] = []     # (next attempt, queue id), lazily pruned
        self.ready: dict[Group, deque[str]] = {}      # due, by next hops, in arrival order
        self.in_flight: dict[str, tuple[JobHandle, list[str]]] = {}
        self.noted: set[str] = set()   # held back and journaled 86 since last dispatched
        self.wake = trio.Event()
        self._turn = 0

    # --- what comes in ---------------------------------------------------------------------

    def add(self, item: OutboundItem) -> None:
        """A message (re)enters the queue: new, back from an attempt, recovered or flushed."""
        if item.queue_id in self.in_flight:
            return  # a job holds it; its answer tells where it is next
        self._drop(item.queue_id)
        self.items[item.queue_id] = item
        if item.next_attempt <= self.wall():
            self.ready.setdefault(tuple(item.destinations), deque()).append(item.queue_id)
        else:
            heapq.heappush(self.timers, (item.next_attempt, item.queue_id))
        self.wake.set()

    def _drop(self, queue_id: str) -> None:
        self.noted.discard(queue_id)
        old = self.items.pop(queue_id, None)
        if old is not None:
            group = self.ready.get(tuple(old.destinations))
            if group is not None and queue_id in group:
                group.remove(queue_id)

    def forget(self, queue_id: str) -> None:
        """The message left the queues (the operator deleted it)."""
        self._drop(queue_id)

    def delivered(self, job: JobHandle, msg: Delivered) -> None:
        booked = self.in_flight.pop(msg.queue_id, (job, []))[1]
        if msg.queue_id in job.work:
            job.work.discard(msg.queue_id)
            self.entry.rules.release(job.id)
            self.entry.poke()
        reported = dict(msg.outcomes)
        for dest in booked:
            outcome = reported.get(dest, "skipped")
            if outcome == "skipped":
                self.destinations.release(dest)
            else:
                self.destinations.finished(dest, outcome)
        if msg.after is not None:
            self.add(msg.after)
        self.wake.set()

    def job_exited(self, job: JobHandle, reload: Callable[[str], None]) -> None:
        """A job died holding messages: give their slots back and reload each from disk."""
        for queue_id in list(job.work):
            _, booked = self.in_flight.pop(queue_id, (job, []))
            for dest in booked:
                self.destinations.release(dest)
            reload(queue_id)
        job.work.clear()
        self.wake.set()

    def flush(self, *, domain: str | None = None, subdomains: bool = False,
              queue_id: str | None = None) -> int:
        """Make waiting messages due now (operator flush, ETRN); returns how many."""
        domain = domain.lower().rstrip(".") if domain else None

        def wanted(item: OutboundItem) -> bool:
            if queue_id is not None:
                return item.queue_id == queue_id
            if domain is None:
                return True
            return any(d == domain or (subdomains and d.endswith("." + domain))
                       for d in item.destinations)

        hits = [item for item in self.items.values() if wanted(item)]
        for item in hits:
            for dest in item.destinations:
                self.destinations.resume(dest)
            self.add(OutboundItem(item.queue_id, item.queue, item.destinations, 0.0))
        if domain is not None:
            self.destinations.resume(domain)
        return len(hits)

    # --- choosing the next message -------------------------------------------------------------

    def _promote(self) -> None:
        now = self.wall()
        while self.timers and self.timers[0][0] <= now:
            due, queue_id = heapq.heappop(self.timers)
            item = self.items.get(queue_id)
            if item is not None and item.next_attempt == due:
                self.ready.setdefault(tuple(item.destinations), deque()).append(queue_id)

    def _next(self) -> tuple[OutboundItem, list[str]] | None:
        """The next message that may go now and the next hops to skip, taken off `ready`."""
        self._promote()
        groups = [g for g, q in self.ready.items() if q]
        for g in [g for g, q in self.ready.items() if not q]:
            del self.ready[g]
        if not groups:
            return None
        self._turn = (self._turn + 1) % len(groups)
        for group in groups[self._turn:] + groups[:self._turn]:
            verdicts = {d: self.destinations.check(d) for d in group}
            if "busy" in verdicts.values() or (group and all(
                    v == "paused" for v in verdicts.values())):
                self._note_held(group, verdicts)
                continue
            queue_id = self.ready[group].popleft()
            item = self.items.pop(queue_id)
            self.noted.discard(queue_id)
            return item, [d for d, v in verdicts.items() if v == "paused"]
        return None

    def _note_held(self, group: Group, verdicts: dict[str, str]) -> None:
        why = "; ".join(
            f"{d}: paused after a connection failure" if v == "paused"
            else f"{d}: connection limit full" for d, v in verdicts.items() if v != "go")
        for queue_id in self.ready[group]:
            if queue_id not in self.noted:
                self.noted.add(queue_id)
                self.record("86", queue_id=queue_id, detail=why)

    def _deadline(self) -> float:
        """Trio time of the next event no message or answer will announce."""
        now_trio, now_wall = trio.current_time(), self.wall()
        wake = now_trio + 1.0
        while self.timers and self.timers[0][1] not in self.items:
            heapq.heappop(self.timers)
        if self.timers:
            wake = min(wake, now_trio + max(0.0, self.timers[0][0] - now_wall))
        pause_end = self.destinations.wake_at()
        if pause_end is not None:
            wake = min(wake, pause_end)
        return wake

    # --- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        entry = self.entry
        while True:
            self.wake = trio.Event()
            pick = self._next()
            if pick is None:
                with trio.move_on_at(self._deadline()):
                    await self.wake.wait()
                continue
            item, skip = pick
            job_id, _, _ = await self.pools.acquire(entry, None)
            job = self.pools.job(entry, job_id) if job_id is not None else None
            if job is None or item.queue_id in self.items or item.queue_id in self.in_flight:
                # No job (shutting down), or the message changed while we waited for one.
                if job is not None:
                    entry.rules.cancel(job.id)
                if item.queue_id not in self.items and item.queue_id not in self.in_flight:
                    self.add(item)
                if job is None:
                    await entry.changed.wait()
                continue
            go = [d for d in item.destinations if d not in skip]
            for dest in go:
                self.destinations.started(dest)
            self.in_flight[item.queue_id] = (job, go)
            job.work.add(item.queue_id)
            assert job.channel is not None
            try:
                await job.channel.send(Deliver(item=item, skip=skip))
            except ChannelClosed:
                # The job is gone; its exit hands the message back (job_exited).
                continue

    def stats(self) -> dict[str, Any]:
        now = self.wall()
        return {"waiting": len(self.items),
                "due": sum(len(q) for q in self.ready.values()),
                "in_flight": len(self.in_flight),
                "next_attempt_in": (max(0.0, min(t for t, _ in self.timers) - now)
                                    if self.timers else None),
                "destinations": self.destinations.stats()}
