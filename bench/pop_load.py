"""POP3 retrieval load on Trio, usable against any POP3 server.

    python -m bench.pop_load --host 127.0.0.1 --port 1110 --sessions 10 \\
        --user 'bench{n}' --password secret --users 10 --messages 5000 [--json]

Each of N sessions logs in as one of the users (session i uses user i mod
--users, formatted into --user's "{n}"), STATs the maildrop, RETRs every
message in it (no DELE, so every round sees the same maildrop) and QUITs, then
logs in again until --messages retrievals were made in all (or --duration
passed). Printed: retrievals per second, megabytes per second, latency
percentiles of connect-to-greeting, login (USER sent -> PASS answered) and
RETR (command sent -> terminating "." read), and errors by kind. POP3
maildrops are locked per user (RFC 1939 section 8), so give each concurrent
session its own user.

`run_pop(...)` in this module is the runner the benchmark driver uses: it takes
any POP3 server that is already filled and reports the same figures.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import trio

from bench.smtp_load import percentiles, raise_fd_limit


class PopError(Exception):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


@dataclass
class PopConfig:
    host: str = "127.0.0.1"
    port: int = 110
    sessions: int = 1
    user: str = "bench{n}"
    password: str = "bench"
    users: int = 1
    messages: int = 1000  # RETR budget shared by all sessions
    timeout: float = 30.0
    duration: float = 0.0


@dataclass
class PopResult:
    tool: str
    host: str
    port: int
    sessions: int
    users: int
    requested: int
    retrieved: int
    bytes: int
    logins: int
    elapsed: float
    retr_per_sec: float
    mb_per_sec: float
    greeting_ms: dict[str, float]
    login_ms: dict[str, float]
    retr_ms: dict[str, float]
    errors: dict[str, int]
    stopped_early: bool = False
    extra: dict[str, object] = field(default_factory=dict)


class PopConn:
    __slots__ = ("buf", "sock")

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.buf = bytearray()

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[await self.sock.send(view) :]

    async def _more(self) -> None:
        data = await self.sock.recv(262144)
        if not data:
            raise PopError("closed")
        self.buf += data

    async def line(self) -> bytes:
        while (nl := self.buf.find(b"\n")) < 0:
            await self._more()
        out = bytes(self.buf[: nl + 1])
        del self.buf[: nl + 1]
        return out

    async def status(self, what: str) -> bytes:
        """One status line; -ERR (or anything but +OK) raises PopError('-ERR <what>')."""
        line = await self.line()
        if not line.startswith(b"+OK"):
            raise PopError(f"-ERR {what}" if line.startswith(b"-ERR") else f"garbled {what}")
        return line

    async def multiline(self) -> int:
        """Read a dot-terminated body after its +OK line; returns its size in bytes."""
        while len(self.buf) < 3:
            await self._more()
        if self.buf.startswith(b".\r\n"):  # empty body: "." right after the status line
            del self.buf[:3]
            return 0
        start = 0
        while (end := self.buf.find(b"\r\n.\r\n", max(0, start - 4))) < 0:
            start = len(self.buf)
            await self._more()
        del self.buf[: end + 5]
        return end + 2


class PopLoad:
    def __init__(self, cfg: PopConfig) -> None:
        self.cfg = cfg
        self.remaining = cfg.messages
        self.retrieved = 0
        self.bytes = 0
        self.logins = 0
        self.greeting: list[float] = []
        self.login: list[float] = []
        self.retr: list[float] = []
        self.errors: Counter[str] = Counter()
        self.deadline = math.inf
        self.stopped_early = False

    def more(self) -> bool:
        if self.remaining <= 0:
            return False
        if time.monotonic() >= self.deadline:
            self.stopped_early = True
            return False
        return True

    async def session(self, index: int) -> None:
        cfg = self.cfg
        user = cfg.user.format(n=index % cfg.users).encode()
        while self.more():
            with trio.CancelScope() as scope:
                scope.deadline = trio.current_time() + cfg.timeout
                t0 = time.perf_counter()
                sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
                try:
                    try:
                        await sock.connect((cfg.host, cfg.port))
                    except OSError as exc:
                        self.errors[f"connect-{errno.errorcode.get(exc.errno or 0, 'error')}"] += 1
                        self.remaining -= 1  # a refused connection still uses up the budget
                        continue
                    try:
                        await self.conversation(PopConn(sock), user, t0, scope)
                    except PopError as exc:
                        self.errors[exc.kind] += 1
                        self.remaining -= 1
                    except OSError:
                        self.errors["closed"] += 1
                        self.remaining -= 1
                finally:
                    sock.close()
            if scope.cancelled_caught:
                self.errors["timeout"] += 1
                self.remaining -= 1

    async def conversation(self, conn: PopConn, user: bytes, t0: float,
                           scope: trio.CancelScope) -> None:
        timeout = self.cfg.timeout
        await conn.status("greeting")
        self.greeting.append(time.perf_counter() - t0)
        scope.deadline = trio.current_time() + timeout
        t1 = time.perf_counter()
        await conn.send(b"USER " + user + b"\r\n")
        await conn.status("USER")
        await conn.send(b"PASS " + self.cfg.password.encode() + b"\r\n")
        await conn.status("PASS")
        self.login.append(time.perf_counter() - t1)
        self.logins += 1
        scope.deadline = trio.current_time() + timeout
        await conn.send(b"STAT\r\n")
        parts = (await conn.status("STAT")).split()
        count = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        if count == 0:
            raise PopError("empty maildrop")
        for msg in range(1, count + 1):
            if not self.more():
                break
            self.remaining -= 1
            scope.deadline = trio.current_time() + timeout
            t2 = time.perf_counter()
            await conn.send(b"RETR %d\r\n" % msg)
            await conn.status("RETR")
            size = await conn.multiline()
            self.retr.append(time.perf_counter() - t2)
            self.retrieved += 1
            self.bytes += size
        scope.deadline = trio.current_time() + timeout
        await conn.send(b"QUIT\r\n")
        await conn.line()

    async def run(self) -> PopResult:
        cfg = self.cfg
        if cfg.duration > 0:
            self.deadline = time.monotonic() + cfg.duration
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(cfg.sessions):
                nursery.start_soon(self.session, i)
        elapsed = time.perf_counter() - start
        return PopResult(
            tool="pop_load", host=cfg.host, port=cfg.port, sessions=cfg.sessions,
            users=cfg.users, requested=cfg.messages, retrieved=self.retrieved, bytes=self.bytes,
            logins=self.logins, elapsed=elapsed,
            retr_per_sec=self.retrieved / elapsed if elapsed > 0 else 0.0,
            mb_per_sec=self.bytes / elapsed / 1e6 if elapsed > 0 else 0.0,
            greeting_ms=percentiles(self.greeting), login_ms=percentiles(self.login),
            retr_ms=percentiles(self.retr), errors=dict(sorted(self.errors.items())),
            stopped_early=self.stopped_early,
        )


async def run_pop(cfg: PopConfig) -> PopResult:
    """Drive one POP3 server (already holding the users' mail) and report what it did."""
    return await PopLoad(cfg).run()


def format_result(r: PopResult) -> str:
    def lat(d: dict[str, float]) -> str:
        if not d.get("n"):
            return "no samples"
        return " ".join(f"{k}={d[k]:.2f}" for k in ("p50", "p90", "p99", "max")) + " ms"

    errs = ", ".join(f"{k}: {v}" for k, v in r.errors.items()) or "none"
    early = " (stopped at --duration)" if r.stopped_early else ""
    return "\n".join([
        f"{r.host}:{r.port}  sessions={r.sessions} users={r.users}",
        f"retrieved {r.retrieved} messages ({r.bytes / 1e6:.1f} MB) in {r.elapsed:.2f} s over "
        f"{r.logins} logins{early}: {r.retr_per_sec:.1f} msg/s, {r.mb_per_sec:.1f} MB/s",
        f"connect-to-greeting  {lat(r.greeting_ms)}",
        f"login                {lat(r.login_ms)}",
        f"RETR                 {lat(r.retr_ms)}",
        f"errors               {errs}",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.pop_load",
                                description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=110)
    p.add_argument("--sessions", type=int, default=1)
    p.add_argument("--user", default="bench{n}", help='user name; "{n}" is the user number')
    p.add_argument("--password", default="bench")
    p.add_argument("--users", type=int, default=1, help="distinct users, numbered from 0")
    p.add_argument("--messages", type=int, default=1000, help="RETRs in all")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--duration", type=float, default=0.0)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    for name in ("sessions", "users", "messages"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be at least 1")
    cfg = PopConfig(**{k: v for k, v in vars(a).items() if k != "json"})
    raise_fd_limit()
    result = trio.run(run_pop, cfg)
    print(json.dumps(asdict(result), separators=(",", ":")) if a.json else format_result(result))
    return 0 if result.retrieved else 1


if __name__ == "__main__":
    sys.exit(main())
