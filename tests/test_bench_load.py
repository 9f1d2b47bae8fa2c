"""Smoke tests of the benchmark clients against tiny in-process servers (no timings asserted)."""

from __future__ import annotations

import json
import ssl
import sys
from functools import partial
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
# bench/ is a top-level directory beside src/, not an installed package: `pytest` run from
# the venv does not put the repository root on sys.path by itself.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.pop_load import PopConfig, run_pop  # noqa: E402
from bench.report import targets  # noqa: E402
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


def test_percentiles_and_targets() -> None:
    p = percentiles([0.001 * i for i in range(1, 101)])
    assert round(p["p50"]) == 50 and round(p["p99"]) == 99 and round(p["max"]) == 100
    assert percentiles([]) == {"n": 0}

    def smtp(server: str, acc: float, dlv: float | None, greet99: float,
             client: str = "smtp_load") -> dict:
        return {"kind": "smtp", "server": server, "client": client, "label": "20s 1KB k=1",
                "delivered_per_sec": dlv,
                "result": {"msgs_per_sec": acc, "greeting_ms": {"p99": greet99}}}

    rows = [smtp("mailpool", 900, 800, 5.0), smtp("mailpool spj=8", 1000, 900, 4.0),
            smtp("postfix", 400, 500, 6.0), smtp("postfix", 450, 520, 0, "smtp-source"),
            smtp("aiosmtpd-fsync", 300, 300, 3.0),
            {"kind": "journal", "median_on": 960, "median_off": 1000, "cost": 0.04},
            {"kind": "idle", "server": "mailpool spj=8", "held": 100,
             "rss_kb_per_session": 60.0, "pss_kb_per_session": 40.0,
             "warm": {"held": 160, "rss_kb_per_session": 20.0, "pss_kb_per_session": 15.0}}]
    got = {t["name"]: t for t in targets(rows, 8)}
    # Like with like: the generator's mailpool figure against the generator's Postfix one.
    e2e = got["mailpool: durable end to end >= 1.5x Postfix (20s 1KB k=1, smtp_load)"]
    assert e2e["ratio"] == 800 / 500 and e2e["status"] == "MET"
    src = got["mailpool: durable end to end >= 1.5x Postfix (20s 1KB k=1, smtp-source)"]
    assert src["ratio"] is None and src["status"].startswith("n/a")
    assert got["mailpool: accepted/s >= 2x aiosmtpd-fsync (20s 1KB k=1)"]["status"] == "MET"
    greet = got["mailpool: connect-to-greeting p99 no worse than Postfix (20s 1KB k=1)"]
    assert greet["status"] == "MET"
    assert got["journal on costs < 5% throughput"]["status"] == "MET"
    assert got["memory per idle session < 50 KB (sessions_per_job=8, cold)"]["status"] == "MISSED"
    assert got["memory per idle session < 50 KB (sessions_per_job=8, warm)"]["status"] == "MET"
    none = {t["name"]: t for t in targets([], 8)}
    assert all(t["status"].startswith("n/a") for t in none.values())
