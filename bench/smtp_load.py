"""SMTP load generator on Trio, usable against any SMTP server.

    python -m bench.smtp_load --host 127.0.0.1 --port 2525 --sessions 20 \\
        --messages 10000 --size 1024 [--per-connection K] [--pipelining] [--json]
        [--starttls [--tls-ca CA.pem] [--tls-name NAME]]

N sessions share one budget of M messages. Each session connects, reads the
greeting, says EHLO, sends up to K messages (MAIL, RCPT, DATA, content) and
QUITs, then connects again while messages remain. Printed: messages per second,
latency percentiles of connect-to-greeting (TCP connect started -> whole 220
read) and DATA-to-250 (DATA command sent -> final reply to the content read),
and errors by reply code. Every message is attempted once: a refused message is
counted under its reply code (or "timeout", "closed", "connect-...") and not
retried, so a run always ends after M attempts, or at --duration.

With --starttls every connection says STARTTLS after EHLO, expects 220, does the
TLS handshake, says EHLO again and only then sends its messages. Also printed
then: completed handshakes per second and the handshake latency (STARTTLS sent
-> handshake done). The client trusts only --tls-ca and checks the certificate
against --tls-name (default --host); without --tls-ca it verifies nothing, as
an MTA's opportunistic TLS does. A session is never resumed: every handshake is
a full one.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import multiprocessing
import os
import ssl
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Protocol

import trio

from mailpool.fsutil import raise_fd_limit  # many sessions need many descriptors

CRLF = b"\r\n"


class ReplyError(Exception):
    """The session cannot go on: reply code or transport failure, as counted in errors."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


@dataclass
class LoadConfig:
    host: str = "127.0.0.1"
    port: int = 25
    sessions: int = 1
    messages: int = 100
    size: int = 1024
    per_connection: int = 1
    pipelining: bool = False
    mail_from: str = "bench@load.test"
    rcpt_to: str = "bench@example.test"
    helo: str = "load.test"
    timeout: float = 30.0
    duration: float = 0.0  # 0 = no limit; else stop starting messages after this many seconds
    procs: int = 1  # client processes sharing the sessions (Python needs more than one core)
    starttls: bool = False  # STARTTLS after EHLO, then EHLO again and the transaction
    tls_ca: str = ""  # PEM file of the only CA trusted; "" = no certificate verification
    tls_name: str = ""  # server_hostname: SNI, and the name verified with tls_ca; "" = host


@dataclass
class LoadResult:
    tool: str
    host: str
    port: int
    sessions: int
    size: int
    per_connection: int
    pipelining: bool
    requested: int
    attempted: int
    sent: int
    failed: int
    connections: int
    elapsed: float
    msgs_per_sec: float
    greeting_ms: dict[str, float]
    data_ms: dict[str, float]
    errors: dict[str, int]
    pipelined: bool = False
    stopped_early: bool = False
    started_at: float = 0.0  # time.time() of the first connection (for end-to-end rates)
    extra: dict[str, object] = field(default_factory=dict)
    starttls: bool = False
    handshakes: int = 0  # completed TLS handshakes
    handshakes_per_sec: float = 0.0
    handshake_ms: dict[str, float] = field(default_factory=dict)  # STARTTLS sent -> done
    tls: dict[str, int] = field(default_factory=dict)  # "version cipher": sessions


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50/p90/p99/max in milliseconds, nearest-rank; empty input gives n=0 only."""
    if not samples:
        return {"n": 0}
    s = sorted(samples)

    def rank(p: float) -> float:
        return s[max(0, math.ceil(p / 100 * len(s)) - 1)] * 1000

    return {"n": len(s), "p50": rank(50), "p90": rank(90), "p99": rank(99), "max": s[-1] * 1000}


def make_body(size: int) -> bytes:
    """Header-less filler of exactly `size` bytes (>= 2), lines of 78 + CRLF, no leading dots."""
    line = (b"abcdefghijklmnopqrstuvwxyz0123456789" * 3)[:78] + CRLF
    body = line * (size // len(line) + 1)
    body = body[: max(size, 2) - 2] + CRLF
    return body if not body.startswith(b".") else b"x" + body[1:]


class Socket(Protocol):
    """The two socket calls Conn makes."""

    async def send(self, data: memoryview) -> int: ...

    async def recv(self, size: int) -> bytes: ...


class TlsSocket:
    """Socket's calls on a trio.SSLStream, so that Conn's code serves both paths unchanged."""

    __slots__ = ("stream",)

    def __init__(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.stream = stream

    async def send(self, data: memoryview) -> int:
        try:
            await self.stream.send_all(data)
        except trio.BrokenResourceError:
            raise ReplyError("closed") from None
        return len(data)

    async def recv(self, size: int) -> bytes:
        try:
            return await self.stream.receive_some(size)
        except trio.BrokenResourceError:  # reset, or closed without close_notify
            return b""


def client_context(ca_file: str = "") -> ssl.SSLContext:
    """Trusting only ca_file, host name checked; without one, verifying nothing."""
    if ca_file:
        return ssl.create_default_context(cafile=ca_file)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class Conn:
    """A raw Trio socket with a reply reader: the hot path avoids stream-layer overhead so
    that one client process can drive a fast server (smtp-sink measures what is left)."""

    __slots__ = ("buf", "sock")

    def __init__(self, sock: trio.socket.SocketType | Socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = await self.sock.send(view)
            view = view[n:]

    async def reply(self) -> tuple[int, bytes]:
        """One whole (possibly multi-line) reply: (code, all its lines)."""
        buf = self.buf
        pos = 0  # start of the first line not yet known to be a continuation ("250-")
        while True:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                data = await self.sock.recv(65536)
                if not data:
                    raise ReplyError("closed")
                buf += data
                continue
            if nl - pos >= 4 and buf[pos + 3] == 0x2D:  # "-": more lines follow
                pos = nl + 1
                continue
            text = bytes(buf[: nl + 1])
            code = buf[pos : pos + 3]
            del buf[: nl + 1]
            if not code.isdigit():
                raise ReplyError("garbled")
            return int(code), text


class Load:
    def __init__(self, cfg: LoadConfig) -> None:
        self.cfg = cfg
        self.remaining = cfg.messages
        self.attempted = 0
        self.sent = 0
        self.connections = 0
        self.greeting: list[float] = []
        self.data: list[float] = []
        self.errors: Counter[str] = Counter()
        self.pipelined = False
        self.stopped_early = False
        self.deadline = math.inf
        self.body = make_body(cfg.size)
        self.mail = f"MAIL FROM:<{cfg.mail_from}>\r\n".encode()
        self.mail_size = f"MAIL FROM:<{cfg.mail_from}> SIZE={cfg.size + 200}\r\n".encode()
        self.rcpt = f"RCPT TO:<{cfg.rcpt_to}>\r\n".encode()
        self.ehlo = f"EHLO {cfg.helo}\r\n".encode()
        self.header_tmpl = (
            f"From: <{cfg.mail_from}>\r\nTo: <{cfg.rcpt_to}>\r\nSubject: load %d\r\n"
            f"Message-ID: <%d.%d@{cfg.helo}>\r\n\r\n"
        )
        self.pid = os.getpid()
        self.wall_start = self.wall_end = 0.0
        self.handshake: list[float] = []
        self.tls: Counter[str] = Counter()
        self.context = client_context(cfg.tls_ca) if cfg.starttls else None
        self.server_name = cfg.tls_name or cfg.host

    def take(self) -> bool:
        """Claim one message from the shared budget (False when the run is over)."""
        if self.remaining <= 0:
            return False
        if time.monotonic() >= self.deadline:
            self.stopped_early = True
            return False
        self.remaining -= 1
        self.attempted += 1
        return True

    def content(self) -> bytes:
        n = self.attempted
        head = (self.header_tmpl % (n, n, self.pid)).encode()
        return head + self.body + b".\r\n"

    async def session(self) -> None:
        cfg = self.cfg
        while self.take():
            # One cancel scope per connection; its deadline moves before every reply awaited.
            with trio.CancelScope() as scope:
                scope.deadline = trio.current_time() + cfg.timeout
                t0 = time.perf_counter()
                sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
                try:
                    sock.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
                    try:
                        await sock.connect((cfg.host, cfg.port))
                    except OSError as exc:
                        name = errno.errorcode.get(exc.errno or 0, "error")
                        self.errors[f"connect-{name}"] += 1
                        continue
                    self.connections += 1
                    try:
                        await self.conversation(Conn(sock), t0, scope)
                    except ReplyError as exc:
                        self.errors[exc.code] += 1
                    except OSError:
                        self.errors["closed"] += 1
                finally:
                    sock.close()
            if scope.cancelled_caught:
                self.errors["timeout"] += 1

    async def conversation(self, conn: Conn, t0: float, scope: trio.CancelScope) -> None:
        """One connection; the message claimed by the caller is sent first."""
        timeout = self.cfg.timeout
        per_connection = self.cfg.per_connection
        send, reply = conn.send, conn.reply
        code, _ = await reply()
        if code != 220:
            raise ReplyError(str(code))
        self.greeting.append(time.perf_counter() - t0)
        scope.deadline = trio.current_time() + timeout
        await send(self.ehlo)
        code, text = await reply()
        if code != 250:
            raise ReplyError(str(code))
        if self.context is not None:
            conn = await self.starttls(conn, text, scope)
            send, reply = conn.send, conn.reply
            scope.deadline = trio.current_time() + timeout
            await send(self.ehlo)
            code, text = await reply()
            if code != 250:
                raise ReplyError(str(code))
        upper = text.upper()
        pipelining = self.cfg.pipelining and b"PIPELINING" in upper
        mail = self.mail_size if b"SIZE" in upper else self.mail
        self.pipelined = self.pipelined or pipelining
        count = 0
        while True:
            count += 1
            content = self.content()
            scope.deadline = trio.current_time() + timeout
            t1 = 0.0
            if pipelining:
                t1 = time.perf_counter()
                await send(mail + self.rcpt + b"DATA\r\n")
                codes = [(await reply())[0], (await reply())[0], (await reply())[0]]
            else:
                await send(mail)
                codes = [(await reply())[0]]
                if codes[0] == 250:
                    await send(self.rcpt)
                    codes.append((await reply())[0])
                    if codes[1] in (250, 251):
                        t1 = time.perf_counter()
                        await send(b"DATA\r\n")
                        codes.append((await reply())[0])
            if len(codes) == 3 and codes[0] == 250 and codes[1] in (250, 251) and codes[2] == 354:
                scope.deadline = trio.current_time() + timeout
                await send(content)
                code, _ = await reply()
                if code == 250:
                    self.data.append(time.perf_counter() - t1)
                    self.sent += 1
                else:
                    self.errors[str(code)] += 1
                    if code == 421:
                        return
            else:
                bad = next(c for c in codes if c not in (250, 251, 354))
                self.errors[str(bad)] += 1
                if bad == 421:
                    return
                scope.deadline = trio.current_time() + timeout
                if 354 in codes:  # DATA went through after a refused RCPT: end it empty
                    await send(b".\r\n")
                    await reply()
                await send(b"RSET\r\n")
                await reply()
            if count >= per_connection or not self.take():
                break
        scope.deadline = trio.current_time() + timeout
        await send(b"QUIT\r\n")
        await reply()

    async def starttls(self, conn: Conn, ehlo: bytes, scope: trio.CancelScope) -> Conn:
        """STARTTLS and the handshake on conn's socket: a Conn over the TLS stream."""
        assert self.context is not None
        if b"STARTTLS" not in ehlo.upper():
            raise ReplyError("no-starttls")
        scope.deadline = trio.current_time() + self.cfg.timeout
        t0 = time.perf_counter()
        await conn.send(b"STARTTLS\r\n")
        code, _ = await conn.reply()
        if code != 220:
            raise ReplyError(f"starttls-{code}")
        if conn.buf:  # nothing may come between the 220 and the handshake
            raise ReplyError("garbled")
        assert isinstance(conn.sock, trio.socket.SocketType)
        stream = trio.SSLStream(trio.SocketStream(conn.sock), self.context,
                                server_hostname=self.server_name)
        scope.deadline = trio.current_time() + self.cfg.timeout
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            verify = isinstance(exc.__cause__, ssl.SSLCertVerificationError)
            raise ReplyError("tls-verify" if verify else "tls-handshake") from None
        self.handshake.append(time.perf_counter() - t0)
        cipher = stream.cipher()
        self.tls[f"{stream.version()} {cipher[0] if cipher else '?'}"] += 1
        return Conn(TlsSocket(stream))

    async def run(self, start_at: float = 0.0) -> LoadResult:
        """Run the load; start_at (time.time()) lines up several client processes."""
        cfg = self.cfg
        if start_at:
            await trio.sleep(max(0.0, start_at - time.time()))
        self.wall_start = time.time()
        start = time.perf_counter()
        if cfg.duration > 0:
            self.deadline = time.monotonic() + cfg.duration
        async with trio.open_nursery() as nursery:
            for _ in range(min(cfg.sessions, cfg.messages)):
                nursery.start_soon(self.session)
        elapsed = time.perf_counter() - start
        self.wall_end = time.time()
        return LoadResult(
            tool="smtp_load", host=cfg.host, port=cfg.port, sessions=cfg.sessions,
            size=cfg.size, per_connection=cfg.per_connection, pipelining=cfg.pipelining,
            requested=cfg.messages, attempted=self.attempted, sent=self.sent,
            failed=self.attempted - self.sent, connections=self.connections,
            elapsed=elapsed, msgs_per_sec=self.sent / elapsed if elapsed > 0 else 0.0,
            greeting_ms=percentiles(self.greeting), data_ms=percentiles(self.data),
            errors=dict(sorted(self.errors.items())), pipelined=self.pipelined,
            stopped_early=self.stopped_early, started_at=self.wall_start,
            starttls=cfg.starttls, handshakes=len(self.handshake),
            handshakes_per_sec=len(self.handshake) / elapsed if elapsed > 0 else 0.0,
            handshake_ms=percentiles(self.handshake) if cfg.starttls else {},
            tls=dict(sorted(self.tls.items())),
        )


async def run_load(cfg: LoadConfig) -> LoadResult:
    """The load in this process (cfg.procs is ignored here; see run_procs)."""
    return await Load(cfg).run()


def _split(total: int, parts: int, i: int) -> int:
    return total // parts + (1 if i < total % parts else 0)


def _worker(cfg: LoadConfig, start_at: float) -> tuple[LoadResult, list[float], list[float],
                                                       float, float, list[float]]:
    raise_fd_limit()
    load = Load(cfg)
    result = trio.run(load.run, start_at)
    return result, load.greeting, load.data, load.wall_start, load.wall_end, load.handshake


def run_procs(cfg: LoadConfig) -> LoadResult:
    """Split the sessions and messages over cfg.procs processes and merge what they measured."""
    procs = max(1, min(cfg.procs, cfg.sessions, cfg.messages))
    if procs == 1:
        raise_fd_limit()
        return trio.run(run_load, cfg)
    subs = [replace(cfg, sessions=_split(cfg.sessions, procs, i), procs=1,
                    messages=_split(cfg.messages, procs, i)) for i in range(procs)]
    start_at = time.time() + 0.5  # let every process get to its start line first
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(procs, mp_context=ctx) as pool:
        parts = list(pool.map(_worker, subs, [start_at] * procs))
    greeting = [x for p in parts for x in p[1]]
    data = [x for p in parts for x in p[2]]
    handshake = [x for p in parts for x in p[5]]
    elapsed = max(p[4] for p in parts) - min(p[3] for p in parts)
    errors: Counter[str] = Counter()
    tls: Counter[str] = Counter()
    for p in parts:
        errors.update(p[0].errors)
        tls.update(p[0].tls)
    sent = sum(p[0].sent for p in parts)
    attempted = sum(p[0].attempted for p in parts)
    return LoadResult(
        tool="smtp_load", host=cfg.host, port=cfg.port, sessions=cfg.sessions, size=cfg.size,
        per_connection=cfg.per_connection, pipelining=cfg.pipelining, requested=cfg.messages,
        attempted=attempted, sent=sent, failed=attempted - sent,
        connections=sum(p[0].connections for p in parts), elapsed=elapsed,
        msgs_per_sec=sent / elapsed if elapsed > 0 else 0.0,
        greeting_ms=percentiles(greeting), data_ms=percentiles(data),
        errors=dict(sorted(errors.items())), pipelined=any(p[0].pipelined for p in parts),
        stopped_early=any(p[0].stopped_early for p in parts),
        started_at=min(p[3] for p in parts), extra={"procs": procs},
        starttls=cfg.starttls, handshakes=len(handshake),
        handshakes_per_sec=len(handshake) / elapsed if elapsed > 0 else 0.0,
        handshake_ms=percentiles(handshake) if cfg.starttls else {},
        tls=dict(sorted(tls.items())),
    )


def format_result(r: LoadResult) -> str:
    def lat(d: dict[str, float]) -> str:
        if not d.get("n"):
            return "no samples"
        return " ".join(f"{k}={d[k]:.2f}" for k in ("p50", "p90", "p99", "max")) + " ms"

    errs = ", ".join(f"{k}: {v}" for k, v in r.errors.items()) or "none"
    early = " (stopped at --duration)" if r.stopped_early else ""
    lines = [
        f"{r.host}:{r.port}  sessions={r.sessions} size={r.size} per-connection="
        f"{r.per_connection} pipelining={'on' if r.pipelined else 'off'}"
        + (" starttls" if r.starttls else ""),
        f"sent {r.sent}/{r.attempted} in {r.elapsed:.2f} s over {r.connections} connections"
        f"{early}: {r.msgs_per_sec:.1f} msg/s",
        f"connect-to-greeting  {lat(r.greeting_ms)}",
        f"DATA-to-250          {lat(r.data_ms)}",
    ]
    if r.starttls:
        tls = ", ".join(f"{k} ({v})" for k, v in r.tls.items()) or "none"
        lines += [f"STARTTLS-to-secure   {lat(r.handshake_ms)}",
                  f"handshakes           {r.handshakes}: {r.handshakes_per_sec:.1f}/s; {tls}"]
    return "\n".join([*lines, f"errors               {errs}"])


def parse_args(argv: list[str] | None = None) -> tuple[LoadConfig, bool]:
    """(load config, whether to print JSON)."""
    p = argparse.ArgumentParser(prog="python -m bench.smtp_load",
                                description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=25)
    p.add_argument("--sessions", type=int, default=1, help="concurrent sessions (N)")
    p.add_argument("--messages", type=int, default=100, help="messages in all (M)")
    p.add_argument("--size", type=int, default=1024, help="message size in bytes, headers excluded")
    p.add_argument("--per-connection", type=int, default=1, metavar="K",
                   help="messages per connection before QUIT (default 1)")
    p.add_argument("--pipelining", action="store_true",
                   help="send MAIL, RCPT and DATA in one write when the server offers PIPELINING")
    p.add_argument("--from", dest="mail_from", default="bench@load.test")
    p.add_argument("--to", dest="rcpt_to", default="bench@example.test")
    p.add_argument("--helo", default="load.test")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per reply (default 30)")
    p.add_argument("--duration", type=float, default=0.0,
                   help="stop starting messages after this many seconds (0: no limit)")
    p.add_argument("--procs", type=int, default=1,
                   help="client processes to spread the sessions over (default 1)")
    p.add_argument("--starttls", action="store_true",
                   help="STARTTLS after EHLO on every connection, then EHLO again")
    p.add_argument("--tls-ca", default="", metavar="PEM",
                   help="the only CA to trust (default: no certificate verification)")
    p.add_argument("--tls-name", default="", metavar="NAME",
                   help="the server name for SNI and verification (default: --host)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    a = p.parse_args(argv)
    for name in ("sessions", "messages", "size", "per_connection", "procs"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.timeout <= 0:
        p.error("--timeout must be above 0")
    return LoadConfig(**{k: v for k, v in vars(a).items() if k != "json"}), a.json


def main(argv: list[str] | None = None) -> int:
    cfg, as_json = parse_args(argv)
    result = run_procs(cfg)
    if as_json:
        print(json.dumps(asdict(result), separators=(",", ":")))
    else:
        print(format_result(result))
    return 0 if result.sent else 1


if __name__ == "__main__":
    sys.exit(main())
