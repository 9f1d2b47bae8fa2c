"""Connection hand-off: accept on each listener, pick an available job, pass the socket over.

The common case (a job free now) is handled in the accept loop itself; a connection that must
wait for a job (or be refused at the maximum) gets a task of its own. A refused connection is
answered by the supervisor with the role's busy reply: nothing is silently dropped.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from mailpool.supervisor.admin_view import ActivityTotals
from mailpool.supervisor.anvil import ClientLimits
from mailpool.supervisor.channel import Assign, ChannelClosed
from mailpool.supervisor.jobs import EntryRuntime, JobHandle, JobPools, Record
from mailpool.supervisor.limits import LoginFailures

log = logging.getLogger("mailpool.supervisor")


TOO_MANY = b"421 4.7.0 Error: too many connections from your address\r\n"


class HandOff:
    def __init__(self, pools: JobPools, logins: LoginFailures, record: Record,
                 limits: dict[str, ClientLimits] | None = None,
                 activity: ActivityTotals | None = None) -> None:
        self.pools = pools
        self.activity = activity or ActivityTotals()
        self.logins = logins
        self.record = record
        # Per listener, the per-client limits (anvil) its connections are counted by.
        self.limits = limits or {}
        self.conn_ids = 0
        self.scope = trio.CancelScope()
        self.waiting: dict[str, int] = {}  # per entry, connections held for a job
        self.peers: dict[int, tuple[str, str]] = {}  # conn id -> (listener, ip), counted

    async def accept_loops(self, listeners: dict[str, trio.socket.SocketType]) -> None:
        """One accept loop per listener-fed role, until the scope is cancelled (drain)."""
        with self.scope:
            async with trio.open_nursery() as nursery:
                for entry in self.pools.entries.values():
                    for name in entry.role.listeners:
                        if name in listeners:  # the optional ones only when configured
                            nursery.start_soon(self.accept_loop, nursery, entry, name,
                                               listeners[name])
        for sock in listeners.values():
            sock.close()

    async def accept_loop(self, nursery: trio.Nursery, entry: EntryRuntime, listener_name: str,
                          listener: trio.socket.SocketType) -> None:
        while True:
            try:
                sock, addr = await listener.accept()
            except OSError as exc:
                log.warning("accept on %s: %s", listener_name, exc)
                await trio.sleep(0.1)  # EMFILE and friends: back off, do not spin
                continue
            limits = self.limits.get(listener_name)
            if limits is not None:
                refused = limits.admit(str(addr[0]))
                if refused is not None:
                    self.record("9S", ip=str(addr[0]), detail=refused)
                    self.activity.refused(421, refused, listener_name, str(addr[0]))
                    await self.refuse(sock, TOO_MANY)
                    continue
            if not await self.assign_now(entry, listener_name, sock, addr):
                if self.waiting.get(entry.name, 0) >= entry.rules.params.max_waiting:
                    # Bounded memory: beyond max_waiting nobody else is held.
                    entry.rules.request_rejected(None)
                    self.record("JR", entry=entry.name, ip=str(addr[0]),
                                detail="too many requests waiting (max_waiting)")
                    self.activity.refused(421, "too many requests waiting (max_waiting)",
                                          listener_name, str(addr[0]))
                    self.uncount(listener_name, str(addr[0]))
                    await self.refuse(sock, entry.role.busy_reply)
                    continue
                self.waiting[entry.name] = self.waiting.get(entry.name, 0) + 1
                nursery.start_soon(self.hand_off, entry, listener_name, sock, addr)

    async def refuse(self, sock: trio.socket.SocketType, reply: bytes) -> None:
        """Say why and close. A fresh socket's send buffer is empty: this never waits long."""
        with sock, trio.move_on_after(1):
            try:
                await sock.send(reply)
            except OSError:
                pass

    def uncount(self, listener: str, ip: str) -> None:
        limits = self.limits.get(listener)
        if limits is not None:
            limits.closed(ip)

    async def assign_now(self, entry: EntryRuntime, listener: str,
                         sock: trio.socket.SocketType, addr: tuple[Any, ...]) -> bool:
        """Hand the connection to a job free at this moment; False when none is."""
        job_id = entry.rules.acquire()
        if job_id is None or not await self.send_to_job(entry, listener, job_id, sock, addr):
            return False  # the socket stays open for hand_off
        sock.close()  # the job has its own copy now
        return True

    async def send_to_job(self, entry: EntryRuntime, listener: str, job_id: int,
                          sock: trio.socket.SocketType, addr: tuple[Any, ...]) -> bool:
        """Pass the socket to an acquired job; False (slot given back) if that job is gone."""
        job = self.pools.job(entry, job_id)
        if job is None:
            return False
        self.conn_ids += 1
        conn_id = self.conn_ids
        peer_ip = str(addr[0])
        job.conns.add(conn_id)
        self.peers[conn_id] = (listener, peer_ip)
        assert job.channel is not None
        try:
            await job.channel.send(Assign(conn_id=conn_id, peer_ip=peer_ip,
                                          peer_port=int(addr[1]),
                                          listener=listener,
                                          auth_failures=self.logins.recent(peer_ip)),
                                   fd=sock.fileno())
        except ChannelClosed:
            # The job died between acquire and send.
            job.conns.discard(conn_id)
            self.peers.pop(conn_id, None)
            entry.rules.cancel(job_id)
            return False
        self.record("JH", job.name, entry=entry.name, ip=peer_ip, connection_id=conn_id)
        entry.poke()
        return True

    async def hand_off(self, entry: EntryRuntime, listener: str, sock: trio.socket.SocketType,
                       addr: tuple[Any, ...]) -> None:
        try:
            if not await self._hand_off(entry, listener, sock, addr):
                self.uncount(listener, str(addr[0]))
        finally:
            self.waiting[entry.name] -= 1

    async def _hand_off(self, entry: EntryRuntime, listener: str,
                        sock: trio.socket.SocketType, addr: tuple[Any, ...]) -> bool:
        """Held until a job takes it (True) or it is refused or gone (False)."""
        peer_ip = str(addr[0])
        with sock:
            while True:
                job_id, waited, gone = await self.pools.acquire(
                    entry, entry.rules.params.wait_timeout, sock)
                if job_id is not None:
                    if await self.send_to_job(entry, listener, job_id, sock, addr):
                        return True
                    continue  # that job died meanwhile: try another
                if gone:
                    # Not a rejection: nothing was refused and no 421 went out (a TCP probe,
                    # a client that gave up). Counted apart, not journaled as JR.
                    entry.rules.request_abandoned(waited)
                    return False
                entry.rules.request_rejected(waited)
                if waited is not None:
                    why = f"no job free within wait_timeout ({waited:.1f}s)"
                else:
                    why = "at the maximum, wait off"
                self.record("JR", entry=entry.name, ip=peer_ip, detail=why)
                self.activity.refused(421, why, listener, peer_ip)
                with trio.move_on_after(5):
                    try:
                        await sock.send(entry.role.busy_reply)
                    except OSError:
                        pass
                return False

    def session_ended(self, job: JobHandle, conn_id: int) -> None:
        if conn_id in job.conns:
            job.conns.discard(conn_id)
            job.entry.rules.release(job.id)
            job.entry.poke()
        self.connection_gone(conn_id)

    def connection_gone(self, conn_id: int) -> None:
        peer = self.peers.pop(conn_id, None)
        if peer is not None:
            self.uncount(*peer)

    def job_exited(self, job: JobHandle) -> None:
        """Its sessions ended with it."""
        for conn_id in job.conns:
            self.connection_gone(conn_id)
