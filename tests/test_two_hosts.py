"""Two mailpool hosts (127.0.0.2 and 127.0.0.3) sharing a PostgreSQL directory and one
mailbox root, each with its own spool: what a site with two MX hosts relies on."""

from __future__ import annotations

import email
import json
import poplib
import smtplib
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import HostFactory, TrackedHost
from dnsserver import DnsServer
from hosthelp import MAILPOOL, wait_for
from outhelp import outbound_config

CACHE_TTL = 2.0


def _config(ip: str, dsn: str, mailboxes: Path) -> str:
    return f"""
[listen]
smtp = "{ip}:0"
pop3 = "{ip}:0"
admin = "{ip}:0"

[paths]
mailboxes = "{mailboxes}"

[directory]
backend = "postgresql"
dsn = "{dsn}"
cache_ttl = {CACHE_TTL}
connect_timeout = 2.0
query_timeout = 2.0

[pool.smtp-server]
initial_jobs = 1

[pool.pop-server]
initial_jobs = 1

[pop3]
allow_cleartext_login = true
"""


@pytest.fixture
def site(host: HostFactory, pg_dsn: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    boxes = tmp_path / "shared-mailboxes"
    a = host(_config("127.0.0.2", pg_dsn, boxes), name="mx-a")
    b = host(_config("127.0.0.3", pg_dsn, boxes), name="mx-b")
    yield {"a": a, "b": b, "boxes": boxes}


def delivered(boxes: Path, user: str) -> list[Path]:
    box = boxes / user
    return sorted([*(box / "new").glob("*"), *(box / "cur").glob("*")])


def send(h: TrackedHost, rcpt: str, subject: str) -> None:
    with smtplib.SMTP(*h.smtp, timeout=20) as s:
        s.sendmail("sender@remote.test", [rcpt],
                   f"From: sender@remote.test\r\nTo: {rcpt}\r\nSubject: {subject}\r\n"
                   f"Message-ID: <{subject}@remote.test>\r\n\r\nbody of {subject}\r\n")


def rcpt_reply(h: TrackedHost, rcpt: str) -> tuple[int, bytes]:
    with smtplib.SMTP(*h.smtp, timeout=20) as s:
        s.ehlo("client.test")
        s.mail("sender@remote.test")
        return s.rcpt(rcpt)


def test_hosts_listen_on_their_own_addresses(site: dict[str, Any]) -> None:
    assert site["a"].smtp[0] == "127.0.0.2"
    assert site["b"].smtp[0] == "127.0.0.3"
    assert site["a"].data != site["b"].data  # each its own spool


def test_user_added_on_one_host_receives_through_the_other_at_once(
        site: dict[str, Any]) -> None:
    a, b, boxes = site["a"], site["b"], site["boxes"]
    # b looks the address up first: a miss is never cached, so the add is seen at once.
    assert rcpt_reply(b, "carol@example.test")[0] == 550
    a.add_user("carol", "carol@example.test", password="pw-carol")
    send(b, "carol@example.test", "via-b")
    files = wait_for(lambda: delivered(boxes, "carol"), what="carol's message")
    assert b"body of via-b" in files[0].read_bytes()
    assert not (a.data / "mailboxes").exists() or not any((a.data / "mailboxes").iterdir())
    # ... and is read on the other host, over POP3, with the password set on the first.
    pop = poplib.POP3(*a.pop3, timeout=20)
    try:
        pop.user("carol")
        pop.pass_("pw-carol")
        assert pop.stat()[0] == 1
        msg = email.message_from_bytes(b"\r\n".join(pop.retr(1)[1]))
        assert msg["Subject"] == "via-b"
    finally:
        pop.quit()


def test_removed_user_is_refused_on_both_hosts_within_the_cache_ttl(
        site: dict[str, Any]) -> None:
    a, b = site["a"], site["b"]
    a.add_user("dave", "dave@example.test")
    for h in (a, b):  # both jobs now hold dave in their caches
        assert rcpt_reply(h, "dave@example.test")[0] == 250
    b.cli("user", "remove", "dave")
    removed = time.monotonic()

    def refused_on_both() -> bool:
        return all(rcpt_reply(h, "dave@example.test")[0] == 550 for h in (a, b))

    wait_for(refused_on_both, timeout=CACHE_TTL + 10, what="dave refused on both hosts")
    # The stated bound: cache_ttl (plus the time the probes themselves take).
    assert time.monotonic() - removed < CACHE_TTL + 5


def advisory_locks(pg_cluster: Any, dsn: str) -> int:
    return pg_cluster.sql(dsn, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                               "AND granted")[0][0]


def test_pop3_on_one_host_locks_the_maildrop_against_the_other(
        site: dict[str, Any], pg_cluster: Any, pg_dsn: str) -> None:
    a, b = site["a"], site["b"]
    a.add_user("erin", "erin@example.test", password="pw-erin")
    first = poplib.POP3(*a.pop3, timeout=20)
    first.user("erin")
    first.pass_("pw-erin")
    # The lock is the database's, not only the flock both hosts see on this one disk.
    assert advisory_locks(pg_cluster, pg_dsn) == 1
    second = poplib.POP3(*b.pop3, timeout=20)
    second.user("erin")
    with pytest.raises(poplib.error_proto, match=r"IN-USE"):
        second.pass_("pw-erin")
    second.quit()
    first.quit()  # the lock goes with the session ...
    wait_for(lambda: advisory_locks(pg_cluster, pg_dsn) == 0, what="the advisory lock freed")
    again = poplib.POP3(*b.pop3, timeout=20)
    try:
        again.user("erin")
        assert again.pass_("pw-erin").startswith(b"+OK")  # ... so the other host may open it
    finally:
        again.quit()


def test_database_down_answers_temporary_failures_then_recovers(
        site: dict[str, Any], pg_cluster: Any) -> None:
    a, b = site["a"], site["b"]
    a.add_user("hal", "hal@example.test", password="pw-hal")
    with pg_cluster.stopped():
        time.sleep(CACHE_TTL + 0.5)  # nothing of hal left in any cache
        code, text = rcpt_reply(b, "hal@example.test")
        assert (code, text.split()[0]) == (451, b"4.3.0")
        pop = poplib.POP3(*a.pop3, timeout=20)
        pop.user("hal")
        with pytest.raises(poplib.error_proto, match=r"SYS/TEMP"):
            pop.pass_("pw-hal")
        pop.quit()
    wait_for(lambda: rcpt_reply(b, "hal@example.test")[0] == 250, timeout=30,
             what="RCPT accepted again")
    pop = poplib.POP3(*a.pop3, timeout=20)
    try:
        pop.user("hal")
        assert pop.pass_("pw-hal").startswith(b"+OK")
    finally:
        pop.quit()


def test_database_down_mid_load_loses_nothing_and_refuses_nothing_for_good(
        site: dict[str, Any], pg_cluster: Any) -> None:
    a, b, boxes = site["a"], site["b"], site["boxes"]
    a.add_user("fay", "fay@example.test")
    accepted: list[str] = []
    permanent: list[str] = []
    temporary: list[str] = []
    stop = threading.Event()

    def load(h: TrackedHost, tag: str) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            subject = f"{tag}-{n}"
            try:
                send(h, "fay@example.test", subject)
            except smtplib.SMTPRecipientsRefused as exc:
                code = next(iter(exc.recipients.values()))[0]
                (permanent if code >= 500 else temporary).append(f"{subject}: {code}")
            except smtplib.SMTPResponseException as exc:
                (permanent if exc.smtp_code >= 500 else temporary).append(
                    f"{subject}: {exc.smtp_code}")
            else:
                accepted.append(subject)
            time.sleep(0.05)

    threads = [threading.Thread(target=load, args=(h, tag)) for h, tag in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(accepted) >= 6, what="mail flowing before the outage")
        with pg_cluster.stopped():
            # Longer than the cache: the directory itself is asked while it is down.
            time.sleep(CACHE_TTL + 2.5)
        wait_for(lambda: len(accepted) >= len(set(accepted)) and
                 any(s for s in accepted[-3:]), what="mail flowing after the outage")
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not permanent, f"permanent refusals during the outage: {permanent}"
    assert temporary, "the outage was never seen (no temporary failure)"
    # Everything accepted, on either host, ends up in the shared mailbox exactly once.
    def subjects() -> list[str]:
        return [email.message_from_bytes(p.read_bytes())["Subject"]
                for p in delivered(boxes, "fay")]

    wait_for(lambda: len(subjects()) >= len(accepted), timeout=60,
             what=f"{len(accepted)} accepted messages delivered")
    got = subjects()
    assert sorted(got) == sorted(accepted)
    # The outage is journaled (PU) by the jobs that met it.
    codes = {r["code"] for h in (a, b) for r in h.journal("--code", "PU")}
    assert codes == {"PU"}


def test_one_trace_from_the_host_that_accepted_to_the_host_that_delivered(
        site: dict[str, Any], host: HostFactory) -> None:
    """An edge host (its own domain and file directory) relays to mx-a over SMTP as any
    MX would; `journal dump --journal ... --message-id` reads both journals as one."""
    a, boxes = site["a"], site["boxes"]
    a.add_user("gus", "gus@example.test")
    with DnsServer() as dns:
        dns.add("example.test", "MX", "10 mx-a.example.test.")
        dns.add("mx-a.example.test", "A", "127.0.0.2")
        edge = host(outbound_config(dns.port, a.smtp[1], """
[host]
local_domains = ["edge.test"]

[listen]
smtp = "127.0.0.4:0"
pop3 = "127.0.0.4:0"
admin = "127.0.0.4:0"
"""), name="edge")
        with smtplib.SMTP(*edge.smtp, timeout=20) as s:
            s.sendmail("ann@edge.test", ["gus@example.test"],
                       "From: ann@edge.test\r\nTo: gus@example.test\r\nSubject: trace\r\n"
                       "Message-ID: <trace-1@edge.test>\r\n\r\nacross two hosts\r\n")
        wait_for(lambda: delivered(boxes, "gus"), timeout=30, what="gus's message")
    args = [*MAILPOOL, "journal", "dump", "--config", str(a.config_path), "--format", "json",
            "--journal", f"edge={edge.data / 'journal'}", "--journal", f"mx-a={a.data / 'journal'}",
            "--message-id", "<trace-1@edge.test>"]

    def trace() -> list[tuple[str, str]]:
        out = subprocess.run(args, capture_output=True, text=True, timeout=60, check=True)
        return [(o["host"], o["code"]) for o in map(json.loads, out.stdout.splitlines())]

    # The edge's journal is written a moment after its delivery (C2 once the reply is in).
    steps = wait_for(lambda: (t := trace()) and ("edge", "C2") in t and t, what="edge's C2")
    # Accepted on the edge (95: relayed mail), handed to the SMTP client there (C1), then
    # received on mx-a (94) and delivered there (B2), last.
    assert steps[0] == ("edge", "95")
    assert [code for h, code in steps if h == "mx-a"][-1] == "B2"
    assert steps.index(("edge", "C1")) < steps.index(("mx-a", "94"))
    assert {h for h, _ in steps} == {"edge", "mx-a"}
