"""Message ids waiting for a framework job, in arrival order, each queued once."""

from __future__ import annotations

from collections import deque

import trio


class WorkQueue:
    def __init__(self) -> None:
        self._pending: deque[tuple[str, bool]] = deque()
        self._known: set[str] = set()  # queued or being worked on
        self._ready = trio.Event()

    def __len__(self) -> int:
        return len(self._pending)

    def put(self, queue_id: str, *, again: bool = False) -> None:
        """Queue a message; `again` re-queues one whose job died or failed."""
        if queue_id in self._known and not again:
            return
        self._known.add(queue_id)
        self._pending.append((queue_id, again))
        self._ready.set()

    async def get(self) -> tuple[str, bool]:
        """The next (queue id, again)."""
        while not self._pending:
            self._ready = trio.Event()
            await self._ready.wait()
        return self._pending.popleft()

    def take(self, limit: int) -> list[tuple[str, bool]]:
        """Up to `limit` more items that are already waiting (never blocks)."""
        out = []
        while self._pending and len(out) < limit:
            out.append(self._pending.popleft())
        return out

    def done(self, queue_id: str) -> None:
        self._known.discard(queue_id)
