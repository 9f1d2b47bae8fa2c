"""The supervisor: one Trio process that owns the listeners, the pools and the journal.

Modelled on gunicorn's arbiter: signal handlers only enqueue; one manager pass per pool
reaps, kills silent jobs and sizes the pool by the CHGPJE rules (mailpool.supervisor.pool).
Connections are handed to jobs over their control channels (SCM_RIGHTS); queue pools get
queue ids from the dispatcher. Jobs send journal entries here: the single journal writer.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import msgspec
import trio

from mailpool.admin.server import serve_admin
from mailpool.config import (
    ConfigError,
    LoadedConfig,
    PoolParams,
    dump_snapshot,
    load_config,
    parse_hostport,
)
from mailpool.framework.spool import Spool
from mailpool.fsutil import raise_fd_limit
from mailpool.journal.writer import JournalWriter, NullJournal
from mailpool.supervisor.channel import (
    Assign,
    AuthCount,
    AuthFailed,
    Channel,
    ChannelClosed,
    Drain,
    Heartbeat,
    Journal,
    Ready,
    SessionEnded,
    SessionStarted,
    SyncRequest,
    ToSupervisor,
    Work,
    WorkDone,
    socketpair,
)
from mailpool.supervisor.control import serve_control
from mailpool.supervisor.group_commit import GroupCommit
from mailpool.supervisor.pool import Plan, PoolEntry
from mailpool.supervisor.workqueue import WorkQueue

SUPERVISOR = "supervisor"
BUSY_REPLY = b"421 4.3.2 Service not available, closing transmission channel\r\n"
AUTH_FAILURE_MEMORY = 900.0
MANAGE_COALESCE = 0.01
# A framework pass that failed (e.g. a sync error) is tried again after this long.
WORK_RETRY_DELAY = 30.0
# At most this many messages go to a framework job at once (they share one group commit).
WORK_BATCH = 32
POP_BUSY_REPLY = b"-ERR [SYS/TEMP] service not available, try again later\r\n"


def log(message: str) -> None:
    print(f"mailpool: {message}", file=sys.stderr, flush=True)


class JobHandle:
    def __init__(self, job_id: int, entry: EntryRuntime) -> None:
        self.id = job_id
        self.entry = entry
        self.name = f"{entry.name}/{job_id}"
        self.process: trio.Process | None = None
        self.channel: Channel | None = None
        self.conns: set[int] = set()
        self.work: set[str] = set()
        self.killed_for: str | None = None
        self.pending_drain: str | None = None


class EntryRuntime:
    """One prestart job entry: its rules, its jobs, and waiters for a free job."""

    def __init__(self, name: str, params: PoolParams, listener: str | None) -> None:
        self.name = name
        self.rules = PoolEntry(name, params, trio.current_time)
        self.listener = listener
        self.jobs: dict[int, JobHandle] = {}
        self.changed = trio.Event()   # set when a job frees up or the pool changes
        self.wake = trio.Event()      # wakes this entry's manager pass
        self.throttled = False

    def poke(self) -> None:
        self.changed.set()
        self.changed = trio.Event()
        self.wake.set()


class Supervisor:
    def __init__(self, loaded: LoadedConfig) -> None:
        self.loaded = loaded
        self.config_generation = 0
        self.snapshot_path = loaded.run_dir / "config-0.json"
        self.journal: JournalWriter | NullJournal
        self.entries: dict[str, EntryRuntime] = {}
        self.conn_ids = itertools.count(1)
        self.work = WorkQueue()
        self.commits = GroupCommit(loaded.spool_dir, self.on_durable)
        self.stopping = False
        self.spool = Spool(loaded.spool_dir)
        self.listeners: dict[str, trio.socket.SocketType] = {}
        self.started = time.time()
        self.listen_scope = trio.CancelScope()
        self.admin_address: str | None = None
        # Failed POP logins per peer address, forgotten after AUTH_FAILURE_MEMORY quiet seconds.
        self.auth_failures: dict[str, tuple[int, float]] = {}

    # --- journal -----------------------------------------------------------------------

    def record(self, code: str, job: str = SUPERVISOR, time_ns: int | None = None,
               **fields: Any) -> None:
        try:
            self.journal.write(code, job, {k: v for k, v in fields.items() if v is not None},
                               time_ns=time_ns)
        except (ValueError, OSError) as exc:
            # The journal is a side channel: a bad entry or a full disk must not stop mail.
            log(f"journal: cannot write {code} from {job}: {exc}")

    # --- start-up ------------------------------------------------------------------------

    def write_snapshot(self) -> None:
        run = self.loaded.run_dir
        run.mkdir(parents=True, exist_ok=True)
        path = run / f"config-{self.config_generation}.json"
        path.write_bytes(dump_snapshot(self.loaded))
        self.snapshot_path = path

    async def bind(self, name: str, address: str) -> trio.socket.SocketType:
        host, port = parse_hostport(address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await sock.bind((host, port))
        sock.listen(512)
        self.listeners[name] = sock
        return sock

    def listen_addresses(self) -> dict[str, str]:
        out = {}
        for name, sock in self.listeners.items():
            host, port = sock.getsockname()[:2]
            out[name] = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return out

    def write_listen_file(self) -> None:
        info: dict[str, Any] = self.listen_addresses()
        if self.admin_address:
            info["admin"] = self.admin_address
        info["pid"] = os.getpid()
        tmp = self.loaded.run_dir / "listen.json.tmp"
        tmp.write_text(json.dumps(info))
        tmp.rename(self.loaded.run_dir / "listen.json")

    async def run(self) -> int:
        cfg = self.loaded.config
        for sub in ("spool", "mailboxes", "journal", "run"):
            (self.loaded.data_dir / sub).mkdir(parents=True, exist_ok=True)
        if cfg.journal.enabled:
            self.journal = JournalWriter(self.loaded.journal_dir,
                                         max_receiver_bytes=cfg.journal.receiver_max_bytes)
        else:
            self.journal = NullJournal()
        self.journal.open()
        self.write_snapshot()
        try:
            await self.bind("smtp", cfg.listen.smtp)
            await self.bind("pop3", cfg.listen.pop3)
        except OSError as exc:
            log(f"cannot listen: {exc.strerror or exc}")
            self.journal.close()
            return 1
        self.write_listen_file()
        # A crash during DATA leaves only a temp file: it was never accepted.
        removed = self.spool.cleanup_tmp(max_age=0)
        for queue_id in self.spool.list("incoming"):
            self.work.put(queue_id, again=True)  # left by a stop or crash: maybe half done
        listeners = {"smtp-server": "smtp", "pop-server": "pop3", "framework": None}
        for name, listener in listeners.items():
            self.entries[name] = EntryRuntime(name, cfg.pool[name], listener)
        log(f"started pid {os.getpid()}: smtp {cfg.listen.smtp}, pop3 {cfg.listen.pop3}, "
            f"data {self.loaded.data_dir} ({len(self.work)} queued, "
            f"{removed} partial removed)")
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self.signals)
                await nursery.start(serve_control, self.loaded.control_socket, self.control)
                host, port = parse_hostport(cfg.listen.admin)
                try:
                    bound = await nursery.start(serve_admin, self, host, port)
                except OSError as exc:
                    log(str(exc))
                    nursery.cancel_scope.cancel()
                    return 1
                self.admin_address = (f"[{bound[0]}]:{bound[1]}" if ":" in bound[0]
                                      else f"{bound[0]}:{bound[1]}")
                self.write_listen_file()
                nursery.start_soon(self.journal_syncer)
                nursery.start_soon(self.commits.run)
                for entry in self.entries.values():
                    nursery.start_soon(self.manage, entry)
                nursery.start_soon(self.accept_loops)
                nursery.start_soon(self.dispatch_work)
        finally:
            self.journal.close()
        log("stopped")
        return 0

    async def accept_loops(self) -> None:
        with self.listen_scope:
            async with trio.open_nursery() as nursery:
                for entry in self.entries.values():
                    if entry.listener is not None:
                        nursery.start_soon(self.accept_loop, entry,
                                           self.listeners[entry.listener])
        for sock in self.listeners.values():
            sock.close()

    # --- signals, drain and reload --------------------------------------------------------

    async def signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for signum in sigs:
                if signum == signal.SIGHUP:
                    self.reload()
                else:
                    await self.drain_and_exit()
                    return

    def reload(self) -> None:
        try:
            new = load_config(self.loaded.path)
        except ConfigError as exc:
            log(f"reload refused, keeping the running configuration: {exc}")
            return
        self.loaded = new
        self.config_generation += 1
        self.write_snapshot()
        for name, entry in self.entries.items():
            entry.rules.change(new.config.pool[name])
            entry.rules.reload()  # the next plan drains the old jobs and starts new ones
            entry.poke()
        log(f"configuration reloaded from {new.path}; old jobs drain")

    async def send_drain(self, job: JobHandle, reason: str) -> None:
        if job.channel is None:
            job.pending_drain = reason  # still starting: sent as soon as its channel exists
            return
        try:
            await job.channel.send(Drain(reason=reason))
        except ChannelClosed:
            pass

    async def drain_and_exit(self) -> None:
        log("draining: listeners closed, sessions finish, jobs end")
        self.stopping = True
        self.listen_scope.cancel()
        # Work already dispatched completes; nothing new is handed out.
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
        self.nursery.cancel_scope.cancel()

    # --- jobs ------------------------------------------------------------------------------

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
                log(f"{job.name}: cannot start: {exc}")
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
            self.record("JE", job.name, entry=entry.name, pid=pid, detail=why,
                        reason=f"exit status {status}")
            for queue_id in job.work:
                # The message is still in its queue: hand it to another job.
                self.work.put(queue_id, again=True)
            entry.poke()

    def write_entries(self, job: JobHandle, entries: list[tuple[str, int, bytes]]) -> None:
        if not entries:
            return
        try:
            self.journal.write_encoded(job.name, entries)
        except OSError as exc:
            log(f"journal: cannot write entries from {job.name}: {exc}")

    async def on_message(self, job: JobHandle, msg: Any) -> None:
        entry = job.entry
        if isinstance(msg, Journal):
            self.write_entries(job, msg.entries)
        elif isinstance(msg, Heartbeat):
            entry.rules.heartbeat(job.id)
        elif isinstance(msg, SessionStarted):
            pass  # the slot was booked at hand-off; the job's own count is informational
        elif isinstance(msg, SessionEnded):
            if msg.conn_id in job.conns:
                job.conns.discard(msg.conn_id)
                entry.rules.release(job.id)
                entry.poke()
        elif isinstance(msg, WorkDone):
            self.write_entries(job, msg.entries)
            if any(queue_id in job.work for queue_id, _ in msg.results):
                entry.rules.release(job.id)  # one batch, one slot
                entry.poke()
            for queue_id, ok in msg.results:
                job.work.discard(queue_id)
                self.work.done(queue_id)
                if not ok:
                    self.nursery.start_soon(self.retry_later, queue_id)
        elif isinstance(msg, SyncRequest):
            self.commits.request(job, job.channel, msg)
        elif isinstance(msg, AuthFailed):
            count = self.recent_failures(msg.ip) + 1
            self.auth_failures[msg.ip] = (count, trio.current_time())
            try:
                await job.channel.send(AuthCount(token=msg.token, failures=count))
            except ChannelClosed:
                pass
        elif isinstance(msg, Ready):
            entry.rules.job_ready(job.id)
            entry.poke()

    async def execute(self, entry: EntryRuntime, plan: Plan) -> None:
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

    # --- connections -------------------------------------------------------------------------

    async def accept_loop(self, entry: EntryRuntime, listener: trio.socket.SocketType) -> None:
        while True:
            try:
                sock, addr = await listener.accept()
            except OSError as exc:
                log(f"accept on {entry.listener}: {exc}")
                await trio.sleep(0.1)  # EMFILE and friends: back off, do not spin
                continue
            # The common case, a job free now, is handled right here; only a connection
            # that must wait (or be refused) gets a task of its own.
            if not await self.assign_now(entry, sock, addr):
                self.nursery.start_soon(self.hand_off, entry, sock, addr)

    async def assign_now(self, entry: EntryRuntime, sock: trio.socket.SocketType,
                         addr: tuple[Any, ...]) -> bool:
        """Hand the connection to a job free at this moment; False when none is."""
        job_id = entry.rules.acquire()
        if job_id is None or not await self.send_to_job(entry, job_id, sock, addr):
            return False  # the socket stays open for hand_off
        sock.close()  # the job has its own copy now
        return True

    async def send_to_job(self, entry: EntryRuntime, job_id: int, sock: trio.socket.SocketType,
                          addr: tuple[Any, ...]) -> bool:
        """Pass the socket to an acquired job; False (slot given back) if that job is gone."""
        job = entry.jobs.get(job_id)
        if job is None or job.channel is None:
            entry.rules.cancel(job_id)
            return False
        conn_id = next(self.conn_ids)
        peer_ip = str(addr[0])
        job.conns.add(conn_id)
        try:
            await job.channel.send(Assign(conn_id=conn_id, peer_ip=peer_ip,
                                          peer_port=int(addr[1]),
                                          listener=entry.listener or "",
                                          auth_failures=self.recent_failures(peer_ip)),
                                   fd=sock.fileno())
        except ChannelClosed:
            # The job died between acquire and send.
            job.conns.discard(conn_id)
            entry.rules.cancel(job_id)
            return False
        self.record("JH", job.name, entry=entry.name, ip=peer_ip, connection_id=conn_id)
        entry.poke()
        return True

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

    async def hand_off(self, entry: EntryRuntime, sock: trio.socket.SocketType,
                       addr: tuple[Any, ...]) -> None:
        peer_ip = str(addr[0])
        with sock:
            while True:
                job_id, waited, gone = await self.acquire(
                    entry, entry.rules.params.wait_timeout, sock)
                if job_id is not None:
                    if await self.send_to_job(entry, job_id, sock, addr):
                        return
                    continue  # that job died meanwhile: try another
                entry.rules.request_rejected(waited)
                if gone:
                    why = "client left while waiting"
                elif waited is not None:
                    why = f"no job free within wait_timeout ({waited:.1f}s)"
                else:
                    why = "at the maximum, wait off"
                self.record("JR", entry=entry.name, ip=peer_ip, detail=why)
                if gone:
                    return
                busy = POP_BUSY_REPLY if entry.name == "pop-server" else BUSY_REPLY
                with trio.move_on_after(5):
                    try:
                        await sock.send(busy)
                    except OSError:
                        pass
                return

    def recent_failures(self, ip: str) -> int:
        count, last = self.auth_failures.get(ip, (0, 0.0))
        if count and trio.current_time() - last > AUTH_FAILURE_MEMORY:
            del self.auth_failures[ip]
            return 0
        return count

    # --- queue dispatcher (incoming -> framework jobs) -----------------------------------------

    def on_durable(self, job: JobHandle, req: SyncRequest) -> None:
        """A job's group commit is done: its journal entries and hand-overs take effect."""
        self.write_entries(job, req.entries)
        for queue, queue_id in req.queued:
            if queue == "incoming":
                self.work.put(queue_id)

    async def retry_later(self, queue_id: str) -> None:
        await trio.sleep(WORK_RETRY_DELAY)
        self.work.put(queue_id, again=True)

    async def dispatch_work(self) -> None:
        entry = self.entries["framework"]
        while True:
            first = await self.work.get()
            while True:
                job_id, _, _ = await self.acquire(entry, None)
                if job_id is None:
                    await entry.changed.wait()
                    continue
                job = entry.jobs.get(job_id)
                if job is None or job.channel is None:
                    entry.rules.cancel(job_id)
                    continue
                # Whatever else is waiting by now goes in the same batch: one message,
                # one group commit and one answer for all of them.
                items = [first, *self.work.take(WORK_BATCH - 1)]
                job.work.update(queue_id for queue_id, _ in items)
                try:
                    await job.channel.send(Work(items=items))
                except ChannelClosed:
                    job.work.difference_update(queue_id for queue_id, _ in items)
                    entry.rules.cancel(job_id)
                    for queue_id, _ in items[1:]:
                        self.work.put(queue_id, again=True)
                    first = (first[0], True)
                    continue
                break

    # --- journal housekeeping -------------------------------------------------------------------

    async def journal_syncer(self) -> None:
        interval = self.loaded.config.journal.sync_interval
        while True:
            await trio.sleep(interval)
            # fdatasync can take a while on a busy disk: not on the supervisor's loop.
            await trio.to_thread.run_sync(self.journal.sync)
            now = trio.current_time()
            for ip in [ip for ip, (_, last) in self.auth_failures.items()
                       if now - last > AUTH_FAILURE_MEMORY]:
                del self.auth_failures[ip]

    # --- admin console source (mailpool.admin.app.AdminSource) -------------------------------

    def pool_stats(self) -> dict[str, dict[str, Any]]:
        return {name: e.rules.stats() for name, e in self.entries.items()}

    def queue_counts(self) -> dict[str, int]:
        # Runs in a worker thread (directory listing): filesystem only, no Trio objects.
        return {q: len(self.spool.list(q)) for q in Spool.QUEUES}

    def status(self) -> dict[str, Any]:
        listen = self.listen_addresses()
        if self.admin_address:
            listen["admin"] = self.admin_address
        return {"pid": os.getpid(), "started": self.started, "listen": listen}

    async def change_pool(self, entry: str, changes: dict[str, Any]) -> dict[str, Any]:
        return await self.control({"op": "pool-change", "entry": entry, "changes": changes})

    # --- control endpoint (pool show / change, journal rotate) -----------------------------------

    async def control(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "pool-show":
            return {"entries": self.pool_stats()}
        if op == "pool-change":
            name = req["entry"]
            entry = self.entries.get(name)
            if entry is None:
                return {"error": f"unknown pool entry {name!r} (known: {', '.join(self.entries)})"}
            current = msgspec.structs.asdict(entry.rules.params)
            unknown = set(req["changes"]) - set(current)
            if unknown:
                return {"error": f"unknown key(s) {', '.join(sorted(unknown))}"}
            try:
                params = msgspec.convert({**current, **req["changes"]}, PoolParams)
            except msgspec.ValidationError as exc:
                return {"error": f"{name}: {exc}"}
            problems = params.problems()
            if problems:
                key, value, why = problems[0]
                return {"error": f"{name}: {key}: {value!r}: {why}"}
            entry.rules.change(params)
            self.record("JC", entry=name, detail=json.dumps(req["changes"], sort_keys=True))
            entry.poke()
            return {"entry": name, "stats": entry.rules.stats()}
        if op == "journal-rotate":
            if isinstance(self.journal, NullJournal):
                return {"error": "journaling is turned off ([journal] enabled = false)"}
            return {"path": str(self.journal.rotate())}
        if op == "status":
            return self.status()
        return {"error": f"unknown op {op!r}"}


def serve(loaded: LoadedConfig) -> int:
    raise_fd_limit()
    return trio.run(Supervisor(loaded).run)
