"""SMTP client connections: thin Trio code driving the sans-IO client core, and a cache of them.

Each wait for a reply has the deadline RFC 5321 4.5.3.2 gives its stage (greeting, MAIL,
RCPT, DATA, the final dot ...), from [outbound]; the deadline covers the whole reply, never a
single read, so a server dripping bytes cannot stretch it. Content goes out in blocks, each
under the data block timeout. A connection whose transaction ended cleanly is kept for a
short time, keyed by next hop and address, for the next message to the same place; one that
saw an error or a timeout is never reused.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field

import trio

from mailpool.config import OutboundConfig
from mailpool.protocol import smtp_client as core
from mailpool.protocol.smtp_syntax import NEED_DATA

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


def stage_timeouts(cfg: OutboundConfig) -> dict[str, float]:
    return {"greeting": cfg.greeting_timeout, "ehlo": cfg.helo_timeout,
            "helo": cfg.helo_timeout, "mail": cfg.mail_timeout, "rcpt": cfg.rcpt_timeout,
            "data": cfg.data_timeout, "dot": cfg.data_done_timeout, "rset": cfg.mail_timeout,
            "etrn": cfg.mail_timeout, "quit": cfg.quit_timeout}


@dataclass
class Connection:
    stream: trio.SocketStream
    core: core.ClientConnection
    peer: str                 # "mx1.far.test[192.0.2.1]:25", for the journal and notices
    host: str                 # the MX host name (Remote-MTA)
    timeouts: dict[str, float]
    block_timeout: float
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
                          port: int) -> tuple[Connection, core.Event]:
    """Connect, read the greeting and say EHLO (or HELO); the handshake's event with it."""
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
    conn = Connection(stream, core.ClientConnection(local_hostname), peer, host,
                      stage_timeouts(cfg), cfg.data_block_timeout)
    try:
        event = await conn.next_event()
    except SessionError:
        await stream.aclose()
        raise
    return conn, event


class ConnectionCache:
    """Idle connections by (next hop, address), each for connection_cache_time seconds and
    at most connection_reuse_limit transactions."""

    def __init__(self, cfg: OutboundConfig) -> None:
        self.cfg = cfg
        self._idle: dict[tuple[str, str], list[Connection]] = {}

    async def take(self, dest: str, ip: str) -> Connection | None:
        idle = self._idle.get((dest, ip))
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
        self._idle.setdefault((dest, ip), []).append(conn)

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
