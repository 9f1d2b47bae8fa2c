"""End-to-end tests of the POP3 server: a real `mailpool serve`, real sockets, real clients.

One host is shared by the module (starting one costs seconds); every test uses its own
user, so mailboxes and locks never meet. Tests that fail logins connect from their own
loopback address (127.0.0.N), because the growing delay is counted per client address.
"""

from __future__ import annotations

import json
import os
import poplib
import re
import select
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from hosthelp import Host, wait_for

AUTH_FAIL_DELAY = 0.05
INACTIVITY_TIMEOUT = 3.0
POP_CONFIG = f"""
[pop3]
auth_fail_delay = {AUTH_FAIL_DELAY}
inactivity_timeout = {INACTIVITY_TIMEOUT}
"""
PASSWORD = "secret"
UID_RE = re.compile(rb"[\x21-\x7e]{1,70}")
# What mailpool puts in front of a message that came without a Message-ID: local delivery's
# Return-Path and Delivered-To, the trace header and a Message-ID.
ADDED_HEADERS_RE = re.compile(
    rb"Return-Path: <[^<>\r\n]*>\r\nDelivered-To: [^\r\n]+\r\n"
    rb"Received: [^\r\n]*\r\n(?:\t[^\r\n]*\r\n)*Message-ID: <[^<>\r\n]+@mail\.example\.test>\r\n")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pop_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    host = Host(tmp_path_factory.mktemp("pop3"), extra_config=POP_CONFIG)
    try:
        host.start(wait_jobs={"smtp-server": 1, "framework": 1, "pop-server": 1})
        yield host
    finally:
        host.kill()


# --------------------------------------------------------------------------- helpers


def add_user(host: Host, name: str) -> None:
    host.add_user(name, f"{name}@example.test", password=PASSWORD)


def deliver(host: Host, user: str, *messages: bytes) -> list[Path]:
    """Send messages to user@example.test over SMTP and wait until they are in the Maildir."""
    before = len(host.maildir_files(user))
    with smtplib.SMTP(*host.smtp, timeout=20) as smtp:
        for msg in messages:
            smtp.sendmail("sender@other.test", [f"{user}@example.test"], msg)
    return host.wait_delivered(user, before + len(messages))


def crlf(data: bytes) -> bytes:
    """The message as POP3 must send it before byte-stuffing: CRLF line ends, final CRLF."""
    data = re.sub(rb"\r?\n", b"\r\n", data)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def journal(host: Host, code: str, **match: object) -> list[dict]:
    return [r for r in host.journal("--code", code) if r.get("code") == code
            and all(r.get(k) == v for k, v in match.items())]


class RawPop:
    """A POP3 client on a plain socket, to see exact octets (poplib hides them)."""

    def __init__(self, host: Host, source_ip: str | None = None, timeout: float = 20.0) -> None:
        src = (source_ip, 0) if source_ip else None
        self.sock = socket.create_connection(host.pop3, timeout=timeout, source_address=src)
        self.file = self.sock.makefile("rb")
        self.greeting = self.line()
        assert self.greeting.startswith(b"+OK "), self.greeting

    def line(self) -> bytes:
        raw = self.file.readline()
        assert raw.endswith(b"\r\n"), f"connection closed or bad line: {raw!r}"
        return raw[:-2]

    def send(self, line: str | bytes) -> None:
        self.sock.sendall((line.encode() if isinstance(line, str) else line) + b"\r\n")

    def cmd(self, line: str | bytes) -> bytes:
        self.send(line)
        return self.line()

    def multi(self, line: str | bytes) -> tuple[bytes, bytes]:
        """(status line, raw octets up to and excluding the terminating ".\\r\\n")."""
        status = self.cmd(line)
        assert status.startswith(b"+OK"), (line, status)
        raw = bytearray()
        while (chunk := self.file.readline()) != b".\r\n":
            assert chunk.endswith(b"\r\n"), f"not a CRLF line: {chunk!r}"
            raw += chunk
        return status, bytes(raw)

    def login(self, user: str, password: str = PASSWORD) -> bytes:
        assert self.cmd(f"USER {user}").startswith(b"+OK")
        return self.cmd(f"PASS {password}")

    def readable(self) -> bool:
        # Only meaningful when every reply so far was read (the file buffer is empty).
        return bool(select.select([self.sock], [], [], 0)[0])

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def unstuff(raw: bytes) -> bytes:
    return b"".join(line[1:] if line.startswith(b".") else line
                    for line in raw.splitlines(keepends=True))


def login_when_free(host: Host, user: str, timeout: float = 20.0) -> RawPop:
    """A session that got the maildrop lock (retrying while another session holds it)."""
    pop = RawPop(host)

    def attempt() -> bool:
        reply = pop.login(user)
        if reply.startswith(b"+OK"):
            return True
        assert reply.startswith(b"-ERR [IN-USE]"), reply
        return False

    wait_for(attempt, timeout, what=f"{user}'s maildrop lock to be released")
    return pop


def uidl(pop: RawPop) -> dict[int, bytes]:
    _, raw = pop.multi("UIDL")
    rows = [line.split(b" ") for line in raw.splitlines()]
    return {int(n): uid for n, uid in rows}


def listing(pop: RawPop) -> dict[int, int]:
    _, raw = pop.multi("LIST")
    return {int(n): int(size) for n, size in (line.split(b" ") for line in raw.splitlines())}


# --------------------------------------------------------------------------- tests


def test_poplib_retrieve_delete_quit(pop_host: Host) -> None:
    add_user(pop_host, "bob")
    sent = {b"one": b"Subject: one\r\nFrom: a@other.test\r\n\r\nfirst body\r\n",
            b"two": b"Subject: two\r\nFrom: a@other.test\r\n\r\nsecond body\r\nmore\r\n"}
    deliver(pop_host, "bob", *sent.values())

    pop = poplib.POP3(*pop_host.pop3, timeout=20)
    assert pop.user("bob").startswith(b"+OK")
    assert pop.pass_(PASSWORD) == b"+OK maildrop has 2 messages (%d octets)" % pop.stat()[1]
    count, total = pop.stat()
    _, rows, _ = pop.list()
    sizes = {int(n): int(s) for n, s in (r.split() for r in rows)}
    _, rows, _ = pop.uidl()
    uids = {int(n): u for n, u in (r.split() for r in rows)}
    assert count == 2 and set(sizes) == set(uids) == {1, 2}
    assert total == sum(sizes.values())
    assert len(set(uids.values())) == 2

    by_subject: dict[bytes, int] = {}
    for n in (1, 2):
        _, lines, octets = pop.retr(n)
        content = b"".join(line + b"\r\n" for line in lines)
        assert octets == sizes[n] == len(content)
        subject = re.search(rb"^Subject: (\w+)\r$", content, re.M)
        assert subject is not None
        by_subject[subject.group(1)] = n
        # The message as sent, after exactly the trace and Message-ID headers mailpool adds.
        prefix = content[: len(content) - len(sent[subject.group(1)])]
        assert content.endswith(sent[subject.group(1)])
        assert ADDED_HEADERS_RE.fullmatch(prefix), prefix
    assert set(by_subject) == {b"one", b"two"}

    files = {f.name.split(":")[0]: f for f in pop_host.maildir_files("bob")}
    assert set(files) == {u.decode() for u in uids.values()}, "UIDL is not the Maildir name"
    gone_uid = uids[by_subject[b"one"]].decode()
    assert pop.dele(by_subject[b"one"]).startswith(b"+OK")
    assert pop.quit() == b"+OK mail.example.test POP3 server signing off (1 message left)"
    assert not files[gone_uid].exists()

    pop = poplib.POP3(*pop_host.pop3, timeout=20)
    pop.user("bob")
    pop.pass_(PASSWORD)
    assert pop.stat()[0] == 1
    _, rows, _ = pop.uidl()
    assert [r.split()[1] for r in rows] == [uids[by_subject[b"two"]]]
    _, lines, _ = pop.retr(1)
    assert b"Subject: two" in lines
    pop.dele(1)
    assert pop.quit().startswith(b"+OK")
    assert pop_host.maildir_files("bob") == []


def test_fetchmail_keeps_then_fetches_and_deletes(pop_host: Host, tmp_path: Path) -> None:
    fetchmail = shutil.which("fetchmail")
    if fetchmail is None:
        pytest.skip("fetchmail not installed (tests/install_tools.sh installs it from Debian)")
    add_user(pop_host, "fred")
    bodies = [b"fetchmail body %d" % i for i in range(3)]
    deliver(pop_host, "fred", *(b"Subject: fm %d\r\n\r\n%s\r\n" % (i, b) for i, b in
                                enumerate(bodies)))

    home = tmp_path / "home"
    home.mkdir()
    rc = home / ".fetchmailrc"
    host, port = pop_host.pop3
    # sslproto '' keeps fetchmail from insisting on STLS, which this server does not offer.
    rc.write_text(
        "set no bouncemail\n"
        f"poll {host} service {port} protocol pop3 auth password\n"
        f'  user "fred" password "{PASSWORD}" sslproto \'\' no sslcertck\n')
    rc.chmod(0o600)  # fetchmail refuses a control file others can read
    env = {**os.environ, "HOME": str(home), "FETCHMAILHOME": str(home)}

    def run(out: Path, *options: str) -> tuple[subprocess.CompletedProcess[str], list[bytes]]:
        out.mkdir()
        # One file per message: the MDA shell's pid makes the name.
        res = subprocess.run([fetchmail, "-f", str(rc), "--nosyslog", "-v", *options,
                              "--mda", f"/bin/sh -c 'cat > {out}/msg.$$'"],
                             env=env, capture_output=True, text=True, timeout=60)
        return res, [p.read_bytes() for p in sorted(out.iterdir())]

    def check(got: list[bytes], res: subprocess.CompletedProcess[str]) -> None:
        assert res.returncode == 0, res.stdout + res.stderr  # 0: mail was fetched
        assert len(got) == 3, res.stdout + res.stderr
        for body in bodies:
            assert sum(body in m for m in got) == 1
        for m in got:
            assert b"by mail.example.test (mailpool)" in m

    # -k: fetched and kept on the server.
    res, got = run(tmp_path / "kept", "-k")
    check(got, res)
    assert len(pop_host.maildir_files("fred")) == 3
    assert journal(pop_host, "DD", user="fred") == []

    # Without -k (and -a: fetch the ones seen before too) fetchmail deletes what it
    # fetched; the server removed the files at QUIT.
    res, got = run(tmp_path / "fetched", "-a")
    check(got, res)
    wait_for(lambda: pop_host.maildir_files("fred") == [], what="fred's Maildir to empty")
    assert len(journal(pop_host, "DD", user="fred")) == 3

    res, got = run(tmp_path / "again", "-a")
    assert res.returncode == 1 and got == [], res.stdout + res.stderr  # 1: no mail


def pop_job_for(host: Host, source_ip: str, keepalive: RawPop) -> tuple[str, int]:
    """(job name, pid) of the pop-server job the supervisor handed source_ip's connection to.

    Each journal look-up runs the CLI; `keepalive` gets a NOOP in between so that its
    session does not reach the inactivity timeout meanwhile.
    """

    def handed() -> list[dict]:
        assert keepalive.cmd("NOOP") == b"+OK"
        return journal(host, "JH", entry="pop-server", ip=source_ip)

    [record] = wait_for(handed, what=f"JH record for {source_ip}")
    job = record["job"]
    assert job.startswith("pop-server/")
    assert keepalive.cmd("NOOP") == b"+OK"
    started = journal(host, "JS", job=job, entry="pop-server")
    assert started, f"no JS record for {job}"
    return job, int(started[-1]["pid"])


def test_maildrop_lock_released_on_quit_disconnect_and_kill(pop_host: Host) -> None:
    add_user(pop_host, "lena")
    deliver(pop_host, "lena", b"Subject: locked\r\n\r\nbody\r\n")

    # Two free jobs, so no session idles towards the inactivity timeout while the other
    # waits for a job to start.
    pop_host.wait_jobs({"pop-server": 2})

    # 1. QUIT releases the lock.
    first = RawPop(pop_host)
    assert first.login("lena").startswith(b"+OK maildrop has 1 message")
    second = RawPop(pop_host)
    assert second.login("lena") == b"-ERR [IN-USE] maildrop already locked"
    assert second.cmd("NOOP").startswith(b"-ERR")  # still in AUTHORIZATION: session goes on
    assert first.cmd("QUIT").startswith(b"+OK")
    first.close()
    assert second.login("lena").startswith(b"+OK maildrop has 1 message")

    # 2. Dropping the connection without QUIT releases it too.
    third = RawPop(pop_host)
    assert third.login("lena") == b"-ERR [IN-USE] maildrop already locked"
    second.close()
    third.close()
    fourth = login_when_free(pop_host, "lena")

    # 3. kill -9 of the job holding it: the kernel drops the flock with the process.
    fourth.cmd("QUIT")
    fourth.close()
    pop_host.wait_jobs({"pop-server": 2})
    holder = RawPop(pop_host, source_ip="127.0.0.31")
    assert holder.login("lena").startswith(b"+OK"), "the maildrop should be free"
    job, pid = pop_job_for(pop_host, "127.0.0.31", keepalive=holder)
    blocked = RawPop(pop_host)
    assert blocked.login("lena") == b"-ERR [IN-USE] maildrop already locked"
    assert holder.cmd("NOOP") == b"+OK"
    os.kill(pid, signal.SIGKILL)
    # The dead job's socket is gone: the client sees the connection close.
    assert holder.file.readline() == b""
    holder.close()
    blocked.close()
    after = login_when_free(pop_host, "lena")
    assert after.cmd("STAT").startswith(b"+OK 1 ")
    assert after.cmd("QUIT").startswith(b"+OK")
    after.close()
    wait_for(lambda: journal(pop_host, "JE", job=job), what=f"JE record for killed {job}")
    assert len(pop_host.maildir_files("lena")) == 1


def test_no_quit_and_inactivity_timeout_delete_nothing(pop_host: Host) -> None:
    add_user(pop_host, "carl")
    files = deliver(pop_host, "carl", b"Subject: keep me\r\n\r\nbody\r\n")

    # DELE, then the client just goes away: RFC 1939 6, no UPDATE state, nothing removed.
    pop = RawPop(pop_host)
    assert pop.login("carl").startswith(b"+OK")
    assert pop.cmd("DELE 1") == b"+OK message 1 deleted"
    pop.close()
    pop = login_when_free(pop_host, "carl")
    assert pop.cmd("STAT").startswith(b"+OK 1 ")

    # DELE, then silence: the server closes without a reply and removes nothing.
    assert pop.cmd("DELE 1") == b"+OK message 1 deleted"
    pop.sock.settimeout(INACTIVITY_TIMEOUT * 10)
    assert pop.file.read() == b"", "the server must close without sending anything"
    pop.close()

    pop = login_when_free(pop_host, "carl")
    assert pop.cmd("STAT").startswith(b"+OK 1 ")
    assert pop.cmd("QUIT") == b"+OK mail.example.test POP3 server signing off (1 message left)"
    pop.close()
    assert [f.name.split(":")[0] for f in pop_host.maildir_files("carl")] == \
        [f.name.split(":")[0] for f in files]
    assert journal(pop_host, "DD", user="carl") == []


def test_uidl_top_and_sizes(pop_host: Host) -> None:
    add_user(pop_host, "dora")
    plain = b"Subject: plain\r\nX-Test: 1\r\n\r\nb1\r\nb2\r\nb3\r\n"
    dotted = b"Subject: dotted\r\n\r\n.starts with a dot\r\n..two dots\r\n.\r\nend\r\n"
    bare_lf = b"Subject: bare\r\n\r\nline one\nline two\nline three\r\n"
    files = deliver(pop_host, "dora", plain, dotted, bare_lf)
    stored = {f.name.split(":")[0].encode(): f.read_bytes() for f in files}
    assert any(re.search(rb"[^\r]\n", m) for m in stored.values()), \
        "the bare-LF message should be stored with bare LFs"

    pop = RawPop(pop_host)
    assert pop.login("dora").startswith(b"+OK maildrop has 3 messages")
    uids = uidl(pop)
    sizes = listing(pop)
    assert set(uids.values()) == set(stored), "UIDL is the Maildir base name"
    for uid in uids.values():
        assert UID_RE.fullmatch(uid), uid
    assert len(set(uids.values())) == 3
    for n, uid in uids.items():
        assert pop.cmd(f"UIDL {n}") == b"+OK %d %s" % (n, uid)
        assert pop.cmd(f"LIST {n}") == b"+OK %d %d" % (n, sizes[n])
    assert pop.cmd("STAT") == b"+OK 3 %d" % sum(sizes.values())

    by_subject: dict[bytes, int] = {}
    for n, uid in uids.items():
        status, raw = pop.multi(f"RETR {n}")
        expected = crlf(stored[uid])
        assert b"\n" not in raw.replace(b"\r\n", b""), "RETR must send CRLF lines only"
        assert unstuff(raw) == expected
        assert sizes[n] == len(expected) == len(unstuff(raw))
        assert status == b"+OK %d octets" % sizes[n]
        by_subject[re.search(rb"Subject: (\w+)", expected).group(1)] = n

    # Byte-stuffing: every line starting with "." went out with one more ".".
    _, raw = pop.multi(f"RETR {by_subject[b'dotted']}")
    assert b"\r\n..starts with a dot\r\n...two dots\r\n..\r\nend\r\n" in raw

    # TOP n k: the headers, the blank line, then k body lines (all of them if k is larger).
    n = by_subject[b"plain"]
    whole = crlf(stored[uids[n]])
    head = whole[: whole.index(b"\r\n\r\n") + 4]
    assert pop.multi(f"TOP {n} 0")[1] == head
    assert pop.multi(f"TOP {n} 2")[1] == head + b"b1\r\nb2\r\n"
    assert pop.multi(f"TOP {n} 3")[1] == whole
    assert pop.multi(f"TOP {n} 1000")[1] == whole
    n = by_subject[b"dotted"]
    assert unstuff(pop.multi(f"TOP {n} 1")[1]).endswith(b"\r\n\r\n.starts with a dot\r\n")
    assert pop.cmd("QUIT").startswith(b"+OK")
    pop.close()

    # The same uids in a later session (new/ -> cur/ renames kept the base name).
    pop = login_when_free(pop_host, "dora")
    assert uidl(pop) == uids
    assert listing(pop) == sizes
    assert pop.cmd("QUIT").startswith(b"+OK")
    pop.close()


def test_bad_arguments_keep_the_session(pop_host: Host) -> None:
    add_user(pop_host, "eve")
    deliver(pop_host, "eve", b"Subject: args\r\n\r\nbody\r\n")
    pop = RawPop(pop_host)
    assert pop.login("eve").startswith(b"+OK maildrop has 1 message")
    for bad in ("RETR 0", "RETR -1", "RETR abc", "RETR 99999999999999999999", "TOP 1 -1",
                "LIST 999", "TOP 1"):
        reply = pop.cmd(bad)
        assert reply.startswith(b"-ERR "), (bad, reply)
        assert pop.cmd("NOOP") == b"+OK", f"session ended after {bad!r}"
    _, raw = pop.multi("RETR 1")
    assert b"Subject: args" in raw
    assert pop.cmd("QUIT") == b"+OK mail.example.test POP3 server signing off (1 message left)"
    pop.close()


def test_failed_logins_same_reply_journaled_and_slower(pop_host: Host) -> None:
    add_user(pop_host, "gina")

    # Wrong password and unknown user: the same reply, both journaled (DF).
    pop = RawPop(pop_host, source_ip="127.0.0.41")
    wrong = pop.login("gina", "not-the-password")
    unknown = pop.login("nosuchuser", PASSWORD)
    assert wrong == unknown == b"-ERR [AUTH] authentication failed"
    pop.close()
    wait_for(lambda: journal(pop_host, "DF", ip="127.0.0.41", user="gina")
             and journal(pop_host, "DF", ip="127.0.0.41", user="nosuchuser"),
             what="DF records for both failures")

    # Repeated failures from one address: the k-th waits at least base * 2**(k-1). Only a
    # lower bound is asserted: the behaviour is "slower", not a timing of the machine.
    ip = "127.0.0.42"
    pop = RawPop(pop_host, source_ip=ip)
    for k in range(1, 6):
        assert pop.cmd("USER gina").startswith(b"+OK")
        start = time.monotonic()
        assert pop.cmd("PASS wrong") == b"-ERR [AUTH] authentication failed"
        assert time.monotonic() - start >= AUTH_FAIL_DELAY * 2 ** (k - 1)
    pop.close()

    # The count belongs to the address, not the connection: the 6th failure, on a new
    # connection, waits >= 1.6 s. Meanwhile a good login from the same address, started
    # later on another connection, is answered first: it is not slowed. (Two free jobs
    # first, so the good one does not wait for a job to start.)
    pop_host.wait_jobs({"pop-server": 2})
    bad = RawPop(pop_host, source_ip=ip)
    assert bad.cmd("USER gina").startswith(b"+OK")
    start = time.monotonic()
    bad.send("PASS wrong")
    good = RawPop(pop_host, source_ip=ip)
    assert good.login("gina").startswith(b"+OK maildrop has 0 messages")
    assert not bad.readable(), "the good login should finish while the bad one still waits"
    assert bad.line() == b"-ERR [AUTH] authentication failed"
    assert time.monotonic() - start >= AUTH_FAIL_DELAY * 2 ** 5
    assert good.cmd("QUIT").startswith(b"+OK")
    assert bad.cmd("QUIT").startswith(b"+OK")
    good.close()
    bad.close()
    wait_for(lambda: len(journal(pop_host, "DF", ip=ip)) == 6, what="six DF records")


def test_journal_login_retrieve_delete(pop_host: Host) -> None:
    add_user(pop_host, "jane")
    deliver(pop_host, "jane", b"Subject: j1\r\n\r\none\r\n", b"Subject: j2\r\n\r\ntwo\r\n")
    pop = RawPop(pop_host, source_ip="127.0.0.51")
    assert pop.login("jane").startswith(b"+OK maildrop has 2 messages")
    uids = uidl(pop)
    sizes = listing(pop)
    pop.multi("RETR 1")
    pop.multi("RETR 2")
    pop.multi("TOP 2 0")  # TOP is not a retrieval: no DR for it
    assert pop.cmd("DELE 2").startswith(b"+OK")
    assert pop.cmd("QUIT").startswith(b"+OK")
    pop.close()

    common = {"user": "jane", "ip": "127.0.0.51"}
    wait_for(lambda: journal(pop_host, "DD", **common), what="DD record")
    logins = journal(pop_host, "DL", **common)
    assert len(logins) == 1 and logins[0]["job"].startswith("pop-server/")
    retrieved = journal(pop_host, "DR", **common)
    assert sorted((r["detail"], r["size"]) for r in retrieved) == \
        sorted((uids[n].decode(), sizes[n]) for n in (1, 2))
    deleted = journal(pop_host, "DD", **common)
    assert [(r["detail"], r["size"]) for r in deleted] == [(uids[2].decode(), sizes[2])]
    # In order: login, then retrievals, then the deletion at QUIT.
    seqs = [r["seq"] for r in (*logins, *retrieved, *deleted)]
    assert seqs == sorted(seqs)


def test_connections_go_through_the_pop_server_pool(pop_host: Host) -> None:
    def accepted() -> int:
        res = pop_host.cli("pool", "show", "pop-server", "--json")
        entries = json.loads(res.stdout)["entries"]
        assert list(entries) == ["pop-server"]
        return int(entries["pop-server"]["accepted"])

    before = accepted()
    ips = [f"127.0.0.{n}" for n in (61, 62, 63)]
    for ip in ips:
        pop = RawPop(pop_host, source_ip=ip)
        assert pop.greeting == b"+OK mail.example.test POP3 server ready"
        assert pop.cmd("QUIT") == b"+OK mail.example.test POP3 server signing off"
        pop.close()
    for ip in ips:
        [handed] = wait_for(lambda ip=ip: journal(pop_host, "JH", ip=ip), what=f"JH for {ip}")
        assert handed["entry"] == "pop-server" and handed["job"].startswith("pop-server/")
    assert wait_for(lambda: accepted() >= before + 3, what="accepted count") and \
        accepted() == before + 3


def test_unusable_mailbox_is_a_temporary_error(pop_host: Host) -> None:
    add_user(pop_host, "hank")
    # The mailbox path is taken by a file: the maildrop cannot be opened.
    (pop_host.data / "mailboxes" / "hank").write_text("not a Maildir")
    pop = RawPop(pop_host, source_ip="127.0.0.71")
    reply = pop.login("hank")
    assert reply.startswith(b"-ERR [SYS/TEMP] cannot open maildrop"), reply
    _, caps = pop.multi("CAPA")  # the session goes on
    assert b"UIDL\r\n" in caps
    assert pop.cmd("QUIT").startswith(b"+OK")
    pop.close()
    [handed] = wait_for(lambda: journal(pop_host, "JH", ip="127.0.0.71"), what="JH record")
    assert journal(pop_host, "JE", job=handed["job"]) == [], "the job must not crash"
    assert journal(pop_host, "DL", user="hank") == []


def test_duplicate_maildir_base_names_get_unique_uids(pop_host: Host) -> None:
    add_user(pop_host, "ivy")
    deliver(pop_host, "ivy", b"Subject: twin\r\n\r\nbody\r\n")
    pop = RawPop(pop_host)
    assert pop.login("ivy").startswith(b"+OK maildrop has 1 message")
    assert pop.cmd("QUIT").startswith(b"+OK")
    pop.close()
    # A copied Maildir file: same base name, other flags.
    [original] = pop_host.maildir_files("ivy")
    assert original.parent.name == "cur" and original.name.endswith(":2,")
    shutil.copyfile(original, original.with_name(original.name + "S"))

    pop = login_when_free(pop_host, "ivy")
    uids = uidl(pop)
    assert len(uids) == 2 and len(set(uids.values())) == 2
    assert all(UID_RE.fullmatch(u) for u in uids.values())
    for n in uids:
        assert b"Subject: twin" in pop.multi(f"RETR {n}")[1]
    assert pop.cmd("QUIT").startswith(b"+OK")
    pop.close()
