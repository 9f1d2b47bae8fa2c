"""Job processes and their pools: start, reap, kill silent jobs, size each pool by its rules.

One EntryRuntime per prestart job entry (a row of mailpool.roles). Its manager task runs one
pass of the CHGPJE rules (mailpool.supervisor.pool) per wake-up and executes the plan; each
job runs as a task that starts the process, reads its control channel and reaps it. What the
job says is passed to the supervisor's message switch; nothing here knows what a role does.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from mailpool.config import PoolParams
from mailpool.fsutil import session_limit
from mailpool.roles import Role
from mailpool.supervisor.channel import Channel, ChannelClosed, Drain, ToSupervisor, socketpair
from mailpool.supervisor.pool import Plan, PoolEntry

log = logging.getLogger("mailpool.supervisor")

MANAGE_COALESCE = 0.01
Record = Callable[..., None]


def exit_text(status: int | None) -> str:
    """A process's end as an administrator reads it: `exit status 1`, `killed by signal 9
    (SIGKILL)` (a negative return code is the signal that ended it)."""
    if status is None:
        return "not started"
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = "unknown signal"
        return f"killed by signal {-status} ({name})"
    return f"exit status {status}"


class JobHandle:
    def __init__(self, job_id: int, entry: EntryRuntime) -> None:
        self.id = job_id
        self.entry = entry
        self.name = f"{entry.name}/{job_id}"
        self.process: trio.Process | None = None
        self.channel: Channel | None = None
        self.conns: set[int] = set()
        self.work: set[str] = set()  # queue ids handed to this job and not yet answered
        self.killed_for: str | None = None
        self.pending_drain: str | None = None


class EntryRuntime:
    """One prestart job entry: its role, its rules, its jobs, and waiters for a free job."""

    def __init__(self, role: Role, params: PoolParams) -> None:
        self.role = role
        self.name = role.name
        self.rules = PoolEntry(role.name, params, trio.current_time,
                               session_limit=session_limit())
        self.jobs: dict[int, JobHandle] = {}
        self.changed = trio.Event()   # set when a job frees up or the pool changes
        self.wake = trio.Event()      # wakes this entry's manager pass
        self.throttled = False

    def poke(self) -> None:
        self.changed.set()
        self.changed = trio.Event()
        self.wake.set()


OnMessage = Callable[[JobHandle, Any], Awaitable[None]]
OnExit = Callable[[JobHandle], None]


class JobPools:
    def __init__(self, record: Record, on_message: OnMessage, on_exit: OnExit) -> None:
        self.entries: dict[str, EntryRuntime] = {}
        self.record = record
        self.on_message = on_message
        self.on_exit = on_exit
        self.snapshot_path = Path()
        self.stopping = False
        self.nursery: trio.Nursery | None = None

    def add(self, role: Role, params: PoolParams) -> EntryRuntime:
        entry = self.entries[role.name] = EntryRuntime(role, params)
        return entry

    def start(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        for entry in self.entries.values():
            nursery.start_soon(self.manage, entry)

    def job(self, entry: EntryRuntime, job_id: int) -> JobHandle | None:
        """The job acquire() booked, if it can still take work; else the booking is undone."""
        job = entry.jobs.get(job_id)
        if job is None or job.channel is None:
            entry.rules.cancel(job_id)
            return None
        return job

    # --- processes ---------------------------------------------------------------------

    async def run_job(self, entry: EntryRuntime, job_id: int) -> None:
        job = JobHandle(job_id, entry)
        entry.jobs[job_id] = job
        parent, child = socketpair()
        crashed = True
        try:
            try:
                job.process = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "mailpool.jobs.main", entry.name, str(job_id),
                     str(child.fileno()), str(self.snapshot_path)],
                    pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL)
            except OSError as exc:
                log.error("%s: cannot start: %s", job.name, exc)
                return
            finally:
                child.close()
            job.channel = Channel(trio.socket.from_stdlib_socket(parent), ToSupervisor)
            self.record("JS", job.name, entry=entry.name, pid=job.process.pid)
            if job.pending_drain or self.stopping:
                await self.send_drain(job, job.pending_drain or "drain")
            try:
                while True:
                    msg, fd = await job.channel.receive()
                    if fd is not None:
                        os.close(fd)
                    await self.on_message(job, msg)
            except ChannelClosed:
                pass
            with trio.move_on_after(5):
                await job.process.wait()
            if job.process.returncode is None:
                job.process.kill()
                await job.process.wait()
            crashed = job.process.returncode != 0 or job.killed_for is not None
        finally:
            parent.close()
            if job.process is not None and job.process.returncode is None:
                # Cancelled (shutdown) before the job was reaped: reap it now, briefly.
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    job.process.kill()
                    await job.process.wait()
            del entry.jobs[job_id]
            why = entry.rules.job_exited(job_id, crashed)
            if job.killed_for:
                why = job.killed_for
            pid = job.process.pid if job.process else None
            status = job.process.returncode if job.process else None
            ended = exit_text(status)
            self.record("JE", job.name, entry=entry.name, pid=pid, detail=why, reason=ended)
            if crashed:
                log.warning("%s (pid %s) ended: %s (%s)", job.name, pid, ended, why)
            self.on_exit(job)
            entry.poke()

    async def send_drain(self, job: JobHandle, reason: str) -> None:
        if job.channel is None:
            job.pending_drain = reason  # still starting: sent as soon as its channel exists
            return
        try:
            await job.channel.send(Drain(reason=reason))
        except ChannelClosed:
            pass

    async def execute(self, entry: EntryRuntime, plan: Plan) -> None:
        assert self.nursery is not None
        for _ in range(plan.spawn):
            job_id = entry.rules.job_spawned()
            self.nursery.start_soon(self.run_job, entry, job_id)
        for job_id, reason in plan.drain:
            job = entry.jobs.get(job_id)
            if job is not None:
                await self.send_drain(job, reason)
        for job_id, reason in plan.kill:
            job = entry.jobs.get(job_id)
            if job is not None and job.process is not None:
                job.killed_for = reason
                job.process.kill()
        if plan.spawn_blocked_until is not None and not entry.throttled:
            entry.throttled = True
            delay = plan.spawn_blocked_until - trio.current_time()
            self.record("JT", entry=entry.name, detail=f"restart delayed {delay:.1f}s")
        elif plan.spawn_blocked_until is None:
            entry.throttled = False

    async def manage(self, entry: EntryRuntime) -> None:
        """One pass of the rules per wake-up: reap, kill silent jobs, size the pool."""
        await self.execute(entry, entry.rules.start())
        while not self.stopping:
            entry.wake = trio.Event()
            plan = entry.rules.plan()
            await self.execute(entry, plan)
            deadline = plan.wake_at if plan.wake_at is not None else trio.current_time() + 1.0
            with trio.move_on_at(min(deadline, trio.current_time() + 1.0)):
                await entry.wake.wait()
            # Under load every session pokes the manager; one pass per short interval sees
            # them all (job start-up takes far longer than this).
            await trio.sleep(MANAGE_COALESCE)

    async def drain_all(self) -> None:
        """Drain every pool (shutdown); kill what is left after the longest drain timeout."""
        self.stopping = True
        longest = max(e.rules.params.drain_timeout for e in self.entries.values())
        for entry in self.entries.values():
            entry.rules.shutdown()
            await self.execute(entry, entry.rules.plan())
            entry.poke()
        with trio.move_on_after(longest + 5):
            while any(e.jobs for e in self.entries.values()):
                await trio.sleep(0.05)
        for entry in self.entries.values():
            for job in entry.jobs.values():
                if job.process is not None:
                    job.process.kill()

    # --- waiting for a free job ----------------------------------------------------------

    async def acquire(self, entry: EntryRuntime, timeout: float | None,
                      sock: trio.socket.SocketType | None = None
                      ) -> tuple[int | None, float | None, bool]:
        """A job with a free slot, now or once one frees up within `timeout` (None: forever).

        Returns (job id or None, seconds waited or None when the request was never held,
        whether the client hung up while it waited). A held connection is watched: one
        whose client leaves is dropped rather than handed to a job later, where it would
        only keep live clients waiting behind it.
        """
        job_id = entry.rules.acquire()
        if job_id is not None or not entry.rules.can_wait():
            return job_id, None, False
        start = trio.current_time()
        entry.rules.request_waiting()
        self.record("JW", entry=entry.name)
        entry.poke()
        gone = False

        async def watch_client(scope: trio.CancelScope) -> None:
            nonlocal gone
            assert sock is not None
            await trio.lowlevel.wait_readable(sock)
            try:
                early = await sock.recv(1, socket.MSG_PEEK)
            except OSError:
                early = b""
            if not early:  # EOF or reset: nobody to serve
                gone = True
                scope.cancel()

        with trio.move_on_after(timeout if timeout is not None else math.inf):
            async with trio.open_nursery() as nursery:
                if sock is not None:
                    nursery.start_soon(watch_client, nursery.cancel_scope)
                while job_id is None and not self.stopping:
                    await entry.changed.wait()
                    job_id = entry.rules.acquire()
                nursery.cancel_scope.cancel()
        waited = trio.current_time() - start
        if job_id is not None:
            entry.rules.request_served(waited)
        return job_id, waited, gone

    def stats(self) -> dict[str, dict[str, Any]]:
        return {name: e.rules.stats() for name, e in self.entries.items()}
