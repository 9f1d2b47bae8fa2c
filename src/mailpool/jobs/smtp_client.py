"""What an smtp-client job runs (QTMSCLCP): one delivery attempt per message handed to it.

An attempt, in order:
1. take the message (8E/8F back from a retry queue, 8B), count the attempt and store the
   time it is due again should it fail; durable (group commit) before anything goes out;
2. per next hop of its pending recipients, concurrently: route (the router, or MX over DNS;
   every DNS failure journaled 8K), then try up to 5 hosts and each of their addresses until
   one takes the transaction;
3. record each recipient's outcome (88 82 delivered, 83 failed), send the notices that are
   due (failure, delay, "relayed" success) into the incoming queue, and move the message to
   its next place by the retry schedule (8C retry1, 8D retry2) or off the queues; durable,
   then reported to the supervisor (where it is now, how each next hop answered).
A reply lost after the final dot leaves the recipients pending: they are tried again (a
duplicate is possible, as RFC 5321 accepts) and the journal says so.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import trio

from mailpool.config import parse_router
from mailpool.framework.notice_queue import NoticeSettings, queue_notice
from mailpool.framework.notices import RecipientReport
from mailpool.framework.spool import Envelope, Spool, SpoolError
from mailpool.jobs.client_session import (
    ConnectionCache,
    SessionError,
    TlsContexts,
    open_connection,
    tls_policy_for,
)
from mailpool.jobs.runtime import JobContext, run_job
from mailpool.logs import DELIVERY
from mailpool.outbound.mx import RouteFailure
from mailpool.outbound.resolver import (
    DnsProblem,
    DnsSettings,
    MailResolver,
    MxHost,
    Route,
    system_nameservers,
)
from mailpool.outbound.schedule import (
    EXPIRED,
    RetryPolicy,
    after_temporary_failure,
    back_to_outbound_code,
    pending_deadline,
)
from mailpool.outbound.state import (
    DELIVERED,
    FAILED,
    OUTBOUND_QUEUES,
    OutboundState,
    destination_of,
    destinations,
    load_state,
    save_state,
)
from mailpool.protocol import smtp_client as core
from mailpool.protocol.smtp_syntax import Reply, enhanced_of
from mailpool.supervisor.channel import Deliver, Delivered, OutboundItem

log = logging.getLogger("mailpool.client")

DEFERRED = "deferred"


@dataclass
class Result:
    """One recipient's outcome in this attempt."""

    status: str          # DELIVERED, FAILED or DEFERRED
    code: str            # enhanced status code
    reason: str          # the remote reply, or what went wrong here
    remote_mta: str = ""
    dsn_passed: bool = True   # the next hop took DSN duties over (RFC 3461 5.2.2)
    tls: str = ""             # the session's TLS ("TLSv1.3 <cipher>", "none", ...)


# A recipient's outcome as Postfix logs it (status=sent, bounced, deferred).
_LOGGED_STATUS = {DELIVERED: "sent", FAILED: "bounced"}


def _reply_text(reply: Reply) -> str:
    return f"{reply.code} {enhanced_of(reply)} {reply.text}".strip()


def _from_reply(reply: Reply, mta: str, dsn: bool, tls: str = "") -> Result:
    status = DELIVERED if reply.is_positive else FAILED if reply.is_permanent else DEFERRED
    return Result(status, enhanced_of(reply), _reply_text(reply), mta, dsn, tls)


def _wants(notify: str, what: str) -> bool:
    if not notify:
        return what in ("FAILURE", "DELAY")
    return what in notify.upper().split(",")


class ClientRole:
    def __init__(self, ctx: JobContext) -> None:
        cfg = ctx.config
        self.ctx = ctx
        self.cfg = cfg.outbound
        self.hostname = cfg.host.name
        self.spool = Spool(ctx.loaded.spool_dir)
        nameservers = tuple(cfg.dns.nameservers) or system_nameservers()
        self.resolver = MailResolver(
            DnsSettings(nameservers, port=cfg.dns.port, timeout=cfg.dns.timeout,
                        lifetime=cfg.dns.lifetime, cache=cfg.dns.cache),
            my_names={cfg.host.name}, rng=random.Random())
        self.policy = RetryPolicy(cfg.retry.first_interval, cfg.retry.first_count,
                                  cfg.retry.second_interval, cfg.retry.max_lifetime)
        self.notices = NoticeSettings.from_config(cfg)
        self.delay_notice = cfg.notices.delay_notice
        self.cache = ConnectionCache(self.cfg)
        self.tls = TlsContexts(self.cfg.tls.ca_file)

    # --- one attempt -------------------------------------------------------------------

    async def deliver(self, ctx: JobContext, msg: Deliver) -> Delivered:
        item = msg.item
        qid = item.queue_id
        entries: list[tuple[str, dict[str, Any]]] = []
        loaded = self._take(item, entries)
        if loaded is None:
            return Delivered(queue_id=qid, outcomes=[])
        envelope, content, state = loaded
        ids = {"queue_id": qid, "message_id": envelope.message_id}
        arrival = envelope.received_ns / 1e9
        state.attempts += 1
        state.next_attempt = pending_deadline(self.policy, arrival=arrival,
                                              attempts=state.attempts, now=time.time())
        entries.append(("8B", {"detail": f"attempt {state.attempts}", **ids}))
        save_state(self.spool, qid, state)
        if not await ctx.group_sync(entries):
            return Delivered(queue_id=qid, outcomes=[], failed=True)
        entries = []

        router = self.cfg.router
        groups: dict[str, list[int]] = {}
        for i in state.pending():
            groups.setdefault(destination_of(envelope.recipients[i], router), []).append(i)
        results: dict[int, Result] = {}
        outcomes: dict[str, str] = {}
        async with trio.open_nursery() as nursery:
            for dest, indexes in groups.items():
                if dest in msg.skip:
                    for i in indexes:
                        results[i] = Result(DEFERRED, "4.4.1", f"delivery to {dest} paused "
                                            "after a connection failure")
                    continue
                nursery.start_soon(self._guarded_group, dest, envelope, content, indexes,
                                   results, outcomes, entries)
        after, notice_ids = self._settle(envelope, content, state, results, entries)
        if not await ctx.group_sync(entries, [("incoming", n) for n in notice_ids]):
            return Delivered(queue_id=qid, outcomes=list(outcomes.items()), failed=True)
        return Delivered(queue_id=qid, outcomes=list(outcomes.items()), after=after)

    def _take(self, item: OutboundItem, entries: list[tuple[str, dict[str, Any]]]
              ) -> tuple[Envelope, bytes, OutboundState] | None:
        """Load the message, moving it back to the outbound queue when it was waiting in a
        retry queue. None when it is no longer queued (done) or cannot be read (held)."""
        qid, queue = item.queue_id, item.queue
        try:
            envelope, content = self.spool.load(queue, qid)
        except FileNotFoundError:
            found = self.spool.find(qid)
            if found not in OUTBOUND_QUEUES:
                return None
            queue = found
            envelope, content = self.spool.load(queue, qid)
        except SpoolError as exc:
            log.error("%s (moved to hold)", exc)
            self.spool.move(qid, queue, "hold", sync=False)
            return None
        if queue != "outbound":
            self.spool.move(qid, queue, "outbound", sync=False)
            entries.append((back_to_outbound_code(queue),
                            {"queue_id": qid, "message_id": envelope.message_id,
                             "detail": f"from {queue}"}))
        return envelope, content, load_state(self.spool, qid, len(envelope.recipients))

    # --- one next hop --------------------------------------------------------------------------

    async def _guarded_group(self, dest: str, envelope: Envelope, content: bytes,
                             indexes: list[int], results: dict[int, Result],
                             outcomes: dict[str, str],
                             entries: list[tuple[str, dict[str, Any]]]) -> None:
        """One next hop; a bug there defers its recipients (the schedule still runs, so the
        message expires in the end) instead of failing every other next hop's delivery."""
        try:
            await self._deliver_group(dest, envelope, content, indexes, results, outcomes,
                                      entries)
        except Exception as exc:
            log.exception("delivery of %s to %s broke off", envelope.queue_id, dest)
            for i in indexes:
                results[i] = Result(DEFERRED, "4.3.0", f"local error: {exc!r}")
            outcomes[dest] = "skipped"

    async def _deliver_group(self, dest: str, envelope: Envelope, content: bytes,
                             indexes: list[int], results: dict[int, Result],
                             outcomes: dict[str, str],
                             entries: list[tuple[str, dict[str, Any]]]) -> None:
        ids = {"queue_id": envelope.queue_id, "message_id": envelope.message_id}
        route, port, problems = await self._route(dest, envelope.recipients[indexes[0]])
        for problem in problems:
            entries.append(("8K", {"detail": f"{problem.query}: {problem.reason}", **ids}))
        if isinstance(route, RouteFailure):
            status = FAILED if route.permanent else DEFERRED
            for i in indexes:
                results[i] = Result(status, route.status, f"{route.code} {route.status} "
                                                          f"{route.reason}")
            outcomes[dest] = "skipped"  # nothing learnt about the hop itself
            return
        tx = core.Transaction(
            sender=envelope.originator,
            recipients=tuple(envelope.recipients[i] for i in indexes),
            content=content, ret=envelope.ret or None, envid=envelope.envid or None,
            notify=tuple(tuple(envelope.rcpt_notify(i).upper().split(","))
                         if envelope.rcpt_notify(i) else None for i in indexes),
            orcpt=tuple(envelope.rcpt_orcpt(i) or None for i in indexes))
        last: Result | None = None
        answered = False
        policy = tls_policy_for(self.cfg.tls, dest)
        for host in route.hosts:
            for ip in host.addresses:
                try:
                    done, tls = await self._transact(dest, host, ip, port, tx, policy)
                except SessionError as exc:
                    if exc.stage == "dot":
                        # The message may have been delivered: try again later anyway.
                        reason = (f"{exc.reason} after end of data: the message may have been "
                                  "delivered; it is retried (a duplicate is possible)")
                        for i in indexes:
                            results[i] = Result(DEFERRED, "4.4.2", reason, host.name)
                        outcomes[dest] = "failed"
                        return
                    answered = answered or exc.stage != "connect"
                    code = {"connect": "4.4.1", "starttls": "4.7.4"}.get(exc.stage, "4.4.2")
                    last = Result(DEFERRED, code, exc.reason, host.name)
                    continue
                if isinstance(done, core.HandshakeFailed):
                    answered = True
                    last = _from_reply(done.reply, host.name, True)
                    if last.status == DELIVERED:
                        last = Result(DEFERRED, "4.4.2", last.reason, host.name)
                    continue
                outcome = [_from_reply(r, host.name, done.dsn, tls)
                           for r in done.recipient_results()]
                for i, res in zip(indexes, outcome, strict=True):
                    results[i] = res
                alive = any(r.status != DEFERRED for r in outcome)
                outcomes[dest] = "ok" if alive else "failed"
                return
        if last is None:
            last = Result(DEFERRED, "4.4.4", f"no address to deliver to for {dest}")
        for i in indexes:
            results[i] = last
        outcomes[dest] = "failed" if answered else "unreachable"

    async def _route(self, dest: str, first_rcpt: str
                     ) -> tuple[Route | RouteFailure, int, list[DnsProblem]]:
        """Where mail for `dest` goes: the router (its MX, or with firewall only its own
        addresses), else the recipient domain's MX hosts."""
        port = self.cfg.port
        if not self.cfg.router:
            route, problems = await self.resolver.route(dest)
            return route, port, problems
        host, router_port = parse_router(self.cfg.router)
        port = router_port or port
        if self.cfg.firewall or _is_ip(host):
            found, problems = await self.resolver.host_addresses(host)
            route: Route | RouteFailure = (
                found if isinstance(found, RouteFailure)
                else Route(host, (MxHost(host, 0, True, found),)))
        else:
            route, problems = await self.resolver.route(host)
        if isinstance(route, RouteFailure) and route.permanent:
            # The source: without an address for the router, SMTP runs without it.
            problems.append(DnsProblem(f"{host} (router)", "cannot be resolved: delivering "
                                       "directly", True))
            domain = first_rcpt.rpartition("@")[2]
            direct, more = await self.resolver.route(domain)
            return direct, self.cfg.port, problems + more
        return route, port, problems

    async def _transact(self, dest: str, host: MxHost, ip: str, port: int,
                        tx: core.Transaction, policy: str
                        ) -> tuple[core.TransactionDone | core.HandshakeFailed, str]:
        """One transaction on a cached connection or a new one (a cached connection found
        dead before any reply is replaced by a fresh one, once); and the session's TLS."""
        conn = await self.cache.take(dest, ip, tls_policy=policy)
        if conn is not None:
            try:
                conn.core.send_transaction(tx)
                event = await conn.next_event()
            except SessionError as exc:
                await conn.close()
                if exc.stage != "mail":
                    raise
                conn = None  # the server had closed it while idle
            else:
                # A 421 to MAIL on a cached connection: the server timed it out meanwhile.
                if isinstance(event, core.TransactionDone) and event.mail.code != 421:
                    return await self._finish(dest, ip, conn, event), conn.tls
                await conn.close()
                conn = None
        conn, event = await open_connection(self.cfg, self.hostname, host.name, ip, port,
                                            tls_policy=policy, tls_contexts=self.tls)
        if not isinstance(event, core.Ready):
            await conn.close()
            if isinstance(event, core.HandshakeFailed):
                return event, conn.tls
            raise SessionError("greeting", f"{conn.peer} closed the connection: {event}")
        try:
            conn.core.send_transaction(tx)
            event = await conn.next_event()
        except SessionError:
            await conn.close()
            raise
        if not isinstance(event, core.TransactionDone):
            await conn.close()
            stage = "dot" if "dot" in getattr(event, "reason", "") else "mail"
            raise SessionError(stage, f"{conn.peer}: {getattr(event, 'reason', event)}")
        return await self._finish(dest, ip, conn, event), conn.tls

    async def _finish(self, dest: str, ip: str, conn: Any,
                      done: core.TransactionDone) -> core.TransactionDone:
        clean = done.mail.is_positive and done.data is not None and done.data.is_positive
        if clean:
            await self.cache.give_back(dest, ip, conn)
        else:
            conn.broken = True
            await conn.close()
        return done

    # --- after the attempt ---------------------------------------------------------------------

    def _settle(self, envelope: Envelope, content: bytes, state: OutboundState,
                results: dict[int, Result], entries: list[tuple[str, dict[str, Any]]]
                ) -> tuple[OutboundItem | None, list[str]]:
        qid = envelope.queue_id
        ids = {"queue_id": qid, "message_id": envelope.message_id}
        now = time.time()
        delivered = [i for i, r in sorted(results.items()) if r.status == DELIVERED]
        failed = [i for i, r in sorted(results.items()) if r.status == FAILED]
        delay = now - envelope.received_ns / 1e9
        for i, res in results.items():
            rs = state.recipients[i]
            rs.code, rs.reason, rs.remote_mta, rs.last_attempt = (
                res.code, res.reason, res.remote_mta, now)
            log.info(DELIVERY, qid, envelope.recipients[i], res.remote_mta or "none", delay,
                     _LOGGED_STATUS.get(res.status, res.status), res.reason)
            if res.status == DELIVERED:
                self.ctx.activity.delivered(remote=True, delay=delay)
            elif res.status == FAILED:
                self.ctx.activity.bounced()
            if res.status in (DELIVERED, FAILED):
                rs.status = res.status
        if delivered:
            # The next hops and how each session was protected (TLS version and cipher).
            mtas = sorted({f"{results[i].remote_mta} (TLS: {results[i].tls or 'none'})"
                           for i in delivered})
            entries.append(("88", {"detail": ", ".join(mtas), **ids}))
            for i in delivered:
                entries.append(("82", {"recipient": envelope.recipients[i],
                                       "detail": results[i].reason, **ids}))
        for i in failed:
            entries.append(("83", {"recipient": envelope.recipients[i],
                                   "detail": results[i].reason, **ids}))
        notice_ids: list[str] = []
        after: OutboundItem | None = None
        if state.pending():
            step = after_temporary_failure(self.policy, arrival=envelope.received_ns / 1e9,
                                           attempts=state.attempts, now=now)
            if step.queue == EXPIRED:
                for i in state.pending():
                    rs = state.recipients[i]
                    rs.status = FAILED
                    rs.reason = f"delivery time expired; last problem: {rs.reason}"
                    rs.code = rs.code if rs.code.startswith("4.") else "4.4.7"
                    failed.append(i)
                    log.info(DELIVERY, qid, envelope.recipients[i], rs.remote_mta or "none",
                             delay, "expired", rs.reason)
                    self.ctx.activity.bounced()
                    entries.append(("83", {"recipient": envelope.recipients[i],
                                           "detail": rs.reason, **ids}))
            else:
                self.ctx.activity.deferred()
                reasons = sorted({state.recipients[i].reason for i in state.pending()})
                self.spool.move(qid, "outbound", step.queue, sync=False)
                state.next_attempt = step.next_attempt or now
                entries.append((step.code, {"detail": "; ".join(reasons)[:1000], **ids}))
                if (step.entered_retry2 and self.delay_notice and not state.delay_notified):
                    state.delay_notified = True
                    until = envelope.received_ns / 1e9 + self.policy.max_lifetime
                    want = [i for i in state.pending()
                            if _wants(envelope.rcpt_notify(i), "DELAY")]
                    nid = self._notice(envelope, content, state, "delay", f"{qid}-DLY", want,
                                       entries, until)
                    notice_ids += [nid] if nid else []
                save_state(self.spool, qid, state)
                after = OutboundItem(qid, step.queue,
                                     destinations(envelope, state, self.cfg.router),
                                     state.next_attempt)
        if failed:
            want = [i for i in failed if _wants(envelope.rcpt_notify(i), "FAILURE")]
            nid = self._notice(envelope, content, state, "failure",
                               f"{qid}-NDR{state.attempts}", want, entries)
            notice_ids += [nid] if nid else []
        relayed = [i for i in delivered if not results[i].dsn_passed
                   and _wants(envelope.rcpt_notify(i), "SUCCESS")]
        if relayed:
            nid = self._notice(envelope, content, state, "success",
                               f"{qid}-RLY{state.attempts}", relayed, entries)
            notice_ids += [nid] if nid else []
        if after is None:
            self.spool.remove("outbound", qid, sync=False)
        return after, notice_ids

    def _notice(self, envelope: Envelope, content: bytes, state: OutboundState, kind: str,
                notice_id: str, indexes: list[int],
                entries: list[tuple[str, dict[str, Any]]], until: float | None = None
                ) -> str | None:
        """Queue a notice about these recipients; its id, or None when none is due."""
        action = {"failure": "failed", "delay": "delayed", "success": "relayed"}[kind]
        reports = []
        for i in indexes:
            rs = state.recipients[i]
            reports.append(RecipientReport(
                final_recipient=envelope.recipients[i], action=action,
                status=rs.code or ("2.0.0" if kind == "success" else "4.0.0"),
                original_recipient=envelope.rcpt_orcpt(i) or None,
                diagnostic_code=rs.reason or None, remote_mta=rs.remote_mta or None,
                last_attempt=rs.last_attempt or None,
                will_retry_until=until if kind == "delay" else None))
        ids = {"queue_id": envelope.queue_id, "message_id": envelope.message_id}
        queued = queue_notice(self.spool, self.notices, kind=kind, notice_id=notice_id,
                              envelope=envelope, content=content, reports=reports)
        if queued is None:
            if kind == "failure" and reports:
                entries.append(("83", {"detail": "no notice: the message was itself a notice "
                                                 "to the postmaster (dropped)", **ids}))
            return None
        new = queued.envelope
        generated = {"new_queue_id": new.queue_id, "new_message_id": new.message_id}
        entries.append(("87", {"detail": f"{kind} notice", **ids}))
        notice_ids = {"queue_id": new.queue_id, "message_id": new.message_id}
        if kind == "success":
            entries.append(("7R", {"detail": "relayed: the next hop has no DSN", **ids}))
            entries.append(("7G", {"detail": "confirmation of delivery", **generated, **ids}))
            codes = ("BR", "B1", "B2")
        else:
            for i in indexes:
                entries.append(("7P", {"recipient": envelope.recipients[i], **ids}))
            entries.append(("7G", {"detail": f"{kind} notice", **generated, **ids}))
            codes = ("AP", "A1", "A2")
        entries.append((codes[0], {"detail": kind, **notice_ids}))
        entries.append((codes[1], {"originator": "", **notice_ids}))
        for rcpt in new.recipients:
            entries.append((codes[2], {"recipient": rcpt, **notice_ids}))
        return None if queued.existed else new.queue_id

    # --- the scheduler's ETRN errand ---------------------------------------------------------

    async def etrn(self, ctx: JobContext, domains: list[str]) -> None:
        """Connect to the router and ask it to release our domains' mail (RFC 1985)."""
        host, router_port = parse_router(self.cfg.router)
        found, _ = await self.resolver.host_addresses(host)
        if isinstance(found, RouteFailure) or not found:
            log.warning("ETRN: router %s cannot be resolved", host)
            return
        try:
            conn, event = await open_connection(self.cfg, self.hostname, host, found[0],
                                                router_port or self.cfg.port)
        except SessionError as exc:
            log.warning("ETRN: %s", exc.reason)
            return
        try:
            if not isinstance(event, core.Ready):
                log.warning("ETRN: %s refused the session: %s", conn.peer, event)
                return
            for domain in domains:
                conn.core.send_etrn(domain)
                done = await conn.next_event()
                if isinstance(done, core.EtrnDone):
                    log.info("ETRN %s at %s: %s", domain, conn.peer, _reply_text(done.reply))
                else:
                    return
        except SessionError as exc:
            log.warning("ETRN: %s", exc.reason)
        finally:
            await conn.close()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def run(ctx: JobContext) -> None:
    role = ClientRole(ctx)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(role.cache.reaper)
            await run_job(ctx, deliver=role.deliver, etrn=role.etrn)
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await role.cache.close_all()
