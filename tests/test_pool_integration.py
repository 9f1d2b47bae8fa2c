"""The prestart job pool end to end: a real `mailpool serve`, real job processes, real sockets.

Every open SMTP session occupies one job slot, so the pool's state is driven by holding
sessions open and read back from the running supervisor. `pool show --json` prints the
control socket's reply unchanged, so polling talks to <data>/run/control.sock directly (a CLI
call costs half a second of interpreter start-up) and the CLI itself is checked at the
points that matter. Journal records are read from the receivers with the project's reader,
as `journal dump --format json` shows them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hosthelp import BASE_CONFIG, MAILPOOL, Host, wait_for

from mailpool.journal.dump import record_dict
from mailpool.journal.reader import iter_records
from mailpool.supervisor.control import ControlUnavailable, request

SMTP = "smtp-server"
BUSY = "421 4.3.2"
# The numbers: 4 / 2 / 2 / 20.
SOURCE_DEFAULTS = {"initial_jobs": 4, "threshold": 2, "additional_jobs": 2, "maximum_jobs": 20,
                   "sessions_per_job": 1}  # the source: one session per job
# jobs.current after k open sessions (k = 0 .. 20) under those rules, one session per job:
# jobs are added two at a time whenever fewer than 2 are left with a free slot.
GROWTH = [4, 4, 4, 6, 6, 8, 8, 10, 10, 12, 12, 14, 14, 16, 16, 18, 18, 20, 20, 20, 20]


# --- configuration -------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def _dump_toml(tables: dict[str, dict[str, Any]]) -> str:
    out: list[str] = []
    for name, table in tables.items():
        out.append(f"[{name}]")
        out += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
        out.append("")
    return "\n".join(out)


def build_config(pools: dict[str, dict[str, Any]]) -> str:
    """hosthelp's base config with long SMTP timeouts (sessions are held open on purpose),
    a small POP pool (not under test: fewer processes to start) and the given pool tables."""
    base = tomllib.loads(BASE_CONFIG)
    base["smtp"] = {**base.get("smtp", {}), "command_timeout": 120.0, "data_timeout": 120.0}
    tables: dict[str, dict[str, Any]] = dict(base)
    merged = {"pop-server": {"initial_jobs": 1, "threshold": 0}, **pools}
    for name, table in merged.items():
        # These tests watch the rules job by job: one session per job, as in the source,
        # unless a test says otherwise.
        if name in (SMTP, "pop-server"):
            table = {"sessions_per_job": 1, **table}
        tables[f"pool.{name}"] = table
    return _dump_toml(tables)


# --- an SMTP client that keeps its session open -----------------------------------------------


class Client:
    """One raw SMTP connection. The connect returns at once; the greeting is read separately,
    so a request held by the supervisor can be observed while it waits."""

    def __init__(self, addr: tuple[str, int], timeout: float = 30.0) -> None:
        self.started = time.monotonic()
        self.sock = socket.create_connection(addr, timeout=timeout)
        self.buf = b""
        self.greeting: tuple[int, str] | None = None

    def reply(self) -> tuple[int, str]:
        lines: list[str] = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(4096)
                if not chunk:
                    raise EOFError(f"connection closed after {lines!r} {self.buf!r}")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line.decode())
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(lines)

    def greet(self) -> tuple[int, str]:
        self.greeting = self.reply()
        return self.greeting

    def cmd(self, line: str) -> tuple[int, str]:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def expect(self, line: str, code: int) -> str:
        got, text = self.cmd(line)
        assert got == code, f"{line!r}: expected {code}, got {text!r}"
        return text

    def start_data(self, rcpt: str, helo: str = "client.test") -> None:
        """EHLO, MAIL, RCPT and DATA up to the 354."""
        self.expect(f"EHLO {helo}", 250)
        self.expect("MAIL FROM:<sender@remote.test>", 250)
        self.expect(f"RCPT TO:<{rcpt}>", 250)
        self.expect("DATA", 354)

    def send_message(self, rcpt: str, subject: str) -> str:
        self.start_data(rcpt)
        self.sock.sendall(f"Subject: {subject}\r\n\r\nbody of {subject}\r\n".encode())
        return self.expect(".", 250)

    def at_eof(self) -> bool:
        """True once the peer closed or reset the connection (blocks until something arrives)."""
        try:
            return self.sock.recv(4096) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


# --- the host ------------------------------------------------------------------------------------


class PoolHost(Host):
    def __init__(self, root: Path, pools: dict[str, dict[str, Any]]) -> None:
        super().__init__(root)
        self.write_config(pools)
        self.clients: list[Client] = []

    def write_config(self, pools: dict[str, dict[str, Any]]) -> None:
        self.config_path.write_text(build_config(pools))

    def spawn(self) -> None:
        """`mailpool serve` without waiting for any job (Host.start waits for them all)."""
        (self.data / "run" / "listen.json").unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*MAILPOOL, "serve", "--config", str(self.config_path)], stdout=log,
                stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)

    def catches(self, signum: int) -> bool:
        """The supervisor has its handler for `signum` installed (else it would die of it)."""
        assert self.proc is not None
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return False
        mask = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
        return bool(int(mask.split()[1], 16) >> (signum - 1) & 1)

    def connect(self, greet: bool = True) -> Client:
        client = Client(self.smtp)
        self.clients.append(client)
        if greet:
            code, text = client.greet()
            assert code == 220, text
        return client

    def pool(self, entry: str = SMTP) -> dict[str, Any]:
        """The entry's `pool show --json` object, straight from the control socket."""
        reply = request(self.data / "run" / "control.sock", {"op": "pool-show"})
        return reply["entries"][entry]

    def show_cli(self, entry: str = SMTP) -> dict[str, Any]:
        res = self.cli("pool", "show", entry, "--json")
        return json.loads(res.stdout)["entries"][entry]

    def settle(self, ok: Callable[[dict[str, Any]], bool], what: str, entry: str = SMTP,
               timeout: float = 20.0) -> dict[str, Any]:
        """Poll the entry until `ok(stats)`; returns those stats."""
        seen: list[dict[str, Any]] = []

        def check() -> dict[str, Any] | None:
            stats = self.pool(entry)
            seen[:] = [stats]
            return stats if ok(stats) else None

        try:
            return wait_for(check, timeout, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last pool show: {json.dumps(seen)}") from None

    def records(self, *codes: str, job: str | None = None) -> list[dict[str, Any]]:
        out = []
        for rec in iter_records(self.data / "journal"):
            if codes and rec.code not in codes:
                continue
            if job is not None and rec.job != job and not rec.job.startswith(job + "/"):
                continue
            out.append(record_dict(rec))
        return out

    def wait_records(self, code: str, count: int, what: str, **match: Any
                     ) -> list[dict[str, Any]]:
        def found() -> list[dict[str, Any]] | None:
            recs = [r for r in self.records(code)
                    if all(r.get(k) == v for k, v in match.items())]
            return recs if len(recs) >= count else None

        return wait_for(found, 20.0, what=what)

    def smtp_records(self, code: str, **match: Any) -> list[dict[str, Any]]:
        return [r for r in self.records(code, job=SMTP)
                if all(r.get(k) == v for k, v in match.items())]

    def job_of_last_handoff(self, handoffs: int) -> str:
        """The job named by the `handoffs`-th JH record (1-based) of the SMTP entry."""
        recs = wait_for(lambda: len(hs := self.records("JH", job=SMTP)) >= handoffs and hs,
                        20.0, what=f"{handoffs} JH records")
        return recs[handoffs - 1]["job"]

    def pid_of(self, job: str) -> int:
        (js,) = [r for r in self.records("JS") if r["job"] == job]
        return int(js["pid"])

    def shutdown(self) -> None:
        for client in self.clients:
            client.close()
        self.kill()


@pytest.fixture
def make_host(tmp_path: Path) -> Iterator[Callable[..., PoolHost]]:
    hosts: list[PoolHost] = []

    def make(pools: dict[str, dict[str, Any]], name: str = "host") -> PoolHost:
        host = PoolHost(tmp_path / name, pools)
        hosts.append(host)
        return host

    yield make
    for host in hosts:
        host.shutdown()


def jobs_of(stats: dict[str, Any]) -> int:
    return int(stats["jobs"]["current"])


# --- growth by the rules ----------------------------------------------------------------------


def test_open_sessions_grow_the_pool_exactly_by_the_rules(make_host) -> None:
    host = make_host({SMTP: dict(SOURCE_DEFAULTS)})
    host.start(wait_jobs={SMTP: 4, "framework": 1})
    first = host.show_cli()
    assert first["parameters"]["initial_jobs"] == 4
    assert jobs_of(first) == GROWTH[0] and first["in_use"]["current"] == 0

    for k in range(1, 21):
        host.connect()  # its greeting has arrived: the session sits on a job
        stats = host.settle(
            lambda s, k=k: jobs_of(s) == GROWTH[k] and s["in_use"]["current"] == k,
            what=f"{GROWTH[k]} jobs and {k} in use after {k} open sessions")
        # The peak proves no overshoot ever happened, not even briefly.
        assert stats["jobs"]["peak"] == GROWTH[k], (k, stats)
        assert stats["in_use"]["peak"] == k and stats["accepted"] == k, (k, stats)
        assert stats["rejected"] == 0
        if k == 3:
            assert jobs_of(host.show_cli()) == 6  # the CLI shows the same figures

    final = host.show_cli()
    assert final["jobs"]["peak"] == 20 and final["in_use"]["peak"] == 20
    assert final["accepted"] == 20 and final["rejected"] == 0
    assert 4 < final["jobs"]["average"] < 20 and 0 < final["in_use"]["average"] < 20
    handed = host.records("JH", job=SMTP)
    assert len(handed) == 20 and len({r["job"] for r in handed}) == 20  # one session per job
    assert len(host.records("JS", job=SMTP)) == 20
    text = host.cli("pool", "show", SMTP).stdout
    assert "Prestart job entry smtp-server" in text and "accepted 20" in text

    # Sessions ending free their jobs; nothing ends yet (idle_timeout is 60 s).
    for client in host.clients:
        client.expect("QUIT", 221)
    stats = host.settle(lambda s: s["in_use"]["current"] == 0, what="all sessions ended")
    assert jobs_of(stats) == 20


def test_sessions_per_job_4_fit_in_one_job_and_the_5th_grows_the_pool(make_host) -> None:
    host = make_host({SMTP: {"initial_jobs": 1, "threshold": 0, "additional_jobs": 1,
                             "maximum_jobs": 4, "sessions_per_job": 4}})
    host.start(wait_jobs={SMTP: 1, "framework": 1})
    expected = [1, 1, 1, 1, 1, 2, 2, 2, 2, 3]
    for k in range(1, 10):
        host.connect()
        in_use = (k + 3) // 4  # jobs with at least one session: filled least-loaded first
        stats = host.settle(
            lambda s, k=k, n=in_use: jobs_of(s) == expected[k] and s["in_use"]["current"] == n,
            what=f"{expected[k]} jobs, {in_use} in use after {k} sessions")
        assert stats["jobs"]["peak"] == expected[k] and stats["accepted"] == k, (k, stats)
    handed = [r["job"] for r in host.records("JH", job=SMTP)]
    assert handed[:4] == [f"{SMTP}/1"] * 4
    assert set(handed[4:8]) == {f"{SMTP}/2"} and handed[8] == f"{SMTP}/3"
    # The 5th had no slot anywhere (threshold 0): it waited while its job started.
    assert host.records("JW", job=None) and host.pool()["rejected"] == 0
    for client in host.clients:  # every session on the shared jobs still works
        client.expect("NOOP", 250)


# --- the maximum: refuse, hold, time out --------------------------------------------------------

SMALL = {"initial_jobs": 2, "threshold": 1, "additional_jobs": 1, "maximum_jobs": 3}


def fill_small_pool(host: PoolHost) -> list[Client]:
    """Three sessions on the three jobs the small entry may have."""
    clients = []
    for k, jobs in ((1, 2), (2, 3), (3, 3)):
        clients.append(host.connect())
        host.settle(lambda s, k=k, j=jobs: jobs_of(s) == j and s["in_use"]["current"] == k,
                    what=f"{jobs} jobs, {k} in use")
    return clients


def test_no_wait_at_the_maximum_refuses_with_421(make_host) -> None:
    host = make_host({SMTP: {**SMALL, "wait": False}})
    host.start(wait_jobs={SMTP: 2, "framework": 1})
    fill_small_pool(host)
    # (A session may have waited above while its job was still starting: that is allowed.)
    held_before = len(host.records("JW"))
    extra = host.connect(greet=False)
    code, text = extra.greet()
    assert code == 421 and text.startswith(BUSY), text
    assert extra.at_eof()
    stats = host.settle(lambda s: s["rejected"] == 1, what="rejected 1")
    assert stats["accepted"] == 3 and jobs_of(stats) == 3 and stats["waiting"]["current"] == 0
    (jr,) = host.wait_records("JR", 1, "a JR record", entry=SMTP)
    assert jr["ip"] == "127.0.0.1" and jr["job"] == "supervisor"
    assert len(host.records("JW")) == held_before  # refused at once, never held


def test_wait_holds_the_client_until_a_session_ends_or_wait_timeout(make_host) -> None:
    host = make_host({SMTP: {**SMALL, "wait": True, "wait_timeout": 8.0}})
    host.start(wait_jobs={SMTP: 2, "framework": 1})
    clients = fill_small_pool(host)

    # Sessions may have waited above while their jobs were starting: count from here.
    held_before = len(host.records("JW"))
    held = host.connect(greet=False)
    host.settle(lambda s: s["waiting"]["current"] == 1, what="one request waiting")
    host.wait_records("JW", held_before + 1, "a JW record", entry=SMTP)
    clients[0].expect("QUIT", 221)  # a job frees up: the held client gets it
    code, text = held.greet()
    assert code == 220, text
    held.expect("EHLO held.test", 250)
    stats = host.settle(lambda s: s["waiting"]["current"] == 0 and s["accepted"] == 4,
                        what="the held request served")
    assert stats["waiting"]["peak"] >= 1 and stats["waiting"]["average_wait_s"] > 0
    assert stats["rejected"] == 0 and jobs_of(stats) == 3

    # Nothing ends this time: after wait_timeout the supervisor answers 421 itself.
    host.cli("pool", "change", SMTP, "--wait-timeout", "1.5")
    late = host.connect(greet=False)
    host.settle(lambda s: s["waiting"]["current"] == 1, what="the late request waiting")
    code, text = late.greet()
    held_for = time.monotonic() - late.started
    assert code == 421 and text.startswith(BUSY), text
    assert held_for >= 1.5  # held for the whole wait_timeout, not refused at once
    stats = host.settle(lambda s: s["rejected"] == 1 and s["waiting"]["current"] == 0,
                        what="the late request rejected")
    assert stats["accepted"] == 4 and stats["waiting"]["peak"] >= 1
    host.wait_records("JW", held_before + 2, "a second JW record", entry=SMTP)
    assert len(host.records("JW")) == held_before + 2
    host.wait_records("JR", 1, "a JR record", entry=SMTP)


def test_a_client_that_leaves_while_held_is_dropped_not_handed_on(make_host) -> None:
    host = make_host({SMTP: {**SMALL, "wait": True, "wait_timeout": 30.0}})
    host.start(wait_jobs={SMTP: 2, "framework": 1})
    clients = fill_small_pool(host)
    quitter = host.connect(greet=False)
    host.settle(lambda s: s["waiting"]["current"] == 1, what="one request waiting")
    quitter.sock.close()  # the client gives up before any job is free
    # Not a rejection (no 421 was sent): counted as abandoned, no JR record.
    stats = host.settle(lambda s: s["waiting"]["current"] == 0 and s["abandoned"] == 1,
                        what="nothing waiting, one abandoned")
    assert stats["rejected"] == 0 and host.records("JR") == []
    accepted = stats["accepted"]
    # A live client held now is the one served when a job frees up.
    held = host.connect(greet=False)
    host.settle(lambda s: s["waiting"]["current"] == 1, what="the live request waiting")
    clients[0].expect("QUIT", 221)
    code, text = held.greet()
    assert code == 220, text
    stats = host.settle(lambda s: s["accepted"] == accepted + 1, what="the live one served")
    assert len(host.records("JH", job=None)) == accepted + 1  # the one that left never was


# --- live change ------------------------------------------------------------------------------


def test_pool_change_applies_to_the_running_server(make_host) -> None:
    host = make_host({SMTP: {**SMALL, "maximum_jobs": 6}})
    host.start(wait_jobs={SMTP: 2, "framework": 1})
    host.settle(lambda s: jobs_of(s) == 2, what="2 jobs")

    res = host.cli("pool", "change", SMTP, "--initial-jobs", "4", "--threshold", "2")
    assert "initial_jobs=4" in res.stdout
    stats = host.settle(lambda s: jobs_of(s) == 4, what="4 jobs after raising initial_jobs")
    assert stats["parameters"]["initial_jobs"] == 4 and stats["parameters"]["threshold"] == 2

    host.cli("pool", "change", SMTP, "--maximum-jobs", "3", "--initial-jobs", "3")
    stats = host.settle(lambda s: jobs_of(s) == 3, what="3 jobs after lowering maximum_jobs")
    assert stats["parameters"]["maximum_jobs"] == 3
    host.wait_records("JE", 1, "a job ended for the lower maximum", detail="maximum")

    host.cli("pool", "change", SMTP, "--no-wait")
    assert host.show_cli()["parameters"]["wait"] is False
    for k in (1, 2, 3):  # threshold 2 wants more jobs, the maximum says no
        host.connect()
        host.settle(lambda s, k=k: s["in_use"]["current"] == k, what=f"{k} in use")
    code, text = host.connect(greet=False).greet()
    assert code == 421 and text.startswith(BUSY), text
    host.wait_records("JR", 1, "a JR record", entry=SMTP)

    changes = host.wait_records("JC", 3, "three JC records", entry=SMTP)
    assert json.loads(changes[0]["detail"]) == {"initial_jobs": 4, "threshold": 2}
    assert json.loads(changes[2]["detail"]) == {"wait": False}

    before = host.pool()["parameters"]
    for args, key in ((["--threshold", "9"], "threshold"), (["--max-use", "0"], "max_use"),
                      (["--initial-jobs", "7"], "initial_jobs"),
                      (["--sessions-per-job", "0"], "sessions_per_job")):
        res = host.cli("pool", "change", SMTP, *args, check=False)
        assert res.returncode != 0, res
        assert key in res.stderr and "Traceback" not in res.stderr, res.stderr
    res = host.cli("pool", "change", "no-such-entry", "--threshold", "1", check=False)
    assert res.returncode != 0 and "no-such-entry" in res.stderr
    assert host.pool()["parameters"] == before
    assert len(host.records("JC")) == 3  # refused changes are not journaled


# --- job life: max_use, crash, drain, reload -----------------------------------------------------


def test_max_use_replaces_the_job_after_3_sessions(make_host) -> None:
    host = make_host({SMTP: {"initial_jobs": 1, "threshold": 0, "additional_jobs": 1,
                             "maximum_jobs": 2, "max_use": 3}})
    host.start(wait_jobs={SMTP: 1, "framework": 1})
    for _ in range(6):
        client = host.connect()
        client.expect("EHLO once.test", 250)
        client.expect("QUIT", 221)
        client.close()
    ended = host.wait_records("JE", 2, "two jobs ended at max_use", detail="max_use")
    assert [r["job"] for r in ended] == [f"{SMTP}/1", f"{SMTP}/2"]
    handed = [r["job"] for r in host.records("JH", job=SMTP)]
    assert handed == [f"{SMTP}/1"] * 3 + [f"{SMTP}/2"] * 3
    host.wait_records("JS", 1, "the third job started", job=f"{SMTP}/3")
    pids = [host.pid_of(f"{SMTP}/{n}") for n in (1, 2, 3)]
    assert len(set(pids)) == 3
    assert [r["pid"] for r in ended] == pids[:2]
    stats = host.settle(lambda s: jobs_of(s) == 1, what="the pool back at its size")
    assert stats["jobs"]["peak"] <= 2  # a successor may start while the old job drains
    assert stats["accepted"] == 6 and stats["rejected"] == 0


def test_kill_9_of_a_job_mid_session(make_host) -> None:
    # initial 3: after the kill only 2 jobs are left, so the rules must start a third.
    host = make_host({SMTP: {"initial_jobs": 3, "threshold": 1, "additional_jobs": 1,
                             "maximum_jobs": 6}})
    host.add_user("alice", "alice@example.test")
    host.start(wait_jobs={SMTP: 3, "framework": 1})

    victim = host.connect()
    victim.send_message("alice@example.test", "before-the-kill")  # 250: accepted
    victim_job = host.job_of_last_handoff(1)
    other = host.connect()
    other.expect("EHLO other.test", 250)
    other_job = host.job_of_last_handoff(2)
    assert other_job != victim_job
    victim.start_data("alice@example.test")  # mid-transaction when the job dies
    host.settle(lambda s: jobs_of(s) == 3 and s["in_use"]["current"] == 2, what="3 jobs, 2 busy")
    wait_for(lambda: len(host.records("JS", job=SMTP)) == 3, what="3 JS records")

    os.kill(host.pid_of(victim_job), signal.SIGKILL)
    assert victim.at_eof()
    (crash,) = host.wait_records("JE", 1, "the killed job reaped", job=victim_job)
    assert crash["detail"] == "crash" and crash["pid"] == host.pid_of(victim_job)
    (new,) = wait_for(lambda: host.records("JS", job=SMTP)[3:], what="a replacement job")
    assert new["job"] == f"{SMTP}/4" and new["pid"] != crash["pid"]
    stats = host.settle(lambda s: jobs_of(s) == 3 and s["in_use"]["current"] == 1,
                        what="the pool repaired")
    assert stats["jobs"]["peak"] == 3

    other.send_message("alice@example.test", "after-the-kill")
    other.expect("QUIT", 221)
    files = host.wait_delivered("alice", 2)
    bodies = b"".join(f.read_bytes() for f in files)
    assert b"Subject: before-the-kill" in bodies and b"Subject: after-the-kill" in bodies
    # Fresh sessions go to live jobs.
    for _ in range(3):
        host.connect().expect("QUIT", 221)


def test_a_job_killed_mid_session_is_not_a_startup_failure(make_host) -> None:
    host = make_host({SMTP: {"initial_jobs": 2, "threshold": 0, "additional_jobs": 1}})
    host.start(wait_jobs={SMTP: 2, "framework": 1})
    client = host.connect()  # a job that got ready and took a session has started fine
    client.expect("EHLO victim.test", 250)
    job = host.job_of_last_handoff(1)
    os.kill(host.pid_of(job), signal.SIGKILL)
    assert client.at_eof()
    host.wait_records("JE", 1, "the killed job reaped", job=job)
    wait_for(lambda: len(host.records("JS", job=SMTP)) == 3, what="its replacement")
    assert host.records("JT") == []


def test_sigterm_drains_open_sessions_then_exits_0(make_host) -> None:
    host = make_host({SMTP: {**SMALL, "drain_timeout": 20.0}})
    host.add_user("alice", "alice@example.test")
    host.start(wait_jobs={SMTP: 2, "framework": 1})
    client = host.connect()
    client.start_data("alice@example.test")
    client.sock.sendall(b"Subject: drained\r\n\r\nfirst half\r\n")
    idle = host.connect()  # between transactions: ended at once by the drain
    idle.expect("EHLO idle.test", 250)
    assert host.proc is not None
    host.proc.send_signal(signal.SIGTERM)
    code, text = idle.reply()
    assert code == 421 and text.startswith(BUSY), text
    assert idle.at_eof()

    def refused() -> bool:
        try:
            probe = socket.create_connection(host.smtp, timeout=5)
        except ConnectionRefusedError:
            return True
        probe.close()  # accepted just before the listener closed
        return False

    wait_for(refused, what="new connections refused")
    client.sock.sendall(b"second half\r\n")
    client.expect(".", 250)
    code, text = client.reply()  # the transaction is over: the session ends with 421 too
    assert code == 421 and text.startswith(BUSY), text
    assert host.proc.wait(30) == 0
    drained = host.records("JE", job=SMTP)
    assert drained and {r["detail"] for r in drained} == {"drain"}

    # Accepted means durable: delivered before the exit, or delivered after a restart.
    spool = host.queue_files("incoming")
    if not host.maildir_files("alice"):
        assert spool, "the message is neither delivered nor in spool/incoming"
    host.start(wait_jobs={SMTP: 1, "framework": 1})
    (msg,) = host.wait_delivered("alice", 1)
    content = msg.read_bytes()
    assert b"Subject: drained" in content and b"second half" in content


def test_sighup_reloads_pool_values_and_old_jobs_drain(make_host) -> None:
    pools = {SMTP: {**SMALL, "maximum_jobs": 6}}
    host = make_host(pools)
    host.add_user("alice", "alice@example.test")
    host.start(wait_jobs={SMTP: 2, "framework": 1})
    busy = host.connect()  # mid-transaction at the reload: may finish it
    busy.expect("EHLO busy.test", 250)
    busy.expect("MAIL FROM:<sender@remote.test>", 250)
    busy_job = host.job_of_last_handoff(1)
    idle = host.connect()  # between transactions at the reload: ended at once
    idle.expect("EHLO idle.test", 250)
    host.settle(lambda s: jobs_of(s) == 3 and s["in_use"]["current"] == 2, what="3 jobs")

    host.write_config({SMTP: {**pools[SMTP], "initial_jobs": 3, "threshold": 2}})
    assert host.proc is not None
    host.proc.send_signal(signal.SIGHUP)
    code, text = idle.reply()
    assert code == 421 and text.startswith(BUSY), text
    stats = host.settle(lambda s: s["parameters"]["initial_jobs"] == 3, what="the new value")
    assert stats["parameters"]["threshold"] == 2
    assert host.show_cli()["parameters"]["initial_jobs"] == 3
    wait_for(lambda: len(host.smtp_records("JE", detail="reload")) == 2,
             what="the two old jobs without a transaction drained")
    assert busy_job not in {r["job"] for r in host.smtp_records("JE")}

    busy.expect("RCPT TO:<alice@example.test>", 250)  # the draining job finishes its work
    busy.expect("DATA", 354)
    busy.sock.sendall(b"Subject: across-the-reload\r\n\r\nbody\r\n")
    busy.expect(".", 250)
    code, text = busy.reply()
    assert code == 421 and text.startswith(BUSY), text
    wait_for(lambda: len(host.smtp_records("JE", detail="reload")) == 3,
             what="all three old jobs drained")
    reloaded = host.smtp_records("JE", detail="reload")
    assert {r["job"] for r in reloaded} == {f"{SMTP}/{i}" for i in (1, 2, 3)}
    stats = host.settle(lambda s: jobs_of(s) == 3 and s["in_use"]["current"] == 0,
                        what="3 new jobs")
    host.connect().expect("QUIT", 221)
    new_job = host.job_of_last_handoff(3)
    assert int(new_job.rpartition("/")[2]) > 3  # served by a job started after the reload
    host.wait_delivered("alice", 1)


def test_sighup_while_jobs_start_drains_them_too(make_host) -> None:
    """A reload while jobs are being spawned (no process or channel yet) reaches them too."""
    n = 6  # several jobs at once: a wider window while they are being spawned
    # A job that got its Drain ends as soon as it has started (a second or two, more on a
    # loaded machine); one that missed it would live until drain_timeout: far beyond the wait.
    host = make_host({SMTP: {"initial_jobs": n, "threshold": 0, "additional_jobs": 1,
                             "drain_timeout": 120.0}})
    host.spawn()
    wait_for(lambda: host.catches(signal.SIGHUP), what="the SIGHUP handler")

    def spawning() -> bool | None:
        """True while jobs are counted by the rules but have no JS record yet (the process
        and its channel are being created); None once every job has one (window missed)."""
        try:
            counted = jobs_of(host.pool())
        except ControlUnavailable:  # the control socket is not listening yet
            return False
        started = len(host.records("JS", job=SMTP))
        if started == n:
            return None
        return counted == n and started < n

    deadline = time.monotonic() + 20
    while not (state := spawning()):
        if state is None or time.monotonic() > deadline:
            pytest.skip("every job had started before the SIGHUP could be sent")
    assert host.proc is not None
    host.proc.send_signal(signal.SIGHUP)
    unborn = {f"{SMTP}/{i}" for i in range(1, n + 1)} - {r["job"] for r in host.records("JS")}
    ended = wait_for(lambda: len(e := [r for r in host.records("JE", job=SMTP)
                                       if int(r["job"].rpartition("/")[2]) <= n]) == n and e,
                     timeout=30.0, what=f"the {n} first jobs ended")
    details = sorted((r["job"], r["detail"]) for r in ended)
    assert {d for _, d in details} == {"reload"}, f"{details}; no process yet: {sorted(unborn)}"


# --- silent and crashing jobs --------------------------------------------------------------------


def test_a_job_that_stops_heartbeating_is_killed_and_replaced(make_host) -> None:
    host = make_host({SMTP: {"initial_jobs": 2, "threshold": 0, "additional_jobs": 1,
                             "maximum_jobs": 3, "heartbeat_timeout": 1.0}})
    host.start(wait_jobs={SMTP: 2, "framework": 1})
    victim = f"{SMTP}/1"
    pid = host.pid_of(victim)
    os.kill(pid, signal.SIGSTOP)  # alive but silent: a hung job
    try:
        (je,) = host.wait_records("JE", 1, "the silent job ended", job=victim)
        assert je["detail"] == "heartbeat" and je["pid"] == pid
        host.settle(lambda s: s["ready"] == 2, what="the pool back at 2 ready jobs")
        assert len(host.records("JS", job=SMTP)) == 3  # one replacement
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    client = host.connect()
    client.expect("EHLO after.test", 250)


def test_jobs_that_die_at_start_up_are_restarted_with_growing_back_off(make_host) -> None:
    host = make_host({SMTP: {"initial_jobs": 1, "threshold": 0, "additional_jobs": 1,
                             "maximum_jobs": 2}})
    host.start(wait_jobs={SMTP: 1, "framework": 1})
    # Every new job now fails at once: its snapshot of the configuration is unreadable.
    snapshot = host.data / "run" / "config-0.json"
    good = snapshot.read_bytes()
    snapshot.write_bytes(b"not json")
    try:
        os.kill(host.pid_of(f"{SMTP}/1"), signal.SIGKILL)
        jts = host.wait_records("JT", 3, "three throttled restarts", entry=SMTP)
        delays = [float(r["detail"].split()[2].rstrip("s")) for r in jts[:3]]
        assert delays[0] < delays[1] < delays[2], delays  # the back-off grows
        crashed = [r for r in host.records("JE", job=SMTP) if r["detail"] == "crash"]
        assert len(crashed) >= 3
    finally:
        snapshot.write_bytes(good)
    host.settle(lambda s: s["ready"] >= 1, what="a job starts again once it can", timeout=40)
