"""Two mailpool hosts sharing a PostgreSQL directory and a mailbox root, against one host.

    python -m bench.run --only twohost [--quick]     (then bench.directory_calls too)

One private PostgreSQL cluster (tests/pghelp.py, through bench.pg) holds the site's
directory. Three mailpool hosts run at once, each with its own data directory (spool,
journal) and the bench's default configuration otherwise:

- mx1 on 127.0.0.2 and mx2 on 127.0.0.3, same port: [directory] backend = "postgresql" on
  the cluster (cache_ttl at its default), and one mailbox root for both ([paths] mailboxes);
- "file" on 127.0.0.1: the file directory and its own mailboxes, the one-host baseline.

Three setups run the target workload (20 sessions, 1 KB, one message per connection):
one host with the file directory, one host with PostgreSQL (mx1 alone), and the two hosts
(10 sessions and half the messages on each, at once). The client is smtp-source (one per
host) if installed, else the Trio generator. Each setup gets one unmeasured pass, then
the setups run in turn, their order rotated each round; medians are reported:
delivered/s (from the load's start to the last message in a Maildir), the second host's
gain (two hosts / one host), and CPU per delivered message per process kind, summed over
the setup's hosts, with the database's own processes as the kind "postgresql" where the
setup uses it. One host with PostgreSQL against one with the file is the cost of the shared
directory per message. The machine's CPUs are shared by everything here: the gain
says what a second host adds on this machine, not on a second one.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import TYPE_CHECKING, Any

from bench import servers as S
from bench.cpu import CpuPoller, mailpool_kind, settle
from bench.outbound import port_free_on
from bench.pg import postmaster_pid, start_cluster
from bench.report import dircalls_lines, twohost_lines

if TYPE_CHECKING:
    from bench.run import Runner

KB = 1024
SESSIONS = 20
SITE = ("127.0.0.2", "127.0.0.3")
SETUPS = {"one-file": "1 host, file directory", "one-pg": "1 host, PostgreSQL",
          "two-pg": "2 hosts, PostgreSQL"}
CLIENT_TIMEOUT = 90.0


class SiteHost(S.Mailpool):
    """mailpool on its own address with its own data directory; with dsn its directory is
    PostgreSQL, with mailboxes its mailbox root is that (shared) directory."""

    def __init__(self, label: str, workdir: Path, address: str, name: str,
                 dsn: str = "", mailboxes: Path | None = None, owns_user: bool = True,
                 port: int = 0) -> None:
        super().__init__(label, workdir)
        self.address = address
        self.fixed_port = port  # the site's hosts share one port, as MX hosts share 25
        self.name = name
        self.dsn = dsn
        self.mailboxes = mailboxes
        self.owns_user = owns_user  # adds the bench's user (once per directory)

    def write_config(self) -> None:
        self.port = self.fixed_port or port_free_on([self.address])
        pop3, admin = port_free_on([self.address]), port_free_on([self.address])
        lines = [
            "[host]", f'name = "{self.name}"', f'local_domains = ["{S.DOMAIN}"]',
            f'user = "{getpass.getuser()}"', "",
            "[listen]", f'smtp = "{self.address}:{self.port}"',
            f'pop3 = "{self.address}:{pop3}"', f'admin = "{self.address}:{admin}"', "",
            "[paths]", 'data = "var"']
        if self.mailboxes is not None:
            lines.append(f'mailboxes = "{self.mailboxes}"')
        lines += ["", "[journal]", "enabled = true", ""]
        if self.dsn:
            lines += ["[directory]", 'backend = "postgresql"', f'dsn = "{self.dsn}"', ""]
        self.config.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 60.0) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.write_config()
        if self.owns_user:
            self.add_user(S.USER, S.RCPT)
        self.proc = self._popen([*S.mailpool_command(), "serve", "--config", str(self.config)],
                                cwd=self.dir)
        try:
            S.wait_banner(self.port, b"220", timeout, self.proc, host=self.address)
        except S.ServerError as exc:
            raise S.ServerError(f"{exc}: {self.log_tail()}") from None

    def delivered(self) -> int | None:
        return S.count_maildir(self.mailboxes or self.data / "mailboxes")


@dataclass
class Client:
    tool: str  # "smtp-source" or "smtp_load"

    def argv(self, host: SiteHost, sessions: int, messages: int) -> list[str]:
        if self.tool == "smtp-source":
            return [S.postfix_tool("smtp-source") or "smtp-source", "-s", str(sessions),
                    "-m", str(messages), "-l", str(KB), "-f", S.SENDER, "-t", S.RCPT,
                    f"{host.address}:{host.port}"]
        return [sys.executable, "-m", "bench.smtp_load", "--host", host.address,
                "--port", str(host.port), "--sessions", str(sessions), "--messages",
                str(messages), "--size", str(KB), "--per-connection", "1", "--to", S.RCPT,
                "--from", S.SENDER, "--timeout", "30", "--json"]

    def sent(self, messages: int, res: subprocess.CompletedProcess[str]) -> int:
        """Messages the server accepted; ValueError saying why the client failed."""
        if res.returncode != 0:
            raise ValueError(f"{self.tool} exit {res.returncode}: "
                             f"{(res.stderr or res.stdout).strip()[-200:]}")
        if self.tool == "smtp-source":
            return messages
        out = json.loads(res.stdout.strip().splitlines()[-1])
        if out.get("errors"):
            raise ValueError(f"smtp_load errors {out['errors']}")
        return int(out["sent"])


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def load(client: Client, hosts: list[SiteHost], messages: int) -> int:
    """The target workload over hosts at once (sessions and messages split evenly); the
    messages accepted. ValueError when a client fails or does not finish in time."""
    cwd = Path(__file__).resolve().parent.parent
    shares = split(messages, len(hosts))
    procs: list[subprocess.Popen[str]] = []
    sent, failed = 0, []
    try:
        for host, sessions, m in zip(hosts, split(SESSIONS, len(hosts)), shares, strict=True):
            procs.append(subprocess.Popen(client.argv(host, sessions, m), text=True, cwd=cwd,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          stdin=subprocess.DEVNULL))
        deadline = time.monotonic() + CLIENT_TIMEOUT
        for proc, m in zip(procs, shares, strict=True):
            try:
                out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                failed.append(f"{client.tool} did not finish in {CLIENT_TIMEOUT:.0f} s")
                continue
            try:
                sent += client.sent(m, subprocess.CompletedProcess(proc.args, proc.returncode,
                                                                   out, err))
            except (ValueError, KeyError, IndexError, json.JSONDecodeError) as exc:
                failed.append(str(exc))
    except OSError as exc:
        failed.append(f"{client.tool}: {exc}")
    finally:
        for proc in procs:  # a client that failed or hung is ended (ours, by its pid)
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    if failed:
        raise ValueError("; ".join(failed))
    return sent


def measure(runner: Runner, setup: str, hosts: list[SiteHost], client: Client,
            messages: int, db_pid: int | None = None) -> dict[str, Any]:
    """One load over the setup's hosts: delivered/s into the mailbox root(s) and CPU per
    delivered message per process kind, summed over the hosts (and per host); with db_pid
    the database's processes too, as the kind "postgresql"."""
    for host in hosts:
        settle(host)
    pollers = {h.label: CpuPoller(h.root_pids(), mailpool_kind(h.proc.pid)) for h in hosts
               if h.proc is not None}
    if db_pid:
        pollers["postgresql"] = CpuPoller([db_pid], lambda _pid, _argv: "postgresql")
    before = hosts[0].delivered() or 0  # mx1's and mx2's mailbox root is one
    row: dict[str, Any] = {"kind": "twohost-run", "setup": setup, "client": client.tool,
                           "hosts": [h.label for h in hosts], "messages": messages}
    for p in pollers.values():
        p.start()
    try:
        for p in pollers.values():
            p.mark()
        t0 = time.time()
        try:
            sent = load(client, hosts, messages)
        except ValueError as exc:
            return row | {"error": str(exc), "serve_log": [h.log_tail(5) for h in hosts]}
        got, rate = runner.wait_delivered(hosts[0], before, sent, t0)
    finally:
        for p in pollers.values():
            p.stop()
    row |= {"sent": sent, "delivered": got, "delivered_per_sec": rate}
    if rate is None:
        return row | {"error": f"only {got}/{sent} delivered",
                      "serve_log": [h.log_tail(5) for h in hosts]}
    total: dict[str, float] = {}
    per_host: dict[str, float] = {}
    for name, p in pollers.items():
        cpu, _procs, _started = p.by_kind()
        per_host[name] = sum(cpu.values()) / got * 1e6
        for kind, seconds in cpu.items():
            total[kind] = total.get(kind, 0.0) + seconds
    return row | {"cpu_us_per_msg": sum(total.values()) / got * 1e6,
                  "cpu_us_per_msg_by_kind": {k: v / got * 1e6 for k, v in sorted(total.items())},
                  "cpu_us_per_msg_by_host": per_host}


def run_line(row: dict[str, Any]) -> str:
    head = f"    {SETUPS[row['setup']]:<22} run {row['round']}: "
    if "error" in row:
        return head + f"ERROR {row['error']}; server logs: {row.get('serve_log')}"
    kinds = sorted(row["cpu_us_per_msg_by_kind"].items(), key=lambda kv: -kv[1])
    return (head + f"{row['delivered']} delivered {row['delivered_per_sec']:.0f}/s, CPU "
            f"{row['cpu_us_per_msg']:.0f} us/msg ("
            + ", ".join(f"{k} {v:.0f}" for k, v in kinds if v >= 1) + ")")


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per setup; the second host's gain and the shared directory's CPU cost."""
    setups: dict[str, Any] = {}
    for key in SETUPS:
        good = [r for r in rows if r["setup"] == key and "error" not in r]
        if not good:
            continue
        kinds = sorted({k for r in good for k in r["cpu_us_per_msg_by_kind"]})
        setups[key] = {
            "label": SETUPS[key], "runs": len(good), "hosts": len(good[0]["hosts"]),
            "delivered_per_sec": median(r["delivered_per_sec"] for r in good),
            "cpu_us_per_msg": median(r["cpu_us_per_msg"] for r in good),
            "cpu_us_per_msg_by_kind": {k: median(r["cpu_us_per_msg_by_kind"].get(k, 0.0)
                                                 for r in good) for k in kinds}}

    def ratio(a: str, b: str, key: str) -> float | None:
        if a in setups and b in setups and setups[b][key]:
            return setups[a][key] / setups[b][key]
        return None

    one_pg, one_file = setups.get("one-pg"), setups.get("one-file")
    return {"setups": setups,
            "gain_vs_file": ratio("two-pg", "one-file", "delivered_per_sec"),
            "gain_vs_pg": ratio("two-pg", "one-pg", "delivered_per_sec"),
            "pg_cpu_ratio": ratio("one-pg", "one-file", "cpu_us_per_msg"),
            "pg_cpu_extra_us": (one_pg["cpu_us_per_msg"] - one_file["cpu_us_per_msg"]
                                if one_pg and one_file else None)}


def run_twohost(runner: Runner, cluster: Any) -> None:
    quick = runner.opts.quick
    messages, rounds = (400, 1) if quick else (800, 3)
    client = Client("smtp-source" if S.postfix_tool("smtp-source") else "smtp_load")
    shared = runner.work / "site-mailboxes"
    shared.mkdir(parents=True, exist_ok=True)
    dsn = cluster.new_database("site")
    port = port_free_on(list(SITE))
    mx1 = SiteHost("site mx1", runner.work, SITE[0], "mx1.bench.test", dsn, shared, port=port)
    mx2 = SiteHost("site mx2", runner.work, SITE[1], "mx2.bench.test", dsn, shared,
                   owns_user=False, port=port)
    single = SiteHost("site file", runner.work, S.HOST, "mailpool.bench.test")
    print(f"  client {client.tool}, {messages} messages a run, {rounds} round(s)", flush=True)
    setups = {"one-file": [single], "one-pg": [mx1], "two-pg": [mx1, mx2]}
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        for host in (mx1, mx2, single):
            if stack.enter_context(runner.serving(host)) is None:
                return  # recorded as skipped, with the reason
        db = {key: postmaster_pid(cluster) if key.endswith("-pg") else None for key in setups}
        for key, hosts in setups.items():  # pools grown, first Maildirs made
            measure(runner, key, hosts, client, messages // 4)
        order = list(setups)
        for rnd in range(1, rounds + 1):
            if runner.over_budget(f"twohost run {rnd}"):
                break
            for key in order[rnd - 1:] + order[:rnd - 1]:
                row = measure(runner, key, setups[key], client, messages, db[key]) | {
                    "round": rnd}
                rows.append(row)
                runner.record(row)
                print(run_line(row), flush=True)
    summary = summarise(rows)
    runner.record({"kind": "twohost-summary", "label": "20s 1KB k=1", "client": client.tool,
                   "messages": messages, "rounds": rounds, **summary})
    for s in summary["setups"].values():
        print(f"  {s['label']}: {s['delivered_per_sec']:.0f} delivered/s, CPU "
              f"{s['cpu_us_per_msg']:.0f} us/msg (median of {s['runs']})", flush=True)
    print("\n".join("  " + line for line in twohost_lines(summary)), flush=True)


def run_dircalls(runner: Runner, cluster: Any) -> None:
    """bench.directory_calls in its own process (its CPU is its own; trio-asyncio's patches
    stay out of the driver)."""
    quick = runner.opts.quick
    argv = [sys.executable, "-m", "bench.directory_calls", "--json",
            "--dsn", cluster.new_database("dircalls"), "--rounds", "1" if quick else "3",
            "--seconds", "1"]
    pid = postmaster_pid(cluster)
    if pid:
        argv += ["--server-pid", str(pid)]
    print("  -- directory calls from Trio: worker threads vs trio-asyncio", flush=True)
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                             cwd=Path(__file__).resolve().parent.parent,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        runner.skip("dircalls", f"bench.directory_calls: {exc}")
        return
    try:
        report = json.loads(res.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        runner.skip("dircalls", f"bench.directory_calls failed (exit {res.returncode}): "
                    f"{res.stderr.strip()[-300:]}")
        return
    runner.record(report)
    print("\n".join("    " + line for line in dircalls_lines(report)), flush=True)


def run_shared_directory(runner: Runner) -> None:
    """The section: the two-host row (twohost) and the directory calls (twohost, dircalls)
    on one private cluster; skipped, with the reason, when PostgreSQL cannot start."""
    two = runner.wanted("twohost")
    part = "twohost" if two else "dircalls"
    print("\n== shared directory: " + ("2 mailpool hosts on one PostgreSQL directory vs 1 "
                                       "host, 20s 1KB k=1; then " if two else "")
          + "directory calls from Trio", flush=True)
    if runner.over_budget(part, 10.0):
        return
    try:
        cluster = start_cluster()
    except Exception as exc:  # whatever the reason, the rest of the bench goes on
        runner.skip(part, f"PostgreSQL cannot start: {type(exc).__name__}: {exc}")
        return
    try:
        for name, run in (("twohost", run_twohost), ("dircalls", run_dircalls)):
            if name == "twohost" and not two:
                continue
            try:
                run(runner, cluster)
            except Exception as exc:  # a database error, say: reported, the bench goes on
                runner.skip(name, f"{type(exc).__name__}: {exc}")
    finally:
        cluster.destroy()

