"""The benchmark driver: mailpool against the servers its users would otherwise run.

    python -m bench.run [--quick]

In one run, on 127.0.0.1 with free ports chosen now, it starts each server,
measures how many idle sessions it holds and what they cost in memory, drives
it with the same SMTP workloads, stops it, and then compares: mailpool (default
pools, and sessions_per_job raised), Postfix (end to end into a Maildir, driven
by this project's generator and by Postfix's own smtp-source), aiosmtpd with a
handler that fsyncs each message, and smtp-sink (no disk: the ceiling of the
loopback and the client). Then the journal's cost (mailpool with journaling on
and off, alternated), POP3 retrieval against Dovecot, and the outbound side
(bench.outbound: mailpool's SMTP client against Postfix's smtp(8), from a full
queue to smtp-sink MX hosts), and last the target workload over STARTTLS, mailpool
against Postfix (`--only tls`). It prints one table
with ratios against mailpool and each target as MET or MISSED, and saves JSON
lines and a chart under bench/results/.

Every run is bounded: each workload stops starting messages after --duration
seconds, every wait has a timeout, and every server started is stopped again,
also on Ctrl-C and errors. Peers that cannot be installed are reported as
skipped, with the reason.
"""

from __future__ import annotations

import argparse
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
from bench.handoff import settle
from bench.idle import idle_capacity
from bench.outbound import CpuPoller, mailpool_kind, postfix_kind, run_outbound
from bench.pop_load import PopConfig, run_pop
from bench.smtp_load import LoadConfig, LoadResult, make_body, raise_fd_limit, run_load

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results"
KB = 1024


@dataclass(frozen=True)
class Workload:
    sessions: int
    size: int
    per_connection: int
    messages: int  # upper bound; --duration usually ends the run first

    @property
    def label(self) -> str:
        size = f"{self.size // KB}KB" if self.size >= KB else f"{self.size}B"
        return f"{self.sessions}s {size} k={self.per_connection}"


TARGET = Workload(20, KB, 1, 20000)  # durable end to end: the targets are measured here


def workloads(quick: bool) -> list[Workload]:
    """The target workload first, so that a run cut short by its budget still has it."""
    if quick:
        return [TARGET]
    out = [TARGET]
    for sessions in (1, 20, 100):
        for size in (KB, 100 * KB):
            for k in (1, 100):
                cap = 2000 if size == KB else 500
                wl = Workload(sessions, size, k, cap * max(1, sessions // 10))
                if wl.label != TARGET.label:
                    out.append(wl)
    return out


@dataclass
class Options:
    quick: bool
    duration: float
    idle_bound: int
    idle_window: float
    journal_rounds: int
    spj: int
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
            print(f"  {server.label}: listening on {S.HOST}:{server.port} "
                  f"(started in {time.monotonic() - t0:.1f} s)", flush=True)
            yield server
        finally:
            stop_quietly(server)
            self.running.remove(server)

    def wanted(self, name: str) -> bool:
        return not self.opts.only or name in self.opts.only

    # --- measurements -------------------------------------------------------------

    def smtp_load(self, server: S.Server, wl: Workload, tls: S.TlsFiles | None = None,
                  duration: float | None = None) -> dict[str, Any] | None:
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

    def smtp_source(self, server: S.Server, wl: Workload, messages: int) -> dict[str, Any]:
        """Postfix's smtp-source with the same sessions, size and message count."""
        exe = S.postfix_tool("smtp-source")
        if exe is None:
            return {"error": "smtp-source not found"}
        messages = max(messages, wl.sessions)
        argv = [exe, "-s", str(wl.sessions), "-m", str(messages), "-l", str(wl.size),
                "-f", S.SENDER, "-t", server.rcpt]
        if wl.per_connection > 1:
            argv.append("-d")  # one connection per session for all its messages
        argv.append(f"{S.HOST}:{server.port}")
        t0 = time.perf_counter()
        try:
            res = subprocess.run(argv, capture_output=True, text=True,
                                 timeout=max(60.0, self.opts.duration * 20))
        except subprocess.TimeoutExpired:
            return {"error": "smtp-source did not finish in time"}
        elapsed = time.perf_counter() - t0
        if res.returncode != 0:
            return {"error": f"smtp-source: {(res.stderr or res.stdout).strip()[-200:]}"}
        return {"tool": "smtp-source", "sent": messages, "attempted": messages, "failed": 0,
                "elapsed": elapsed, "msgs_per_sec": messages / elapsed, "errors": {},
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

    def drive(self, server: S.Server, client: str, wl: Workload, messages: int = 0,
              ) -> dict[str, Any] | None:
        before = server.delivered() if server.durable else None
        t0 = time.time()
        if client == "smtp_load":
            result = self.smtp_load(server, wl)
            t0 = (result or {}).get("started_at") or t0  # the generator's own start line
        else:
            result = self.smtp_source(server, wl, messages)
        assert result is not None
        row: dict[str, Any] = {"kind": "smtp", "server": server.label, "server_kind": server.kind,
                               "client": client, "workload": asdict(wl), "label": wl.label,
                               "result": result}
        if "error" not in result and before is not None and result.get("sent"):
            got, rate = self.wait_delivered(server, before, result["sent"], t0)
            row["delivered"] = got
            row["delivered_per_sec"] = rate
        self.record(row)
        print("    " + one_line(row), flush=True)
        return result

    def idle(self, server: S.Server) -> None:
        """Idle capacity on the fresh server ("cold": workers it starts for the sessions
        count), then, unless --quick, again at once ("warm": the workers exist already)."""
        def run() -> dict[str, Any]:
            return run_trio(idle_capacity, S.HOST, server.port, self.opts.idle_bound,
                            self.opts.idle_window, server.memory)

        row: dict[str, Any] = {"kind": "idle", "server": server.label,
                               "server_kind": server.kind, **run()}
        if not self.opts.quick:
            time.sleep(1.0)  # let the server notice the closed sessions
            row["warm"] = run()
        self.record(row)
        per = row.get("rss_kb_per_session")
        warm = row.get("warm", {}).get("rss_kb_per_session")
        print(f"    idle: held {row['held']}/{row['bound']} sessions; "
              f"RSS {row['before']['rss_kb']} -> {row['after']['rss_kb']} KiB"
              + (f" = {per:.1f} KiB/session" if per is not None else "")
              + (f" (warm: {warm:.1f})" if warm is not None else "")
              + f"; {row['after']['processes']} processes", flush=True)

    # --- the phases ----------------------------------------------------------------

    def smtp_servers(self) -> list[tuple[S.Server, list[str]]]:
        w, spj = self.work, self.opts.spj
        out: list[tuple[S.Server, list[str]]] = []
        if self.wanted("mailpool"):
            # smtp-source too, on the target workload only: the targets compare like with like.
            out.append((S.Mailpool("mailpool", w), ["smtp_load", "smtp-source"]))
            out.append((S.Mailpool(f"mailpool spj={spj}", w, {"sessions_per_job": spj}),
                        ["smtp_load", "smtp-source"]))
        if self.wanted("postfix"):
            out.append((S.Postfix("postfix", w), ["smtp_load", "smtp-source"]))
        if self.wanted("aiosmtpd"):
            out.append((S.AiosmtpdFsync("aiosmtpd-fsync", w), ["smtp_load"]))
        if self.wanted("smtp-sink"):
            out.append((S.SmtpSink("smtp-sink", w, self.opts.idle_bound + 100),
                        ["smtp_load", "smtp-source"]))
        return out

    def run_smtp(self) -> None:
        wls = workloads(self.opts.quick)
        # Time kept back for the phases that follow (journal, POP, outbound, STARTTLS).
        reserve = (30.0 if self.opts.quick else 90.0) * (
            self.wanted("journal") + self.wanted("pop") + self.wanted("outbound")
            + self.wanted("tls")) / 2
        for server, clients in self.smtp_servers():
            print(f"\n== {server.label}", flush=True)
            if self.over_budget(server.label, reserve):
                continue
            with self.serving(server) as up:
                if up is None:
                    continue
                self.idle(server)
                for wl in wls:
                    if self.over_budget(f"{server.label} {wl.label}", reserve):
                        break
                    sent = 0
                    for client in clients:
                        if client == "smtp-source":
                            if not sent:  # it sends what the generator managed, in one go
                                continue
                            if server.kind == "mailpool" and wl != TARGET:
                                continue
                            if wl.per_connection > 1:  # -d: all of a session's on one link
                                sent = min(sent, wl.sessions * wl.per_connection)
                        res = self.drive(server, client, wl, sent)
                        if client == "smtp_load" and res and "error" not in res:
                            sent = res["sent"]

    def run_journal(self) -> None:
        if not self.wanted("journal"):
            return
        spj = {"sessions_per_job": self.opts.spj}
        print(f"\n== journal cost (mailpool, sessions_per_job={self.opts.spj}, journal on vs off)",
              flush=True)
        if self.over_budget("journal comparison", 15.0):
            return
        # The raised sessions_per_job keeps pool growth (job start-up) out of the comparison.
        on = S.Mailpool("mailpool journal=on", self.work, spj)
        off = S.Mailpool("mailpool journal=off", self.work, spj, journal=False)
        with self.serving(on) as a, self.serving(off) as b:
            if a is None or b is None:
                return
            # One unmeasured pass each first (page cache, first Maildir directories).
            for server in (on, off):
                self.smtp_load(server, TARGET)
            rates: dict[str, list[float]] = {"on": [], "off": []}
            for _ in range(self.opts.journal_rounds):
                for name, server in (("on", on), ("off", off)):
                    res = self.drive(server, "smtp_load", TARGET)
                    if res and "error" not in res:
                        rates[name].append(res["msgs_per_sec"])
            if rates["on"] and rates["off"]:
                m_on, m_off = median(rates["on"]), median(rates["off"])
                self.record({"kind": "journal", "workload": asdict(TARGET), "label": TARGET.label,
                             "on": rates["on"], "off": rates["off"], "median_on": m_on,
                             "median_off": m_off, "cost": 1 - m_on / m_off if m_off else None})

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
        print("\n== POP3 retrieval", flush=True)
        if self.over_budget("POP3 retrieval", 10.0):
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
                    print(f"    {sessions} sessions: {res['retr_per_sec']:.0f} RETR/s, "
                          f"{res['mb_per_sec']:.1f} MB/s, login p99 "
                          f"{res['login_ms'].get('p99', 0):.1f} ms, RETR p99 "
                          f"{res['retr_ms'].get('p99', 0):.2f} ms, errors {res['errors'] or 0}",
                          flush=True)

    def run_outbound(self) -> None:
        if self.wanted("outbound"):
            run_outbound(self)  # bench.outbound: the SMTP client against Postfix's smtp(8)

    def run_tls(self) -> None:
        """The target workload over STARTTLS: mailpool (default pools) and Postfix, both up
        at once, one unmeasured pass each, then alternated measured runs; medians."""
        if not self.wanted("tls"):
            return
        rounds = 1 if self.opts.quick else 2
        print(f"\n== STARTTLS: {TARGET.label} (durable), every connection STARTTLS, "
              f"mailpool vs Postfix, {rounds} run(s) each", flush=True)
        if self.over_budget("tls", 20.0):
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
                self.smtp_load(server, TARGET, tls, duration=min(self.opts.duration, 2.0))
            for rnd in range(1, rounds + 1):
                for name, server in up:
                    if self.over_budget(f"tls {name} run {rnd}"):
                        continue
                    row = self.measure_tls(name, server, tls, rnd)
                    rows[name].append(row)
                    self.record(row)
                    print("    " + tls_line(row), flush=True)
        summary = {name: summarise_tls(r) for name, r in rows.items()}
        self.record({"kind": "tls-summary", "workload": asdict(TARGET), "label": TARGET.label,
                     "certificate": f"{tls.kind}, verified by the client",
                     **summary, "ratio": tls_ratios(summary["mailpool"], summary["postfix"])})

    def measure_tls(self, name: str, server: S.Server, tls: S.TlsFiles, rnd: int,
                    ) -> dict[str, Any]:
        """One run: the load, the wait for its deliveries, the server's CPU over both (per
        process kind) and the generator's (is the client the bottleneck?)."""
        if isinstance(server, S.Mailpool):
            assert server.proc is not None
            kind = mailpool_kind(server.proc.pid)
        else:
            kind = postfix_kind
        settle(server)
        poller = CpuPoller(server.root_pids(), kind)
        before = server.delivered() or 0
        row: dict[str, Any] = {"kind": "tls", "server": name, "server_kind": server.kind,
                               "round": rnd, "workload": asdict(TARGET), "label": TARGET.label}
        poller.start()
        try:
            poller.mark()
            t0 = time.time()
            client = client_cpu()
            result = row["result"] = self.smtp_load(server, TARGET, tls) or {"error": "none"}
            client = client_cpu() - client
            if "error" not in result and result.get("sent"):
                got, rate = self.wait_delivered(server, before, result["sent"],
                                                result.get("started_at") or t0)
                row |= {"delivered": got, "delivered_per_sec": rate}
        finally:
            poller.stop()
        if "error" in result:
            row["serve_log"] = server.log_tail(10)
            return row
        row["client_cpu_share"] = client / result["elapsed"] if result["elapsed"] else None
        cpu, procs, started = poller.by_kind()
        if result["sent"]:
            row |= {"cpu_us_per_msg": sum(cpu.values()) / result["sent"] * 1e6,
                    "cpu_us_per_msg_by_kind": {k: v / result["sent"] * 1e6
                                               for k, v in sorted(cpu.items())}}
        row |= {"processes_by_kind": procs, "started_by_kind": started}
        if result.get("errors") or row.get("delivered_per_sec") is None:
            row["serve_log"] = server.log_tail(10)
        return row

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
    if "error" in r:
        return f"{row['label']:<16} {row['client']:<11} ERROR {r['error']}"
    text = (f"{row['label']:<16} {row['client']:<11} {r['sent']:>6} sent "
            f"{r['msgs_per_sec']:>8.1f}/s")
    if row.get("delivered_per_sec"):
        text += f"  delivered {row['delivered_per_sec']:.1f}/s"
    elif "delivered" in row:
        text += f"  delivered {row['delivered']}/{r['sent']} (timed out)"
    if r.get("data_ms", {}).get("n"):
        text += (f"  greet p99 {r['greeting_ms']['p99']:.1f} ms"
                 f"  DATA p99 {r['data_ms']['p99']:.1f} ms")
    if r.get("errors"):
        text += f"  errors {r['errors']}"
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
                   help="a ~1 minute subset: the target workload only, fewer idle sessions")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds each workload runs at most (default 3, --quick 2)")
    p.add_argument("--idle-bound", type=int, default=None,
                   help="idle sessions to try to hold (default 1000, --quick 300)")
    p.add_argument("--spj", type=int, default=256,
                   help="sessions_per_job of the second mailpool configuration (default 256: "
                        "enough for the idle test's 1000 sessions on the 4 initial jobs)")
    p.add_argument("--client-procs", type=int, default=1,
                   help="generator processes (default 1; raise it on machines with many cores)")
    p.add_argument("--only", action="append", default=[],
                   choices=["mailpool", "postfix", "aiosmtpd", "smtp-sink", "journal", "pop",
                            "outbound", "tls"],
                   help="run only these parts (repeatable)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole run (default 540, --quick 90); parts that "
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
        idle_bound=a.idle_bound or (200 if a.quick else 1000),
        idle_window=3.0 if a.quick else 8.0,
        journal_rounds=1 if a.quick else 5,
        spj=a.spj, client_procs=a.client_procs, install=not a.no_install,
        only=set(a.only), keep=a.keep,
        budget=a.budget or (90.0 if a.quick else 540.0),
        pop_sessions=(5,) if a.quick else (1, 10),
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
    from bench.report import chart, print_report

    opts = parse_args(argv)
    raise_fd_limit()
    signal.signal(signal.SIGTERM, _sigterm)
    started = time.monotonic()
    ensure_peers(opts.install)
    runner = Runner(opts)
    info = machine()
    runner.record({"kind": "meta", "machine": info, "options": asdict(opts) | {
        "only": sorted(opts.only)}})
    print(f"mailpool benchmark {runner.stamp}: {info['cpus']} CPUs, load average "
          f"{info['load'][0]:.2f}; results in {runner.out_path.relative_to(BENCH_DIR.parent)}")
    if info["load"][0] > 0.5:
        print("  note: the machine is busy; figures will be noisy (compare ratios, rerun)")
    phases: list[Callable[[], None]] = [runner.run_smtp, runner.run_journal, runner.run_pop,
                                        runner.run_outbound, runner.run_tls]
    interrupted = False
    try:
        for phase in phases:
            phase()
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping servers", file=sys.stderr)
    finally:
        runner.close()
    targets = print_report(runner.rows, opts.spj)
    for t in targets:
        runner.rows.append(t)
    with open(runner.out_path, "a") as f:
        for t in targets:
            f.write(json.dumps({"run": runner.stamp, **t}, separators=(",", ":")) + "\n")
    png = chart(runner.rows, runner.out_path.with_suffix(".png"))
    if png:
        print(f"\nchart: {png.relative_to(BENCH_DIR.parent)}")
    print(f"results: {runner.out_path.relative_to(BENCH_DIR.parent)} "
          f"({time.monotonic() - started:.0f} s)")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
