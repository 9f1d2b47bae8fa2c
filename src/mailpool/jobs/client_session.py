"""SMTP client connections: thin Trio code driving the sans-IO client core, and a cache of them.

Each wait for a reply has the deadline RFC 5321 4.5.3.2 gives its stage (greeting, MAIL,
RCPT, DATA, the final dot ...), from [outbound]; the deadline covers the whole reply, never a
single read, so a server dripping bytes cannot stretch it. Content goes out in blocks, each
under the data block timeout. A connection whose transaction ended cleanly is kept for a
short time, keyed by next hop, address and TLS policy, for the next message to the same place;
one that saw an error or a timeout is never reused.

STARTTLS follows the next hop's [outbound.tls] policy, as Postfix's smtp_tls_security_level:
"none" never; "may" when offered, without looking at the certificate, and a failed handshake
is followed by one plaintext session to the same address; "encrypt" requires TLS, any
certificate; "verify" requires TLS with a certificate that chains to a trusted CA and names
the MX host. The handshake has the EHLO deadline (helo_timeout). TLS 1.2 at least, always.
The TLS stream does not send or expect close_notify: SMTP marks its own ends (replies, the
final dot, QUIT), so a bare TCP close reads as the EOF it is in plaintext.
"""

from __future__ import annotations

import logging
import socket
import ssl
from dataclasses import dataclass, field

import trio

from mailpool.config import TLS_POLICIES, OutboundConfig, OutboundTlsConfig
from mailpool.protocol import smtp_client as core
from mailpool.protocol.smtp_syntax import NEED_DATA, Reply, enhanced_of

log = logging.getLogger("mailpool.client")

BLOCK = 64 * 1024
RECEIVE = 16 * 1024


class SessionError(Exception):
    """The connection failed: refused, timed out or closed. `stage` says where, which
    matters after the final dot (the message may have been delivered)."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


# The client core's STARTTLS mode for each policy.
_STARTTLS_MODE = {"none": "none", "may": "try", "encrypt": "require", "verify": "require"}


def tls_policy_for(cfg: OutboundTlsConfig, destination: str) -> str:
    """The policy for a next hop: its [outbound.tls.destinations] entry (the exact domain,
    any case), else the default policy."""
    wanted = destination.rstrip(".").lower()
    for domain, policy in cfg.destinations.items():
        if domain.rstrip(".").lower() == wanted:
            return policy
    return cfg.policy


class TlsContexts:
    """The client SSLContext of each policy, made on first use and kept (one per job): the
    system's CA store is read once, not per connection."""

    def __init__(self, ca_file: str = "") -> None:
        self.ca_file = ca_file
        self._contexts: dict[bool, ssl.SSLContext] = {}

    def get(self, policy: str) -> ssl.SSLContext:
        """The context for "may", "encrypt" or "verify"; raises OSError or ssl.SSLError when
        the CA file cannot be loaded."""
        if policy not in ("may", "encrypt", "verify"):
            raise ValueError(f"no TLS context for policy {policy!r}")
        verify = policy == "verify"
        context = self._contexts.get(verify)
        if context is None:
            if verify:
                context = ssl.create_default_context(cafile=self.ca_file or None)
            else:
                # Opportunistic and "encrypt": any certificate at all, as Postfix does.
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            self._contexts[verify] = context
        return context


def stage_timeouts(cfg: OutboundConfig) -> dict[str, float]:
    return {"greeting": cfg.greeting_timeout, "ehlo": cfg.helo_timeout,
            "helo": cfg.helo_timeout, "starttls": cfg.helo_timeout, "tls": cfg.helo_timeout,
            "mail": cfg.mail_timeout, "rcpt": cfg.rcpt_timeout,
            "data": cfg.data_timeout, "dot": cfg.data_done_timeout, "rset": cfg.mail_timeout,
            "etrn": cfg.mail_timeout, "quit": cfg.quit_timeout}


@dataclass
class Connection:
    stream: trio.abc.Stream   # a trio.SocketStream, or the trio.SSLStream over it
    core: core.ClientConnection
    peer: str                 # "mx1.far.test[192.0.2.1]:25", for the journal and notices
    host: str                 # the MX host name (Remote-MTA)
    timeouts: dict[str, float]
    block_timeout: float
    tls_policy: str = "none"  # what it was opened under (the cache key has it)
    # The TLS outcome for the journal: "TLSv1.3 TLS_AES_256_GCM_SHA384", "none" (plaintext:
    # not offered or policy none) or "plaintext after failed handshake (<reason>)".
    tls: str = "none"
    uses: int = 0
    broken: bool = False
    expires: float = 0.0
    extensions: dict[str, str] = field(default_factory=dict)

    async def next_event(self) -> core.Event:
        """Send what the core has queued, then read until it has an event."""
        while True:
            event = self.core.next_event()
            # Replies may queue commands (EHLO after the greeting, the content after 354).
            await self._flush()
            if event is not NEED_DATA:
                return event  # type: ignore[return-value]
            stage = self.core.stage
            with trio.move_on_after(self.timeouts.get(stage, 300.0)) as scope:
                try:
                    data = await self.stream.receive_some(RECEIVE)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self.broken = True
                    raise SessionError(stage, f"lost connection with {self.peer} while "
                                              f"waiting for the {stage} reply: {exc}") from None
            if scope.cancelled_caught:
                self.broken = True
                raise SessionError(stage, f"conversation with {self.peer} timed out while "
                                          f"waiting for the {stage} reply")
            self.core.receive_data(data)

    async def _flush(self) -> None:
        out = self.core.data_to_send()
        view = memoryview(out)
        while view:
            block, view = view[:BLOCK], view[BLOCK:]
            with trio.move_on_after(self.block_timeout) as scope:
                try:
                    await self.stream.send_all(block)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self.broken = True
                    raise SessionError(self.core.stage, f"lost connection with {self.peer} "
                                                        f"while sending: {exc}") from None
            if scope.cancelled_caught:
                self.broken = True
                raise SessionError(self.core.stage, f"conversation with {self.peer} timed "
                                                    "out while sending")

    async def close(self) -> None:
        """QUIT politely when the connection is sound, then close; never raises."""
        with trio.move_on_after(min(5.0, self.timeouts["quit"])):
            if not self.broken and self.core.stage in ("idle", "quit"):
                try:
                    if self.core.stage == "idle":
                        self.core.send_quit()
                    while not isinstance(await self.next_event(), core.Closed):
                        pass
                except (SessionError, core.SMTPClientError):
                    pass
        with trio.CancelScope(shield=True):
            await self.stream.aclose()


async def open_connection(cfg: OutboundConfig, local_hostname: str, host: str, ip: str,
                          port: int, *, tls_policy: str = "none",
                          tls_contexts: TlsContexts | None = None
                          ) -> tuple[Connection, core.Event]:
    """Connect, read the greeting, say EHLO (or HELO) and do STARTTLS as `tls_policy` says;
    the handshake's event with the connection: Ready, HandshakeFailed (not at "starttls") or
    Closed. Raises SessionError: "connect", a stage's timeout or lost connection, and
    "starttls" when the policy's TLS cannot be had (not offered, refused, the handshake or
    the certificate failed; a 421 to STARTTLS too). `tls_contexts` defaults to a fresh
    TlsContexts(cfg.tls.ca_file); pass the job's to build each context once."""
    if tls_policy not in TLS_POLICIES:
        raise ValueError(f"unknown TLS policy {tls_policy!r}")
    context: ssl.SSLContext | None = None
    if tls_policy != "none":
        contexts = tls_contexts or TlsContexts(cfg.tls.ca_file)
        try:
            context = contexts.get(tls_policy)
        except (OSError, ssl.SSLError) as exc:
            raise SessionError("starttls", f"TLS is required for {host}, but the client TLS "
                                           f"setup failed: CA file {contexts.ca_file!r}: "
                                           f"{getattr(exc, 'strerror', None) or exc}") from None
    conn, event = await _session(cfg, local_hostname, host, ip, port,
                                 _STARTTLS_MODE[tls_policy])
    conn.tls_policy = tls_policy
    if isinstance(event, core.StartTlsReady):
        assert context is not None
        failure = await _handshake(conn, context, cfg.helo_timeout)
        if failure is not None and tls_policy == "may":
            # Opportunistic: the same address again, in plaintext, once.
            log.info("TLS handshake with %s failed (%s): retrying in plaintext", conn.peer,
                     failure)
            conn, event = await _session(cfg, local_hostname, host, ip, port, "none")
            conn.tls_policy = tls_policy
            conn.tls = f"plaintext after failed handshake ({failure})"
            return conn, event
        if failure is not None:
            raise SessionError("starttls", f"TLS handshake with {conn.peer} failed: {failure}")
        try:
            event = await conn.next_event()  # EHLO again, over TLS
        except SessionError:
            await conn.close()
            raise
    if isinstance(event, core.HandshakeFailed) and event.stage == "starttls":
        await conn.close()  # QUIT is on its way (none after a 421)
        if event.reply is core.TLS_NOT_OFFERED:
            reason = f"TLS is required but was not offered by host {conn.peer}"
        elif event.reply.code == 421:
            reason = f"{conn.peer} ended the session at STARTTLS: {_reply_text(event.reply)}"
        else:
            reason = (f"TLS is required but {conn.peer} refused STARTTLS: "
                      f"{_reply_text(event.reply)}")
        raise SessionError("starttls", reason)
    return conn, event


async def _session(cfg: OutboundConfig, local_hostname: str, host: str, ip: str, port: int,
                   starttls: str) -> tuple[Connection, core.Event]:
    """Connect and run the core until its first event (Ready, StartTlsReady, ...)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    where = f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
    peer = f"{host}[{ip}]:{port}"
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        if cfg.bind_address:
            await sock.bind((cfg.bind_address, 0))
        with trio.fail_after(cfg.connect_timeout):
            await sock.connect((ip, port))
    except trio.TooSlowError:
        sock.close()
        raise SessionError("connect", f"connect to {host}[{where}]: timed out") from None
    except OSError as exc:
        sock.close()
        raise SessionError("connect", f"connect to {host}[{where}]: "
                                      f"{exc.strerror or exc}") from None
    stream = trio.SocketStream(sock)
    conn = Connection(stream, core.ClientConnection(local_hostname, starttls=starttls), peer,
                      host, stage_timeouts(cfg), cfg.data_block_timeout)
    try:
        event = await conn.next_event()
    except SessionError:
        await stream.aclose()
        raise
    return conn, event


async def _handshake(conn: Connection, context: ssl.SSLContext, timeout: float) -> str | None:
    """TLS over the connection after the server's 220 to STARTTLS. None when done (the
    connection now reads and writes through TLS and its `tls` names version and cipher),
    else why not (the connection is then closed)."""
    tls = trio.SSLStream(conn.stream, context, server_hostname=conn.host.rstrip("."),
                         https_compatible=True)
    failure: str | None = None
    with trio.move_on_after(timeout) as scope:
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            failure = _handshake_failure(exc.__cause__)
    if scope.cancelled_caught:
        failure = "the handshake timed out"
    if failure is not None:
        conn.broken = True
        conn.core.tls_failed()
        await trio.aclose_forcefully(tls)
        return failure
    conn.stream = tls
    conn.core.tls_established()
    cipher = tls.cipher()
    conn.tls = f"{tls.version()} {cipher[0] if cipher else '?'}"
    return None


def _handshake_failure(cause: BaseException | None) -> str:
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"certificate verification failed: {cause.verify_message}"
    if isinstance(cause, ssl.SSLEOFError) or (
            isinstance(cause, ssl.SSLError) and cause.reason == "UNEXPECTED_EOF_WHILE_READING"):
        return "the server closed the connection during the handshake"
    if isinstance(cause, ssl.SSLError):
        return f"TLS error: {cause.reason or cause}"
    if isinstance(cause, OSError):
        return f"connection lost during the handshake: {cause.strerror or cause}"
    return "the server closed the connection during the handshake"


def _reply_text(reply: Reply) -> str:
    return f"{reply.code} {enhanced_of(reply)} {reply.text}".strip()


class ConnectionCache:
    """Idle connections by (next hop, address, TLS policy), each for connection_cache_time
    seconds and at most connection_reuse_limit transactions. The policy is in the key so
    that a connection opened under a weaker one never serves a stricter delivery."""

    def __init__(self, cfg: OutboundConfig) -> None:
        self.cfg = cfg
        self._idle: dict[tuple[str, str, str], list[Connection]] = {}

    async def take(self, dest: str, ip: str, *, tls_policy: str = "none") -> Connection | None:
        idle = self._idle.get((dest, ip, tls_policy))
        while idle:
            conn = idle.pop()
            if conn.expires > trio.current_time() and not conn.broken:
                return conn
            await conn.close()
        return None

    async def give_back(self, dest: str, ip: str, conn: Connection) -> None:
        """Keep a connection that ended its transaction cleanly, or close it."""
        conn.uses += 1
        if (conn.broken or conn.core.stage != "idle" or self.cfg.connection_cache_time <= 0
                or conn.uses >= self.cfg.connection_reuse_limit):
            await conn.close()
            return
        conn.expires = trio.current_time() + self.cfg.connection_cache_time
        self._idle.setdefault((dest, ip, conn.tls_policy), []).append(conn)

    async def reaper(self) -> None:
        """Close connections idle past their time (and any the server closed meanwhile)."""
        while True:
            await trio.sleep(max(0.5, self.cfg.connection_cache_time / 2))
            now = trio.current_time()
            for key in list(self._idle):
                keep = [c for c in self._idle[key] if c.expires > now]
                for conn in self._idle[key]:
                    if conn not in keep:
                        await conn.close()
                if keep:
                    self._idle[key] = keep
                else:
                    del self._idle[key]

    async def close_all(self) -> None:
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                await conn.close()
