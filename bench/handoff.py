"""What a connection costs through the prestart job pool: connect-to-greeting and hand-off.

    python -m bench.handoff [--connections N] [--concurrency C] [--sequential M]

In one run, on 127.0.0.1, against each server: M connections one at a time, then N
connections C at a time; each connects, reads the whole 220 greeting, sends QUIT and reads
the answer. Printed: connect-to-greeting latency (TCP connect started -> greeting line read,
p50/p99) and connections per second. Servers:

- a direct Trio listener that writes a 220 itself (no pool: the floor of this machine, this
  client and Trio's accept path);
- mailpool with the default pools (4 / 2 / 2 / 20 jobs of 512 sessions each);
- Postfix's smtpd from a private instance (bench.servers.Postfix), where installed.

The cost of one hand-off is the supervisor's side: the sequential p50 through mailpool minus
the direct listener's p50 (accept, pick a job, SCM_RIGHTS over the job's channel, the JH
record, the job picking the socket up and writing its greeting), and the supervisor's own CPU
time per connection (its /proc utime+stime over the concurrent phase, divided by the
connections). Numbers are printed, never asserted. The whole run is bounded (< 1 minute).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import trio

from bench.cpu import cpu_seconds, settle
from bench.servers import (
    HOST,
    Mailpool,
    Postfix,
    Server,
    ServerError,
    free_port,
    wait_banner,
)

PHASE_LIMIT = 12.0  # seconds per measured phase at most
# Between paired connections: lets the previous session's tail (its close, the supervisor's
# SessionEnded bookkeeping) finish so that it does not land on the next sample.
PAIR_GAP = 0.003
CONNECT_TIMEOUT = 10.0


# --- the direct listener (run as its own process, like the servers it is compared with) --------


async def serve_direct(port: int) -> None:
    listener = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    await listener.bind((HOST, port))
    listener.listen(512)

    async def one(sock: trio.socket.SocketType) -> None:
        with sock:
            try:
                await sock.send(b"220 direct.bench.test ESMTP\r\n")
                buf = b""
                while b"\n" not in buf:
                    chunk = await sock.recv(1024)
                    if not chunk:
                        return
                    buf += chunk
                await sock.send(b"221 2.0.0 Bye\r\n")
            except OSError:
                pass

    async with trio.open_nursery() as nursery:
        while True:
            sock, _ = await listener.accept()
            nursery.start_soon(one, sock)


class Direct(Server):
    kind = "direct"

    def start(self, timeout: float = 30.0) -> None:
        self.port = free_port()
        root = Path(__file__).resolve().parent.parent
        self.proc = self._popen([sys.executable, "-m", "bench.handoff", "--serve-direct",
                                 str(self.port)], cwd=root,
                                env={**os.environ, "PYTHONPATH": str(root)})
        wait_banner(self.port, b"220", timeout, self.proc)


# --- the client ---------------------------------------------------------------------------------


@dataclass
class Phase:
    connections: int
    concurrency: int
    ok: int = 0
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    cpu_us_per_conn: float | None = None

    def pct(self, p: float) -> float:
        """Nearest-rank percentile in milliseconds (nan without samples)."""
        if not self.latencies:
            return math.nan
        s = sorted(self.latencies)
        return s[max(0, math.ceil(p / 100 * len(s)) - 1)] * 1000

    @property
    def rate(self) -> float:
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0


async def one_connection(port: int, phase: Phase) -> float | None:
    """Connect-to-greeting in seconds (None on failure, counted in phase.errors)."""
    start = trio.current_time()
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            stream = await trio.open_tcp_stream(HOST, port)
            async with stream:
                buf = b""
                while b"\n" not in buf:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        raise EOFError
                    buf += chunk
                greeted = trio.current_time()
                if not buf.startswith(b"220"):
                    phase.errors[buf[:3].decode(errors="replace")] += 1
                    return None
                await stream.send_all(b"QUIT\r\n")
                reply = b""
                while b"\n" not in reply:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        break
                    reply += chunk
    except trio.TooSlowError:
        phase.errors["timeout"] += 1
        return None
    except (OSError, EOFError, trio.BrokenResourceError) as exc:
        phase.errors[type(exc).__name__] += 1
        return None
    phase.latencies.append(greeted - start)
    phase.ok += 1
    return greeted - start


async def run_phase(port: int, connections: int, concurrency: int, gap: float = 0.0) -> Phase:
    phase = Phase(connections, concurrency)
    todo = iter(range(connections))

    async def worker() -> None:
        for _ in todo:
            await one_connection(port, phase)
            if gap:
                await trio.sleep(gap)

    start = trio.current_time()
    with trio.move_on_after(PHASE_LIMIT):
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
    phase.elapsed = trio.current_time() - start
    return phase


async def run_pairs(direct_port: int, port: int, pairs: int
                    ) -> tuple[Phase, Phase, list[float]]:
    """One connection to the direct listener, then one to `port`, `pairs` times: the two
    samples of a pair see the same machine load, so their difference is the hand-off.
    Returns both phases and the differences (seconds)."""
    direct, pooled = Phase(pairs, 1), Phase(pairs, 1)
    diffs: list[float] = []
    start = trio.current_time()
    with trio.move_on_after(PHASE_LIMIT):
        for _ in range(pairs):
            a = await one_connection(direct_port, direct)
            await trio.sleep(PAIR_GAP)
            b = await one_connection(port, pooled)
            await trio.sleep(PAIR_GAP)
            if a is not None and b is not None:
                diffs.append(b - a)
    pooled.elapsed = trio.current_time() - start
    return direct, pooled, diffs


@dataclass
class Measured:
    label: str
    sequential: Phase | None = None
    concurrent: Phase | None = None
    skipped: str | None = None
    handoff_us: float | None = None  # median of (pooled - direct) over interleaved pairs
    paired_direct: Phase | None = None  # the direct listener's samples of those pairs


def measure(server: Server, args: argparse.Namespace, supervisor_cpu: bool,
            direct_port: int | None = None) -> Measured:
    result = Measured(server.label)
    try:
        server.start()
    except (ServerError, OSError, FileNotFoundError) as exc:
        server.stop()
        result.skipped = str(exc)
        return result
    try:
        # Warm up: every prestart job (or smtpd process) started and ready.
        trio.run(run_phase, server.port, max(2 * args.concurrency, 40), args.concurrency)
        settle(server)
        if direct_port is None:
            result.sequential = trio.run(run_phase, server.port, args.sequential, 1, PAIR_GAP)
        else:
            result.paired_direct, result.sequential, diffs = trio.run(
                run_pairs, direct_port, server.port, args.sequential)
            if diffs:
                result.handoff_us = sorted(diffs)[len(diffs) // 2] * 1e6
        pid = server.proc.pid if supervisor_cpu and server.proc is not None else None
        before = cpu_seconds(pid) if pid else 0.0
        result.concurrent = trio.run(run_phase, server.port, args.connections, args.concurrency)
        if pid and result.concurrent.ok:
            used = cpu_seconds(pid) - before
            result.concurrent.cpu_us_per_conn = used / result.concurrent.ok * 1e6
    finally:
        server.stop()
    return result


def measure_direct(direct: Direct, args: argparse.Namespace) -> Measured:
    """The direct listener's own figures; it stays running for the pairs."""
    result = Measured(direct.label)
    try:
        direct.start()
    except (ServerError, OSError) as exc:
        direct.stop()
        result.skipped = str(exc)
        return result
    trio.run(run_phase, direct.port, 40, args.concurrency)
    result.sequential = trio.run(run_phase, direct.port, args.sequential, 1, PAIR_GAP)
    result.concurrent = trio.run(run_phase, direct.port, args.connections, args.concurrency)
    return result



# --- report ------------------------------------------------------------------------------------


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def report(results: list[Measured], args: argparse.Namespace, elapsed: float) -> None:
    print(f"\nconnect-to-greeting on {HOST}, {os.cpu_count()} CPUs; seq = {args.sequential} "
          f"connections one at a time, {PAIR_GAP * 1000:.0f} ms apart (mailpool's interleaved "
          f"with the direct listener's); concurrent = {args.connections} connections "
          f"{args.concurrency} at a time")
    head = (f"{'server':34}{'seq p50':>9}{'seq p99':>9}{'p50 ms':>9}{'p99 ms':>9}"
            f"{'conn/s':>9}{'ok':>7}  errors")
    print(head)
    print("-" * len(head))
    for r in results:
        if r.skipped is not None:
            print(f"{r.label:34}skipped: {r.skipped[:80]}")
            continue
        assert r.sequential is not None and r.concurrent is not None
        s, c = r.sequential, r.concurrent
        errors = dict(s.errors + c.errors)
        print(f"{r.label:34}{s.pct(50):>9.3f}{s.pct(99):>9.3f}{c.pct(50):>9.3f}"
              f"{c.pct(99):>9.3f}{c.rate:>9.0f}{c.ok:>7}  {errors or 'none'}")
    print()
    for r in results:
        if not r.label.startswith("mailpool") or r.sequential is None or r.concurrent is None:
            continue
        if r.handoff_us is not None and r.paired_direct is not None:
            print(f"hand-off cost, {r.label}: {r.handoff_us:.0f} us per connection (median of "
                  f"pooled minus direct over {len(r.sequential.latencies)} interleaved pairs; "
                  f"p50 {r.sequential.pct(50) * 1000:.0f} vs "
                  f"{r.paired_direct.pct(50) * 1000:.0f} us)")
        if r.concurrent.cpu_us_per_conn is not None:
            print(f"supervisor CPU, {r.label}: {r.concurrent.cpu_us_per_conn:.0f} us per "
                  "connection (accept, hand-off, JH record, session end)")
    print(f"\nrun time {elapsed:.1f} s; load average now {load_average()} (other work on this "
          "machine skews every figure)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--connections", type=int, default=600, metavar="N")
    p.add_argument("--concurrency", type=int, default=10, metavar="C")
    p.add_argument("--sequential", type=int, default=200, metavar="M",
                   help="connections one at a time, for the hand-off cost (default 200)")
    p.add_argument("--no-postfix", action="store_true", help="leave Postfix out")
    p.add_argument("--serve-direct", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_direct is not None:
        with contextlib.suppress(KeyboardInterrupt):
            trio.run(serve_direct, args.serve_direct)
        return
    started = time.monotonic()
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="handoff-", dir=results) as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # Postfix's daemons (user postfix) must reach their queue below it
        print(f"load average at start {load_average()}", file=sys.stderr)
        # The direct listener runs throughout: the pooled servers are timed against it.
        direct = Direct("direct trio 220 (no pool)", work)
        results = [measure_direct(direct, args)]
        plan: list[tuple[Server, bool]] = [
            (Mailpool("mailpool default pools", work), True),
        ]
        if not args.no_postfix:
            plan.append((Postfix("postfix smtpd", work), False))
        try:
            for server, cpu in plan:
                print(f"measuring {server.label} ...", file=sys.stderr, flush=True)
                port = direct.port if direct.proc is not None else None
                results.append(measure(server, args, cpu, port))
        finally:
            direct.stop()
    report(results, args, time.monotonic() - started)


if __name__ == "__main__":
    main()
