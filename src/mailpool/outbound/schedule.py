"""The retry schedule after a temporary delivery failure (the source's 1st and 2nd level retry).

Pure logic: no I/O, no clock of its own. Every time is absolute on the caller's clock
(the one `arrival` was taken on and that is stored with the message), so a schedule
survives a restart.

A message that fails temporarily waits `first_interval` between tries in the 1st level
retry queue for `first_count` tries, then `second_interval` in the 2nd level queue,
until `max_lifetime` after its arrival: then it is undeliverable. The last try is
placed exactly at the end of the lifetime rather than past it, and its failure expires
the message.

The caller stores `pending_deadline()` with the message before each attempt: a crash
during the attempt then neither restarts the schedule nor retries at once, it resumes
at the time the failure would have set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

RETRY1 = "retry1"
RETRY2 = "retry2"
EXPIRED = "expired"

# Journal codes (see mailpool.journal.codes): moved to a retry queue, and back out of it.
_INTO = {RETRY1: "8C", RETRY2: "8D"}
_BACK = {RETRY1: "8E", RETRY2: "8F"}


@dataclass(frozen=True)
class RetryPolicy:
    first_interval: float  # seconds between tries in the 1st level retry queue
    first_count: int  # tries in the 1st level before moving to the 2nd level
    second_interval: float  # seconds between tries in the 2nd level retry queue
    max_lifetime: float  # seconds since arrival after which the message is undeliverable

    def problems(self) -> list[tuple[str, Any, str]]:
        """(key, value, why) for every inconsistent value; empty when valid."""
        out: list[tuple[str, Any, str]] = []
        for key in ("first_interval", "second_interval", "max_lifetime"):
            value = getattr(self, key)
            # `not value > 0` also catches NaN; an infinite interval would never retry.
            if not value > 0 or math.isinf(value):
                out.append((key, value, "must be a finite number above 0"))
        if self.first_count < 0:
            out.append(("first_count", self.first_count, "must not be negative"))
        return out


@dataclass(frozen=True)
class Step:
    queue: str  # RETRY1, RETRY2 or EXPIRED
    next_attempt: float | None  # absolute time on the caller's clock; None when expired
    entered_retry2: bool  # True exactly on the move from the 1st to the 2nd level
    code: str  # journal code for the move: "8C" (to retry1), "8D" (to retry2), "" expired


def after_temporary_failure(policy: RetryPolicy, *, arrival: float, attempts: int,
                            now: float) -> Step:
    """Where a message goes after attempt number `attempts` (the first delivery is 1)
    failed temporarily at `now`. `policy` must be valid (no problems())."""
    if attempts < 1:
        raise ValueError(f"attempts: {attempts!r}: must be at least 1 (the failed attempt)")
    expires = arrival + policy.max_lifetime
    # Both forms: `arrival + max_lifetime` may round either side of `now - arrival`, and a
    # try placed exactly at `expires` must expire when it fails.
    if now - arrival >= policy.max_lifetime or now >= expires:
        return Step(queue=EXPIRED, next_attempt=None, entered_retry2=False, code="")
    if attempts <= policy.first_count:
        queue, interval = RETRY1, policy.first_interval
    else:
        queue, interval = RETRY2, policy.second_interval
    return Step(
        queue=queue,
        next_attempt=min(now + interval, expires),
        entered_retry2=attempts == policy.first_count + 1,
        code=_INTO[queue],
    )


def pending_deadline(policy: RetryPolicy, *, arrival: float, attempts: int,
                     now: float) -> float:
    """The next-attempt time to store with the message before attempt `attempts` starts
    at `now`: where a failure of that attempt would put it (`now` if it would expire)."""
    step = after_temporary_failure(policy, arrival=arrival, attempts=attempts, now=now)
    return now if step.next_attempt is None else step.next_attempt


def back_to_outbound_code(queue: str) -> str:
    """The journal code for a message leaving a retry queue for the outbound queue."""
    try:
        return _BACK[queue]
    except KeyError:
        raise ValueError(f"queue: {queue!r}: not a retry queue "
                         f"({RETRY1!r} or {RETRY2!r})") from None
