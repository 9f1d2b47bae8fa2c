"""The outbound benchmark: mailpool's SMTP client against Postfix's smtp(8), in the same run.

    python -m bench.run --only outbound [--quick] [--outbound-messages N]

Each server starts with N messages (1 KB content, one recipient each, to the domains
d0..d19.bench.test in turn) already queued and held back; the clock starts when they are
released and stops when its queue is empty. The 20 domains have 20 MX hosts: one smtp-sink
on each of 127.0.0.2 .. 127.0.0.21, all on one port (as real MX hosts all listen on 25).
Every run gets fresh sinks, whose counters (smtp-sink -c) say how many messages arrived.

- mailpool (default configuration): the messages are written into spool/retry1 with the
  project's own spool code while the host is stopped, deferred for an hour. The host starts;
  once its pools are up and quiet, `queue-flush` on the control socket makes them due. Its
  MX lookups go to the test suite's DNS server (tests/dnsserver.py), run in this process.
  The journal must then hold one 88 (delivered) per message.
- Postfix (bench.servers.PostfixRelay, defaults): smtp-source hands it the messages over
  SMTP with defer_transports = smtp, so they wait in its deferred queue; defer_transports
  is cleared, Postfix reloaded, and `postqueue -f` releases them. transport_maps sends each
  domain to its sink's address (no DNS). Postfix limits concurrency per next hop, so the
  domains get distinct next hops: behind one shared [127.0.0.1]:port they would be a single
  destination for Postfix (20 connections in all) but 20 destinations for mailpool.

The servers run alternated (mailpool, Postfix, mailpool, Postfix; --quick: once each) and
the medians are reported: messages per second and CPU per message, in total and per process
kind, with the ratios mailpool/Postfix. Nothing here is asserted; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import TYPE_CHECKING, Any

from bench import servers as S
from bench.cpu import CpuPoller, mailpool_kind, postfix_kind, settle
from bench.smtp_load import make_body
from mailpool.framework.spool import Envelope, Spool
from mailpool.outbound.state import OutboundState, RecipientState, save_state
from mailpool.supervisor.control import ControlError, ControlUnavailable, request

if TYPE_CHECKING:
    from bench.run import Runner
    from tests.dnsserver import DnsServer

KB = 1024
DOMAINS = 20
# A local user on both servers: a notice, should one be sent, stays on the host under test.
ORIGINATOR = S.RCPT
# mailpool's queues that hold mail not yet delivered (hold and quarantine are operator's).
MAILPOOL_QUEUES = ("outbound", "retry1", "retry2")
MAILPOOL_FAILURES = "83,8C,8D,8K,86,87"  # journal codes that say why mail did not go
POLL = 0.05           # seconds between looks at a queue
START_TIMEOUT = 60.0  # pools up, queue filled, Postfix reloaded


def domain(k: int) -> str:
    return f"d{k % DOMAINS}.bench.test"


def recipient(i: int) -> str:
    return f"u{i % DOMAINS}@{domain(i)}"


def mx_address(k: int) -> str:
    """The sink (MX host) of domain k: its own loopback address, so its own next hop."""
    return f"127.0.0.{k % DOMAINS + 2}"


def content(i: int, rcpt: str) -> bytes:
    """What bench.smtp_load sends: a few header lines and KB of filler."""
    head = (f"From: <{ORIGINATOR}>\r\nTo: <{rcpt}>\r\nSubject: outbound {i}\r\n"
            f"Message-ID: <{i}@bench>\r\n\r\n")
    return head.encode() + make_body(KB)


def delivery_timeout(messages: int) -> float:
    return 30.0 + messages / 20  # 20 messages/s would be very slow on any machine


def wait_until(ready: Callable[[], bool], timeout: float, alive: Callable[[], bool] = lambda: True,
               ) -> float | None:
    """perf_counter() when ready() first held (polled every POLL s); None on timeout or
    when alive() turns false."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        if ready():
            return time.perf_counter()
        time.sleep(POLL)
    return None


# --- the MX hosts and their DNS -----------------------------------------------------------


class MxSink(S.Server):
    """smtp-sink on one address; `-c` keeps running counters on its stdout (the log)."""

    kind = "smtp-sink"
    _MESG = re.compile(rb"mesg=(\d+)")

    def __init__(self, workdir: Path, address: str, port: int) -> None:
        super().__init__(f"mx {address}", workdir)
        self.address = address
        self.port = port

    def start(self, timeout: float = 10.0) -> None:
        exe = S.postfix_tool("smtp-sink")
        if exe is None:
            raise S.ServerError("smtp-sink not found (Debian package postfix)")
        argv = [exe, "-c"]
        if S.is_root():
            argv += ["-u", "nobody"]  # smtp-sink refuses to keep root privileges
        self.proc = self._popen([*argv, f"{self.address}:{self.port}", "1024"])
        proc = self.proc

        def listening() -> bool:
            if proc.poll() is not None:
                raise S.ServerError(f"smtp-sink on {self.address}:{self.port} exited "
                                    f"({proc.returncode}): {self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection(
                    (self.address, self.port), timeout=1):
                return True
            return False

        if wait_until(listening, timeout) is None:
            raise S.ServerError(f"smtp-sink on {self.address}:{self.port} not listening")

    def received(self) -> int:
        """Messages it answered the final dot for (its last counter line)."""
        try:
            found = self._MESG.findall(self.log.read_bytes()[-200:])
        except OSError:
            return 0
        return int(found[-1]) if found else 0


def port_free_on(addresses: list[str]) -> int:
    """A TCP port free at this moment on every one of addresses."""
    for _ in range(50):
        port = S.free_port()
        with contextlib.ExitStack() as stack:
            try:
                for addr in addresses:
                    s = stack.enter_context(socket.socket())
                    s.bind((addr, port))
            except OSError:
                continue
            return port
    raise S.ServerError("no port free on all the MX addresses")


class MxHosts:
    """One smtp-sink per domain, all on one port; started and stopped around each run."""

    def __init__(self, workdir: Path) -> None:
        self.addresses = [mx_address(k) for k in range(DOMAINS)]
        self.port = port_free_on(self.addresses)
        self.sinks = [MxSink(workdir, a, self.port) for a in self.addresses]

    def __enter__(self) -> MxHosts:
        try:
            for sink in self.sinks:
                sink.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        for sink in self.sinks:
            sink.stop()

    def received(self) -> int:
        return sum(sink.received() for sink in self.sinks)


def start_dns() -> DnsServer:
    """The suite's DNS server (in a thread here) with an MX and an A record per domain."""
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)  # `tests` is a namespace package at the repository root
    from tests.dnsserver import DnsServer

    dns = DnsServer().start()
    for k in range(DOMAINS):
        dns.add(domain(k), "MX", f"10 mx.{domain(k)}.")
        dns.add(f"mx.{domain(k)}", "A", mx_address(k))
    return dns


# --- mailpool -----------------------------------------------------------------------------


class MailpoolOutbound(S.Mailpool):
    """mailpool's default configuration, pointed at the bench DNS server and MX port."""

    def __init__(self, label: str, workdir: Path, dns_port: int, mx_port: int) -> None:
        super().__init__(label, workdir)
        self.dns_port = dns_port
        self.mx_port = mx_port

    def write_config(self) -> None:
        super().write_config()
        with open(self.config, "a") as f:
            f.write("\n".join(["", "[dns]", 'nameservers = ["127.0.0.1"]',
                               f"port = {self.dns_port}", "", "[outbound]",
                               f"port = {self.mx_port}", ""]))

    @property
    def control(self) -> Path:
        return self.data / "run" / "control.sock"

    def fill(self, messages: int) -> None:
        """Queue messages as deferred mail due in an hour (before start: nothing runs)."""
        spool = Spool(self.data / "spool")
        due = time.time() + 3600
        for i in range(messages):
            rcpt = recipient(i)
            body = content(i, rcpt)
            env = Envelope(queue_id=spool.new_queue_id(), message_id=f"{i}@bench",
                           originator=ORIGINATOR, recipients=[rcpt],
                           received_ns=time.time_ns(), size=len(body))
            spool.store("retry1", env, body, sync=False)
            save_state(spool, env.queue_id, OutboundState(
                recipients=[RecipientState()], attempts=1, next_attempt=due))
        os.sync()

    def queued(self) -> int:
        return sum(len(os.listdir(self.data / "spool" / q)) for q in MAILPOOL_QUEUES)

    def pools_ready(self) -> bool:
        """Every entry has its initial jobs ready (so none starts during the run)."""
        try:
            entries = request(self.control, {"op": "pool-show"}, timeout=5)["entries"]
        except (ControlUnavailable, ControlError, OSError, ValueError):
            return False
        return entries["smtp-client"]["ready"] >= 1 and all(
            e["ready"] >= e["parameters"]["initial_jobs"] for e in entries.values())

    def journal_records(self, codes: str, limit: int | None = None) -> list[dict[str, Any]]:
        args = ["journal", "dump", "--code", codes, "--format", "json"]
        if limit is not None:
            args += ["-n", str(limit)]
        res = self.cli(*args)
        if res.returncode != 0:
            raise S.ServerError(f"journal dump: {(res.stderr or res.stdout).strip()[:200]}")
        return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]

    def delivered_in_journal(self, expect: int, timeout: float = 5.0) -> int:
        """88 records, read again until there are expect (the journal syncs every second)."""
        got = 0
        deadline = time.monotonic() + timeout
        while True:
            got = len(self.journal_records("88"))
            if got >= expect or time.monotonic() > deadline:
                return got
            time.sleep(0.5)


# --- one measured run ---------------------------------------------------------------------


def measure(server: S.Server, mx: MxHosts, messages: int, poller: CpuPoller,
            release: Callable[[], None], queued: Callable[[], int]) -> dict[str, Any]:
    """From release() until queued() is 0: time, CPU per kind, what reached the sinks."""
    proc = server.proc

    def alive() -> bool:
        return proc is None or proc.poll() is None

    poller.start()
    try:
        poller.mark()
        t0 = time.perf_counter()
        release()
        t1 = wait_until(lambda: queued() == 0, delivery_timeout(messages), alive)
    finally:
        poller.stop()
    cpu, procs, started = poller.by_kind()
    # The sink counts at the final dot, before its 250: all are in by the time the sender
    # has removed its last queue file; the short wait covers the counter's write.
    wait_until(lambda: mx.received() >= messages, 2.0)
    row: dict[str, Any] = {"messages": messages, "received": mx.received(),
                           "left_in_queue": queued(), "exited_by_kind": poller.exited_by_kind(),
                           "cpu_s_by_kind": cpu, "processes_by_kind": procs,
                           "started_by_kind": started}
    if t1 is None:
        row["error"] = (f"{row['left_in_queue']}/{messages} still queued after "
                        f"{delivery_timeout(messages):.0f} s" if alive()
                        else f"server exited ({proc.returncode if proc else '?'})")
        return row
    seconds = t1 - t0
    total = sum(cpu.values())
    row |= {"seconds": seconds, "msgs_per_sec": messages / seconds,
            "cpu_us_per_msg": total / messages * 1e6,
            "cpu_us_per_msg_by_kind": {k: v / messages * 1e6 for k, v in sorted(cpu.items())}}
    if row["received"] < messages:
        row["error"] = f"queue empty but the sinks got {row['received']}/{messages}"
    return row


def run_mailpool(runner: Runner, label: str, messages: int, dns_port: int) -> dict[str, Any]:
    with MxHosts(runner.work / f"{label}-mx".replace(" ", "_")) as mx:
        server = MailpoolOutbound(label, runner.work, dns_port, mx.port)
        server.dir.mkdir(parents=True, exist_ok=True)
        server.fill(messages)
        with runner.serving(server) as up:
            if up is None:
                return {"error": "did not start (see Skipped)"}
            if wait_until(server.pools_ready, START_TIMEOUT, lambda: server.proc is not None
                          and server.proc.poll() is None) is None:
                return {"error": f"pools not ready within {START_TIMEOUT:.0f} s: "
                                 f"{server.log_tail()}"}
            settle(server)
            assert server.proc is not None
            flushed: dict[str, Any] = {}

            def release() -> None:
                flushed.update(request(server.control, {"op": "queue-flush"}))

            row = measure(server, mx, messages, CpuPoller(server.root_pids(),
                          mailpool_kind(server.proc.pid)), release, server.queued)
            row["flushed"] = flushed.get("flushed")
            row["journal_88"] = server.delivered_in_journal(messages)
            if row["journal_88"] < messages:
                failures = server.journal_records(MAILPOOL_FAILURES, limit=10)
                row["error"] = (f"journal has {row['journal_88']}/{messages} deliveries (88); "
                                f"first failures: {json.dumps(failures)[:1500]}; "
                                f"serve.log: {server.log_tail(10)}")
            elif "error" in row:
                row["error"] += f"; serve.log: {server.log_tail(10)}"
            return row


def fill_postfix(server: S.PostfixRelay, messages: int) -> str | None:
    """smtp-source, one session per domain, all its messages on one connection; an error or
    None."""
    exe = S.postfix_tool("smtp-source")
    if exe is None:
        return "smtp-source not found"
    procs = []
    for k in range(min(DOMAINS, messages)):
        count = messages // DOMAINS + (1 if k < messages % DOMAINS else 0)
        procs.append(subprocess.Popen(
            [exe, "-s", "1", "-m", str(count), "-l", str(KB), "-f", ORIGINATOR,
             "-t", recipient(k), "-d", f"{S.HOST}:{server.port}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
    errors = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=START_TIMEOUT)
            if p.returncode != 0:
                errors.append(out.decode(errors="replace").strip()[-200:])
    except subprocess.TimeoutExpired:
        errors.append("smtp-source did not finish in time")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return "; ".join(errors) or None


def run_postfix(runner: Runner, label: str, messages: int) -> dict[str, Any]:
    with MxHosts(runner.work / f"{label}-mx".replace(" ", "_")) as mx:
        routes = {domain(k): f"[{mx_address(k)}]:{mx.port}" for k in range(DOMAINS)}
        server = S.PostfixRelay(label, runner.work, routes)
        with runner.serving(server) as up:
            if up is None:
                return {"error": "did not start (see Skipped)"}
            error = fill_postfix(server, messages)
            if error:
                return {"error": f"filling the queue: {error}"}
            held = wait_until(lambda: server.queued(("deferred",)) >= messages
                              and server.queued() == server.queued(("deferred",)),
                              START_TIMEOUT)
            if held is None:
                return {"error": f"queue not filled: {server.queued(('deferred',))}/"
                                 f"{messages} deferred, {server.queued()} queued in all: "
                                 f"{server.log_tail()}"}
            server.release()
            settle(server)
            early = mx.received()  # reload must not have started delivery (mtime in future)
            row = measure(server, mx, messages,
                          CpuPoller(server.root_pids(), postfix_kind), server.flush,
                          server.queued)
            if early:
                row["error"] = f"{early} delivered before the flush (clock start)"
            elif "error" in row:
                row["error"] += f"; postfix.log: {server.log_tail(10)}"
            return row


# --- the section: runs, medians, table ----------------------------------------------------


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Medians of the good runs of one server, or None when it has none."""
    good = [r for r in rows if "error" not in r]
    if not good:
        return None
    kinds = sorted({k for r in good for k in r["cpu_us_per_msg_by_kind"]})
    return {"runs": len(good), "messages": good[0]["messages"],
            "seconds": median(r["seconds"] for r in good),
            "msgs_per_sec": median(r["msgs_per_sec"] for r in good),
            "cpu_us_per_msg": median(r["cpu_us_per_msg"] for r in good),
            "cpu_us_per_msg_by_kind": {k: median(r["cpu_us_per_msg_by_kind"].get(k, 0.0)
                                                 for r in good) for k in kinds}}


def report(summary: dict[str, Any]) -> list[str]:
    lines = [f"{'server':<10}{'runs':>5}{'messages':>10}{'seconds':>9}{'msgs/s':>9}"
             f"{'CPU us/msg':>12}  CPU us/msg by process kind"]
    lines.append("-" * (len(lines[0]) + 40))
    for name in ("mailpool", "postfix"):
        s = summary.get(name)
        if s is None:
            lines.append(f"{name:<10}no successful run")
            continue
        kinds = sorted(s["cpu_us_per_msg_by_kind"].items(), key=lambda kv: -kv[1])
        lines.append(f"{name:<10}{s['runs']:>5}{s['messages']:>10}{s['seconds']:>9.2f}"
                     f"{s['msgs_per_sec']:>9.0f}{s['cpu_us_per_msg']:>12.0f}  "
                     + ", ".join(f"{k} {v:.0f}" for k, v in kinds))
    rate, cpu = summary.get("ratio_rate"), summary.get("ratio_cpu")
    if rate is not None and cpu is not None:
        lines.append(f"mailpool/Postfix: messages/s {rate:.2f}x, CPU per message {cpu:.2f}x")
    return lines


def one_line(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"    {row['server']} run {row['round']}: ERROR {row['error']}"
    kinds = sorted(row["cpu_us_per_msg_by_kind"].items(), key=lambda kv: -kv[1])
    procs = ", ".join(f"{k} {n}" + (f" ({row['started_by_kind'][k]} new)"
                                    if row["started_by_kind"].get(k) else "")
                      for k, n in sorted(row["processes_by_kind"].items()))
    return (f"    {row['server']} run {row['round']}: {row['messages']} in {row['seconds']:.2f} s"
            f" = {row['msgs_per_sec']:.0f}/s, CPU {row['cpu_us_per_msg']:.0f} us/msg ("
            + ", ".join(f"{k} {v:.0f}" for k, v in kinds) + f"); processes: {procs}")


def run_outbound(runner: Runner) -> None:
    """The section: alternated runs, each recorded as it ends, then medians and ratios."""
    opts = runner.opts
    messages = opts.outbound_messages or (600 if opts.quick else 2000)
    rounds = 1 if opts.quick else 2
    print(f"\n== outbound: {messages} messages of 1 KB from the queue to "
          f"{DOMAINS} smtp-sink MX hosts, mailpool vs Postfix, {rounds} run(s) each", flush=True)
    if runner.over_budget("outbound", 10.0):
        return
    try:
        dns = start_dns()
    except (ImportError, OSError) as exc:
        runner.skip("outbound", f"no DNS server for mailpool (tests/dnsserver.py): {exc}")
        return
    rows: dict[str, list[dict[str, Any]]] = {"mailpool": [], "postfix": []}
    try:
        for rnd in range(1, rounds + 1):
            for name in ("mailpool", "postfix"):
                label = f"outbound {name} {rnd}"
                if runner.over_budget(label):
                    continue
                try:
                    if name == "mailpool":
                        row = run_mailpool(runner, label, messages, dns.port)
                    else:
                        row = run_postfix(runner, label, messages)
                except (S.ServerError, OSError, subprocess.SubprocessError,
                        ControlUnavailable, ControlError) as exc:
                    row = {"error": f"{type(exc).__name__}: {exc}"}
                row = {"kind": "outbound", "server": name, "round": rnd,
                       "messages": messages, **row}
                rows[name].append(row)
                runner.record(row)
                print(one_line(row), flush=True)
    finally:
        dns.stop()
    summary: dict[str, Any] = {name: summarise(r) for name, r in rows.items()}
    mp, pf = summary["mailpool"], summary["postfix"]
    if mp and pf:
        summary["ratio_rate"] = mp["msgs_per_sec"] / pf["msgs_per_sec"]
        summary["ratio_cpu"] = mp["cpu_us_per_msg"] / pf["cpu_us_per_msg"]
    runner.record({"kind": "outbound-summary", "domains": DOMAINS, "size": KB, **summary})
    print(f"\n== Outbound (queue -> {DOMAINS} smtp-sink MX hosts, 1 KB; medians of alternated "
          "runs; CPU = utime+stime of the server's processes from release to empty queue)")
    print("\n".join(report(summary)), flush=True)
