"""The skeleton every prestart job runs on (Postfix-style: one role per program, one skeleton).

A job is a fresh Python process with one Trio loop. It talks to the supervisor over its
control channel only: it says Ready, receives sockets (Assign) or queue work (Work),
reports sessions ending, heartbeats, and sends its journal entries (the supervisor is the
single journal writer). When the channel closes or a Drain arrives it stops taking work,
lets open sessions finish within drain_timeout, and exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import trio

from mailpool.activity import JobActivity
from mailpool.config import LoadedConfig, PoolParams
from mailpool.journal.writer import prepare_payload
from mailpool.supervisor.channel import (
    ActivityReport,
    Assign,
    AuthCount,
    AuthFailed,
    Channel,
    ChannelClosed,
    Deliver,
    Delivered,
    Drain,
    Flush,
    Flushed,
    Heartbeat,
    Journal,
    OutboundItem,
    Ready,
    SendEtrn,
    SessionEnded,
    Synced,
    SyncRequest,
    Work,
    WorkDone,
)

log = logging.getLogger("mailpool.job")
# Journal entries a job gathers before sending them: at most this long, at most this many.
JOURNAL_BATCH = 0.005
JOURNAL_BATCH_MAX = 256
ACTIVITY_EVERY = 1.0  # seconds between a job's activity reports (when something happened)


class JobContext:
    """What a session or work item may use: config, identity, and the way up to the supervisor."""

    def __init__(self, loaded: LoadedConfig, entry: str, job_id: int, channel: Channel,
                 params: PoolParams) -> None:
        self.loaded = loaded
        self.config = loaded.config
        self.entry = entry
        self.job_id = job_id
        self.job_name = f"{entry}/{job_id}"
        self.channel = channel
        self.params = params
        self._journal_on = loaded.config.journal.enabled
        self._unsent: list[tuple[str, int, bytes]] = []  # stamped, not yet sent
        self._journal_wake = trio.Event()
        self._flush_lock = trio.Lock()
        self._waiters: dict[int, trio.Event] = {}
        self._replies: dict[int, Any] = {}
        self._next_token = 0
        self.active = 0  # open sessions on this job
        self.activity = JobActivity()  # counts for /metrics and the console
        # Set when the supervisor asks this job to drain: idle sessions end at once.
        self.draining = trio.Event()
        self.idle_scopes: set[trio.CancelScope] = set()

    def free_slots(self) -> int:
        return max(0, self.params.sessions_per_job - self.active)

    async def journal(self, code: str, **fields: Any) -> None:
        await self.journal_many([(code, fields)])

    async def journal_many(self, entries: list[tuple[str, dict[str, Any]]]) -> None:
        """Queue entries for the supervisor; they keep their order. The flusher sends what
        gathered within JOURNAL_BATCH as one channel message (a POP3 session journals every
        RETR: one message each would wake the supervisor as often)."""
        self._unsent += self.stamp(entries)
        if len(self._unsent) >= JOURNAL_BATCH_MAX:
            await self.flush_journal()  # bounded: a slow supervisor slows the sender
        elif self._unsent:
            self._journal_wake.set()

    async def flush_journal(self) -> None:
        """Send the queued entries now (before any message that carries entries of its
        own, so the journal keeps this job's order)."""
        async with self._flush_lock:  # FIFO: batches leave in the order they were taken
            if self._unsent:
                entries, self._unsent = self._unsent, []
                await self.channel.send(Journal(entries=entries))

    def stamp(self, entries: list[tuple[str, dict[str, Any]]]
              ) -> list[tuple[str, int, bytes]]:
        """Entries as the channel carries them: time-stamped now, payload encoded here so
        the single writer only frames them; none with journaling off."""
        if not self._journal_on:
            return []
        now = time.time_ns()
        return [(code, now, prepare_payload(fields)) for code, fields in entries]

    async def _ask(self, make: Callable[[int], Any]) -> Any:
        """Send a request carrying a fresh token; the reply with that token (None if the
        channel closed first)."""
        self._next_token += 1
        token = self._next_token
        event = self._waiters[token] = trio.Event()
        try:
            await self.channel.send(make(token))
        except ChannelClosed:
            self._waiters.pop(token, None)
            return None
        await event.wait()
        return self._replies.pop(token, None)

    async def group_sync(self, entries: list[tuple[str, dict[str, Any]]] | None = None,
                         queued: list[tuple[str, str]] | None = None) -> bool:
        """Ask the supervisor's syncer to make everything written so far durable; once it
        is, the supervisor journals `entries` and dispatches the `queued` messages."""
        stamped = self.stamp(entries or [])
        await self.flush_journal()
        reply = await self._ask(lambda token: SyncRequest(token=token, entries=stamped,
                                                          queued=queued or []))
        return isinstance(reply, Synced) and reply.ok

    async def auth_failed(self, ip: str) -> int:
        """Report a failed login; returns the recent failures from `ip` across all jobs."""
        reply = await self._ask(lambda token: AuthFailed(token=token, ip=ip))
        return reply.failures if isinstance(reply, AuthCount) else 1

    async def flush(self, domain: str, subdomains: bool) -> int | None:
        """ETRN: ask the supervisor to deliver mail queued for `domain` now; how many
        messages that was (None: the supervisor could not be asked)."""
        reply = await self._ask(lambda token: Flush(token=token, domain=domain,
                                                    subdomains=subdomains))
        return reply.count if isinstance(reply, Flushed) else None

    def _reply(self, msg: Synced | AuthCount | Flushed) -> None:
        event = self._waiters.pop(msg.token, None)
        if event is not None:
            self._replies[msg.token] = msg
            event.set()

    def _channel_lost(self) -> None:
        for event in self._waiters.values():
            event.set()
        self._waiters.clear()

    def _start_drain(self) -> None:
        self.draining.set()
        for scope in self.idle_scopes:
            scope.cancel()


async def send_within(stream: trio.abc.SendStream, data: bytes, timeout: float) -> bool:
    """Send `data` unless the peer stops reading for `timeout`; False when it did."""
    if not data:
        return True
    with trio.move_on_after(timeout):
        await stream.send_all(data)
        return True
    return False


SessionHandler = Callable[[JobContext, trio.SocketStream, Assign], Awaitable[None]]
# A batch of (queue id, again) -> its answer (results, last journal entries, hand-overs).
WorkHandler = Callable[[JobContext, list[tuple[str, bool]]], Awaitable["WorkResult"]]
# One message off the outbound queue -> what became of it.
DeliverHandler = Callable[[JobContext, Deliver], Awaitable[Delivered]]
EtrnHandler = Callable[[JobContext, list[str]], Awaitable[None]]


class WorkResult(NamedTuple):
    results: list[tuple[str, bool]]
    entries: list[tuple[str, dict[str, Any]]]
    handed: list[OutboundItem]


async def run_job(ctx: JobContext, *, session: SessionHandler | None = None,
                  work: WorkHandler | None = None, deliver: DeliverHandler | None = None,
                  etrn: EtrnHandler | None = None) -> None:
    channel = ctx.channel
    heartbeat_every = max(0.05, ctx.params.heartbeat_timeout / 4)

    async def heartbeats() -> None:
        while True:
            await trio.sleep(heartbeat_every)
            await channel.send(Heartbeat())

    async def journal_flusher() -> None:
        while True:
            await ctx._journal_wake.wait()
            ctx._journal_wake = trio.Event()
            await trio.sleep(JOURNAL_BATCH)
            await ctx.flush_journal()

    async def report_activity() -> None:
        while True:
            await trio.sleep(ACTIVITY_EVERY)
            await send_activity()

    async def send_activity() -> None:
        tally = ctx.activity.take()
        if tally is not None:
            try:
                await channel.send(ActivityReport(tally=tally))
            except ChannelClosed:
                pass

    async def one_session(msg: Assign, fd: int) -> None:
        sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
        stream = trio.SocketStream(sock)
        ctx.active += 1
        try:
            # No "session started" message: the slot was booked at hand-off (one control
            # message fewer per connection).
            assert session is not None
            await session(ctx, stream, msg)
        except Exception as exc:  # one broken session must not end the job's other sessions
            log.error("session %d from %s failed: %r", msg.conn_id, msg.peer_ip, exc)
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()
                ctx.active -= 1
                try:
                    await channel.send(SessionEnded(conn_id=msg.conn_id,
                                                    free_slots=ctx.free_slots()))
                except ChannelClosed:
                    pass

    async def one_work(items: list[tuple[str, bool]]) -> None:
        assert work is not None
        try:
            done = await work(ctx, items)
        except Exception as exc:  # the messages stay queued; the supervisor retries them
            log.error("work on %s failed: %r", [q for q, _ in items], exc)
            done = WorkResult([(queue_id, False) for queue_id, _ in items], [], [])
        try:
            await ctx.flush_journal()
            await channel.send(WorkDone(results=done.results, entries=ctx.stamp(done.entries),
                                        handed=done.handed))
        except ChannelClosed:
            pass

    async def one_delivery(msg: Deliver) -> None:
        assert deliver is not None
        try:
            answer = await deliver(ctx, msg)
        except Exception as exc:  # still queued: the supervisor reloads it from the spool
            log.exception("delivery of %s failed: %r", msg.item.queue_id, exc)
            answer = Delivered(queue_id=msg.item.queue_id, outcomes=[], failed=True)
        try:
            await ctx.flush_journal()
            await channel.send(answer)
        except ChannelClosed:
            pass

    async def one_etrn(domains: list[str]) -> None:
        assert etrn is not None
        try:
            await etrn(ctx, domains)
        except Exception as exc:
            log.error("ETRN for %s failed: %r", domains, exc)

    async def keep_reading() -> None:
        # While draining, sessions may still wait on group commits.
        try:
            while True:
                msg, fd = await channel.receive()
                if fd is not None:
                    os.close(fd)
                if isinstance(msg, Synced | AuthCount | Flushed):
                    ctx._reply(msg)
        except ChannelClosed:
            ctx._channel_lost()

    async with trio.open_nursery() as control:
        control.start_soon(heartbeats)
        control.start_soon(report_activity)
        control.start_soon(journal_flusher)
        async with trio.open_nursery() as tasks:
            await channel.send(Ready(pid=os.getpid()))
            try:
                while True:
                    msg, fd = await channel.receive()
                    if isinstance(msg, Assign) and fd is not None and session is not None:
                        tasks.start_soon(one_session, msg, fd)
                    elif isinstance(msg, Work) and work is not None:
                        tasks.start_soon(one_work, msg.items)
                    elif isinstance(msg, Deliver) and deliver is not None:
                        tasks.start_soon(one_delivery, msg)
                    elif isinstance(msg, SendEtrn) and etrn is not None:
                        tasks.start_soon(one_etrn, msg.domains)
                    elif isinstance(msg, Synced | AuthCount | Flushed):
                        ctx._reply(msg)
                    elif isinstance(msg, Drain):
                        break
                    elif fd is not None:
                        os.close(fd)
                control.start_soon(keep_reading)
            except ChannelClosed:
                ctx._channel_lost()
            ctx._start_drain()
            # Draining: no new work; open sessions get drain_timeout to finish.
            tasks.cancel_scope.deadline = trio.current_time() + ctx.params.drain_timeout
        await send_activity()  # the last counts before the job ends
        with contextlib.suppress(ChannelClosed):
            await ctx.flush_journal()
        control.cancel_scope.cancel()
