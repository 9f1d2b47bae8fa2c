"""The SMTP server session: thin Trio code driving the sans-IO core (QTMSSRCP's job).

Policy lives here (who is local, relay refusal, durability before 250); protocol grammar
lives in mailpool.protocol.smtp_server.
"""

from __future__ import annotations

import logging
import select
import socket
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import trio

from mailpool.directory import DirectoryError, open_job_directory
from mailpool.framework.spool import Envelope, Spool
from mailpool.jobs.logins import Logins
from mailpool.jobs.runtime import JobContext, run_job, send_within
from mailpool.jobs.tls import describe, handshake, server_context
from mailpool.logs import ACCEPTED, CONNECT, DISCONNECT, REJECT
from mailpool.message import find_message_id, message_id_header, received_header
from mailpool.plugins import CheckEnvelope, Checks, Quarantine, Reject
from mailpool.protocol import smtp_server as core
from mailpool.relay import RelayRules
from mailpool.storage import REPLY as STORAGE_LOW
from mailpool.storage import SpaceCheck
from mailpool.supervisor.channel import Assign

if TYPE_CHECKING:
    from mailpool.config import Config
    from mailpool.restrictions import ConnectionRules

log = logging.getLogger("mailpool.smtp")
# Seconds a closing session reads (and drops) what the client still sends.
LINGER = 1.0


def connection_rules(cfg: Config) -> ConnectionRules:
    # dnspython is imported only by jobs that need it: it doubles a job's start-up time.
    from mailpool.outbound.resolver import system_nameservers
    from mailpool.restrictions import ConnectionRules

    r = cfg.restrictions
    return ConnectionRules(deny=r.deny, dnsbl=r.dnsbl, timeout=r.dnsbl_timeout,
                           nameservers=cfg.dns.nameservers or list(system_nameservers()),
                           port=cfg.dns.port)


async def talked_first(stream: trio.abc.Stream, pause: float) -> bool:
    """Whether the client sent anything before its greeting (waiting `pause` seconds). Not
    asked on implicit TLS, where the client speaks first by design (its ClientHello)."""
    if not isinstance(stream, trio.SocketStream):
        return False
    sock = stream.socket
    if pause > 0:
        with trio.move_on_after(pause):
            await trio.lowlevel.wait_readable(sock)
    # poll, not select: select() refuses descriptors above 1023, and a job holding
    # thousands of sessions has them.
    readable = select.poll()
    readable.register(sock.fileno(), select.POLLIN)
    if not readable.poll(0):
        return False
    try:
        return bool(await sock.recv(1, socket.MSG_PEEK))
    except OSError:
        return False  # reset: the session ends at its first read


@dataclass
class Tally:
    """What one session did, for its disconnect line."""

    messages: int = 0
    rejected: int = 0


class SmtpServerRole:
    """Per-job state shared by this job's sessions."""

    def __init__(self, ctx: JobContext) -> None:
        cfg = ctx.config
        self.ctx = ctx
        self.hostname = cfg.host.name
        self.relay = RelayRules.build(
            mode=cfg.relay.mode, local_domains=cfg.host.local_domains,
            near_domains=cfg.relay.near_domains, networks=cfg.relay.networks,
            percent_hack=cfg.relay.percent_hack)
        self.etrn_domains = {d.lower().rstrip(".") for d in cfg.etrn.domains}
        self.space = SpaceCheck(ctx.loaded.data_dir, cfg.storage.min_free_mb)
        self.rules = connection_rules(cfg) if (cfg.restrictions.deny
                                               or cfg.restrictions.dnsbl) else None
        self.postmaster = cfg.host.postmaster
        self.spool = Spool(ctx.loaded.spool_dir)
        self.directory = open_job_directory(ctx.loaded, ctx.journal)
        self.tls = server_context(cfg.tls)
        self.logins = Logins(ctx, self.directory)
        # Content-check plug-ins (asyncio coroutines); their loop opens in run() only when
        # some are configured.
        self.checks = Checks.build(cfg.check)
        base = core.ServerLimits(
            hostname=cfg.host.name,
            max_message_size=cfg.smtp.max_message_size,
            max_recipients=cfg.smtp.max_recipients,
            max_command_line=cfg.smtp.max_command_line,
            max_text_line=cfg.smtp.max_text_line,
            hard_error_limit=cfg.smtp.hard_error_limit,
            dsn=cfg.smtp.dsn,
            etrn=bool(cfg.etrn.domains),
        )
        tls = self.tls is not None
        # Per listener (RFC 8314): port 25 offers STARTTLS (and AUTH only if configured);
        # submission (587) STARTTLS and AUTH, required before MAIL; smtps (465) TLS from the
        # first byte and AUTH required.
        self.limits = {
            "smtp": replace(base, starttls=tls, auth=cfg.smtp.auth),
            "submission": replace(base, starttls=tls, auth=True, auth_required=True,
                                  etrn=False),
            "smtps": replace(base, tls_active=True, auth=True, auth_required=True, etrn=False),
        }

    # --- policy -----------------------------------------------------------------------

    async def local_user(self, address: str) -> str | None:
        """The mailbox owner for a local address; postmaster always resolves."""
        local, _, _domain = address.rpartition("@")
        if "@" not in address or local.lower() == "postmaster":
            user = await self.directory.lookup(address) if "@" in address else None
            return user.name if user else self.postmaster
        user = await self.directory.lookup(address)
        return user.name if user else None

    async def rcpt(self, conn: core.ServerConnection, event: core.RcptTo, peer_ip: str,
             relayed: dict[str, str]) -> str | None:
        """Answer one RCPT; a journal note ("9V" refusal) for the caller to write, or None."""
        if self.space.low():
            conn.reply(*STORAGE_LOW)
            return None
        verdict = self.relay.classify(event.address, peer_ip)
        addr = verdict.address
        if verdict.kind == "refused" and conn.authenticated_user:
            # An authenticated client may relay whatever the relay mode.
            verdict = replace(verdict, kind="relay")
        if verdict.kind == "refused":
            conn.reply(550, f"<{event.address}>: Relay access denied", "5.7.1")
            return verdict.reason
        if verdict.kind == "relay":
            relayed[event.address] = addr
            conn.reply(250, "Ok", "2.1.5")
            return None
        try:
            owner = await self.local_user(addr)
        except (DirectoryError, OSError):
            # The directory cannot be read now: the client should try later.
            conn.reply(451, f"<{event.address}>: Temporary lookup failure", "4.3.0")
            return None
        if owner is None:
            conn.reply(550, f"<{event.address}>: Recipient address rejected: "
                            "User unknown in local recipient table", "5.1.1")
        else:
            if addr != event.address:
                relayed[event.address] = addr  # rewritten (percent hack) but local
            conn.reply(250, "Ok", "2.1.5")
        return None

    async def etrn(self, ctx: JobContext, conn: core.ServerConnection, node: str,
                   peer_ip: str) -> None:
        """RFC 1985: release the queued mail of one of [etrn] domains, for allowed clients."""
        if node.startswith("#"):
            conn.reply(458, f"Unable to queue messages for node {node}")
            return
        subdomains = node.startswith("@")
        domain = node.lstrip("@").lower().rstrip(".")
        if domain not in self.etrn_domains:
            conn.reply(459, f"<{domain}>: service not available for this domain", "4.7.1")
            return
        if self.relay.mode != "all" and not self.relay.client_listed(peer_ip):
            conn.reply(459, f"<{domain}>: not allowed for your address", "4.7.1")
            return
        count = await ctx.flush(domain, subdomains)
        if count is None:
            conn.reply(458, f"Unable to queue messages for node {domain}", "4.3.0")
        elif count == 0:
            conn.reply(251, f"OK, no messages waiting for node {domain}", "2.0.0")
        else:
            conn.reply(253, f"OK, {count} pending messages for node {domain} started", "2.0.0")

    # --- the session --------------------------------------------------------------------

    async def opening(self, ctx: JobContext, stream: trio.abc.Stream,
                      conn: core.ServerConnection, peer_ip: str) -> None:
        """Greet the client, or refuse it: the deny list and DNS blocklists, and a client that
        talks before the greeting (Postfix's pregreet test; with greet_pause 0 only what it
        sent while the connection waited for a job counts)."""
        if self.rules is not None:
            refusal, notes = await self.rules.check(peer_ip)
            for note in notes:
                log.info("blocklist lookup for %s: %s", peer_ip, note)
            if refusal is not None:
                conn.refuse(refusal.reason)
                log.info(REJECT, "NOQUEUE", "CONNECT", peer_ip,
                         f"554 5.7.1 {refusal.reason}", "", "", "")
                ctx.activity.rejected(554, f"CONNECT: 554 5.7.1 {refusal.reason}", ip=peer_ip)
                await ctx.journal("9S", ip=peer_ip,
                                  detail=f"{refusal.listed_by}: {refusal.reason} "
                                         f"({refusal.detail})")
                return
        if await talked_first(stream, ctx.config.smtp.greet_pause):
            conn.early_talker()
            log.info(REJECT, "NOQUEUE", "CONNECT", peer_ip,
                     "554 5.7.1 client talked before the greeting", "", "", "")
            ctx.activity.rejected(554, "CONNECT: 554 5.7.1 client talked before the greeting",
                                  ip=peer_ip)
            await ctx.journal("9S", ip=peer_ip, detail="talked before the greeting")
            return
        conn.greeting()

    async def session(self, ctx: JobContext, raw: trio.SocketStream, assign: Assign) -> None:
        log.info(CONNECT, assign.peer_ip, assign.peer_port, assign.listener)
        ctx.activity.connection(assign.listener)
        tally = Tally()
        try:
            await self.converse(ctx, raw, assign, tally)
        finally:
            log.info(DISCONNECT, assign.peer_ip, tally.messages, tally.rejected)

    async def report(self, ctx: JobContext, conn: core.ServerConnection, peer_ip: str,
                     tally: Tally, relay_refused: str | None = None) -> None:
        """Log and journal what the session refused since the last look: `9R`, or `9V`
        for a recipient the relay rules refused (`relay_refused` says why)."""
        for r in conn.take_rejections():
            tally.rejected += 1
            answer = f"{r.reply.code} {r.reply.enhanced or ''} {' '.join(r.reply.lines)}"
            log.info(REJECT, "NOQUEUE", r.command, peer_ip, answer, r.originator,
                     r.recipient, conn.helo or "")
            ctx.activity.rejected(r.reply.code, f"{r.command}: {answer}", ip=peer_ip)
            if relay_refused is not None and r.command == "RCPT":
                await ctx.journal("9V", ip=peer_ip, recipient=r.recipient,
                                  detail=f"relay refused ({relay_refused})")
            else:
                await ctx.journal("9R", ip=peer_ip, originator=r.originator,
                                  recipient=r.recipient, detail=f"{r.command} {answer}")

    async def converse(self, ctx: JobContext, raw: trio.SocketStream, assign: Assign,
                       tally: Tally) -> None:
        cfg = ctx.config.smtp
        limits = self.limits.get(assign.listener, self.limits["smtp"])
        conn = core.ServerConnection(limits)
        peer_ip = assign.peer_ip
        stream: trio.abc.Stream = raw
        if limits.tls_active:  # smtps: the handshake comes before anything else
            assert self.tls is not None  # the config refuses smtps without [tls]
            secured = await handshake(raw, self.tls, ctx.config.tls.handshake_timeout)
            if secured is None:
                return
            stream = secured
            conn.cipher_info = describe(secured)
        await self.opening(ctx, stream, conn, peer_ip)
        auth_failures = 0
        login_failures = assign.auth_failures
        quit_seen = False
        # RCPT address as given -> the address to deliver to, where the relay rules
        # rewrote it or let it go out (for this transaction).
        rewritten: dict[str, str] = {}
        # Deadlines no dripping client can stretch: the whole session; each command line
        # (from the wait that starts it, the greeting for the first); DATA at a minimum rate.
        now = trio.current_time()
        session_deadline = now + cfg.session_timeout
        line_deadline = now + cfg.command_timeout
        data_started: float | None = None

        async def flush() -> bool:
            return await send_within(stream, conn.data_to_send(), cfg.command_timeout)

        async def close() -> None:
            """The last reply out, then (unless the client said QUIT: it sent nothing after
            it) a short lingering close: input the client already sent is read and dropped,
            so the kernel does not answer it with a reset that could destroy that last reply
            before the client reads it."""
            if await flush() and not quit_seen:
                with trio.move_on_after(LINGER):
                    try:
                        if isinstance(stream, trio.abc.HalfCloseableStream):
                            await stream.send_eof()
                        while await stream.receive_some(65536):
                            pass
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass

        try:
            while True:
                event = conn.next_event()
                if conn.has_rejections:
                    await self.report(ctx, conn, peer_ip, tally)
                if event is core.NEED_DATA:
                    if conn.closed:
                        await close()
                        return
                    # Between transactions a draining job ends the session at once (421);
                    # a transaction in progress may finish within the drain timeout.
                    idle = conn.state in ("start", "ready")
                    if idle and ctx.draining.is_set():
                        conn.shutdown()
                        await flush()
                        return
                    now = trio.current_time()
                    if conn.state == "data":
                        data_started = data_started if data_started is not None else now
                        deadline = (data_started + cfg.data_timeout
                                    + conn.data_bytes_received / cfg.min_data_rate)
                        why = "Error: data too slow"
                    else:
                        data_started = None
                        if not conn.in_command_line and not conn.awaiting_first_command:
                            line_deadline = now + cfg.command_timeout  # a new line starts
                        deadline, why = line_deadline, "Error: timeout exceeded"
                    if session_deadline < deadline:
                        deadline, why = session_deadline, "Error: session too long"
                    # Our replies must go out and the client's next bytes arrive before it
                    # (a client that does not read is as silent as one that does not write).
                    out = conn.data_to_send()
                    with trio.move_on_at(deadline) as scope:
                        if out:
                            await stream.send_all(out)
                        if idle:  # a drain may interrupt the wait, never a reply
                            ctx.idle_scopes.add(scope)
                            if ctx.draining.is_set():  # it came while the reply went out
                                scope.cancel()
                        try:
                            data = await stream.receive_some(65536)
                        finally:
                            ctx.idle_scopes.discard(scope)
                    if scope.cancelled_caught:
                        if idle and ctx.draining.is_set():
                            conn.shutdown()
                        else:
                            conn.timeout(why)
                        await flush()
                        return
                    conn.receive_data(data)
                elif isinstance(event, core.Forbidden | core.ImproperPipelining):
                    # The core answered and closes: journal who tried what.
                    what = (f"forbidden command {event.line!r}"
                            if isinstance(event, core.Forbidden)
                            else f"improper pipelining after DATA: {event.sample!r}")
                    await ctx.journal("9S", ip=peer_ip, detail=what)
                elif isinstance(event, core.RcptTo):
                    refused = await self.rcpt(conn, event, peer_ip, rewritten)
                    await self.report(ctx, conn, peer_ip, tally, refused)
                elif isinstance(event, core.Etrn):
                    await self.etrn(ctx, conn, event.node, peer_ip)
                elif isinstance(event, core.Verify):
                    try:
                        await self.verify(conn, event.argument)
                    except (DirectoryError, OSError):
                        conn.reply(451, "Temporary lookup failure", "4.3.0")
                elif isinstance(event, core.MessageReceived):
                    if await self.accept_message(ctx, conn, event, peer_ip, rewritten):
                        tally.messages += 1
                    rewritten = {}
                elif isinstance(event, core.MailFrom):
                    rewritten = {}
                    await self.mail_from(conn, event)
                elif isinstance(event, core.StartTls):
                    # The 220 goes out, then the handshake on the raw stream; what the
                    # client pipelined behind STARTTLS was dropped by the core, unread.
                    if not await flush():
                        return
                    assert self.tls is not None
                    secured = await handshake(stream, self.tls,
                                              ctx.config.tls.handshake_timeout)
                    if secured is None:
                        conn.tls_failed()
                        return
                    stream = secured
                    conn.tls_established(describe(secured))
                    line_deadline = trio.current_time() + cfg.command_timeout
                elif isinstance(event, core.Authenticate):
                    try:
                        user = await self.logins.check(event.username, event.password)
                    except (OSError, DirectoryError):
                        conn.reply(454, "Temporary authentication failure", "4.7.0")
                        continue
                    if user is not None:
                        conn.auth_ok(user)
                        await ctx.journal("9A", ip=peer_ip, user=user,
                                          detail=event.mechanism)
                        continue
                    await ctx.journal("9F", ip=peer_ip, user=event.username,
                                      detail=event.mechanism)
                    login_failures = await self.logins.failed(peer_ip, login_failures)
                    conn.auth_failed()
                    auth_failures += 1
                    if auth_failures >= cfg.max_auth_failures:
                        conn.close_with(421, "Error: too many failed authentications",
                                        "4.7.0")
                elif isinstance(event, core.AuthAborted):
                    await ctx.journal("9F", ip=peer_ip,
                                      detail=f"{event.mechanism}: {event.reason}")
                elif isinstance(event, core.Quit):
                    quit_seen = True  # answered by the core; the close follows
                elif isinstance(event, core.ConnectionClosed):
                    await close()
                    return
                # Hello, Reset, Quit: the core already answered.
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        except trio.Cancelled:
            # The drain deadline passed mid-session: say so before the socket closes.
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                conn.shutdown()
                try:
                    await stream.send_all(conn.data_to_send())
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            raise

    async def mail_from(self, conn: core.ServerConnection, event: core.MailFrom) -> None:
        """An authenticated client sends as one of its own addresses (Postfix's
        reject_sender_login_mismatch), unless that check is off."""
        user = event.auth_user
        if (user and event.address and self.ctx.config.smtp.reject_sender_login_mismatch):
            try:
                owner = await self.directory.lookup(event.address)
            except (OSError, DirectoryError):
                conn.reply(451, "Temporary lookup failure", "4.3.0")
                return
            if owner is None or owner.name != user:
                conn.reply(553, f"<{event.address}>: Sender address rejected: not owned by "
                                f"user {user}", "5.7.1")
                return
        conn.reply(250, "Ok", "2.1.0")

    async def verify(self, conn: core.ServerConnection, argument: str) -> None:
        addr = argument.strip().strip("<>")
        if "@" in addr and self.relay.is_local(addr):
            if await self.local_user(addr) is not None:
                conn.reply(250, f"<{addr}>", "2.0.0")
            else:
                conn.reply(550, f"<{addr}>: Recipient address rejected: User unknown", "5.1.1")
        else:
            conn.reply(252, "Cannot VRFY user, but will accept message and attempt delivery",
                       "2.0.0")

    async def accept_message(self, ctx: JobContext, conn: core.ServerConnection,
                             event: core.MessageReceived, peer_ip: str,
                             rewritten: dict[str, str]) -> bool:
        """Make the message durable in the incoming queue, journal it, then answer 250
        (True); or answer why not."""
        if self.space.low():
            conn.reply(*STORAGE_LOW)
            return False
        queue_id = self.spool.new_queue_id()
        content = event.content
        # A recipient named twice in one transaction (in any letter case: local mailboxes
        # are case-insensitive) gets one copy, as Postfix's cleanup does; each RCPT still
        # got its 250. DSN parameters stay with their recipient.
        given = list(event.recipients)
        firsts: dict[str, int] = {}
        for i, rcpt in enumerate(given):
            firsts.setdefault(rewritten.get(rcpt, rcpt).lower(), i)
        keep = sorted(firsts.values())
        recipients = [rewritten.get(given[i], given[i]) for i in keep]
        notify = [",".join(event.notify[i] or ()) for i in keep] if any(event.notify) else []
        orcpt = [event.orcpt[i] or "" for i in keep] if any(event.orcpt) else []
        relayed = any(not self.relay.is_local(r) for r in recipients)
        quarantine: Quarantine | None = None
        if self.checks:
            verdict = await self.checks.run(CheckEnvelope(
                peer_ip=peer_ip, helo=conn.helo or "", originator=event.originator,
                recipients=tuple(recipients), size=len(content),
                authenticated_user=conn.authenticated_user), content)
            if isinstance(verdict, Reject):
                conn.reply(verdict.code, verdict.text, verdict.enhanced)
                await ctx.journal("OW", ip=peer_ip, detail=f"refused by {verdict.check}: "
                                  f"{verdict.code} {verdict.enhanced} {verdict.text}")
                return False
            if isinstance(verdict, Quarantine):
                quarantine = verdict
        message_id = find_message_id(content)
        prefix = received_header(helo=conn.helo or "", peer_ip=peer_ip, hostname=self.hostname,
                                 queue_id=queue_id, recipients=recipients, esmtp=conn.esmtp,
                                 tls=conn.cipher_info if conn.tls_active else "",
                                 authenticated=conn.authenticated_user is not None)
        if message_id is None:
            message_id, header = message_id_header(queue_id, self.hostname)
            prefix += header
        data = prefix + content
        envelope = Envelope(queue_id=queue_id, message_id=message_id,
                            originator=event.originator, recipients=recipients,
                            received_ns=time.time_ns(), peer_ip=peer_ip, helo=conn.helo or "",
                            size=len(data), ret=event.ret or "", envid=event.envid or "",
                            notify=notify, orcpt=orcpt, relayed=relayed)
        # Group commit: the file is written and renamed into the queue without an fsync of
        # its own; one syncfs in the supervisor then makes every message written meanwhile
        # durable at once, and only then does any of those sessions answer 250. The journal
        # entries and the hand-over to the framework ride on the same request: the
        # supervisor acts on them once the message is durable.
        ids = {"queue_id": queue_id, "message_id": message_id}
        entries = [
            ("95" if relayed else "94", {"ip": peer_ip, **ids}),
            ("91", {"originator": event.originator, **ids}),
            *(("92", {"recipient": rcpt, **ids}) for rcpt in recipients),
            ("9T", {"size": len(data), **ids}),
            ("99", ids),
            ("97", {"detail": "incoming", **ids}) if quarantine is None else
            ("OW", {"detail": f"kept in quarantine: {quarantine.check}: {quarantine.reason}",
                    **ids}),
        ]
        queue = "incoming" if quarantine is None else "quarantine"
        try:
            with trio.fail_after(ctx.config.smtp.spool_timeout):
                # Without an fsync this is a page-cache write and a rename: cheaper in the
                # loop than a hop to a worker thread.
                self.spool.store(queue, envelope, data, sync=False)
                durable = await ctx.group_sync(
                    entries, [("incoming", queue_id)] if quarantine is None else [])
        except (OSError, trio.TooSlowError) as exc:
            durable = False
            reason = type(exc).__name__
        else:
            reason = "sync failed"
        if not durable:
            self.spool.remove(queue, queue_id, sync=False)
            conn.reply(451, f"Error: queue file write error ({reason})", "4.3.0")
            return False
        conn.reply(250, f"Ok: queued as {queue_id}", "2.0.0")
        log.info(ACCEPTED, queue_id, peer_ip, event.originator, len(recipients), len(data),
                 message_id)
        ctx.activity.received()
        return True


async def run(ctx: JobContext) -> None:
    role = SmtpServerRole(ctx)
    # The content checks' asyncio loop lives as long as the job (opens nothing without checks).
    async with role.checks.open():
        await run_job(ctx, session=role.session)
