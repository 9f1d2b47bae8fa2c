"""What the console shows over time, kept by the supervisor: a per-minute ring for the chart
(AdminSource.history) and a bounded ring of recent rejections and errors (AdminSource.events).

Pure bookkeeping with an injected wall clock: minutes are wall-clock minutes so the chart's
time axis reads like the operator's clock. Nothing here does I/O or needs the event loop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

MINUTE = 60
HISTORY_MINUTES = 60
EVENTS_KEPT = 200
EVENT_KINDS = ("reject", "error")


class MinuteHistory:
    """One sample per minute since it was made (the supervisor's start), the last
    `minutes` of them kept.

    A sample is {"t": start of the minute (Unix seconds, a multiple of 60), "received":
    messages accepted in that minute, "delivered": recipients delivered in it, "in_use":
    peak sessions in use during it, "waiting": peak requests waiting for a job during it}.
    Minutes in which nothing was reported are still there: counts 0, gauges held at the
    last value reported (a gauge does not change unless someone says so).
    """

    COUNTS = ("received", "delivered")
    GAUGES = ("in_use", "waiting")

    def __init__(self, clock: Callable[[], float], minutes: int = HISTORY_MINUTES) -> None:
        if minutes < 1:
            raise ValueError("minutes must be >= 1")
        self._clock = clock
        self._ring: deque[dict[str, int]] = deque(maxlen=minutes)
        self._gauges = dict.fromkeys(self.GAUGES, 0)
        self._new_minute(int(clock() // MINUTE) * MINUTE)  # the chart starts at start-up

    def _new_minute(self, t: int) -> dict[str, int]:
        self._ring.append({"t": t, **dict.fromkeys(self.COUNTS, 0), **self._gauges})
        return self._ring[-1]

    def _current(self) -> dict[str, int]:
        minute = int(self._clock() // MINUTE) * MINUTE
        ring = self._ring
        if minute <= ring[-1]["t"]:
            # This minute, or a wall clock stepped back: count it in the newest minute.
            return ring[-1]
        assert ring.maxlen is not None
        # Minutes skipped in silence, at most a ring's worth however long the silence was.
        first = max(ring[-1]["t"] + MINUTE, minute - MINUTE * (ring.maxlen - 1))
        for t in range(first, minute, MINUTE):
            self._new_minute(t)
        return self._new_minute(minute)

    def count(self, what: str, n: int = 1) -> None:
        """Add `n` to this minute's "received" or "delivered"."""
        if what not in self.COUNTS:
            raise ValueError(f"unknown count {what!r} (known: {', '.join(self.COUNTS)})")
        self._current()[what] += n

    def load(self, in_use: int, waiting: int) -> None:
        """The gauges now: sessions in use and requests waiting, over every pool entry.
        Call it whenever either changes (or at least once a second)."""
        sample = self._current()
        self._gauges = {"in_use": in_use, "waiting": waiting}
        for key, value in self._gauges.items():
            sample[key] = max(sample[key], value)

    def samples(self) -> list[dict[str, int]]:
        """Oldest first; the last is the current minute, still filling."""
        self._current()
        return [dict(s) for s in self._ring]


class RecentEvents:
    """The last `size` rejections and errors, newest first.

    An event is {"time": Unix seconds, "kind": "reject" | "error", "code": the SMTP reply
    code ("550") of a rejection or the journal code of an error ("" when none), "detail":
    the reply text or the error message}, plus whichever of "listener", "ip", "job",
    "queue_id", "message_id" apply.
    """

    FIELDS = ("listener", "ip", "job", "queue_id", "message_id")

    def __init__(self, clock: Callable[[], float], size: int = EVENTS_KEPT) -> None:
        self._clock = clock
        self._ring: deque[dict[str, Any]] = deque(maxlen=size)

    def add(self, kind: str, code: str, detail: str, at: float | None = None,
            **fields: str | None) -> None:
        """`at`: when it happened (Unix seconds), if not now."""
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {kind!r} (known: {', '.join(EVENT_KINDS)})")
        unknown = set(fields) - set(self.FIELDS)
        if unknown:
            raise ValueError(f"unknown event field(s) {', '.join(sorted(unknown))}")
        event: dict[str, Any] = {"time": self._clock() if at is None else at, "kind": kind,
                                 "code": code,
                                 "detail": detail}
        event.update((k, v) for k, v in fields.items() if v is not None)
        self._ring.append(event)

    def recent(self) -> list[dict[str, Any]]:
        return [dict(e) for e in reversed(self._ring)]
