"""The benchmark driver: mailpool against the servers its users would otherwise run.

    python -m bench.run [--quick] [--only PART ...]

In one run, on 127.0.0.1 with free ports chosen now:

- SMTP: mailpool (default configuration), Postfix (end to end into a Maildir), aiosmtpd
  with a handler that fsyncs each message, and smtp-sink (no disk: the ceiling of the
  loopback and the clients) are started together; each workload then runs on each of them
  in turn, so that the figures compared were taken seconds apart under the same machine
  load. Per server and workload two clients: Postfix's smtp-source (C, the headline: it
  leaves the servers most of the machine) and this project's Trio generator
  (bench.smtp_load, the second row and the one that times greetings and DATA).
  smtp-source sends as many messages as the generator did in --duration seconds (with
  100 per connection: exactly 100 on each). The targets' two workloads (20 sessions, 1 KB,
  1 and 100 messages per connection) run three times on mailpool and Postfix, alternated,
  and the targets take medians. Every row has the server's CPU per message:
  utime + stime of its whole process tree, exited children included, from the load's
  start to its last delivery; mailpool's also per process kind.
- idle: a fresh mailpool (default configuration): new clients' connect-to-greeting alone
  and with 1,000 idle sessions open, then how many idle sessions it holds (10,000 tried)
  and what they cost in memory.
- journal: mailpool with the journal on and off, alternated rounds of smtp-source: CPU per
  delivered message (steadier than a rate).
- POP3 retrieval against Dovecot; the outbound side (bench.outbound: mailpool's SMTP client
  against Postfix's smtp(8)); the target workload over STARTTLS against Postfix.
- twohost (bench.twohost): the target workload over two mailpool hosts (127.0.0.2 and
  127.0.0.3) sharing a PostgreSQL directory and a mailbox root, against one host with the
  file directory, and one with PostgreSQL; then dircalls (bench.directory_calls): psycopg
  called from Trio in worker threads vs through trio-asyncio. Both need PostgreSQL's server
  binaries (tests/pghelp.py starts a private cluster); without them they are skipped.

Then the report: the tables, each target of issue 11 with MET or MISSED (bench.report),
and a Markdown block for the README's Performance section; JSON lines, the chart and the
Markdown block are saved under bench/results/.

Every run is bounded: each workload stops starting messages after --duration seconds,
every wait has a timeout, a part that would start after --budget is spent is reported as
skipped, and every server started is stopped again, also on Ctrl-C and errors. Peers that
cannot be installed are reported as skipped, with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median
from typing import Any

import trio

from bench import servers as S
from bench.cpu import CpuPoller, mailpool_kind, server_kind, settle
from bench.idle import greeting_delay, idle_capacity
from bench.outbound import run_outbound
from bench.pop_load import PopConfig, run_pop
from bench.smtp_load import LoadConfig, LoadResult, make_body, raise_fd_limit, run_load
from bench.twohost import run_shared_directory

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results"
KB = 1024


@dataclass(frozen=True)
class Workload:
    sessions: int
    size: int
    per_connection: int
    messages: int  # the generator's upper bound; --duration usually ends the run first

    @property
    def label(self) -> str:
        size = f"{self.size // KB}KB" if self.size >= KB else f"{self.size}B"
        return f"{self.sessions}s {size} k={self.per_connection}"


# Durable accept and Maildir delivery end to end; targets 1, 2 and 4 are measured here.
TARGET = Workload(20, KB, 1, 20000)
MANY = Workload(20, KB, 100, 20000)  # target 3: 100 messages per connection
WARM_UP = 2.0  # seconds of the target workload before a server's first measured run
PAIR = ("mailpool", "postfix")  # the servers the targets compare: their runs are repeated


def workloads(quick: bool) -> list[Workload]:
    """The targets' workloads first, so that a run cut short by its budget still has them."""
    if quick:
        return [TARGET, MANY]
    return [TARGET, MANY, Workload(1, KB, 1, 2000), Workload(100, KB, 1, 20000),
            Workload(20, 100 * KB, 1, 5000)]


# Seconds each later part needs at least (quick, full): the SMTP part leaves them this much.
PART_SECONDS: dict[str, tuple[float, float]] = {
    "idle": (15.0, 45.0), "journal": (15.0, 45.0), "pop": (20.0, 35.0),
    "outbound": (25.0, 70.0), "tls": (15.0, 35.0), "twohost": (45.0, 100.0)}


@dataclass
class Options:
    quick: bool
    duration: float
    idle_bound: int
    idle_window: float
    greet_idle: int
    greet_probes: int
    target_rounds: int  # runs of the targets' workloads on mailpool and Postfix (medians)
    journal_rounds: int
    journal_messages: int
    client_procs: int
    install: bool
    only: set[str]
    keep: bool
    budget: float  # seconds for the whole run; later parts are skipped once it is spent
    pop_sessions: tuple[int, ...]
    pop_per_user: int
    outbound_messages: int = 0  # 0: 2000, --quick 600 (bench.outbound)


class Runner:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.stamp = time.strftime("%Y%m%d-%H%M%S")
        RESULTS.mkdir(parents=True, exist_ok=True)
        self.out_path = RESULTS / f"bench-{self.stamp}.jsonl"
        self.out = open(self.out_path, "a")  # closed in close()
        self.rows: list[dict[str, Any]] = []
        # Under bench/results (same filesystem as the project), not /tmp: every server runs
        # its queues in the same place, whatever /tmp is on this machine.
        self.work = Path(tempfile.mkdtemp(prefix="work-", dir=RESULTS))
        self.work.chmod(0o755)  # peers deliver as nobody below it
        self.running: list[S.Server] = []
        self.deadline = time.monotonic() + opts.budget

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def over_budget(self, what: str, reserve: float = 0.0) -> bool:
        """True (and recorded as skipped) when the run's --budget leaves no time for what."""
        if self.time_left() > reserve:
            return False
        self.skip(what, f"time budget spent (--budget {self.opts.budget:.0f} s)")
        return True

    def reserve_after(self, part: str) -> float:
        """Seconds the wanted parts after part need at least."""
        names = list(PART_SECONDS)
        later = names[names.index(part) + 1:] if part in names else names
        return sum(PART_SECONDS[n][0 if self.opts.quick else 1] for n in later
                   if self.wanted(n))

    # --- bookkeeping ---------------------------------------------------------------

    def record(self, row: dict[str, Any]) -> None:
        row = {"run": self.stamp, **row}
        self.rows.append(row)
        self.out.write(json.dumps(row, separators=(",", ":")) + "\n")
        self.out.flush()

    def skip(self, server: str, reason: str) -> None:
        print(f"  {server}: skipped: {reason}", flush=True)
        self.record({"kind": "skipped", "server": server, "reason": reason})

    def close(self) -> None:
        for server in reversed(self.running):
            stop_quietly(server)
        self.running.clear()
        self.out.close()
        if not self.opts.keep:
            shutil.rmtree(self.work, ignore_errors=True)

    @contextmanager
    def serving(self, server: S.Server) -> Iterator[S.Server | None]:
        """Start the server (None when it cannot start: recorded as skipped); always stop it."""
        self.running.append(server)
        try:
            t0 = time.monotonic()
            try:
                server.start()
            except (S.ServerError, OSError, subprocess.SubprocessError) as exc:
                self.skip(server.label, str(exc))
                yield None
                return
            print(f"  {server.label}: listening on {server.address}:{server.port} "
                  f"(started in {time.monotonic() - t0:.1f} s)", flush=True)
            yield server
        finally:
            stop_quietly(server)
            self.running.remove(server)

    def wanted(self, name: str) -> bool:
        return not self.opts.only or name in self.opts.only

    # --- the clients ----------------------------------------------------------------

    def smtp_load(self, server: S.Server, wl: Workload, tls: S.TlsFiles | None = None,
                  duration: float | None = None) -> dict[str, Any]:
        """The project's generator as a subprocess (its CPU is not the driver's); with tls,
        every connection goes STARTTLS, trusting tls.ca only."""
        duration = duration or self.opts.duration
        argv = [sys.executable, "-m", "bench.smtp_load", "--host", S.HOST,
                "--port", str(server.port), "--sessions", str(wl.sessions),
                "--messages", str(wl.messages), "--size", str(wl.size),
                "--per-connection", str(wl.per_connection), "--to", server.rcpt,
                "--from", S.SENDER, "--duration", str(duration),
                "--timeout", "30", "--procs", str(self.opts.client_procs), "--json"]
        if tls is not None:
            argv += ["--starttls", "--tls-ca", str(tls.ca), "--tls-name", tls.name]
        try:
            res = subprocess.run(argv, capture_output=True, text=True, cwd=BENCH_DIR.parent,
                                 timeout=duration + 90)
        except subprocess.TimeoutExpired:
            return {"error": "generator did not finish in time"}
        try:
            return json.loads(res.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            return {"error": f"generator failed: {res.stderr.strip()[-300:]}"}

    def smtp_source(self, server: S.Server, wl: Workload, messages: int,
                    timeout: float = 60.0) -> dict[str, Any]:
        """Postfix's smtp-source with the workload's sessions and size and `messages` in all;
        with per_connection above 1 every session keeps one connection for all its own."""
        exe = S.postfix_tool("smtp-source")
        if exe is None:
            return {"error": "smtp-source not found (Debian package postfix)"}
        messages = max(messages, wl.sessions)
        argv = [exe, "-s", str(wl.sessions), "-m", str(messages), "-l", str(wl.size),
                "-f", S.SENDER, "-t", server.rcpt]
        if wl.per_connection > 1:
            argv.append("-d")  # one connection per session for all its messages
        argv.append(f"{S.HOST}:{server.port}")
        t0 = time.perf_counter()
        started = time.time()
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"smtp-source did not finish in {timeout:.0f} s"}
        elapsed = time.perf_counter() - t0
        if res.returncode != 0:
            return {"error": f"smtp-source: {(res.stderr or res.stdout).strip()[-200:]}"}
        return {"tool": "smtp-source", "sent": messages, "attempted": messages, "failed": 0,
                "elapsed": elapsed, "msgs_per_sec": messages / elapsed, "errors": {},
                "started_at": started,
                "per_connection": -(-messages // wl.sessions) if wl.per_connection > 1 else 1}

    def wait_delivered(self, server: S.Server, before: int, expect: int, t0: float,
                       ) -> tuple[int, float | None]:
        """Poll the server's Maildirs until expect more messages are there (bounded).

        t0 is the time.time() the load started; the rate is messages over the time from
        then until the last one was seen in a Maildir (polled every 50 ms).
        """
        limit = time.monotonic() + min(30.0, 5.0 + (time.time() - t0))
        got = 0
        while time.monotonic() < limit:
            got = (server.delivered() or 0) - before
            if got >= expect:
                elapsed = time.time() - t0
                return got, got / elapsed if elapsed > 0 else None
            time.sleep(0.05)
        return got, None

    def measure_load(self, server: S.Server, client: str, wl: Workload, messages: int = 0,
                     tls: S.TlsFiles | None = None, timeout: float = 60.0) -> dict[str, Any]:
        """One load on server, measured: the client's result, the deliveries it made (a
        durable server), the server's CPU over both (per process kind) and the client's.

        CPU per message is over the delivered messages on a durable server (what a
        message costs end to end), over the accepted ones elsewhere."""
        poller = CpuPoller(server.root_pids(), server_kind(server))
        before = server.delivered() if server.durable else None
        row: dict[str, Any] = {"kind": "smtp", "server": server.label,
                               "server_kind": server.kind, "client": client,
                               "workload": asdict(wl), "label": wl.label}
        poller.start()
        try:
            poller.mark()
            t0 = time.time()
            used = client_cpu()
            if client == "smtp_load":
                result = self.smtp_load(server, wl, tls)
            else:
                result = self.smtp_source(server, wl, messages, timeout)
            used = client_cpu() - used
            row["result"] = result
            if "error" not in result and before is not None and result.get("sent"):
                got, rate = self.wait_delivered(server, before, result["sent"],
                                                result.get("started_at") or t0)
                row |= {"delivered": got, "delivered_per_sec": rate}
        finally:
            poller.stop()
        if "error" in result:
            row["serve_log"] = server.log_tail(10)
            return row
        if result.get("elapsed"):
            row["client_cpu_share"] = used / result["elapsed"]
        cpu, procs, started = poller.by_kind()
        count = row.get("delivered") if before is not None else result.get("sent")
        row |= {"cpu_basis": "delivered" if before is not None else "accepted",
                "processes_by_kind": procs, "started_by_kind": started}
        if count:
            row |= {"cpu_us_per_msg": sum(cpu.values()) / count * 1e6,
                    "cpu_us_per_msg_by_kind": {k: v / count * 1e6
                                               for k, v in sorted(cpu.items())}}
        if result.get("errors") or (before is not None and row.get("delivered_per_sec")
                                    is None):
            row["serve_log"] = server.log_tail(10)
        return row

    # --- the parts ----------------------------------------------------------------

    def smtp_servers(self) -> list[S.Server]:
        w = self.work
        out: list[S.Server] = []
        if self.wanted("mailpool"):
            out.append(S.Mailpool("mailpool", w))
        if self.wanted("postfix"):
            out.append(S.Postfix("postfix", w))
        if self.wanted("aiosmtpd"):
            out.append(S.AiosmtpdFsync("aiosmtpd-fsync", w))
        if self.wanted("smtp-sink"):
            out.append(S.SmtpSink("smtp-sink", w))
        return out

    def run_smtp(self) -> None:
        servers = self.smtp_servers()
        if not servers:
            return
        reserve = self.reserve_after("smtp")
        print(f"\n== SMTP: {', '.join(s.label for s in servers)}; each workload on each "
              "server in turn, smtp-source and the Trio generator", flush=True)
        if self.over_budget("SMTP", reserve):
            return
        with contextlib.ExitStack() as stack:
            up = [s for s in servers if stack.enter_context(self.serving(s)) is not None]
            for server in up:
                self.warm_up(server)
            for wl in workloads(self.opts.quick):
                print(f"  -- {wl.label}", flush=True)
                # The targets' workloads again on the targets' pair, alternated: medians.
                rounds = self.opts.target_rounds if wl in (TARGET, MANY) else 1
                for rnd in range(1, rounds + 1):
                    # Checked once a round: every server runs it, or none (a ratio needs both).
                    if self.over_budget(f"SMTP {wl.label} run {rnd}", reserve):
                        return
                    for server in up:
                        if rnd == 1 or server.kind in PAIR:
                            self.measure_workload(server, wl, rnd)

    def warm_up(self, server: S.Server) -> None:
        """An unmeasured pass of the target workload: pools grown to what the load needs (a
        job's start-up is not a message's cost), first Maildir directories made."""
        self.smtp_load(server, TARGET, duration=WARM_UP)
        settle(server)

    def measure_workload(self, server: S.Server, wl: Workload, rnd: int = 1) -> None:
        """The generator for --duration, then smtp-source with as many messages (k > 1:
        exactly k per connection), each after the server has gone quiet."""
        settle(server)
        gen = self.measure_load(server, "smtp_load", wl) | {"round": rnd}
        self.record(gen)
        print("    " + one_line(gen), flush=True)
        res = gen["result"]
        sent = res.get("sent", 0) if "error" not in res else 0
        if wl.per_connection > 1:
            messages = wl.sessions * wl.per_connection
        else:
            messages = max(sent, wl.sessions * 10)
        rate = res.get("msgs_per_sec") or 0.0
        # Bounded by what the generator saw of this server: four times its pace, at least 30 s.
        timeout = max(30.0, 4 * messages / rate + 10) if rate else 60.0
        settle(server)
        src = self.measure_load(server, "smtp-source", wl, messages, timeout=timeout) | {
            "round": rnd}
        self.record(src)
        print("    " + one_line(src), flush=True)

    def run_idle(self) -> None:
        """Target 7 on a fresh mailpool with the default configuration."""
        if not self.wanted("idle"):
            return
        o = self.opts
        print(f"\n== idle sessions: mailpool (default configuration): new clients' greeting "
              f"alone and with {o.greet_idle} idle sessions open; then up to {o.idle_bound} "
              "idle sessions held", flush=True)
        if self.over_budget("idle", 10.0):
            return
        server = S.Mailpool("mailpool idle", self.work)
        with self.serving(server) as up:
            if up is None:
                return
            assert server.proc is not None
            settle(server)
            greet = run_trio(greeting_delay, S.HOST, server.port, o.greet_idle,
                             o.greet_probes, o.idle_window)
            self.record({"kind": "greeting-delay", "server": "mailpool", **greet})
            print("    " + greeting_line(greet), flush=True)
            time.sleep(1.0)  # the closed sessions' ends reach the server
            settle(server)
            classify = mailpool_kind(server.proc.pid)
            cap = run_trio(idle_capacity, S.HOST, server.port, o.idle_bound, o.idle_window,
                           lambda: server.memory(classify))
            self.record({"kind": "idle", "server": "mailpool", **cap})
            print("    " + idle_line(cap), flush=True)

    def run_journal(self) -> None:
        """Target 5: CPU per delivered message with the journal on and off (alternated)."""
        if not self.wanted("journal"):
            return
        o = self.opts
        print(f"\n== journal cost: mailpool journal on vs off, {TARGET.label}, smtp-source "
              f"{o.journal_messages} messages a run, {o.journal_rounds} round(s)", flush=True)
        if self.over_budget("journal comparison", self.reserve_after("journal") + 15.0):
            return
        on = S.Mailpool("mailpool journal=on", self.work)
        off = S.Mailpool("mailpool journal=off", self.work, journal=False)
        with self.serving(on) as a, self.serving(off) as b:
            if a is None or b is None:
                return
            for server in (on, off):
                self.warm_up(server)
            cpu: dict[str, list[float]] = {"on": [], "off": []}
            rates: dict[str, list[float]] = {"on": [], "off": []}
            for rnd in range(1, o.journal_rounds + 1):
                pair = [("on", on), ("off", off)]
                for name, server in pair if rnd % 2 else pair[::-1]:
                    settle(server)
                    row = self.measure_load(server, "smtp-source", TARGET, o.journal_messages)
                    row |= {"kind": "journal-run", "journal": name, "round": rnd}
                    self.record(row)
                    print("    " + one_line(row), flush=True)
                    if row.get("cpu_us_per_msg") is not None and row.get("delivered_per_sec"):
                        cpu[name].append(row["cpu_us_per_msg"])
                        rates[name].append(row["delivered_per_sec"])
            if cpu["on"] and cpu["off"]:
                m_on, m_off = median(cpu["on"]), median(cpu["off"])
                self.record({"kind": "journal", "workload": asdict(TARGET),
                             "label": TARGET.label, "client": "smtp-source",
                             "cpu_on": cpu["on"], "cpu_off": cpu["off"],
                             "median_on": m_on, "median_off": m_off,
                             "cost": m_on / m_off - 1 if m_off else None,
                             "rate_on": median(rates["on"]), "rate_off": median(rates["off"])})

    def run_pop(self) -> None:
        if not self.wanted("pop"):
            return
        per_user = self.opts.pop_per_user
        sessions_list = self.opts.pop_sessions
        users = max(sessions_list)
        names = [f"pop{i}" for i in range(users)]
        body = make_body(KB)
        message = (f"From: <{S.SENDER}>\r\nTo: <pop@{S.DOMAIN}>\r\nSubject: pop\r\n\r\n"
                   ).encode() + body
        print(f"\n== POP3 retrieval: mailpool vs Dovecot, {', '.join(map(str, sessions_list))} "
              f"session(s), {per_user} messages of 1 KB per user", flush=True)
        if self.over_budget("POP3 retrieval", self.reserve_after("pop") + 10.0):
            return
        dovecot = S.Dovecot("dovecot", self.work)
        mailpool = S.Mailpool("mailpool pop", self.work, pop_users=users)
        for server in (mailpool, dovecot):
            if server is dovecot:
                try:
                    dovecot.fill(names, per_user, message)
                except OSError as exc:
                    self.skip("dovecot", f"cannot fill maildirs: {exc}")
                    continue
            with self.serving(server) as up:
                if up is None:
                    continue
                if server is mailpool:
                    if not mailpool.pop_available():
                        self.skip("mailpool pop", "no POP3 greeting on [listen] pop3")
                        continue
                    if not self.fill_mailpool(mailpool, names, per_user):
                        continue
                    port = mailpool.pop_port
                else:
                    port = dovecot.port
                for sessions in sessions_list:
                    cfg = PopConfig(host=S.HOST, port=port, sessions=sessions, user="pop{n}",
                                    password=S.POP_PASSWORD, users=sessions,
                                    messages=1_000_000, duration=self.opts.duration,
                                    timeout=30)
                    res = asdict(run_trio(run_pop, cfg))
                    row = {"kind": "pop", "server": server.label.replace(" pop", ""),
                           "sessions": sessions, "messages_per_user": per_user,
                           "size": len(message), "result": res}
                    self.record(row)
                    print(f"    {server.kind} {sessions} sessions: {res['retr_per_sec']:.0f} "
                          f"RETR/s, {res['mb_per_sec']:.1f} MB/s, login p99 "
                          f"{res['login_ms'].get('p99', 0):.1f} ms, RETR p99 "
                          f"{res['retr_ms'].get('p99', 0):.2f} ms, errors {res['errors'] or 0}",
                          flush=True)

    def run_outbound(self) -> None:
        if self.wanted("outbound"):
            run_outbound(self)  # bench.outbound: the SMTP client against Postfix's smtp(8)

    def run_twohost(self) -> None:
        if self.wanted("twohost") or self.wanted("dircalls"):
            run_shared_directory(self)  # bench.twohost (with bench.directory_calls)

    def run_tls(self) -> None:
        """The target workload over STARTTLS: mailpool (default configuration) and Postfix,
        both up at once, one unmeasured pass each, then alternated measured runs; medians."""
        if not self.wanted("tls"):
            return
        rounds = 1 if self.opts.quick else 2
        print(f"\n== STARTTLS: {TARGET.label} (durable), every connection STARTTLS, "
              f"mailpool vs Postfix, {rounds} run(s) each", flush=True)
        if self.over_budget("tls", 15.0):
            return
        try:
            tls = S.make_tls_files(self.work / "tls")
        except (S.ServerError, OSError) as exc:
            self.skip("tls", f"no certificate: {exc}")
            return
        mailpool = S.Mailpool("tls mailpool", self.work, tls=tls)
        postfix = S.PostfixTls("tls postfix", self.work, tls)
        rows: dict[str, list[dict[str, Any]]] = {"mailpool": [], "postfix": []}
        with self.serving(mailpool) as a, self.serving(postfix) as b:
            up = [(name, s) for name, s, u in (("mailpool", mailpool, a), ("postfix", postfix, b))
                  if u is not None]
            for _, server in up:  # pools grown, first Maildir directories made
                self.smtp_load(server, TARGET, tls, duration=WARM_UP)
            for rnd in range(1, rounds + 1):
                for name, server in up:
                    if self.over_budget(f"tls {name} run {rnd}"):
                        continue
                    settle(server)
                    row = self.measure_load(server, "smtp_load", TARGET, tls=tls)
                    row |= {"kind": "tls", "server": name, "round": rnd}
                    rows[name].append(row)
                    self.record(row)
                    print("    " + tls_line(row), flush=True)
        summary = {name: summarise_tls(r) for name, r in rows.items()}
        self.record({"kind": "tls-summary", "workload": asdict(TARGET), "label": TARGET.label,
                     "certificate": f"{tls.kind}, verified by the client",
                     **summary, "ratio": tls_ratios(summary["mailpool"], summary["postfix"])})

    def fill_mailpool(self, server: S.Mailpool, names: list[str], per_user: int) -> bool:
        """Deliver per_user messages to every POP user through mailpool's own SMTP."""
        before = server.delivered() or 0
        results: list[LoadResult] = []

        async def fill() -> None:
            async def one(name: str) -> None:
                cfg = LoadConfig(host=S.HOST, port=server.port, sessions=2, messages=per_user,
                                 size=KB, per_connection=per_user, mail_from=S.SENDER,
                                 rcpt_to=f"{name}@{S.DOMAIN}", timeout=30)
                results.append(await run_load(cfg))

            async with trio.open_nursery() as nursery:
                for name in names:
                    nursery.start_soon(one, name)

        run_trio(fill)
        sent = sum(r.sent for r in results)
        if sent < per_user * len(names):
            errors = {k: v for r in results for k, v in r.errors.items()}
            self.skip("mailpool pop", f"filling the maildrops: {sent}/{per_user * len(names)} "
                      f"accepted, errors {errors}")
            return False
        got, _ = self.wait_delivered(server, before, sent, time.time())
        if got < sent:
            self.skip("mailpool pop", f"only {got}/{sent} delivered to the POP users")
            return False
        return True


def client_cpu() -> float:
    """CPU seconds of the driver's children waited for so far (the generator, once it ended)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def summarise_tls(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Medians over one server's runs that accepted messages, and every run's errors (None:
    no run at all)."""
    if not rows:
        return None
    ran = [r for r in rows if "error" not in r["result"]]
    errors = dict(sorted(sum((Counter(r["result"]["errors"]) for r in ran), Counter()).items()))
    good = [r for r in ran if r["result"].get("sent")]
    if not good:
        return {"runs": 0, "errors": errors}

    def med(get: Callable[[dict[str, Any]], float | None]) -> float | None:
        values = [v for v in map(get, good) if v is not None]
        return median(values) if values else None

    kinds = sorted({k for r in good for k in r.get("cpu_us_per_msg_by_kind", {})})
    return {
        "runs": len(good),
        "handshakes_per_sec": med(lambda r: r["result"]["handshakes_per_sec"]),
        "accepted_per_sec": med(lambda r: r["result"]["msgs_per_sec"]),
        "delivered_per_sec": med(lambda r: r.get("delivered_per_sec")),
        "handshake_p50_ms": med(lambda r: r["result"]["handshake_ms"].get("p50")),
        "handshake_p99_ms": med(lambda r: r["result"]["handshake_ms"].get("p99")),
        "cpu_us_per_msg": med(lambda r: r.get("cpu_us_per_msg")),
        "cpu_us_per_msg_by_kind": {k: med(lambda r, k=k: r.get("cpu_us_per_msg_by_kind", {})
                                          .get(k, 0.0)) for k in kinds},
        "client_cpu_share": med(lambda r: r.get("client_cpu_share")),
        "errors": errors,
        "tls": sorted({k for r in good for k in r["result"].get("tls", {})}),
    }


def tls_ratios(mp: dict[str, Any] | None, pf: dict[str, Any] | None) -> dict[str, float | None]:
    """mailpool / Postfix for each rate and the CPU per message."""
    keys = ("handshakes_per_sec", "accepted_per_sec", "delivered_per_sec", "cpu_us_per_msg")
    if mp is None or pf is None:
        return dict.fromkeys(keys)
    return {k: mp[k] / pf[k] if mp.get(k) is not None and pf.get(k) else None for k in keys}


def tls_line(row: dict[str, Any]) -> str:
    r = row["result"]
    head = f"{row['server']} run {row['round']}: "
    if "error" in r:
        return head + f"ERROR {r['error']}; server log: {row.get('serve_log', '')}"
    text = (head + f"{r['handshakes']} handshakes {r['handshakes_per_sec']:.1f}/s, "
            f"{r['sent']} accepted {r['msgs_per_sec']:.1f}/s")
    if row.get("delivered_per_sec"):
        text += f", delivered {row['delivered_per_sec']:.1f}/s"
    elif "delivered" in row:
        text += f", delivered {row['delivered']}/{r['sent']} (timed out)"
    hs = r.get("handshake_ms", {})
    if hs.get("n"):
        text += f"; STARTTLS-to-secure p50 {hs['p50']:.1f} p99 {hs['p99']:.1f} ms"
    if row.get("cpu_us_per_msg") is not None:
        kinds = sorted(row["cpu_us_per_msg_by_kind"].items(), key=lambda kv: -kv[1])
        text += (f"; CPU {row['cpu_us_per_msg']:.0f} us/msg ("
                 + ", ".join(f"{k} {v:.0f}" for k, v in kinds if v >= 1) + ")")
    if row.get("client_cpu_share") is not None:
        text += f"; client CPU {row['client_cpu_share'] * 100:.0f}%"
    if r.get("errors"):
        text += f"; errors {r['errors']}; server log: {row.get('serve_log', '')}"
    return text


def stop_quietly(server: S.Server) -> None:
    try:
        server.stop()
    except Exception as exc:  # a failing stop must not hide the others
        print(f"  {server.label}: stop failed: {exc}", file=sys.stderr)


def one_line(row: dict[str, Any]) -> str:
    r = row["result"]
    head = f"{row['server']:<20} {row['client']:<11}"
    if row.get("round", 1) > 1:
        head += f" run {row['round']}"
    if "error" in r:
        return f"{head} ERROR {r['error']}; server log: {row.get('serve_log', '')}"
    text = f"{head} {r['sent']:>6} sent {r['msgs_per_sec']:>8.1f}/s"
    if row.get("delivered_per_sec"):
        text += f"  delivered {row['delivered_per_sec']:.1f}/s"
    elif "delivered" in row:
        text += f"  delivered {row['delivered']}/{r['sent']} (timed out)"
    if r.get("data_ms", {}).get("n"):
        text += (f"  greet p99 {r['greeting_ms']['p99']:.1f} ms"
                 f"  DATA p99 {r['data_ms']['p99']:.1f} ms")
    if row.get("cpu_us_per_msg") is not None:
        text += f"  CPU {row['cpu_us_per_msg']:.0f} us/msg"
        if row["server_kind"] == "mailpool":
            kinds = sorted(row["cpu_us_per_msg_by_kind"].items(), key=lambda kv: -kv[1])
            text += " (" + ", ".join(f"{k} {v:.0f}" for k, v in kinds if v >= 1) + ")"
    if row.get("client_cpu_share") is not None:
        text += f"  client CPU {row['client_cpu_share'] * 100:.0f}%"
    if r.get("errors"):
        text += f"  errors {r['errors']}; server log: {row.get('serve_log', '')}"
    return text


def _ms(p: dict[str, float]) -> str:
    if not p.get("n"):
        return "no samples"
    return f"p50 {p['p50']:.1f} p99 {p['p99']:.1f} max {p['max']:.1f} ms (n={p['n']})"


def greeting_line(g: dict[str, Any]) -> str:
    errors = {k: v for k, v in (("alone", g["alone_errors"]), ("with idle", g["with_idle_errors"]),
                                ("idle", g["idle_errors"])) if v}
    return (f"new clients' connect-to-greeting alone: {_ms(g['alone_ms'])}; with "
            f"{g['held']}/{g['idle']} idle sessions open: {_ms(g['with_idle_ms'])}"
            + (f"; errors {errors}" if errors else ""))


def idle_line(c: dict[str, Any]) -> str:
    b, a = c["before"], c["after"]
    per = c.get("pss_kb_per_session")
    alone = c.get("pss_kb_per_session_sessions_only")
    text = (f"held {c['held']}/{c['bound']} idle sessions (ramp {c['ramp_seconds']:.1f} s); "
            f"RSS {b['rss_kb'] / 1024:.0f} -> {a['rss_kb'] / 1024:.0f} MiB, PSS "
            f"{b['pss_kb'] / 1024:.0f} -> {a['pss_kb'] / 1024:.0f} MiB; "
            f"processes {b['processes']} -> {a['processes']}")
    if per is not None:
        text += (f"; per session {c['rss_kb_per_session']:.1f} KiB RSS, {per:.1f} KiB PSS, "
                 f"{alone:.1f} KiB PSS without the {sum(c['new_processes'].values())} "
                 "processes started")
    if c.get("errors"):
        text += f"; errors {c['errors']}"
    return text


def peers_missing() -> list[str]:
    missing = []
    if S.postfix_tool("postfix") is None or S.postfix_tool("smtp-sink") is None:
        missing.append("postfix")
    if S.postfix_tool("dovecot") is None or not Path("/usr/lib/dovecot/pop3").exists():
        missing.append("dovecot-pop3d")
    return missing


def ensure_peers(install: bool) -> None:
    missing = peers_missing()
    if not missing:
        return
    if not install:
        print(f"peers missing ({', '.join(missing)}); --no-install given: they are skipped")
        return
    print(f"installing peers ({', '.join(missing)}) with bench/install_peers.sh ...", flush=True)
    try:
        res = subprocess.run(["sh", str(BENCH_DIR / "install_peers.sh")], capture_output=True,
                             text=True, timeout=600, stdin=subprocess.DEVNULL)
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or [""]
        print(f"  install_peers.sh: exit {res.returncode} {tail[0]}")
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"  install_peers.sh failed: {exc}")


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "kernel": platform.release(),
                            "python": platform.python_version(), "load": os.getloadavg()}
    try:
        res = subprocess.run(["postconf", "-d", "-h", "mail_version"], capture_output=True,
                             text=True, timeout=10)
        info["postfix"] = res.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        info["postfix"] = None
    try:
        res = subprocess.run(["dovecot", "--version"], capture_output=True, text=True,
                             timeout=10)
        info["dovecot"] = res.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        info["dovecot"] = None
    try:
        import aiosmtpd

        info["aiosmtpd"] = aiosmtpd.__version__
    except ImportError:
        info["aiosmtpd"] = None
    return info


def parse_args(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a 3-4 minute subset: the targets' workloads once each, 2,000 idle "
                        "sessions, one journal round")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds the generator runs each workload at most (default 3, --quick 2)")
    p.add_argument("--idle-bound", type=int, default=None,
                   help="idle sessions to try to hold (default 10000, --quick 2000)")
    p.add_argument("--client-procs", type=int, default=1,
                   help="generator processes (default 1; raise it on machines with many cores)")
    p.add_argument("--only", action="append", default=[],
                   choices=["mailpool", "postfix", "aiosmtpd", "smtp-sink", "idle", "journal",
                            "pop", "outbound", "tls", "twohost", "dircalls"],
                   help="run only these parts (repeatable; twohost includes dircalls)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole run (default 660, --quick 240); parts that "
                        "would start later are reported as skipped")
    p.add_argument("--outbound-messages", type=int, default=0, metavar="N",
                   help="messages queued for the outbound section (default 2000, --quick 600)")
    p.add_argument("--no-install", action="store_true",
                   help="do not try to install missing peers")
    p.add_argument("--keep", action="store_true",
                   help="keep the servers' temporary directories (logs, spools)")
    a = p.parse_args(argv)
    return Options(
        quick=a.quick,
        duration=a.duration or (2.0 if a.quick else 3.0),
        idle_bound=a.idle_bound or (2000 if a.quick else 10_000),
        idle_window=30.0 if a.quick else 90.0,
        greet_idle=1000, greet_probes=100 if a.quick else 300,
        target_rounds=1 if a.quick else 3,
        journal_rounds=1 if a.quick else 4,
        journal_messages=300 if a.quick else 600,
        client_procs=a.client_procs, install=not a.no_install,
        only=set(a.only), keep=a.keep,
        budget=a.budget or (240.0 if a.quick else 580.0),
        pop_sessions=(10,) if a.quick else (1, 10),
        pop_per_user=20 if a.quick else 100,
        outbound_messages=a.outbound_messages,
    )


class _Stop:
    """Where a SIGTERM finds the driver: in plain code, or inside a trio.run."""

    requested = False
    token: trio.lowlevel.TrioToken | None = None
    scope: trio.CancelScope | None = None


def run_trio(fn: Callable[..., Any], *args: Any) -> Any:
    """trio.run, cancelled cleanly by SIGTERM (which then surfaces as KeyboardInterrupt)."""
    async def wrapper() -> Any:
        _Stop.token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as scope:
            _Stop.scope = scope
            return await fn(*args)
        return None

    try:
        result = trio.run(wrapper)
    finally:
        _Stop.token = _Stop.scope = None
    if _Stop.requested:
        raise KeyboardInterrupt
    return result


def _sigterm(signum: int, frame: object) -> None:
    _Stop.requested = True
    token, scope = _Stop.token, _Stop.scope
    if token is not None and scope is not None:
        token.run_sync_soon(scope.cancel)  # raising here would tear Trio's run apart
        return
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    from bench.report import chart, markdown, print_report

    opts = parse_args(argv)
    raise_fd_limit()  # the idle part holds 10,000 client sockets in this process
    signal.signal(signal.SIGTERM, _sigterm)
    started = time.monotonic()
    ensure_peers(opts.install)
    runner = Runner(opts)
    info = machine()
    runner.record({"kind": "meta", "machine": info, "options": asdict(opts) | {
        "only": sorted(opts.only)}, "started": time.strftime("%Y-%m-%d %H:%M %Z")})
    print(f"mailpool benchmark {runner.stamp}: {info['cpus']} CPUs, load average "
          f"{info['load'][0]:.2f}; results in {runner.out_path.relative_to(BENCH_DIR.parent)}")
    if info["load"][0] > 0.5:
        print("  note: the machine is busy; figures will be noisy (compare ratios, rerun)")
    parts: list[tuple[str, Callable[[], None]]] = [
        ("smtp", runner.run_smtp), ("idle", runner.run_idle), ("journal", runner.run_journal),
        ("pop", runner.run_pop), ("outbound", runner.run_outbound), ("tls", runner.run_tls),
        ("twohost", runner.run_twohost)]
    seconds: dict[str, float] = {}
    interrupted = False
    try:
        for name, part in parts:
            t0 = time.monotonic()
            part()
            seconds[name] = time.monotonic() - t0
            if seconds[name] >= 1:
                print(f"  ({name}: {seconds[name]:.0f} s)", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping servers", file=sys.stderr)
    finally:
        runner.close()
    wall = time.monotonic() - started
    targets = print_report(runner.rows)
    runner.rows.extend(targets)
    with open(runner.out_path, "a") as f:
        for row in [*targets, {"kind": "wall", "seconds": wall, "parts": seconds}]:
            f.write(json.dumps({"run": runner.stamp, **row}, separators=(",", ":")) + "\n")
    block = markdown(runner.rows, wall)
    md = runner.out_path.with_suffix(".md")
    md.write_text(block)
    print(f"\n== README Performance block (Markdown, also in "
          f"{md.relative_to(BENCH_DIR.parent)})\n\n{block}")
    png = chart(runner.rows, runner.out_path.with_suffix(".png"))
    if png:
        print(f"chart: {png.relative_to(BENCH_DIR.parent)}")
    print(f"results: {runner.out_path.relative_to(BENCH_DIR.parent)} "
          f"({time.monotonic() - started:.0f} s)")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
