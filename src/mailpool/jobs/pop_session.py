"""The POP3 server session: thin Trio code driving the sans-IO core (the source's QTPOP jobs)."""

from __future__ import annotations

import trio

from mailpool.config import IMPLICIT_TLS, cleartext_login_allowed
from mailpool.directory import DirectoryError, open_job_directory, open_maildrop_lock
from mailpool.jobs.logins import Logins
from mailpool.jobs.runtime import JobContext, run_job, send_within
from mailpool.jobs.tls import handshake, server_context
from mailpool.maildrop import DropMessage, Maildrop
from mailpool.protocol import pop3 as core
from mailpool.supervisor.channel import Assign

INLINE_READ = 256 * 1024


class PopServerRole:
    def __init__(self, ctx: JobContext) -> None:
        cfg = ctx.config
        self.directory = open_job_directory(ctx.loaded, ctx.journal)
        self.mailbox_root = ctx.loaded.mailbox_dir
        self.logins = Logins(ctx, self.directory)
        self.shared_lock = open_maildrop_lock(ctx.loaded)
        dcfg = cfg.directory
        self.lock_deadline = dcfg.connect_timeout + dcfg.query_timeout + 1.0
        self.tls = server_context(cfg.tls)
        cleartext = cleartext_login_allowed(cfg)
        self.limits = core.Pop3Limits(hostname=cfg.host.name, allow_cleartext_login=cleartext,
                                      stls_available=self.tls is not None)
        # pop3s (995): TLS from the first byte, so no STLS.
        self.implicit = core.Pop3Limits(hostname=cfg.host.name,
                                        allow_cleartext_login=cleartext, tls_active=True)

    async def session(self, ctx: JobContext, raw: trio.SocketStream, assign: Assign) -> None:
        timeout = ctx.config.pop3.inactivity_timeout
        ctx.activity.connection(assign.listener)
        stream: trio.abc.Stream = raw
        if assign.listener in IMPLICIT_TLS:
            assert self.tls is not None  # the config refuses pop3s without [tls]
            secured = await handshake(raw, self.tls, ctx.config.tls.handshake_timeout)
            if secured is None:
                return
            stream = secured
            conn = core.Pop3Connection(self.implicit)
        else:
            conn = core.Pop3Connection(self.limits)
        conn.greeting()
        peer_ip = assign.peer_ip
        failures = assign.auth_failures
        drop: Maildrop | None = None
        listing: dict[str, DropMessage] = {}
        user: str | None = None

        async def flush() -> bool:
            return await send_within(stream, conn.data_to_send(), timeout)

        try:
            while True:
                event = conn.next_event()
                if event is core.NEED_DATA:
                    if not await flush():
                        return
                    # Not logged in yet and the job drains: close at once. A logged-in
                    # session may finish (QUIT) within the drain timeout.
                    idle = conn.state == "AUTHORIZATION"
                    if idle and ctx.draining.is_set():
                        conn.timeout()
                        continue
                    with trio.move_on_after(timeout) as scope:
                        if idle:
                            ctx.idle_scopes.add(scope)
                        try:
                            data = await stream.receive_some(65536)
                        finally:
                            ctx.idle_scopes.discard(scope)
                    if scope.cancelled_caught:
                        conn.timeout()
                    else:
                        conn.receive_data(data)
                elif isinstance(event, core.Authenticate):
                    try:
                        name = await self.logins.check(event.user, event.password)
                    except (OSError, DirectoryError):
                        # A broken directory is the host's fault: not a failed login, and
                        # not a reason to crash the job with every session in it.
                        conn.sys_temp_error("cannot check the password now")
                        continue
                    if name is None:
                        await ctx.journal("DF", ip=peer_ip, user=event.user)
                        failures = await self.logins.failed(peer_ip, failures)
                        conn.auth_failed()
                        continue
                    candidate = Maildrop(self.mailbox_root / name)
                    try:
                        locked = await trio.to_thread.run_sync(candidate.lock)
                    except OSError as exc:
                        # e.g. the mailbox path is not a directory: answer, do not crash.
                        conn.sys_temp_error(f"cannot open maildrop ({exc.strerror or exc})")
                        continue
                    if locked:
                        try:
                            locked = await self.lock_shared(name)
                        except DirectoryError as exc:
                            candidate.unlock()
                            await self.directory.report(exc)
                            conn.sys_temp_error("cannot lock the maildrop now")
                            continue
                        if not locked:
                            candidate.unlock()  # another host has it open
                    if not locked:
                        conn.maildrop_busy()
                        continue
                    try:
                        messages = await trio.to_thread.run_sync(candidate.scan)
                    except OSError as exc:
                        candidate.unlock()
                        conn.sys_temp_error(f"cannot read maildrop ({exc.strerror or exc})")
                        continue
                    drop, user = candidate, name
                    listing = {m.uid: m for m in messages}
                    conn.auth_ok([core.MessageInfo(uid=m.uid, size=m.size) for m in messages])
                    await ctx.journal("DL", user=user, ip=peer_ip,
                                      detail=f"{len(messages)} messages")
                elif isinstance(event, core.StartTls):
                    # The core dropped what the client pipelined after STLS: a fresh start.
                    if not await flush():
                        return
                    assert self.tls is not None
                    secured = await handshake(stream, self.tls,
                                              ctx.config.tls.handshake_timeout)
                    if secured is None:
                        return
                    stream = secured
                    conn.tls_established()
                elif isinstance(event, core.Retrieve):
                    msg = listing[event.uid]
                    try:
                        # Small messages come from the page cache faster than a thread hop.
                        content = (msg.path.read_bytes() if msg.size < INLINE_READ else
                                   await trio.to_thread.run_sync(msg.path.read_bytes))
                    except OSError as exc:
                        conn.sys_temp_error(f"cannot read message ({exc.strerror or exc})")
                        continue
                    conn.message_content(content)
                elif isinstance(event, core.Retrieved):
                    await ctx.journal("DR", user=user, ip=peer_ip, detail=event.uid,
                                      size=event.size)
                elif isinstance(event, core.Update):
                    assert drop is not None
                    gone = [listing[uid] for uid in event.deleted_uids]
                    try:
                        await trio.to_thread.run_sync(drop.delete, gone)
                    except OSError:
                        conn.update_done(ok=False)
                        continue
                    for msg in gone:
                        await ctx.journal("DD", user=user, ip=peer_ip, detail=msg.uid,
                                          size=msg.size)
                    conn.update_done(ok=True)
                elif isinstance(event, core.ConnectionClosed):
                    await flush()
                    return
                # Quit, Deleted, Undeleted: nothing to do until UPDATE.
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            if drop is not None:
                drop.unlock()
                if self.shared_lock.shared and user is not None:
                    await self.unlock_shared(user)

    async def lock_shared(self, user: str) -> bool:
        """The other hosts' side of the maildrop lock (a database lock), after the flock."""
        if not self.shared_lock.shared:
            return True
        try:
            with trio.fail_after(self.lock_deadline):
                return await trio.to_thread.run_sync(self.shared_lock.acquire, user,
                                                     abandon_on_cancel=True)
        except trio.TooSlowError:
            raise DirectoryError(f"maildrop lock: no answer within "
                                 f"{self.lock_deadline:g} s") from None

    async def unlock_shared(self, user: str) -> None:
        # Shielded: a session ended by cancellation still gives its lock back.
        with trio.move_on_after(self.lock_deadline) as scope:
            scope.shield = True
            await trio.to_thread.run_sync(self.shared_lock.release, user,
                                          abandon_on_cancel=True)


async def run(ctx: JobContext) -> None:
    await run_job(ctx, session=PopServerRole(ctx).session)
