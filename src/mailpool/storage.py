"""The source's storage threshold: is the data directory's file system short of space?

Below [storage] min_free_mb free, the SMTP server answers RCPT and the end of DATA with
`452 4.3.1` and the framework parks incoming mail on the busy queue (7L) until the
supervisor sees space again (7M). One statvfs per check, at most one per second per process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

REPLY = (452, "Insufficient system storage", "4.3.1")


def free_mb(path: Path) -> float:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize / (1024 * 1024)


class SpaceCheck:
    def __init__(self, path: Path, min_free_mb: int, *, every: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.min_free_mb = min_free_mb
        self.every = every
        self._clock = clock
        self._checked = -float("inf")
        self._low = False

    def low(self) -> bool:
        """True when free space is under the threshold (0: never)."""
        if self.min_free_mb <= 0:
            return False
        now = self._clock()
        if now - self._checked >= self.every:
            self._checked = now
            try:
                self._low = free_mb(self.path) < self.min_free_mb
            except OSError:
                self._low = False  # cannot tell: writes will say (451) if it is really full
        return self._low
