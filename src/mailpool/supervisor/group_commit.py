"""Group commit: one syncfs(2) makes every message written so far durable at once.

Jobs write and rename without fsync, then send a SyncRequest. Every request waiting when
the syncer wakes shares the next syncfs; each is then acted on in order (its journal
entries written, its messages handed on) and answered.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from mailpool.fsutil import syncfs
from mailpool.supervisor.channel import Channel, ChannelClosed, Synced, SyncRequest

OnDurable = Callable[[Any, SyncRequest], None]


class SyncThread:
    """One long-lived thread that runs syncfs on request. trio.to_thread would hand each
    sync to a pooled worker, paying a hand-over per group commit (a profile found it the
    supervisor's largest single cost); this thread just waits for the next request."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._requests: queue.SimpleQueue[Callable[[OSError | None], None]] = (
            queue.SimpleQueue())
        self._thread: threading.Thread | None = None

    def _work(self) -> None:
        while True:
            done = self._requests.get()
            try:
                syncfs(self.path)
                done(None)
            except OSError as exc:
                done(exc)

    async def sync(self) -> None:
        """syncfs on the thread; raises its OSError."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="syncfs", daemon=True)
            self._thread.start()
        token = trio.lowlevel.current_trio_token()
        finished = trio.Event()
        outcome: list[OSError | None] = []

        def done(error: OSError | None) -> None:
            outcome.append(error)
            token.run_sync_soon(finished.set)

        self._requests.put(done)
        # Not cancellable half-way: the sync runs to its end either way.
        with trio.CancelScope(shield=True):
            await finished.wait()
        if outcome[0] is not None:
            raise outcome[0]


class GroupCommit:
    def __init__(self, path: Path, on_durable: OnDurable) -> None:
        self.path = path
        self.on_durable = on_durable
        self._waiting: list[tuple[Any, Channel | None, SyncRequest]] = []
        self._wake = trio.Event()
        self._syncer = SyncThread(path)

    def request(self, owner: Any, channel: Channel | None, req: SyncRequest) -> None:
        self._waiting.append((owner, channel, req))
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            batch, self._waiting = self._waiting, []
            if not batch:
                continue
            try:
                await self._syncer.sync()
                ok = True
            except OSError as exc:
                print(f"mailpool: syncfs failed: {exc}", file=sys.stderr, flush=True)
                ok = False
            for owner, channel, req in batch:
                if ok:
                    self.on_durable(owner, req)
                if channel is None:
                    continue
                try:
                    await channel.send(Synced(token=req.token, ok=ok))
                except ChannelClosed:
                    pass
