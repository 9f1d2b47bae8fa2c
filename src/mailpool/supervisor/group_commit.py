"""Group commit: one syncfs(2) makes every message written so far durable at once.

Jobs write and rename without fsync, then send a SyncRequest. Every request waiting when
the syncer wakes shares the next syncfs; each is then acted on in order (its journal
entries written, its messages handed on) and answered.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from mailpool.fsutil import syncfs
from mailpool.supervisor.channel import Channel, ChannelClosed, Synced, SyncRequest

OnDurable = Callable[[Any, SyncRequest], None]


class GroupCommit:
    def __init__(self, path: Path, on_durable: OnDurable) -> None:
        self.path = path
        self.on_durable = on_durable
        self._waiting: list[tuple[Any, Channel | None, SyncRequest]] = []
        self._wake = trio.Event()

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
                await trio.to_thread.run_sync(syncfs, self.path)
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
