"""Per-destination delivery concurrency and dead destinations, as pure logic.

The counterpart of Postfix's initial_destination_concurrency,
default_destination_concurrency_limit and its dead-destination throttling. A
destination is an opaque string key: a recipient domain in lower case, or the
configured router. No I/O; time comes from an injected clock.

Contract with the delivery code: check() before a delivery, started() when it
begins (books a slot), finished() with its outcome when it ends. While
check() says "paused" or "busy", leave the message queued and look again at
wake_at() or when a delivery to that destination finishes.

Rules:
- A new destination may run `initial` deliveries at once. Every "ok" (the remote
  answered, even with a 5xx: it is alive) grows its limit by one up to `maximum`;
  every "failed" (temporary failure for everything, session broken mid-way)
  halves it (at least 1): concurrency feedback.
- "unreachable" (no connection to any address) marks it dead: paused for
  `dead_pause`, then its limit is 1, one probe delivery at a time, until an "ok".
  Each pause that follows an unreachable probe doubles, capped at 8 x dead_pause;
  an "ok" or "failed" (the remote answered) starts the count again. Deliveries
  that were already running when the pause began are not probes: reporting
  "unreachable", whenever they end, leaves the pause as it is (same news), and
  until they have all ended the limit of 1 keeps the probe waiting ("busy").
  An "ok" from any delivery lifts the pause: the remote answered.
- resume() (operator flush, ETRN) lifts a pause at once; the limit stays at the
  one probe.
- A destination with nothing running and no pause in force is forgotten
  `idle_forget` after its last event (or the end of its pause): the memory bound.
  No mail wanted it for that long, so its history, good or bad, has gone stale.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

Clock = Callable[[], float]
Verdict = Literal["go", "busy", "paused"]
OUTCOMES = ("ok", "failed", "unreachable")

# A dead destination's pause doubles per unreachable probe up to this many dead_pause.
PAUSE_CAP_FACTOR = 8


@dataclass(frozen=True)
class DestinationLimits:
    initial: int = 5  # concurrency a new destination starts with
    maximum: int = 20  # it grows by one per successful delivery up to this
    dead_pause: float = 60.0  # seconds a destination is paused after a connection failure
    idle_forget: float = 600.0  # a destination with nothing running is forgotten after this

    def problems(self) -> list[tuple[str, Any, str]]:
        """(key, value, why) for every inconsistent value; empty when valid."""
        out: list[tuple[str, Any, str]] = []
        if self.initial < 1:
            out.append(("initial", self.initial, "must be at least 1"))
        if self.maximum < max(self.initial, 1):
            out.append(("maximum", self.maximum,
                        f"must be at least 1 and at least initial ({self.initial})"))
        for key in ("dead_pause", "idle_forget"):
            value = getattr(self, key)
            if not value > 0:
                out.append((key, value, "must be above 0"))
        return out


@dataclass
class _Dest:
    limit: int
    last_event: float
    active: int = 0
    failures: int = 0  # "failed" or "unreachable" outcomes since the last "ok"
    dead_streak: int = 0  # pauses in a row without the remote answering
    stale: int = 0  # of `active`: deliveries already running when the last pause began
    paused_until: float | None = None


class Destinations:
    """The concurrency and dead-destination state of every destination in use."""

    def __init__(self, limits: DestinationLimits, clock: Clock) -> None:
        bad = limits.problems()
        if bad:
            raise ValueError("; ".join(f"{key}: {value!r}: {why}" for key, value, why in bad))
        self.limits = limits
        self._clock = clock
        self._dests: dict[str, _Dest] = {}
        self._next_sweep = clock() + limits.idle_forget

    # ---- queries

    def check(self, dest: str) -> Verdict:
        """May a delivery to dest start now?"""
        now = self._clock()
        d = self._get(dest, now)
        if d is None:
            return "go"
        if d.paused_until is not None and now < d.paused_until:
            return "paused"
        return "busy" if d.active >= d.limit else "go"

    def paused_until(self, dest: str) -> float | None:
        """When dest's pause ends, or None if it is not paused now."""
        now = self._clock()
        d = self._get(dest, now)
        if d is None or d.paused_until is None or now >= d.paused_until:
            return None
        return d.paused_until

    def wake_at(self) -> float | None:
        """The earliest time a paused destination becomes usable again (None: none paused)."""
        now = self._clock()
        ends = [d.paused_until for d in self._dests.values()
                if d.paused_until is not None and d.paused_until > now]
        return min(ends) if ends else None

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per known destination: limit, active, paused_until (None if not paused), failures."""
        now = self._clock()
        self._sweep(now)
        out: dict[str, dict[str, Any]] = {}
        for dest in sorted(self._dests):
            d = self._dests[dest]
            paused = d.paused_until if d.paused_until is not None and now < d.paused_until \
                else None
            out[dest] = {"limit": d.limit, "active": d.active, "paused_until": paused,
                         "failures": d.failures}
        return out

    # ---- events

    def started(self, dest: str) -> None:
        """A delivery to dest began: it holds a slot until finished().

        Booked even when check() did not say "go" (a forced delivery): the slot is real.
        """
        now = self._clock()
        d = self._get(dest, now)
        if d is None:
            d = self._dests[dest] = _Dest(limit=self.limits.initial, last_event=now)
        d.active += 1
        d.last_event = now
        self._maybe_sweep(now)

    def finished(self, dest: str, outcome: str) -> None:
        """A delivery to dest ended with outcome "ok", "failed" or "unreachable".

        Ignored when dest has no delivery running (never a negative count)."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome: {outcome!r}: must be one of {', '.join(OUTCOMES)}")
        ended = self._end(dest)
        if ended is None:
            return
        d, old, now = ended
        if outcome == "ok":
            d.limit = min(d.limit + 1, self.limits.maximum)
            d.failures = 0
            d.dead_streak = 0
            d.paused_until = None  # it answered: it is not dead
        elif outcome == "failed":
            d.limit = max(1, d.limit // 2)
            d.failures += 1
            d.dead_streak = 0  # it answered, so it is reachable
        else:
            d.failures += 1
            d.limit = 1
            if not old:
                d.dead_streak += 1
                factor = min(2 ** (d.dead_streak - 1), PAUSE_CAP_FACTOR)
                d.paused_until = now + self.limits.dead_pause * factor
                d.stale = d.active
        self._maybe_sweep(now)

    def release(self, dest: str) -> None:
        """A booked delivery ended without trying dest (nothing pending there, or its job
        died): the slot is freed and nothing is learnt about the destination."""
        self._end(dest)

    def _end(self, dest: str) -> tuple[_Dest, bool, float] | None:
        """Free one slot of dest: (its state, whether the delivery began before the current
        pause, now), or None when nothing was running there."""
        now = self._clock()
        d = self._get(dest, now)
        if d is None or d.active == 0:
            return None
        d.active -= 1
        d.last_event = now
        # While deliveries from before the pause run, check() says "busy" (limit 1), so no
        # probe runs (short of a forced started()): this one is one of the old ones.
        old = d.stale > 0
        if old:
            d.stale -= 1
        return d, old, now

    def resume(self, dest: str | None = None) -> None:
        """Operator flush / ETRN: lift the pause of dest, or of every destination if None."""
        now = self._clock()
        targets = list(self._dests.values()) if dest is None else [self._get(dest, now)]
        for d in targets:
            if d is not None:
                d.paused_until = None

    # ---- forgetting

    def _forget_at(self, d: _Dest) -> float | None:
        if d.active:
            return None
        since = d.last_event if d.paused_until is None else max(d.last_event, d.paused_until)
        return since + self.limits.idle_forget

    def _get(self, dest: str, now: float) -> _Dest | None:
        # A destination due to be forgotten is treated as forgotten at once, so the rules do
        # not depend on when the sweep last ran.
        d = self._dests.get(dest)
        if d is None:
            return None
        at = self._forget_at(d)
        if at is not None and now >= at:
            del self._dests[dest]
            return None
        return d

    def _maybe_sweep(self, now: float) -> None:
        if now >= self._next_sweep:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        # At most once per idle_forget outside stats(): memory stays bounded by the
        # destinations used in the last two idle_forget periods, at O(1) amortised cost.
        for dest in [k for k, d in self._dests.items()
                     if (at := self._forget_at(d)) is not None and now >= at]:
            del self._dests[dest]
        self._next_sweep = now + self.limits.idle_forget
