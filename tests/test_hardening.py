"""Hardening, end to end: one host per data directory, privileges, per-client limits,
deadlines a client cannot stretch, and hostile input side by side with a normal client."""

from __future__ import annotations

import json
import os
import pwd
import select
import signal
import smtplib
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from hosthelp import MAILPOOL, Host, wait_for

from mailpool.supervisor.privileges import drop_to, unreachable

NO_EXCEPTIONS = "[smtp]\nclient_limit_exceptions = []\n"


def smtp_ok(h: Host, rcpt: str = "bob@example.test") -> None:
    """A normal client is served, on time."""
    start = time.monotonic()
    with smtplib.SMTP(*h.smtp, timeout=10) as s:
        s.ehlo("client.example.test")
        assert s.sendmail("a@remote.test", [rcpt], b"Subject: ok\r\n\r\nfine\r\n") == {}
    assert time.monotonic() - start < 5


# --- one host per data directory -------------------------------------------------------


def test_a_second_serve_on_the_same_data_directory_exits_naming_the_pid(host: Any) -> None:
    h = host()
    other = h.root / "other.toml"
    text = h.config_path.read_text().replace('smtp = "127.0.0.1:0"', 'smtp = "127.0.0.1:0"')
    other.write_text(text.replace('data = "var"', f'data = "{h.data}"'))
    res = subprocess.run([*MAILPOOL, "serve", "--config", str(other)], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 1
    (line,) = res.stderr.strip().splitlines()
    assert f"pid {h.proc.pid}" in line and str(h.data) in line
    # The first host is untouched: still managed through its control socket.
    assert h.pool_stats()["smtp-server"]["jobs"]["current"] >= 1
    sock = h.data / "run" / "control.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert h.cli("journal", "dump", "--verify").returncode == 0


def test_a_listen_error_names_the_address_and_port(host: Any) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        h = host(f'[listen]\nsmtp = "127.0.0.1:{port}"\n', start=False)
        res = subprocess.run([*MAILPOOL, "serve", "--config", str(h.config_path)],
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 1
        assert f"127.0.0.1:{port}" in res.stderr and "listen.smtp" in res.stderr
    finally:
        busy.close()


# --- privileges ------------------------------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="privileges are dropped only by root")


def mailpool_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("mailpool")
    except KeyError:
        pytest.skip("no mailpool user (make test creates it when run as root)")


@needs_root
def test_the_drop_gives_the_data_to_the_user_and_becomes_it(tmp_path: Path) -> None:
    user = mailpool_user()
    data = Path(tempfile.mkdtemp(prefix="mailpool-drop-"))
    os.chmod(data, 0o755)
    (data / "spool").mkdir()
    (data / "spool" / "file").write_bytes(b"x")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child drops for good; the test process stays root
        try:
            said = drop_to("mailpool", data, check_interpreter=False)
            os.write(write, json.dumps([said, os.getuid(), os.getgid(),
                                        os.getgroups()]).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        said, uid, gid, groups = json.loads(f.read())
    os.waitpid(pid, 0)
    assert (uid, gid, groups) == (user.pw_uid, user.pw_gid, [])
    assert said.startswith("running as mailpool")
    for path in (data, data / "spool", data / "spool" / "file"):
        assert (path.stat().st_uid, path.stat().st_gid) == (user.pw_uid, user.pw_gid)


@needs_root
def test_started_as_root_on_a_privileged_port_every_process_runs_as_the_user(host: Any
                                                                              ) -> None:
    user = mailpool_user()
    blocked = unreachable(Path(sys.executable).resolve(), user.pw_uid, user.pw_gid, os.X_OK)
    if blocked:
        pytest.skip(f"user mailpool cannot run this Python: {blocked}")
    root = Path(tempfile.mkdtemp(prefix="mailpool-priv-"))
    os.chmod(root, 0o755)
    port = next(p for p in range(700, 1000) if _free(p))
    h = Host(root, f'[host]\nuser = "mailpool"\n[listen]\nsmtp = "127.0.0.1:{port}"\n')
    h.add_user("bob", "bob@example.test")
    try:
        h.start()
        smtp_ok(h)
        h.wait_delivered("bob", 1)
        pids = [h.proc.pid, *_children(h.proc.pid)]
        uids = {_uid(p) for p in pids}
        assert uids == {user.pw_uid}, uids
        spool_file = next((h.data / "mailboxes" / "bob" / "new").iterdir())
        assert spool_file.stat().st_uid == user.pw_uid
    finally:
        h.kill()


def _free(port: int) -> bool:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        return False
    finally:
        s.close()
    return True


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except OSError:
                continue
            if ppid == pid:
                out.append(int(entry.name))
    return out


def _uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[2])  # effective
    raise AssertionError(pid)


# --- per-client limits -------------------------------------------------------------------------


def test_idle_connections_from_one_address_do_not_starve_another(host: Any) -> None:
    # The hostile client comes from 127.0.0.2, the normal one from 127.0.0.1; loopback is
    # not exempt here.
    h = host(NO_EXCEPTIONS + "max_connections_per_client = 5\n")
    h.add_user("bob", "bob@example.test")
    idle = []
    for _ in range(20):
        s = socket.create_connection(h.smtp, source_address=("127.0.0.2", 0))
        idle.append(s)
    try:
        refused = 0
        for s in idle:
            s.settimeout(10)
            first = s.recv(200)
            refused += first.startswith(b"421 4.7.0")
        assert refused == 15  # five held, the rest refused at once
        smtp_ok(h)  # 127.0.0.1 is served on time
        records = wait_for(lambda: len(h.journal("--code", "9S")) >= 15 and
                           h.journal("--code", "9S"), 10, what="9S records")
        assert {r["ip"] for r in records} == {"127.0.0.2"}
    finally:
        for s in idle:
            s.close()


# --- storage threshold ------------------------------------------------------------------------


def test_below_the_storage_threshold_mail_waits_and_resumes(host: Any, raw_smtp: Any) -> None:
    huge = "[storage]\nmin_free_mb = 1000000000\ncheck_interval = 0.2\n"
    h = host(huge, start=False)
    h.add_user("bob", "bob@example.test")
    # A message already accepted (on the incoming queue when the host starts) ...
    from mailpool.framework.spool import Envelope, Spool

    spool = Spool(h.data / "spool")
    qid = spool.new_queue_id()
    spool.store("incoming", Envelope(queue_id=qid, message_id="busy@remote.test",
                                     originator="a@remote.test", recipients=["bob@example.test"],
                                     received_ns=time.time_ns()), b"Subject: wait\r\n\r\nx\r\n")
    h.start()
    # ... is parked on the busy queue, and new mail is refused for now.
    wait_for(lambda: h.queue_files("busy"), 20, what="the message on the busy queue")
    c = raw_smtp(h.smtp)
    c.reply()
    c.cmd("EHLO client.example.test")
    assert c.cmd("MAIL FROM:<a@remote.test>")[0] == 250
    assert c.cmd("RCPT TO:<bob@example.test>") == (452, ["4.3.1 Insufficient system storage"])
    c.cmd("QUIT")
    # Room again (the threshold lowered, a reload): back on the incoming queue, delivered.
    h.config_path.write_text(h.config_path.read_text().replace("1000000000", "0"))
    os.kill(h.proc.pid, signal.SIGHUP)
    h.wait_delivered("bob", 1, timeout=30)
    codes = [r["code"] for r in h.journal("--queue-id", qid)]
    assert codes.index("7L") < codes.index("7M") < codes.index("B2"), codes


# --- deadlines a client cannot stretch --------------------------------------------------------


def _connect(h: Host, source: str = "127.0.0.1") -> socket.socket:
    s = socket.create_connection(h.smtp, source_address=(source, 0), timeout=30)
    return s


def _closed(s: socket.socket) -> bool:
    """The server closed: EOF, or a reset (it closed with our unread input in its buffer)."""
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True


def _read_reply(s: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\r\n") or (len(buf) > 4 and buf.splitlines()[-1][3:4] == b"-"):
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf


def test_a_dripping_client_is_cut_at_the_command_deadline(host: Any) -> None:
    h = host("[smtp]\ncommand_timeout = 2.0\n")
    h.add_user("bob", "bob@example.test")
    drip = _connect(h)
    assert _read_reply(drip).startswith(b"220")
    drip.sendall(b"EHLO client.example.test\r\n")
    _read_reply(drip)
    start = time.monotonic()
    closed_at = None
    for byte in b"MAIL FROM:<a@remote.test>\r\n":  # one byte every 0.4 s: 11 s in all
        try:
            drip.sendall(bytes([byte]))
        except OSError:
            break
        drip.settimeout(0.4)
        try:
            got = drip.recv(200)
        except TimeoutError:
            continue
        assert got.startswith(b"421 4.4.2"), got
        closed_at = time.monotonic()
        break
    assert closed_at is not None and closed_at - start < 4  # one deadline for the whole line
    smtp_ok(h)  # the normal client beside it was served


def test_data_below_the_minimum_rate_and_a_session_too_long_are_cut(host: Any) -> None:
    h = host("[smtp]\ndata_timeout = 1.0\nmin_data_rate = 100\nsession_timeout = 6.0\n"
             "command_timeout = 5.0\n")
    h.add_user("bob", "bob@example.test")
    slow = _connect(h)
    _read_reply(slow)
    for cmd in (b"EHLO c.example.test", b"MAIL FROM:<a@remote.test>",
                b"RCPT TO:<bob@example.test>", b"DATA"):
        slow.sendall(cmd + b"\r\n")
        _read_reply(slow)
    start = time.monotonic()
    reply = b""
    for _ in range(40):  # 10 bytes a second: 1 s grace + 10 bytes / 100 B/s
        try:
            slow.sendall(b"x" * 10)
        except OSError:
            break
        slow.settimeout(1.0)
        try:
            reply = slow.recv(200)
        except TimeoutError:
            continue
        break
    assert reply.startswith(b"421 4.4.2") and b"data too slow" in reply, reply
    assert time.monotonic() - start < 6
    # A session that keeps talking is still ended at session_timeout.
    chatty = _connect(h)
    _read_reply(chatty)
    start = time.monotonic()
    reply = b""
    while time.monotonic() - start < 15:
        chatty.sendall(b"NOOP\r\n")
        reply = _read_reply(chatty)
        if not reply.startswith(b"250"):
            break
        time.sleep(0.5)
    assert reply.startswith(b"421 4.4.2") and b"session too long" in reply, reply
    assert 5 < time.monotonic() - start < 9


# --- hostile input ------------------------------------------------------------------------------


def test_pregreet_forbidden_commands_and_pipelining_before_354(host: Any) -> None:
    h = host("[smtp]\ngreet_pause = 0.5\n")
    h.add_user("bob", "bob@example.test")
    early = _connect(h)
    early.sendall(b"EHLO bot.example.test\r\n")  # before the greeting
    assert _read_reply(early).startswith(b"554 5.7.1")
    assert _closed(early)
    web = _connect(h)
    assert _read_reply(web).startswith(b"220")
    web.sendall(b"GET / HTTP/1.1\r\nHost: mail.example.test\r\n\r\n")
    assert _read_reply(web) == b"221 2.7.0 Error: I can break rules, too. Goodbye.\r\n"
    assert _closed(web)
    rush = _connect(h)
    _read_reply(rush)
    rush.sendall(b"EHLO c.example.test\r\n")
    _read_reply(rush)
    rush.sendall(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<bob@example.test>\r\n"
                 b"DATA\r\nSubject: no wait\r\n\r\nbody\r\n.\r\n")
    replies = b""
    while b"554" not in replies:
        try:
            chunk = rush.recv(4096)
        except ConnectionResetError:
            break
        if not chunk:
            break
        replies += chunk
    assert b"554 5.5.0 Error: improper command pipelining after DATA" in replies
    smtp_ok(h)
    details = [r["detail"] for r in h.journal("--code", "9S")]
    assert any("talked before the greeting" in d for d in details)
    assert any("forbidden command" in d and "GET" in d for d in details)
    assert any("improper pipelining" in d for d in details)
    assert h.maildir_files("bob") and len(h.maildir_files("bob")) == 1


def test_grammar_limits_and_a_nul_in_ehlo(host: Any, raw_smtp: Any) -> None:
    h = host()
    h.add_user("bob", "bob@example.test")
    c = raw_smtp(h.smtp)
    c.reply()
    assert c.cmd("EHLO bad\x00name")[0] == 501
    assert c.cmd("EHLO good.example.test")[0] == 250
    assert c.cmd("MAIL FROM:<" + "a" * 65 + "@remote.test>")[0] == 501
    assert c.cmd("MAIL FROM:<a@remote.test>")[0] == 250
    long_path = "b" * 60 + "@" + ".".join(["d" * 60] * 4) + ".test"
    assert c.cmd(f"RCPT TO:<{long_path}>") == (501, ["5.1.3 Bad recipient address syntax"])
    assert c.cmd("RCPT TO:<bob@example.test>")[0] == 250
    c.send(b"DATA\r\n")
    assert c.reply()[0] == 354
    c.send(b"Subject: fine\r\n\r\nok\r\n.\r\n")
    assert c.reply()[0] == 250
    (path,) = h.wait_delivered("bob", 1)
    header = path.read_bytes().split(b"\r\n\r\n")[0]
    assert b"good.example.test" in header and b"\x00" not in header


# --- connection restrictions and filters ---------------------------------------------------


def test_deny_list_and_dns_blocklist_refuse_only_the_listed_client(host: Any) -> None:
    from dnsserver import DnsServer

    with DnsServer() as dns:
        dns.add("2.0.0.127.bl.test", "A", "127.0.0.2")
        dns.add("2.0.0.127.bl.test", "TXT", '"listed for testing"')
        dns.add("4.0.0.127.bl.test", "A", "127.255.255.254")  # an error code, not a listing
        dns.silence("5.0.0.127.bl.test")                        # a timeout never rejects
        h = host(f'[restrictions]\ndeny = ["127.0.0.3/32"]\ndnsbl = ["bl.test"]\n'
                 f'dnsbl_timeout = 1.0\n[dns]\nnameservers = ["127.0.0.1"]\nport = {dns.port}\n')
        h.add_user("bob", "bob@example.test")
        for source, refused in (("127.0.0.2", True), ("127.0.0.3", True),
                                ("127.0.0.4", False), ("127.0.0.5", False)):
            s = _connect(h, source)
            greeting = _read_reply(s)
            if refused:
                assert greeting.startswith(b"554 5.7.1"), (source, greeting)
                s.sendall(b"MAIL FROM:<a@remote.test>\r\n")
                assert _read_reply(s).startswith(b"503 5.7.0")
                s.sendall(b"QUIT\r\n")
                assert _read_reply(s).startswith(b"221")
            else:
                assert greeting.startswith(b"220"), (source, greeting)
            s.close()
        smtp_ok(h)
        records = h.journal("--code", "9S")
        by_ip = {r["ip"]: r["detail"] for r in records}
        assert "bl.test" in by_ip["127.0.0.2"] and "listed for testing" in by_ip["127.0.0.2"]
        assert by_ip["127.0.0.3"].startswith("deny")
        assert "127.0.0.4" not in by_ip and "127.0.0.5" not in by_ip


def test_filters_keep_discard_release_and_delete(host: Any) -> None:
    h = host('[[filter]]\naction = "keep"\nattachment = "*.vbs"\n'
             '[[filter]]\naction = "discard"\nsubject = "ILOVEYOU"\n')
    h.add_user("bob", "bob@example.test")
    from email.message import EmailMessage

    def send(msg: EmailMessage) -> str:
        with smtplib.SMTP(*h.smtp, timeout=10) as s:
            s.ehlo("client.example.test")
            s.mail("a@remote.test")
            s.rcpt("bob@example.test")
            code, text = s.data(msg.as_bytes())
            assert code == 250
        return text.decode().rsplit(" ", 1)[-1]

    virus = EmailMessage()
    virus["Subject"] = "a letter"
    virus.set_content("open it")
    virus.add_attachment(b"x", maintype="application", subtype="octet-stream",
                         filename="=?utf-8?q?lovebug=2Evbs?=")
    kept = send(virus)
    love = EmailMessage()
    love["Subject"] = "=?utf-8?b?SUxPVkVZT1U=?="  # ILOVEYOU, encoded
    love.set_content("x")
    dropped = send(love)
    plain = EmailMessage()
    plain["Subject"] = "hello"
    plain.set_content("fine")
    send(plain)
    h.wait_delivered("bob", 1)
    wait_for(lambda: h.queue_files("quarantine"), 10, what="the kept message in quarantine")
    rows = [json.loads(x) for x in
            h.cli("queue", "list", "--queue", "quarantine", "--json").stdout.splitlines()]
    assert [r["queue_id"] for r in rows] == [kept]
    ow = {r["queue_id"]: r["detail"] for r in h.journal("--code", "OW")}
    assert ow[kept].startswith("kept in quarantine") and "lovebug.vbs" in ow[kept]
    assert ow[dropped].startswith("discarded")
    # The operator looks at it and lets it through: delivered, not filtered again.
    h.cli("queue", "release", kept)
    h.wait_delivered("bob", 2)
    assert [r["code"] for r in h.journal("--queue-id", kept)].count("QR") == 1
    # And a message can be deleted from its queue.
    kept_again = send(virus)
    wait_for(lambda: h.queue_files("quarantine"), 10, what="another one in quarantine")
    out = h.cli("queue", "delete", kept_again).stdout
    assert "deleted from quarantine" in out and not h.queue_files("quarantine")
    res = h.cli("queue", "release", kept_again, check=False)
    assert res.returncode == 1 and "no such message" in res.stderr


def test_connections_waiting_for_a_job_are_bounded(host: Any) -> None:
    h = host("[pool.smtp-server]\ninitial_jobs = 1\nthreshold = 0\nadditional_jobs = 1\n"
             "maximum_jobs = 1\nwait = true\nwait_timeout = 30.0\nmax_waiting = 2\n"
             "sessions_per_job = 1\n",
             wait_jobs={"smtp-server": 1, "framework": 1})
    busy = _connect(h)
    assert _read_reply(busy).startswith(b"220")  # the only job is taken
    held = [_connect(h) for _ in range(2)]       # these two wait for it
    time.sleep(0.5)
    extra = _connect(h)
    extra.settimeout(5)
    assert _read_reply(extra).startswith(b"421 4.3.2")  # at once, not after wait_timeout
    rejected = [r for r in h.journal("--code", "JR") if "max_waiting" in r.get("detail", "")]
    assert len(rejected) == 1
    busy.sendall(b"QUIT\r\n")
    _read_reply(busy)
    busy.close()
    ready, _, _ = select.select(held, [], [], 10)
    assert ready and _read_reply(ready[0]).startswith(b"220")  # a held one got the job
    for s in (busy, *held, extra):
        s.close()


async def test_early_talker_check_works_on_descriptors_above_1023() -> None:
    """A job holding thousands of sessions has descriptors past select()'s 1024: the
    greet-pause check must still answer (it once failed every session past that)."""
    import resource

    import trio

    from mailpool.jobs.smtp_session import talked_first

    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] <= 1500:
        pytest.skip("the open files limit is too low to place a socket at descriptor 1500")
    ours, peer = socket.socketpair()
    high = os.dup2(ours.fileno(), 1500)
    ours.close()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(socket.socket(fileno=high)))
    try:
        assert not await talked_first(stream, 0)  # silent client
        peer.send(b"EHLO too-early\r\n")
        assert await talked_first(stream, 0.5)    # the early talker is seen
    finally:
        await stream.aclose()
        peer.close()
