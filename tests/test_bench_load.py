"""Smoke tests of the benchmark clients against tiny in-process servers (no timings asserted)."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
from functools import partial
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
# bench/ is a top-level directory beside src/, not an installed package: `pytest` run from
# the venv does not put the repository root on sys.path by itself.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.cpu import CpuPoller, program_kind  # noqa: E402
from bench.idle import greeting_delay, hold_idle, per_session, probe  # noqa: E402
from bench.pop_load import PopConfig, run_pop  # noqa: E402
from bench.report import Table, markdown, smtp_table, targets  # noqa: E402
from bench.smtp_load import LoadConfig, make_body, percentiles, run_load  # noqa: E402
from tests.tlshelp import make_certs  # noqa: E402


class TinySmtp:
    """Just enough SMTP (with PIPELINING, and STARTTLS given a context) to count what the
    generator sends."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.messages: list[bytes] = []
        self.connections = 0
        self.tls = tls
        self.transcripts: list[list[bytes]] = []  # each connection's commands ("TLS:" after)

    async def handle(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        buf = bytearray()
        rcpt_ok = False
        secure = False
        said: list[bytes] = []
        self.transcripts.append(said)

        async def line() -> bytes | None:
            while b"\r\n" not in buf:
                data = await stream.receive_some(65536)
                if not data:
                    return None
                buf.extend(data)
            i = buf.index(b"\r\n")
            out = bytes(buf[:i])
            del buf[: i + 2]
            return out

        await stream.send_all(b"220 tiny ESMTP\r\n")
        while (cmd := await line()) is not None:
            said.append(b"TLS:" + cmd if secure else cmd)
            verb = cmd[:4].upper()
            if verb == b"EHLO":
                offer = b"250-STARTTLS\r\n" if self.tls is not None and not secure else b""
                await stream.send_all(b"250-tiny\r\n" + offer
                                      + b"250-PIPELINING\r\n250 SIZE 1000000\r\n")
            elif cmd.upper() == b"STARTTLS" and self.tls is not None and not secure:
                await stream.send_all(b"220 go ahead\r\n")
                stream = trio.SSLStream(stream, self.tls, server_side=True)
                try:
                    await stream.do_handshake()
                except trio.BrokenResourceError:
                    return
                secure = True
            elif verb == b"MAIL":
                rcpt_ok = False
                await stream.send_all(b"250 ok\r\n")
            elif verb == b"RCPT":
                rcpt_ok = b"bad" not in cmd
                await stream.send_all(b"250 ok\r\n" if rcpt_ok else b"550 no such user\r\n")
            elif verb == b"DATA":
                if not rcpt_ok:
                    await stream.send_all(b"554 no valid recipients\r\n")
                    continue
                await stream.send_all(b"354 go ahead\r\n")
                while b"\r\n.\r\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf.extend(data)
                end = buf.index(b"\r\n.\r\n")
                self.messages.append(bytes(buf[: end + 2]))
                del buf[: end + 5]
                await stream.send_all(b"250 queued\r\n")
            elif verb == b"RSET":
                await stream.send_all(b"250 ok\r\n")
            elif verb == b"QUIT":
                await stream.send_all(b"221 bye\r\n")
                return
            else:
                await stream.send_all(b"500 what\r\n")


async def start(nursery: trio.Nursery, handler) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


async def test_one_message_per_connection(nursery: trio.Nursery) -> None:
    server = TinySmtp()
    port = await start(nursery, server.handle)
    res = await run_load(LoadConfig(port=port, sessions=3, messages=10, size=1000,
                                    rcpt_to="bench@example.test", timeout=10))
    assert (res.attempted, res.sent, res.failed, res.connections) == (10, 10, 0, 10)
    assert res.errors == {}
    assert res.greeting_ms["n"] == 10 and res.data_ms["n"] == 10
    assert set(res.data_ms) == {"n", "p50", "p90", "p99", "max"}
    assert len(server.messages) == 10 and server.connections == 10
    # Headers, then exactly the requested body size.
    assert all(m.split(b"\r\n\r\n", 1)[1] == make_body(1000) for m in server.messages)


async def test_many_per_connection_pipelined_and_errors(nursery: trio.Nursery) -> None:
    server = TinySmtp()
    port = await start(nursery, server.handle)
    res = await run_load(LoadConfig(port=port, sessions=2, messages=9, size=300,
                                    per_connection=4, pipelining=True, timeout=10))
    assert res.sent == 9 and res.pipelined
    assert 3 <= res.connections <= 4  # 9 messages, at most 4 per connection, 2 sessions
    bad = await run_load(LoadConfig(port=port, sessions=2, messages=6, per_connection=3,
                                    rcpt_to="bad@example.test", timeout=10))
    assert (bad.sent, bad.failed) == (0, 6)
    assert bad.errors == {"550": 6}
    refused = await run_load(LoadConfig(port=1, messages=2, timeout=5))
    assert refused.sent == 0 and sum(refused.errors.values()) == 2
    assert all(k.startswith("connect-") for k in refused.errors)


async def test_cli_json_line(nursery: trio.Nursery) -> None:
    server = TinySmtp()
    port = await start(nursery, server.handle)
    proc = await trio.run_process(
        [sys.executable, "-m", "bench.smtp_load", "--port", str(port), "--sessions", "2",
         "--messages", "5", "--size", "2048", "--per-connection", "5", "--json"],
        capture_stdout=True, cwd=ROOT)
    lines = proc.stdout.decode().strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["sent"] == 5 and out["failed"] == 0 and out["errors"] == {}
    assert out["sessions"] == 2 and out["size"] == 2048 and out["per_connection"] == 5
    for key in ("msgs_per_sec", "elapsed", "greeting_ms", "data_ms"):
        assert key in out
    assert len(server.messages) == 5


async def test_starttls_every_connection(nursery: trio.Nursery, tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "good", "mx.tiny.test")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.cert, certs.key)
    server = TinySmtp(context)
    port = await start(nursery, server.handle)
    cfg = LoadConfig(port=port, sessions=2, messages=5, size=500, starttls=True,
                     tls_ca=str(certs.ca_file), tls_name="mx.tiny.test", timeout=10)
    res = await run_load(cfg)
    assert (res.sent, res.failed, res.connections, res.handshakes) == (5, 0, 5, 5)
    assert res.errors == {} and res.starttls and res.handshake_ms["n"] == 5
    assert res.handshakes_per_sec == 5 / res.elapsed
    assert sum(res.tls.values()) == 5 and all(k.startswith("TLSv1.") for k in res.tls)
    # The plaintext EHLO, STARTTLS, then everything else only over TLS.
    assert server.transcripts[0] == [
        b"EHLO load.test", b"STARTTLS", b"TLS:EHLO load.test",
        b"TLS:MAIL FROM:<bench@load.test> SIZE=700", b"TLS:RCPT TO:<bench@example.test>",
        b"TLS:DATA", b"TLS:QUIT"]
    assert len(server.messages) == 5
    assert all(m.split(b"\r\n\r\n", 1)[1] == make_body(500) for m in server.messages)
    # A certificate from another CA (or for another name) is refused before anything is sent.
    other = make_certs(tmp_path / "other", "mx.tiny.test")
    for bad in ({"tls_ca": str(other.ca_file)}, {"tls_name": "elsewhere.test"}):
        res = await run_load(LoadConfig(**{**vars(cfg), "messages": 2, **bad}))
        assert (res.sent, res.handshakes, res.errors) == (0, 0, {"tls-verify": 2})
    # Without a CA nothing is verified (an opportunistic client).
    res = await run_load(LoadConfig(**{**vars(cfg), "messages": 2, "tls_ca": "",
                                       "tls_name": "elsewhere.test"}))
    assert (res.sent, res.handshakes, res.errors) == (2, 2, {})
    # A server that does not offer STARTTLS: counted, nothing sent in the clear.
    plain = TinySmtp()
    plain_port = await start(nursery, plain.handle)
    res = await run_load(LoadConfig(**{**vars(cfg), "port": plain_port, "messages": 2}))
    assert (res.sent, res.errors) == (0, {"no-starttls": 2})
    assert plain.messages == [] and all(b"MAIL" not in b" ".join(t) for t in plain.transcripts)
    # The CLI, over two processes: their handshakes are merged.
    before = len(server.messages)
    proc = await trio.run_process(
        [sys.executable, "-m", "bench.smtp_load", "--port", str(port), "--sessions", "2",
         "--messages", "4", "--procs", "2", "--starttls", "--tls-ca", str(certs.ca_file),
         "--tls-name", "mx.tiny.test", "--json"], capture_stdout=True, cwd=ROOT)
    out = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert (out["sent"], out["handshakes"], out["errors"]) == (4, 4, {})
    assert out["starttls"] and out["handshake_ms"]["n"] == 4 and sum(out["tls"].values()) == 4
    assert len(server.messages) == before + 4


async def test_pop_load_retrieves_every_message(nursery: trio.Nursery) -> None:
    body = b"Subject: x\r\n\r\n" + b"line\r\n" * 50

    async def pop(stream: trio.SocketStream) -> None:
        buf = bytearray()
        await stream.send_all(b"+OK tiny POP3\r\n")
        while True:
            while b"\r\n" not in buf:
                data = await stream.receive_some(4096)
                if not data:
                    return
                buf.extend(data)
            i = buf.index(b"\r\n")
            cmd = bytes(buf[:i]).upper()
            del buf[: i + 2]
            if cmd.startswith(b"STAT"):
                await stream.send_all(b"+OK 3 %d\r\n" % (3 * len(body)))
            elif cmd.startswith(b"RETR"):
                await stream.send_all(b"+OK\r\n" + body + b".\r\n")
            elif cmd.startswith(b"QUIT"):
                await stream.send_all(b"+OK bye\r\n")
                return
            else:
                await stream.send_all(b"+OK\r\n")

    port = await start(nursery, pop)
    res = await run_pop(PopConfig(port=port, sessions=2, users=2, messages=7, timeout=10))
    assert res.retrieved == 7 and res.errors == {}
    assert res.bytes == 7 * len(body)
    assert res.logins >= 3  # 3 messages per maildrop: 7 RETRs need at least 3 logins


def test_percentiles() -> None:
    p = percentiles([0.001 * i for i in range(1, 101)])
    assert round(p["p50"]) == 50 and round(p["p99"]) == 99 and round(p["max"]) == 100
    assert percentiles([]) == {"n": 0}


async def test_hold_idle_and_greeting_delay(nursery: trio.Nursery) -> None:
    server = TinySmtp()
    port = await start(nursery, server.handle)
    async with trio.open_nursery() as inner:
        held = await hold_idle(inner, "127.0.0.1", port, 40, 10.0, at_once=8)
        assert (held.held, held.settled, dict(held.errors)) == (40, 40, {})
        assert server.connections == 40
        # Held open and silent: a probe still gets its greeting, and says QUIT.
        samples, errors = await probe("127.0.0.1", port, 3, gap=0)
        assert len(samples) == 3 and errors == {}
        held.release.set()
    assert server.transcripts[40:] == [[b"QUIT"]] * 3 and server.transcripts[:40] == [[]] * 40
    out = await greeting_delay("127.0.0.1", port, idle=20, probes=5, window=10.0)
    assert (out["held"], out["idle_errors"], out["alone_errors"], out["with_idle_errors"]) == (
        20, {}, {}, {})
    assert out["alone_ms"]["n"] == 5 and out["with_idle_ms"]["n"] == 5


async def test_hold_idle_counts_silent_and_refusing_servers(nursery: trio.Nursery) -> None:
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async def busy(stream: trio.SocketStream) -> None:
        await stream.send_all(b"421 4.3.2 busy\r\n")

    for handler, error in ((silent, "no greeting in window"), (busy, "421")):
        port = await start(nursery, handler)
        async with trio.open_nursery() as inner:
            held = await hold_idle(inner, "127.0.0.1", port, 5, 0.5)
            held.release.set()
        assert (held.held, dict(held.errors)) == (0, {error: 5})
    samples, errors = await probe("127.0.0.1", 1, 2, gap=0)
    assert samples == [] and errors == {"ConnectionRefusedError": 2}


def test_per_session_memory() -> None:
    def mem(smtp: int, pss: int, other: int = 1000) -> dict:
        return {"rss_kb": 2 * (smtp * pss + other), "pss_kb": smtp * pss + other,
                "processes": smtp + 1,
                "by_kind": {"smtp-server": {"rss_kb": 2 * smtp * pss, "pss_kb": smtp * pss,
                                            "processes": smtp},
                            "supervisor": {"rss_kb": 2 * other, "pss_kb": other,
                                           "processes": 1}}}

    # 4 jobs of 20,000 KiB, then 6 jobs of 21,000 KiB holding 1,000 sessions: 46,000 KiB
    # grown, of which 2 jobs started at 20,000 each; the sessions alone 6,000 KiB.
    got = per_session(mem(4, 20_000), mem(6, 21_000), 1000)
    assert got == {"rss_kb_per_session": 92.0, "pss_kb_per_session": 46.0,
                   "pss_kb_per_session_sessions_only": 6.0, "new_processes": {"smtp-server": 2}}
    assert per_session(mem(4, 20_000), mem(4, 20_000), 0)["pss_kb_per_session"] is None


def test_cpu_poller_counts_an_exited_child() -> None:
    # Once told to, the root runs a child that burns 0.5 s of CPU and ends, and waits for it.
    # No sample sees the child alive: its CPU can only come from the root's cutime.
    code = ("import subprocess, sys\nsys.stdin.readline()\nsubprocess.run([sys.executable, "
            "'-c', 'import time\\nwhile time.process_time() < 0.5: pass'])\nprint('done', "
            "flush=True)\nsys.stdin.readline()\n")
    root = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert root.stdin is not None and root.stdout is not None
    try:
        poller = CpuPoller([root.pid], program_kind)
        poller.mark()
        root.stdin.write("go\n")
        root.stdin.flush()
        assert root.stdout.readline() == "done\n"
        poller.sample()
        cpu, procs, started = poller.by_kind()
        assert cpu["exited (unseen)"] >= 0.4  # /proc counts in clock ticks, not exactly
        assert procs == {Path(sys.executable).name: 1} and started == {}
    finally:
        root.kill()
        root.wait()


def _smtp(server: str, client: str, label: str, acc: float, dlv: float | None,
          greet99: float = 0.0, cpu: float | None = None, by_kind: dict | None = None) -> dict:
    return {"kind": "smtp", "server": server, "client": client, "label": label,
            "delivered_per_sec": dlv, "delivered": 100, "cpu_us_per_msg": cpu,
            "cpu_us_per_msg_by_kind": by_kind or {},
            "result": {"sent": 100, "msgs_per_sec": acc, "greeting_ms": {"p99": greet99},
                       "data_ms": {}, "errors": {}}}


T, M = "20s 1KB k=1", "20s 1KB k=100"
ROWS = [
    _smtp("mailpool", "smtp_load", T, 300, 280, 5.0, 2100.0),
    _smtp("mailpool", "smtp-source", T, 330, 320, cpu=1900.0,
          by_kind={"smtp-server": 1000.0, "supervisor": 500.0, "framework": 400.0}),
    _smtp("postfix", "smtp_load", T, 400, 350, 6.0), _smtp("postfix", "smtp-source", T, 300, 300),
    _smtp("mailpool", "smtp-source", M, 600, 590), _smtp("postfix", "smtp-source", M, 420, 400),
    {"kind": "journal", "median_on": 2060, "median_off": 2000, "cost": 0.03,
     "cpu_on": [2060], "cpu_off": [2000], "rate_on": 300, "rate_off": 310},
    *({"kind": "pop", "server": name, "sessions": 10,
       "result": {"retr_per_sec": rate, "retrieved": rate * 3, "mb_per_sec": rate / 1000,
                  "login_ms": {"p99": 5.0}, "retr_ms": {"p99": 1.0}, "errors": {}}}
      for name, rate in (("mailpool", 600), ("dovecot", 1000))),
    {"kind": "idle", "server": "mailpool", "bound": 10000, "held": 10000, "ramp_seconds": 16,
     "before": {"rss_kb": 300_000, "pss_kb": 200_000, "processes": 9},
     "after": {"rss_kb": 890_000, "pss_kb": 600_000, "processes": 25},
     "rss_kb_per_session": 59.0, "pss_kb_per_session": 40.0,
     "pss_kb_per_session_sessions_only": 3.4, "new_processes": {"smtp-server": 16}},
    {"kind": "greeting-delay", "idle": 1000, "held": 1000, "probes": 100,
     "alone_ms": {"n": 100, "p99": 2.0, "max": 3.0}, "alone_errors": {},
     "with_idle_ms": {"n": 100, "p99": 5.0, "max": 120.0}, "with_idle_errors": {}},
]


def test_targets_from_rows() -> None:
    got = {t["id"]: t for t in targets(ROWS)}
    assert list(got) == ["1", "1+", "2", "3", "4", "5", "6", "6+", "7a", "7b", "7b'", "7c"]
    status = {k: t["status"] for k, t in got.items()}
    assert status == {"1": "MET", "1+": "MISSED", "2": "MET", "3": "MISSED", "4": "MET",
                      "5": "MET", "6": "MET", "6+": "MISSED", "7a": "MET", "7b": "MISSED",
                      "7b'": "MET", "7c": "MISSED"}
    # Headline: smtp-source's delivered/s; the generator's ratio in the detail.
    assert got["1"]["value"] == 320 / 300 and got["1"]["measured"] == "1.07x"
    assert got["1"]["detail"] == ("delivered/s 320 vs Postfix 300 (smtp-source, medians); "
                                  "Trio generator 0.80x (280 vs 350)")
    assert got["2"]["value"] == 1900.0
    assert got["2"]["detail"] == ("supervisor 500, smtp-server 1000, framework 400 (medians); "
                                  "Trio generator runs 2,100 us")
    assert got["3"]["value"] == 590 / 400
    assert got["4"]["value"] == 5.0 / 6.0
    assert got["7c"]["value"] == 120.0 and got["7c"]["measured"] == "120.0 ms"
    # Nothing measured: every target says why, none is MET or MISSED.
    none = targets([])
    assert all(t["status"].startswith("n/a (") for t in none)
    # An idle test below 10,000 sessions cannot decide target 7's memory.
    short = [{**ROWS[9], "bound": 2000, "held": 2000}]
    assert {t["id"]: t["status"] for t in targets(short)}["7b"] == (
        "n/a (only 2,000 tried (--idle-bound); held 2,000)")
    # A new client refused or timed out while idle sessions are open misses target 7c.
    refused = [{**ROWS[10], "with_idle_errors": {"timeout": 1}}]
    assert {t["id"]: t["status"] for t in targets(refused)}["7c"] == "MISSED"


def test_smtp_table_headline_first_and_ratios_to_postfix() -> None:
    table = smtp_table(ROWS)
    rows = [[*r[:4], r[6], r[8], r[13]] for r in table.rows if r]
    assert rows == [
        [T, "mailpool", "smtp-source", "1", "1.10", "1.07", "1900"],
        [T, "mailpool", "smtp_load", "1", "0.75", "0.80", "2100"],
        [T, "postfix", "smtp-source", "1", "1.00", "1.00", "-"],
        [T, "postfix", "smtp_load", "1", "1.00", "1.00", "-"],
        [M, "mailpool", "smtp-source", "1", "1.43", "1.48", "-"],
        [M, "postfix", "smtp-source", "1", "1.00", "1.00", "-"],
    ]
    assert table.rows[4] == []  # a blank line between workloads


def test_table_renderings() -> None:
    t = Table(["name", "n"], [["a", "1"], [], ["bb|c", "22"]], right={1})
    assert t.text() == ["name   n", "----  --", "a      1", "", "bb|c  22"]
    assert t.markdown() == ["| name | n |", "| --- | ---: |", "| a | 1 |", "| bb/c | 22 |"]


def test_markdown_block() -> None:
    meta = {"kind": "meta", "started": "2026-12-01 06:00 UTC",
            "machine": {"cpus": 2, "kernel": "6.1", "python": "3.11.7", "postfix": "3.7.11",
                        "dovecot": "2.3.19", "load": [1.25, 1.0, 1.0]}}
    block = markdown([meta, *ROWS, *targets(ROWS)], 330.0)
    assert block.startswith("### Latest figures\n\nFrom `make bench` started 2026-12-01 "
                            "06:00 UTC, on 2 CPUs (Linux 6.1), Python 3.11.7, Postfix 3.7.11, "
                            "Dovecot 2.3.19; load average 1.2 when it started")
    assert "The whole run took 5.5 minutes." in block
    assert "\n### Targets\n\n7 met, 5 missed, 0 not measured in this run.\n" in block
    assert ("| 1 | end to end >= 1.0x Postfix (20s 1KB k=1, durable, smtp-source) | >= 1.0x | "
            "1.07x | MET | delivered/s 320 vs Postfix 300 (smtp-source, medians); Trio "
            "generator 0.80x (280 vs 350) |") in block.splitlines()
    assert "\n\n\n" not in block


def test_repeated_runs_median() -> None:
    def run(server: str, dlv: float, cpu: float, greet: float, rnd: int) -> dict:
        return _smtp(server, "smtp-source", T, dlv + 10, dlv, greet, cpu,
                     {"smtp-server": cpu / 2, "supervisor": cpu / 2}) | {"round": rnd}

    rows = [run("mailpool", 300, 2400, 9.0, 1), run("postfix", 320, 0, 0, 1),
            run("mailpool", 260, 1800, 9.0, 2), run("postfix", 250, 0, 0, 2),
            run("mailpool", 280, 2000, 9.0, 3), run("postfix", 300, 0, 0, 3),
            _smtp("mailpool", "smtp-source", T, 0, None) | {"result": {"error": "boom"}}]
    table = smtp_table(rows)
    # One line a server: its median run (by delivered/s), with how many runs there were.
    assert [[*r[1:5], r[7], r[13]] for r in table.rows] == [
        ["mailpool", "smtp-source", "3", "100", "280", "2000"],
        ["postfix", "smtp-source", "3", "100", "300", "0"]]
    got = {t["id"]: t for t in targets(rows)}
    assert got["1"]["value"] == 280 / 300
    assert got["1"]["detail"].startswith("delivered/s 280, 3 runs 260-300 vs Postfix 300, "
                                         "3 runs 250-320 (smtp-source, medians)")
    assert got["2"]["value"] == 2000 and got["2"]["status"] == "MET"
    assert got["2"]["detail"] == ("supervisor 1000, smtp-server 1000 (medians, 3 runs "
                                  "1800-2400)")
    # A server whose only runs failed shows its error.
    failed = smtp_table([rows[-1]])
    assert failed.rows[0][:4] == [T, "mailpool", "smtp-source", "0"]
    assert failed.rows[0][-1] == "ERROR: boom"
