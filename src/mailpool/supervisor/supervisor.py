"""The supervisor: one Trio process that owns the listeners, the pools, the queues and the journal.

Modelled on gunicorn's arbiter: signal handlers only enqueue; one manager pass per pool reaps,
kills silent jobs and sizes the pool by the CHGPJE rules. This module is the wiring: start-up
and recovery, signals (drain, reload), and the message switch that routes what each job says
to the part that owns it: pools (mailpool.supervisor.jobs), connection hand-off (handoff),
queue feeding (dispatch, outbound), group commit, login limits and control ops. Jobs send
journal entries here: the single journal writer.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import signal
import socket
import time
from typing import Any

import trio

from mailpool.admin.server import serve_admin
from mailpool.config import (
    POP_LISTENERS,
    SMTP_LISTENERS,
    ConfigError,
    LoadedConfig,
    dump_snapshot,
    load_config,
    parse_hostport,
)
from mailpool.config import pool_params as effective_pool
from mailpool.framework.spool import Spool, SpoolError
from mailpool.fsutil import raise_fd_limit
from mailpool.journal.writer import JournalWriter, NullJournal
from mailpool.logs import setup as setup_logging
from mailpool.outbound.destinations import DestinationLimits, Destinations
from mailpool.outbound.state import (
    OUTBOUND_QUEUES,
    destinations,
    load_state,
)
from mailpool.roles import ROLES, for_queue
from mailpool.storage import SpaceCheck
from mailpool.supervisor.admin_view import ActivityTotals, AdminView, watch_problems
from mailpool.supervisor.anvil import ClientLimits
from mailpool.supervisor.channel import (
    ActivityReport,
    AuthCount,
    AuthFailed,
    ChannelClosed,
    Delivered,
    Flush,
    Flushed,
    Heartbeat,
    Journal,
    OutboundItem,
    Ready,
    SendEtrn,
    SessionEnded,
    SyncRequest,
    WorkDone,
)
from mailpool.supervisor.control import serve_control
from mailpool.supervisor.dispatch import WorkDispatcher
from mailpool.supervisor.group_commit import GroupCommit
from mailpool.supervisor.handoff import HandOff
from mailpool.supervisor.instance import AlreadyServing, hold_data_directory
from mailpool.supervisor.jobs import JobHandle, JobPools
from mailpool.supervisor.limits import LoginFailures
from mailpool.supervisor.ops import ControlOps
from mailpool.supervisor.outbound import OutboundDispatcher
from mailpool.supervisor.privileges import PrivilegeError, drop_to

SUPERVISOR = "supervisor"
# An attempt that broke off (a bug, an I/O error) is looked at again after this long.
FAILED_RETRY_DELAY = 30.0
log = logging.getLogger("mailpool.supervisor")


class Supervisor:
    def __init__(self, loaded: LoadedConfig) -> None:
        self.loaded = loaded
        self.config_generation = 0
        self.journal: JournalWriter | NullJournal = NullJournal()
        self.spool = Spool(loaded.spool_dir)
        self.listeners: dict[str, trio.socket.SocketType] = {}
        self.started = time.time()
        self.activity = ActivityTotals()  # mail flow for /metrics and the console
        watch_problems(self.activity)
        self.admin_address: str | None = None
        self.logins = LoginFailures(trio.current_time)
        self.pools = JobPools(self.record, self.on_message, self.on_job_exit)
        smtp = loaded.config.smtp
        # One count per client address across every SMTP listener.
        smtp_limits = ClientLimits(max_connections=smtp.max_connections_per_client,
                                   max_rate=smtp.max_connection_rate,
                                   exceptions=smtp.client_limit_exceptions,
                                   clock=trio.current_time)
        self.handoff = HandOff(self.pools, self.logins, self.record,
                               dict.fromkeys(SMTP_LISTENERS, smtp_limits), self.activity)
        self.commits = GroupCommit(loaded.spool_dir, self.on_durable)
        self.control = ControlOps(self)
        cfg = loaded.config
        for role in ROLES:
            rules = self.pools.add(role, effective_pool(cfg, role.name)).rules
            if rules.capped:
                log.warning("pool.%s.sessions_per_job %d is more than a job's open files "
                            "limit allows: %d sessions per job (raise the limit, e.g. "
                            "systemd LimitNOFILE=, or lower sessions_per_job)", role.name,
                            rules.configured.sessions_per_job, rules.params.sessions_per_job)
        # The roles fed by the incoming and the outbound queue (mailpool.roles).
        self.work = WorkDispatcher(self.pools, self.pools.entries[for_queue("incoming").name])
        out = cfg.outbound
        self.outbound = OutboundDispatcher(
            self.pools, self.pools.entries[for_queue("outbound").name],
            Destinations(DestinationLimits(initial=out.initial_destination_concurrency,
                                           maximum=out.destination_concurrency_limit,
                                           dead_pause=out.dead_destination_pause),
                         trio.current_time),
            self.record)

    # --- journal -----------------------------------------------------------------------

    def record(self, code: str, job: str = SUPERVISOR, time_ns: int | None = None,
               **fields: Any) -> None:
        try:
            self.journal.write(code, job, {k: v for k, v in fields.items() if v is not None},
                               time_ns=time_ns)
        except (ValueError, OSError) as exc:
            # The journal is a side channel: a bad entry or a full disk must not stop mail.
            log.error("journal: cannot write %s from %s: %s", code, job, exc)

    def write_entries(self, job: JobHandle, entries: list[tuple[str, int, bytes]]) -> None:
        if not entries:
            return
        try:
            self.journal.write_encoded(job.name, entries)
        except OSError as exc:
            log.error("journal: cannot write entries from %s: %s", job.name, exc)

    # --- start-up ------------------------------------------------------------------------

    def write_snapshot(self) -> None:
        run = self.loaded.run_dir
        run.mkdir(parents=True, exist_ok=True)
        path = run / f"config-{self.config_generation}.json"
        path.write_bytes(dump_snapshot(self.loaded))
        self.pools.snapshot_path = path

    async def bind(self, name: str, address: str) -> None:
        host, port = parse_hostport(address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await sock.bind((host, port))
        sock.listen(512)
        self.listeners[name] = sock

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

    def recover(self) -> tuple[int, int]:
        """Rebuild the queues from the spool (runs before any job starts): returns (removed
        partial files, messages queued)."""
        removed = self.spool.cleanup_tmp(max_age=0)  # never acknowledged: discard
        queued = 0
        for queue_id in self.spool.list("incoming"):
            self.work.put(queue_id, again=True)  # left by a stop or crash: maybe half done
            queued += 1
        for queue in OUTBOUND_QUEUES:
            for queue_id in self.spool.list(queue):
                item = self.outbound_item(queue, queue_id)
                if item is not None:
                    self.outbound.add(item)
                    queued += 1
        return removed, queued

    def outbound_item(self, queue: str, queue_id: str) -> OutboundItem | None:
        """A queued outbound message as the dispatcher knows it, read from the spool."""
        router = self.loaded.config.outbound.router
        try:
            envelope = self.spool.load_envelope(queue, queue_id)
            state = load_state(self.spool, queue_id, len(envelope.recipients))
        except FileNotFoundError:
            return None
        except SpoolError as exc:
            log.error("outbound queue: %s (left in place)", exc)
            return None
        return OutboundItem(queue_id, queue, destinations(envelope, state, router),
                            state.next_attempt)

    async def reload_outbound(self, queue_id: str, delay: float = 0.0) -> None:
        """Put a message back on the dispatcher from wherever it now is on disk."""
        await trio.sleep(delay)

        def find() -> OutboundItem | None:
            queue = self.spool.find(queue_id)
            return self.outbound_item(queue, queue_id) if queue in OUTBOUND_QUEUES else None

        item = await trio.to_thread.run_sync(find)
        if item is not None:
            self.outbound.add(item)

    async def run(self) -> int:
        cfg = self.loaded.config
        try:
            self.lock_fd = hold_data_directory(self.loaded.data_dir)
        except AlreadyServing as exc:
            log.error("%s", exc)
            return 1
        for sub in ("spool", "journal", "run"):
            (self.loaded.data_dir / sub).mkdir(parents=True, exist_ok=True)
        self.loaded.mailbox_dir.mkdir(parents=True, exist_ok=True)
        if cfg.journal.enabled:
            self.journal = JournalWriter(self.loaded.journal_dir,
                                         max_receiver_bytes=cfg.journal.receiver_max_bytes)
        self.journal.open()
        self.write_snapshot()
        for name in (*SMTP_LISTENERS, *POP_LISTENERS):
            address = getattr(cfg.listen, name)
            if not address:
                continue  # an optional listener that is off
            try:
                await self.bind(name, address)
            except OSError as exc:
                log.error("cannot listen on %s (listen.%s): %s", address, name,
                          exc.strerror or exc)
                self.journal.close()
                return 1
        self.write_listen_file()
        removed, queued = self.recover()
        log.info("started pid %d: smtp %s, pop3 %s, data %s (%d queued, %d partial removed)",
                 os.getpid(), cfg.listen.smtp, cfg.listen.pop3, self.loaded.data_dir, queued,
                 removed)
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self.signals)
                nursery.start_soon(self.sample_load)
                await nursery.start(serve_control, self.loaded.control_socket, self.control)
                host, port = parse_hostport(cfg.listen.admin)
                try:
                    bound = await nursery.start(
                        functools.partial(serve_admin, token=cfg.admin.token), AdminView(self),
                        host, port)
                except OSError as exc:
                    log.error("%s", exc)
                    nursery.cancel_scope.cancel()
                    return 1
                self.admin_address = (f"[{bound[0]}]:{bound[1]}" if ":" in bound[0]
                                      else f"{bound[0]}:{bound[1]}")
                self.write_listen_file()
                # Every socket is bound: from here on no root (jobs inherit the user).
                try:
                    dropped = drop_to(cfg.host.user, self.loaded.data_dir)
                except (PrivilegeError, OSError) as exc:
                    log.error("%s", exc)
                    nursery.cancel_scope.cancel()
                    return 1
                if dropped:
                    log.info("%s", dropped)
                nursery.start_soon(self.housekeeping)
                nursery.start_soon(self.storage_watch)
                nursery.start_soon(self.commits.run)
                self.pools.start(nursery)
                nursery.start_soon(self.handoff.accept_loops, self.listeners)
                nursery.start_soon(self.work.run)
                nursery.start_soon(self.outbound.run)
                if cfg.etrn.interval > 0:
                    nursery.start_soon(self.etrn_scheduler)
        finally:
            self.journal.close()
        log.info("stopped")
        return 0

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
            log.error("reload refused, keeping the running configuration: %s", exc)
            return
        self.loaded = new
        setup_logging(cfg=new.config.log)
        watch_problems(self.activity)
        self.config_generation += 1
        self.write_snapshot()
        for name, entry in self.pools.entries.items():
            entry.rules.change(effective_pool(new.config, name))
            entry.rules.reload()  # the next plan drains the old jobs and starts new ones
            entry.poke()
        log.info("configuration reloaded from %s; old jobs drain", new.path)

    async def sample_load(self) -> None:
        """Once a second, sessions in use and requests waiting for the console's chart."""
        while True:
            await trio.sleep(1.0)
            in_use = waiting = 0
            for entry in self.pools.entries.values():
                stats = entry.rules.stats()
                in_use += stats["sessions"]["in_use"]
                waiting += stats["waiting"]["current"]
            self.activity.minutes.load(in_use=in_use, waiting=waiting)

    async def drain_and_exit(self) -> None:
        log.info("draining: listeners closed, sessions finish, jobs end")
        self.handoff.scope.cancel()
        # Work already dispatched completes; nothing new is handed out.
        await self.pools.drain_all()
        self.nursery.cancel_scope.cancel()

    # --- the message switch ------------------------------------------------------------------

    async def on_message(self, job: JobHandle, msg: Any) -> None:
        entry = job.entry
        if isinstance(msg, Journal):
            self.write_entries(job, msg.entries)
        elif isinstance(msg, Heartbeat):
            entry.rules.heartbeat(job.id)
        elif isinstance(msg, ActivityReport):
            self.activity.add(msg.tally, job.name)
        elif isinstance(msg, SessionEnded):
            self.handoff.session_ended(job, msg.conn_id)
        elif isinstance(msg, WorkDone):
            self.write_entries(job, msg.entries)
            self.work.done(job, msg, self.nursery)
            self.hand_over(msg.handed)
        elif isinstance(msg, Delivered):
            self.write_entries(job, msg.entries)
            self.outbound.delivered(job, msg)
            if msg.failed:
                self.nursery.start_soon(self.reload_outbound, msg.queue_id, FAILED_RETRY_DELAY)
        elif isinstance(msg, SyncRequest):
            self.commits.request(job, job.channel, msg)
        elif isinstance(msg, AuthFailed):
            await self.answer(job, AuthCount(token=msg.token, failures=self.logins.failed(msg.ip)))
        elif isinstance(msg, Flush):
            count = self.outbound.flush(domain=msg.domain, subdomains=msg.subdomains)
            await self.answer(job, Flushed(token=msg.token, count=count))
        elif isinstance(msg, Ready):
            entry.rules.job_ready(job.id)
            entry.poke()

    async def answer(self, job: JobHandle, reply: Any) -> None:
        if job.channel is None:
            return
        try:
            await job.channel.send(reply)
        except ChannelClosed:
            pass

    def hand_over(self, items: list[OutboundItem]) -> None:
        """Messages a job put on a queue (once durable): to the dispatcher that feeds it."""
        for item in items:
            if item.queue == "incoming":
                self.work.put(item.queue_id)
            else:
                self.outbound.add(item)

    def on_durable(self, job: JobHandle, req: SyncRequest) -> None:
        """A job's group commit is done: its journal entries and hand-overs take effect."""
        self.write_entries(job, req.entries)
        for queue, queue_id in req.queued:
            if queue == "incoming":
                self.work.put(queue_id)

    def on_job_exit(self, job: JobHandle) -> None:
        self.handoff.job_exited(job)
        if job.entry is self.work.entry:
            self.work.job_exited(job)
        elif job.entry is self.outbound.entry:
            self.outbound.job_exited(
                job, lambda queue_id: self.nursery.start_soon(self.reload_outbound, queue_id))

    # --- timers ----------------------------------------------------------------------------------

    async def storage_watch(self) -> None:
        """Put the busy queue back on the incoming queue (7M) once there is room again."""
        while True:
            storage = self.loaded.config.storage  # a reload may change it
            await trio.sleep(storage.check_interval)
            moved = await trio.to_thread.run_sync(
                self.resume_busy, SpaceCheck(self.loaded.data_dir, storage.min_free_mb))
            for queue_id, message_id in moved:
                self.record("7M", queue_id=queue_id, message_id=message_id,
                            detail="space reclaimed: back on the incoming queue")
                self.work.put(queue_id, again=True)

    def resume_busy(self, check: SpaceCheck) -> list[tuple[str, str]]:
        """In a worker thread (file system only): move the busy queue back when there is
        room; the (queue id, Message-ID) moved."""
        if check.low():
            return []
        moved = []
        for queue_id in self.spool.list("busy"):
            try:
                envelope = self.spool.load_envelope("busy", queue_id)
                self.spool.move(queue_id, "busy", "incoming", sync=False)
            except (FileNotFoundError, SpoolError):
                continue
            moved.append((queue_id, envelope.message_id))
        return moved

    async def housekeeping(self) -> None:
        interval = self.loaded.config.journal.sync_interval
        while True:
            await trio.sleep(interval)
            # fdatasync can take a while on a busy disk: not on the supervisor's loop.
            await trio.to_thread.run_sync(self.journal.sync)
            self.logins.expire()
            for limits in set(self.handoff.limits.values()):
                limits.expire()

    async def etrn_scheduler(self) -> None:
        """The source's scheduled delivery for a dial-up style link: every interval, deliver
        everything queued (to the router) and ask the router for our mail with ETRN."""
        cfg = self.loaded.config
        entry = self.outbound.entry
        domains = cfg.etrn.request_domains or cfg.host.local_domains
        # A random first delay spreads hosts started together.
        await trio.sleep(random.uniform(0.0, min(5.0, cfg.etrn.interval)))
        while True:
            count = self.outbound.flush()
            job_id = entry.rules.acquire()
            job = self.pools.job(entry, job_id) if job_id is not None else None
            if job is not None:
                entry.rules.cancel(job.id)  # a short errand: it takes no delivery slot
                await self.answer(job, SendEtrn(domains=list(domains)))
            log.info("scheduler: %d queued message(s) due; ETRN %s", count,
                     "sent for " + ", ".join(domains) if job else "skipped (no client job)")
            await trio.sleep(cfg.etrn.interval)

    def busy_with(self, queue_id: str) -> bool:
        """Is a job working on this message now?"""
        return any(queue_id in job.work for entry in self.pools.entries.values()
                   for job in entry.jobs.values())

    # --- figures (pool show, status, the admin console through AdminView) --------------------

    def pool_stats(self) -> dict[str, dict[str, Any]]:
        stats = self.pools.stats()
        for name, entry in self.pools.entries.items():
            key = entry.role.capacity_key
            if key is not None:
                params = stats[name]["parameters"]
                params[key[1]] = params.pop("sessions_per_job")
        return stats

    def status(self) -> dict[str, Any]:
        listen = self.listen_addresses()
        if self.admin_address:
            listen["admin"] = self.admin_address
        return {"pid": os.getpid(), "started": self.started, "listen": listen,
                "outbound": self.outbound.stats()}


def serve(loaded: LoadedConfig) -> int:
    setup_logging(cfg=loaded.config.log)
    raise_fd_limit()
    return trio.run(_main, loaded)


async def _main(loaded: LoadedConfig) -> int:
    # Built inside the run: the pools' rules read Trio's clock from the start.
    return await Supervisor(loaded).run()
