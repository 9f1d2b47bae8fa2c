"""Failed logins per client address, counted across every job (POP3 today, SMTP AUTH later).

A job reports each failure; the supervisor answers with the address's recent total, which the
job turns into a growing delay. An address is forgotten after a quiet period.
"""

from __future__ import annotations

from collections.abc import Callable

FORGET_AFTER = 900.0


class LoginFailures:
    def __init__(self, clock: Callable[[], float], forget_after: float = FORGET_AFTER) -> None:
        self._clock = clock
        self._forget_after = forget_after
        self._seen: dict[str, tuple[int, float]] = {}

    def recent(self, ip: str) -> int:
        count, last = self._seen.get(ip, (0, 0.0))
        if count and self._clock() - last > self._forget_after:
            del self._seen[ip]
            return 0
        return count

    def failed(self, ip: str) -> int:
        """Count one failure; the address's recent total."""
        count = self.recent(ip) + 1
        self._seen[ip] = (count, self._clock())
        return count

    def expire(self) -> None:
        now = self._clock()
        for ip in [ip for ip, (_, last) in self._seen.items() if now - last > self._forget_after]:
            del self._seen[ip]
